"""GPU benchmark of the Stable-Diffusion-shaped U-Nets and their training-free acceleration: writes
``diffusion_gpu.json`` and ``diffusion_gpu.md`` (default ``docs/benchmarks/``).

Every model runs in fp16 (weights and activations) under ``torch.inference_mode()``, batch 8, on random
inputs: 4x64x64 latents and 77x768 text states for the text-conditioned U-Nets.
(a) ``step``: median ms of one forward of each of ``unet-sd15`` (Stable Diffusion 1.5's U-Net), BK-SDM's
    ``unet-bk-base`` / ``unet-bk-small`` / ``unet-bk-tiny`` (blocks removed from it) and, as an extra row
    without a target, ``dit-xl2`` on its native 4x32x32 latent with class labels. ``vs_sd15`` = a row's
    ms over unet-sd15's (same run, same latent; none for DiT). Targets: bk-small <= 0.70x sd15, bk-tiny
    <= 0.60x (SD1.5-config measured 30.0 ms on an H200, eager).
(b) ``sampling``: seconds per batch of 50-step DDIM sampling with unet-sd15 (Stable Diffusion's scheduler
    settings, classifier-free guidance 7.5: every step runs the U-Net on the text and the empty-prompt
    states, 2 x 8 samples), plain, with DeepCache (``zoo.acceleration.deepcache``, interval 3, branch 0 as
    DeepCache's default: every third step runs the whole U-Net, the others conv_in, the last up pair and conv_out
    on the cached features; also interval 5, and branch 1, which adds the first down pair and the up pair taking
    its output) and with ToMe-SD (``zoo.acceleration.tome_sd``, ratio 0.5 at
    the 64x64 attention level). ``speedup`` = plain's time over the row's (same run). Targets: DeepCache
    >= 2x; ToMe-SD >= 1.2x.

Failures (out of memory, a refused acceleration) are reported in their row (``error``); the run goes on.

    python scripts/bench_diffusion_gpu.py [--out DIR] [--only step|sampling]
    python scripts/bench_diffusion_gpu.py --only sampling --methods tome_sd --attention-backend math --latent 64
        # the sampling section in another setting (written as diffusion_gpu_sampling_math_latent64.*): here the
        # ToMe-SD paper's, attention without a fused kernel
    python scripts/bench_diffusion_gpu.py --smoke --out DIR   # CPU, toy-width U-Nets of the same layouts
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling scripts, as top-level modules

import torch

from bench_ssm_gpu import fmt, guarded, ratio, say, yes_no
from bench_vit_gpu import target_text
from zoo.acceleration import deepcache, remove, tome_sd
from zoo.bench import interleaved_median_ms, markdown_table, median_ms, write_report
from zoo.models.diffusion import CLASS_LABELS, AttentionBackend, DiffusionBackbone
from zoo.registry import create_model

STEP_TARGETS = {"unet-bk-small": 0.70, "unet-bk-tiny": 0.60}  # ms over unet-sd15's, at most
SAMPLING_TARGETS = {"deepcache": 2.0, "tome_sd": 1.2}  # speed-up over plain sampling, at least
# Stable Diffusion 1.5's DDIM settings (its scheduler_config.json)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
# Stable Diffusion's layout at toy width (16x16 latent, 24-wide text states); bk-tiny drops the 4th stage
TOY_SD = dict(block_out_channels=(32, 32, 64, 64), sample_size=16, cross_attention_dim=24, norm_num_groups=8,
              attention_head_dim=4)

PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(device="cuda", dtype=torch.float16, batch=8, text_tokens=77, step_timing=(5, 20),
                step_models={"unet-sd15": {}, "unet-bk-base": {}, "unet-bk-small": {}, "unet-bk-tiny": {}, "dit-xl2": {}},
                sampling_model=("unet-sd15", {}), steps=50, guidance=7.5, sampling_timing=(1, 3)),
    "smoke": dict(device="cpu", dtype=torch.float32, batch=2, text_tokens=7, step_timing=(0, 1),
                  step_models={"unet-sd15": TOY_SD, "unet-bk-base": TOY_SD, "unet-bk-small": TOY_SD,
                               "unet-bk-tiny": {**TOY_SD, "block_out_channels": (32, 32, 64)},
                               "dit-s2": dict(depth=1, dim=64, num_heads=2, input_size=8)},
                  sampling_model=("unet-sd15", TOY_SD), steps=3, guidance=7.5, sampling_timing=(0, 1)),
}
# sampling rows after plain: method -> (apply, options); the targets judge "deepcache" and "tome_sd" (the
# defaults: branch 0, self-attention merged at the 64x64 level only); the other rows show what the options give
ACCELERATIONS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "deepcache": (deepcache, dict(interval=3)), "deepcache_i5": (deepcache, dict(interval=5)),
    "deepcache_b1": (deepcache, dict(interval=3, branch=1)),
    "tome_sd": (tome_sd, dict(ratio=0.5)),
    "tome_sd_all": (tome_sd, dict(ratio=0.5, merge_crossattn=True, merge_mlp=True)),
    "tome_sd_all_md2": (tome_sd, dict(ratio=0.5, max_downsample=2, merge_crossattn=True, merge_mlp=True))}


def build(name: str, overrides: dict[str, Any], p: dict[str, Any]) -> DiffusionBackbone:
    with torch.device(p["device"]):
        return create_model(name, **overrides).to(p["dtype"]).eval()


def random_cond(model: DiffusionBackbone, batch: int, p: dict[str, Any]) -> torch.Tensor:
    """Text states [batch, text_tokens, width] for a text-conditioned model, else class labels [batch]."""
    if model.cond_kind == CLASS_LABELS:
        return torch.arange(batch, device=p["device"]) % model.null_class
    return torch.randn(batch, p["text_tokens"], model.config.cross_attention_dim, device=p["device"], dtype=p["dtype"])


# --- (a) one denoising step ---------------------------------------------------------------------------------


def step_call(name: str, overrides: dict[str, Any], p: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], None]]:
    """The model's counts and one inference forward at timestep 500 on a fixed batch."""
    model = build(name, overrides, p)
    x = torch.randn(p["batch"], *model.sample_shape, device=p["device"], dtype=p["dtype"])
    cond = random_cond(model, p["batch"], p)

    def run():
        with torch.inference_mode():
            model(x, 500, cond)

    return {"params": model.num_params(), "latent": list(model.sample_shape)}, run


def step_rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model resident, their steps timed in turns (:func:`zoo.bench.interleaved_median_ms`): timed one after
    the other on a freshly started H200, the first model's step read 42.5 ms where it had read 28.5 ms."""
    device, rows, runs = torch.device(p["device"]), [], {}
    for name, overrides in p["step_models"].items():
        row = {"section": "step", "model": name, "overrides": overrides, "batch": p["batch"], "params": None,
               "latent": None, "ms": None, "error": None}

        def measure(name=name, overrides=overrides):
            counts, runs[name] = step_call(name, overrides, p)
            return counts

        rows.append(guarded(row, device, measure))
    times = interleaved_median_ms(runs, device, *p["step_timing"], before=lambda: None) if runs else {}
    for row in rows:
        row["ms"] = times.get(row["model"])
        say(f"step {row['model']:<14} " + (f"{row['ms']:9.2f} ms  latent {row['latent']}" if row["error"] is None
                                           else row["error"]))
    sd15 = next(r for r in rows if r["model"] == "unet-sd15")
    for row in rows:
        same_latent = row["latent"] is not None and row["latent"] == sd15["latent"]
        row["vs_sd15"] = ratio(row["ms"], sd15["ms"]) if same_latent else None
        row["target"] = STEP_TARGETS.get(row["model"])
        row["meets_target"] = None if row["target"] is None or row["vs_sd15"] is None else row["vs_sd15"] <= row["target"]
    return rows


# --- (b) sampling -------------------------------------------------------------------------------------------


@torch.inference_mode()
def sample_latents(model: DiffusionBackbone, text: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance: ``text`` holds the prompts' states then the empty prompt's."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD_SCHEDULER)
    scheduler.set_timesteps(steps, device=text.device)
    x = torch.randn(text.shape[0] // 2, *model.sample_shape, device=text.device, dtype=text.dtype)
    for t in scheduler.timesteps:
        conditional, unconditional = model(torch.cat([x, x]), t, text).chunk(2)
        x = scheduler.step(unconditional + guidance * (conditional - unconditional), t, x).prev_sample
    return x


def sampling_time(method: str, p: dict[str, Any]) -> dict[str, Any]:
    """Median seconds of one sampling run of a fresh (seeded) model with acceleration ``method`` applied, then removed."""
    torch.manual_seed(0)
    name, overrides = p["sampling_model"]
    model = build(name, overrides, p)
    text = random_cond(model, 2 * p["batch"], p)
    if method != "plain":
        apply, options = ACCELERATIONS[method]
        apply(model, **options)
    try:
        run = lambda: sample_latents(model, text, p["steps"], p["guidance"])
        return {"seconds": median_ms(run, torch.device(p["device"]), *p["sampling_timing"], before=lambda: None) / 1e3}
    finally:
        remove(model)


def sampling_rows(p: dict[str, Any], methods: list[str], judged: bool = True) -> list[dict[str, Any]]:
    """Plain sampling, then each of ``methods``; ``judged``: the targets apply (the default setting only)."""
    device, rows = torch.device(p["device"]), []
    for method in ("plain", *methods):
        options = ACCELERATIONS[method][1] if method != "plain" else {}
        row = {"section": "sampling", "model": p["sampling_model"][0], "method": method, "options": options,
               "batch": p["batch"], "steps": p["steps"], "guidance": p["guidance"], "seconds": None, "error": None}
        rows.append(guarded(row, device, lambda: sampling_time(method, p)))
        row["speedup"] = ratio(rows[0]["seconds"], row["seconds"])  # rows[0]: plain sampling
        row["target"] = SAMPLING_TARGETS.get(method) if judged else None
        row["meets_target"] = None if row["target"] is None or row["speedup"] is None else row["speedup"] >= row["target"]
        say(f"sampling {method:<16} {json.dumps(options):<18} " + (
            f"{row['seconds']:8.3f} s/batch  {fmt(row['speedup'])}x plain" if row["error"] is None else row["error"]))
    return rows


# --- report -------------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    parts = ["# Diffusion GPU benchmark\n", f"Card: **{report['device_name']}**; torch {report['torch']}; "
             f"diffusers {report['diffusers']}; {report['dtype']}, inference_mode, batch {report['batch']}.\n"]
    if "step" in report:
        parts += ["## One denoising step\n",
                  "vs sd15: ms over unet-sd15's, same run, same latent. Targets: the target column.\n",
                  markdown_table(("model", "overrides", "params", "latent", "ms", "vs sd15", "target", "target met", "error"), (
                      (r["model"], json.dumps(r["overrides"]) if r["overrides"] else "", fmt(r["params"], ",d"),
                       "x".join(map(str, r["latent"] or [])), fmt(r["ms"], ".2f"), fmt(r["vs_sd15"], ".3f"),
                       target_text(r["target"], "<="), yes_no(r["meets_target"]), r["error"] or "")
                      for r in report["step"]))]
    if "sampling" in report:
        rows = report["sampling"]
        setting = "".join(f", {k} {v}" for k, v in report.get("sampling_setting", {}).items())
        parts += [f"## Sampling ({rows[0]['model']}{setting}, {rows[0]['steps']} DDIM steps, guidance {rows[0]['guidance']})\n",
                  "speedup: plain's seconds over the row's, same run. Targets: the target column"
                  + (" (judged in the default setting only).\n" if setting else ".\n"),
                  markdown_table(("method", "options", "s/batch", "speedup", "target", "target met", "error"), (
                      (r["method"], json.dumps(r["options"]) if r["options"] else "", fmt(r["seconds"], ".3f"),
                       fmt(r["speedup"]), target_text(r["target"], ">="), yes_no(r["meets_target"]), r["error"] or "")
                      for r in rows))]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy-width models, fp32: check the script runs")
    parser.add_argument("--only", choices=("step", "sampling"), help="run one section")
    parser.add_argument("--methods", nargs="+", choices=tuple(ACCELERATIONS), default=list(ACCELERATIONS),
                        help="the sampling rows timed after plain (default: all)")
    parser.add_argument("--attention-backend", choices=get_args(AttentionBackend),
                        help="the sampling model's attention backend (default: the model's, auto)")
    parser.add_argument("--latent", type=int, help="the sampling model's latent size (default: the model's)")
    args = parser.parse_args(argv)
    setting = {k: v for k, v in (("attention_backend", args.attention_backend), ("sample_size", args.latent)) if v}
    if setting and args.only != "sampling":
        parser.error("--attention-backend and --latent set the sampling model: pass --only sampling")
    p = PRESETS["smoke" if args.smoke else "gpu"]
    name, overrides = p["sampling_model"]
    p = {**p, "sampling_model": (name, {**overrides, **setting})}
    if p["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run this on the GPU machine, or pass --smoke for the CPU check")
    import diffusers

    device_name = torch.cuda.get_device_name() if p["device"] == "cuda" else "cpu"
    say(f"diffusion benchmark on {device_name} (torch {torch.__version__}, diffusers {diffusers.__version__})"
        f"{' [smoke]' if args.smoke else ''}")
    report: dict[str, Any] = {"device_name": device_name, "torch": torch.__version__, "diffusers": diffusers.__version__,
                              "smoke": args.smoke, "dtype": str(p["dtype"]).removeprefix("torch."), "batch": p["batch"]}
    if args.only in (None, "step"):
        report["step"] = step_rows(p)
    if args.only in (None, "sampling"):
        report["sampling_setting"] = setting
        report["sampling"] = sampling_rows(p, args.methods, judged=not setting)
    stem = "_".join(["diffusion_gpu", *([args.only] if args.only else []),
                     *([args.attention_backend] if args.attention_backend else []),
                     *([f"latent{args.latent}"] if args.latent else [])])
    return write_report(report, args.out, stem, markdown)


if __name__ == "__main__":
    main()
