"""The spine's GPU benchmark: writes ``spine_gpu.json`` and ``spine_gpu.md`` (default ``docs/benchmarks/``).

(a) The ``attention`` mixer against raw SDPA (``zoo.peers.SDPAAttention``) in bf16 at T = 1k, 4k, 16k:
    the fwd+bwd time ratio ours/peer per T and regime (target <= 1.05).
(b) Full training steps of lm-125m and lm-350m against ``PlainGPT`` of the same shape at T = 1024 (fp32
    weights, bf16 autocast, torch.compile, fused AdamW from ``zoo.train.build_optimizer``, grad clip 1.0):
    tokens/s, MFU and the tokens/s ratio ours/plain (target >= 1.0). The two models alternate step by step
    (swapping order each step) so clock and thermal drift favour neither.

    python scripts/bench_spine_gpu.py [--batch lm-125m=16 --batch lm-350m=8] [--out DIR]
    python scripts/bench_spine_gpu.py --smoke --out DIR   # CPU, lm-tiny, T=64, 2 steps, no compile
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout

import torch
import torch.nn.functional as F

from zoo.bench import TIMERS, benchmark, format_table, markdown_table, release
from zoo.config import TrainConfig
from zoo.peers import plain_gpt_like
from zoo.registry import create_model
from zoo.tasks.lm import LanguageModeling
from zoo.train import build_optimizer

PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100 (and H200) SXM, FLOP/s
MFU_FORMULA = ("MFU = (6 * N_params_non_embedding + 12 * depth * dim * T) * tokens_per_s / 989e12"
               " (989 TFLOP/s: the H100/H200 SXM dense bf16 peak)")
ATTENTION_TARGET = 1.05  # ours/peer fwd+bwd time, at most
TRAINING_TARGET = 1.0  # ours/plain tokens per second, at least

PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(device="cuda", dtype="bfloat16", attention_seq_lens=(1024, 4096, 16384), attention_batch=None, dim=1024,
                num_heads=16, bench_warmup=3, bench_iters=10, batches={"lm-125m": 16, "lm-350m": 8}, seq_len=1024,
                warmup=3, steps=10, compile=True, autocast=torch.bfloat16),
    "smoke": dict(device="cpu", dtype="float32", attention_seq_lens=(64,), attention_batch=4, dim=64, num_heads=4,
                  bench_warmup=1, bench_iters=2, batches={"lm-tiny": 2}, seq_len=64, warmup=1, steps=2,
                  compile=False, autocast=None),
}


def say(text: str) -> None:
    print(text, flush=True)


def attention_section(p: dict[str, Any]) -> dict[str, Any]:
    """(a): benchmark the attention mixer next to raw SDPA; the ratio per T and regime against the target."""
    rows = benchmark(["attention"], device=p["device"], dtype=p["dtype"], seq_lens=p["attention_seq_lens"],
                     batch=p["attention_batch"], dim=p["dim"], num_heads=p["num_heads"], warmup=p["bench_warmup"],
                     iters=p["bench_iters"])
    ratios = [
        {"seq_len": r["seq_len"], "regime": r["regime"], "batch": r["batch"], "ratio": r["ratio_vs_peer"],
         "meets_target": r["ratio_vs_peer"] is not None and r["ratio_vs_peer"] <= ATTENTION_TARGET}
        for r in rows if r["impl"] == "ours"
    ]
    for r in ratios:
        say(f"attention T={r['seq_len']:>6} {r['regime']:<10} B={r['batch']:<3} ours/sdpa fwd+bwd = {fmt_ratio(r['ratio'])}"
            f" (target <= {ATTENTION_TARGET}: {'ok' if r['meets_target'] else 'MISSED'})")
    return {"target_max_ratio": ATTENTION_TARGET, "ratios": ratios, "rows": rows}


def fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


def train_step(model: torch.nn.Module, loss_fn: Callable[[dict], torch.Tensor], autocast: Callable,
               device: torch.device) -> Callable[..., None]:
    """``step(batch, accum=1)``: one full optimisation step as our trainer takes it: ``accum`` micro-batches'
    losses under autocast, each backward scaled by 1 / accum, then clip 1.0, fused AdamW, zero_grad."""
    optimizer = build_optimizer(model, TrainConfig(), device)

    def step(batch: dict, accum: int = 1) -> None:
        for _ in range(accum):
            with autocast():
                loss = loss_fn(batch)
            (loss / accum if accum > 1 else loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_pair(name: str, batch_size: int, p: dict[str, Any]) -> dict[str, Any]:
    """(b) for one model: time ours and PlainGPT, alternating step by step, and derive tokens/s, MFU and the ratio."""
    device, T = torch.device(p["device"]), p["seq_len"]
    autocast = (lambda: torch.autocast(device.type, dtype=p["autocast"])) if p["autocast"] else nullcontext
    wrap = torch.compile if p["compile"] else (lambda m: m)
    with torch.device(device):
        ours = create_model(name)
        plain = plain_gpt_like(ours)
    c = ours.config
    ids = torch.randint(0, c.vocab_size, (batch_size, T + 1), device=device)
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
    ours_fwd, plain_fwd = wrap(ours), wrap(plain)
    task = LanguageModeling()
    steps = {
        "ours": train_step(ours, lambda b: task.loss(ours_fwd, b, with_metrics=False)[0], autocast, device),
        "plain": train_step(plain, lambda b: F.cross_entropy(plain_fwd(b["input_ids"]).flatten(0, 1), b["labels"].flatten()),
                            autocast, device),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(p["warmup"] + p["steps"]):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for key in order:
            ms = TIMERS[device.type](lambda: steps[key](batch))
            if i >= p["warmup"]:
                times[key].append(ms)

    n_non_embedding = sum(q.numel() for q in ours.parameters()) - c.vocab_size * c.dim
    flops_per_token = 6 * n_non_embedding + 12 * c.depth * c.dim * T
    result = {"model": name, "batch": batch_size, "seq_len": T, "warmup_steps": p["warmup"], "timed_steps": p["steps"],
              "compile": p["compile"], "autocast": str(p["autocast"]), "params": ours.num_params(),
              "params_non_embedding": n_non_embedding, "flops_per_token": flops_per_token}
    for key, ts in times.items():
        step_ms = statistics.median(ts)
        tokens_per_s = batch_size * T / (step_ms / 1e3)
        mfu = flops_per_token * tokens_per_s / PEAK_FLOPS
        result.update({f"{key}_step_ms": step_ms, f"{key}_tokens_per_s": tokens_per_s, f"{key}_mfu": mfu})
    result["ratio"] = result["ours_tokens_per_s"] / result["plain_tokens_per_s"]
    result["meets_target"] = result["ratio"] >= TRAINING_TARGET
    return result


def training_section(p: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for name, batch_size in p["batches"].items():
        say(f"training {name} B={batch_size} T={p['seq_len']} ({p['warmup']} warmup + {p['steps']} timed steps each) ...")
        try:
            r = training_pair(name, batch_size, p)
        except torch.OutOfMemoryError:
            r = {"model": name, "batch": batch_size, "seq_len": p["seq_len"], "error": "oom"}
            say(f"training {name}: out of memory at batch {batch_size}")
        else:
            say(f"training {name}: ours {r['ours_tokens_per_s']:,.0f} tok/s (MFU {r['ours_mfu']:.1%}), "
                f"plain {r['plain_tokens_per_s']:,.0f} tok/s (MFU {r['plain_mfu']:.1%}), ours/plain = {r['ratio']:.3f} "
                f"(target >= {TRAINING_TARGET}: {'ok' if r['meets_target'] else 'MISSED'})")
        release(torch.device(p["device"]))
        results.append(r)
    return results


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def markdown(report: dict[str, Any]) -> str:
    att = report["attention"]
    ratios = markdown_table(("T", "regime", "batch", "ours/SDPA", "target met"), (
        (r["seq_len"], r["regime"], r["batch"], fmt_ratio(r["ratio"]), yes_no(r["meets_target"])) for r in att["ratios"]
    ))
    columns = ("model", "batch", "T", "ours ms/step", "plain ms/step", "ours tok/s", "plain tok/s", "ours MFU", "plain MFU",
               "ours/plain", "target met")
    training = markdown_table(columns, (
        (r["model"], r["batch"], r["seq_len"], r["error"], *[""] * 8) if r.get("error") else
        (r["model"], r["batch"], r["seq_len"], f"{r['ours_step_ms']:.1f}", f"{r['plain_step_ms']:.1f}",
         f"{r['ours_tokens_per_s']:,.0f}", f"{r['plain_tokens_per_s']:,.0f}", f"{r['ours_mfu']:.1%}", f"{r['plain_mfu']:.1%}",
         f"{r['ratio']:.3f}", yes_no(r["meets_target"]))
        for r in report["training"]
    ))
    return "\n".join([
        "# Spine GPU benchmark\n",
        f"Card: **{report['device_name']}**; torch {report['torch']}.\n",
        f"## Attention mixer vs raw SDPA ({att['rows'][0]['dtype']}; fwd+bwd time ours/SDPA, target <= {ATTENTION_TARGET})\n",
        ratios,
        f"## Training steps, ours vs PlainGPT (tokens/s ours/plain, target >= {TRAINING_TARGET})\n",
        f"{MFU_FORMULA}.\n",
        training,
        "## All attention rows\n",
        format_table(att["rows"]),
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, no compile: check the script runs")
    parser.add_argument("--batch", action="append", default=[], metavar="MODEL=B", help="training batch of a model (repeatable)")
    parser.add_argument("--steps", type=int, help="timed training steps per model (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int, help="untimed training steps per model (default 3; smoke 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    p = dict(PRESETS["smoke" if args.smoke else "gpu"])
    p["batches"] = {**p["batches"], **{k: int(v) for k, v in (item.split("=", 1) for item in args.batch)}}
    p.update({k: v for k, v in (("steps", args.steps), ("warmup", args.warmup)) if v is not None})
    device = torch.device(p["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run this on the GPU machine, or pass --smoke for the CPU check")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    say(f"spine benchmark on {device_name} (torch {torch.__version__}){' [smoke]' if args.smoke else ''}")
    report = {"device_name": device_name, "torch": torch.__version__, "smoke": args.smoke, "peak_flops": PEAK_FLOPS,
              "mfu_formula": MFU_FORMULA, "attention": attention_section(p), "training": training_section(p)}
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {"json": args.out / "spine_gpu.json", "md": args.out / "spine_gpu.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    say(f"wrote {paths['json']} and {paths['md']}")
    return paths


if __name__ == "__main__":
    main()
