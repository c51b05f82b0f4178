"""GPU benchmark of ViT inference with token reduction: writes ``vit_gpu.json`` and ``vit_gpu.md``
(default ``docs/benchmarks/``).

Throughput (images/s) of forward passes under ``torch.inference_mode()`` and bf16 autocast (fp32 weights; with
``--bf16-weights``: weights and images in bf16, no autocast), batch 256 of random 224x224 images, median over the
timed batches. Rows, side by side in one run:
    ``timm``  timm's ``vit_base_patch16_224`` (``pretrained=False``, eval): the peer every ratio divides by;
    ``zoo``   ``create_model("vit-b16")``, no reduction;
    ``zoo``   vit-b16 with ``token_reduction=`` ToMe (``r`` tokens merged per block, r in 4, 8, 13, 16; at
              r = 16 the last block is clipped to 10, half the 20 tokens left), EViT (``keep_rate`` 0.9, 0.7,
              0.5 at blocks 3, 6, 9) and DynamicViT (``keep_rate`` 0.7 per stage; its predictor untrained: the
              speed does not depend on which tokens it keeps);
    ``timm``  the timm ViT patched in place with ToMe r = 16 (``zoo.patch``).
``vs_timm`` = a row's images/s over the plain timm row's. Targets: zoo vit-b16 >= 1.0x timm; vit-b16 + ToMe
r = 16 >= 1.9x; vit-b16 + EViT keep_rate 0.7 >= 1.4x (timm measured 10,829 img/s on an H200, eager).

Failures (out of memory, a failed compile) are reported in their row (``error``); the run goes on.

    python scripts/bench_vit_gpu.py [--out DIR] [--only baseline|tome|evit|dynamicvit|patch] [--compile] [--bf16-weights]
    python scripts/bench_vit_gpu.py --smoke --out DIR   # CPU, a tiny ViT
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling scripts, as top-level modules

import timm
import torch

import zoo
from bench_ssm_gpu import fmt, guarded, ratio, say, yes_no
from zoo.bench import markdown_table, median_ms, write_report
from zoo.registry import create_model

PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(device="cuda", autocast=torch.bfloat16, batch=256, timing=(10, 30),
                timm=("vit_base_patch16_224", {}), zoo=("vit-b16", {}),
                tome_r=(4, 8, 13, 16), evit_keep=(0.9, 0.7, 0.5), dynamicvit_keep=(0.7,), patch_r=16,
                # images/s over timm's, at least: zoo rows by their reduction ("" = none)
                targets={"": 1.0, "tome r=16": 1.9, "evit keep_rate=0.7": 1.4}),
    # vit-tiny (32x32 images, patch 4: 64 patches, 4 blocks) and timm's ViT built to the same shape
    "smoke": dict(device="cpu", autocast=None, batch=2, timing=(0, 1),
                  timm=("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, num_classes=10, embed_dim=128, depth=4,
                                                     num_heads=4)),
                  zoo=("vit-tiny", {}), tome_r=(2, 8), evit_keep=(0.7,), dynamicvit_keep=(0.7,), patch_r=8,
                  targets={"": 1.0, "tome r=8": 1.9, "evit keep_rate=0.7": 1.4}),  # the gpu targets on like rows
}
SECTIONS = ("baseline", "tome", "evit", "dynamicvit", "patch")


def cases(p: dict[str, Any], only: str | None) -> list[tuple[str, dict[str, Any] | None]]:
    """(impl, token-reduction spec) of every row: the plain timm row first (always: the ratios' base), then ``only``'s."""
    sections = {
        "baseline": [("zoo", None)],
        "tome": [("zoo", {"name": "tome", "r": r}) for r in p["tome_r"]],
        "evit": [("zoo", {"name": "evit", "keep_rate": k}) for k in p["evit_keep"]],
        "dynamicvit": [("zoo", {"name": "dynamicvit", "keep_rate": k}) for k in p["dynamicvit_keep"]],
        "patch": [("timm", {"name": "tome", "r": p["patch_r"]})],
    }
    return [("timm", None)] + [case for name in SECTIONS if only in (None, name) for case in sections[name]]


def reduction_label(spec: dict[str, Any] | None) -> str:
    """``{"name": "tome", "r": 16}`` -> ``"tome r=16"``; no reduction -> ``""``."""
    return "" if spec is None else " ".join([spec["name"], *(f"{k}={v}" for k, v in spec.items() if k != "name")])


def build(impl: str, spec: dict[str, Any] | None, p: dict[str, Any]) -> torch.nn.Module:
    with torch.device(p["device"]):
        if impl == "zoo":
            name, overrides = p["zoo"]
            return create_model(name, **overrides, token_reduction=spec).eval()
        name, kwargs = p["timm"]
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    return model if spec is None else zoo.patch(model, **spec)


def throughput(impl: str, spec: dict[str, Any] | None, p: dict[str, Any], compile: bool) -> dict[str, Any]:
    """Median ms per batch of inference forwards and the images/s it gives."""
    device = torch.device(p["device"])
    model = build(impl, spec, p).to(p["weights"])
    if compile:
        torch._dynamo.reset()  # a fresh compile per model, clear of the recompile limit
    forward = torch.compile(model) if compile else model
    size = model.config.img_size if impl == "zoo" else model.patch_embed.img_size[0]
    images = torch.randn(p["batch"], 3, size, size, device=device, dtype=p["weights"])
    autocast = torch.autocast(device.type, dtype=p["autocast"]) if p["autocast"] else nullcontext()

    def run():
        with torch.inference_mode(), autocast:
            forward(images)

    ms = median_ms(run, device, *p["timing"], before=lambda: None)
    return {"params": sum(t.numel() for t in model.parameters()), "ms": ms, "images_per_s": p["batch"] / (ms / 1e3)}


def vit_rows(p: dict[str, Any], only: str | None, compile: bool) -> list[dict[str, Any]]:
    device, rows = torch.device(p["device"]), []
    for impl, spec in cases(p, only):
        model = p[impl][0]
        row = {"impl": impl, "model": model, "reduction": reduction_label(spec), "batch": p["batch"], "compile": compile,
               "params": None, "ms": None, "images_per_s": None, "error": None}
        rows.append(guarded(row, device, lambda: throughput(impl, spec, p, compile)))
        row["vs_timm"] = ratio(row["images_per_s"], rows[0]["images_per_s"])  # rows[0]: the plain timm row
        row["target"] = p["targets"].get(row["reduction"]) if impl == "zoo" else None
        row["meets_target"] = None if row["target"] is None or row["vs_timm"] is None else row["vs_timm"] >= row["target"]
        say(f"{impl:<4} {model:<22} {row['reduction'] or 'none':<24} " + (
            f"{row['ms']:9.2f} ms/batch {row['images_per_s']:10,.0f} img/s {fmt(row['vs_timm'], '.3f')}x timm"
            if row["error"] is None else row["error"]))
    return rows


def target_text(value: float | None, relation: str) -> str:
    return "" if value is None else f"{relation} {value}x"


def markdown(report: dict[str, Any]) -> str:
    v = report["vit"]
    return "\n".join([
        "# ViT token-reduction GPU benchmark\n",
        f"Card: **{report['device_name']}**; torch {report['torch']}; timm {report['timm']}.\n",
        f"## Inference throughput (batch {v['batch']}, {v['img_size']}x{v['img_size']}, {v['weights']} weights, "
        f"autocast {v['autocast']}, inference_mode, compile={v['compile']})\n",
        "vs timm: images/s over the plain timm row's, same run. Targets (zoo rows): the target column, at least.\n",
        markdown_table(("impl", "model", "token reduction", "params", "ms/batch", "images/s", "vs timm", "target",
                        "target met", "error"), (
            (r["impl"], r["model"], r["reduction"] or "none", fmt(r["params"], ",d"), fmt(r["ms"], ".2f"),
             fmt(r["images_per_s"], ",.0f"), fmt(r["vs_timm"], ".3f"), target_text(r["target"], ">="),
             yes_no(r["meets_target"]), r["error"] or "") for r in v["rows"])),
    ])


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny ViT: check the script runs")
    parser.add_argument("--only", choices=SECTIONS, help="run one section (beside the plain timm row)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--bf16-weights", action="store_true", help="bf16 weights and images instead of autocast")
    args = parser.parse_args(argv)
    p = dict(PRESETS["smoke" if args.smoke else "gpu"], weights=torch.float32)
    if args.bf16_weights:
        p.update(weights=torch.bfloat16, autocast=None)
    if p["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run this on the GPU machine, or pass --smoke for the CPU check")
    device_name = torch.cuda.get_device_name() if p["device"] == "cuda" else "cpu"
    say(f"vit benchmark on {device_name} (torch {torch.__version__}, timm {timm.__version__})"
        f"{' [smoke]' if args.smoke else ''}")
    with torch.device("meta"):
        img_size = create_model(p["zoo"][0], **p["zoo"][1]).config.img_size
    report = {"device_name": device_name, "torch": torch.__version__, "timm": timm.__version__, "smoke": args.smoke,
              "vit": {"batch": p["batch"], "img_size": img_size, "autocast": str(p["autocast"]), "compile": args.compile,
                      "weights": str(p["weights"]).removeprefix("torch."),
                      "rows": vit_rows(p, args.only, args.compile)}}
    return write_report(report, args.out, "vit_gpu" if not args.only else f"vit_gpu_{args.only}", markdown)


if __name__ == "__main__":
    main()
