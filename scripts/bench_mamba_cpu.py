"""CPU benchmark of Mamba's selective scans: writes ``mamba_cpu.json`` and ``mamba_cpu.md`` (default
``docs/benchmarks/``).

(a) The scans alone, fwd+bwd (float32, median ms): the token-by-token reference ``selective_scan_ref``, the
    chunked parallel scan ``selective_scan_chunked`` (chunks of 64) and ``selective_scan_sequential`` (the
    tokens walked one at a time with a hand-written backward), at Zoology's MQAR size and two longer ones.
    The reference is skipped above ``ref_max_len`` tokens: its backward grows with T^2 (one full-size gradient
    per indexed step).
(b) A training step of lm-tiny with Mamba at the MQAR quick cell's size (d_model 64, 2 layers, vocabulary 256,
    batch 64 of 64 tokens, AdamW) with ``scan="chunked"`` and ``scan="sequential"``, timed in turns.

    python scripts/bench_mamba_cpu.py [--out DIR] [--threads N]
    python scripts/bench_mamba_cpu.py --smoke --out DIR   # tiny sizes: check the script runs
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout

import torch
import torch.nn.functional as F

from layers.mamba import selective_scan_chunked, selective_scan_ref, selective_scan_sequential
from zoo.bench import interleaved_median_ms, markdown_table, write_report
from zoo.registry import create_model

SCANS = {"reference": selective_scan_ref, "chunked": selective_scan_chunked, "sequential": selective_scan_sequential}
PRESETS: dict[str, dict[str, Any]] = {
    # (batch, d_inner, T, d_state)
    "cpu": dict(shapes=((64, 128, 64, 16), (8, 128, 512, 16), (2, 256, 2048, 16)), ref_max_len=512, timing=(1, 5),
                train=dict(dim=64, depth=2, vocab=256, batch=64, seq_len=64), train_timing=(2, 10)),
    "smoke": dict(shapes=((2, 8, 5, 4), (1, 8, 40, 4)), ref_max_len=5, timing=(0, 1),
                  train=dict(dim=16, depth=1, vocab=32, batch=2, seq_len=8), train_timing=(0, 1)),
}


def scan_inputs(batch: int, d: int, T: int, N: int) -> dict[str, torch.Tensor]:
    """Mamba's scan inputs as its mixer makes them: delta after softplus, A = -(1..N) per channel, D and z."""
    t = {"u": torch.randn(batch, d, T), "delta": F.softplus(torch.randn(batch, d, T) - 2),
         "A": -torch.arange(1, N + 1.0).expand(d, N).contiguous(), "B": torch.randn(batch, N, T),
         "C": torch.randn(batch, N, T), "D": torch.ones(d), "z": torch.randn(batch, d, T)}
    return {k: v.requires_grad_() for k, v in t.items()}


def clear_grads(inputs: dict[str, torch.Tensor]) -> None:
    for t in inputs.values():
        t.grad = None


def scan_rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for batch, d, T, N in p["shapes"]:
        inputs = scan_inputs(batch, d, T, N)
        dy = torch.randn(batch, d, T)
        fns = {name: (lambda fn=fn: torch.autograd.backward(fn(**inputs)[0], dy))
               for name, fn in SCANS.items() if name != "reference" or T <= p["ref_max_len"]}
        ms = interleaved_median_ms(fns, torch.device("cpu"), *p["timing"], lambda: clear_grads(inputs))
        for name in SCANS:
            rows.append({"batch": batch, "d_inner": d, "seq_len": T, "d_state": N, "scan": name, "fwd_bwd_ms": ms.get(name),
                         "skipped": None if name in ms else f"T > {p['ref_max_len']}: the reference's backward is quadratic"})
            print(f"scan B={batch} D={d} T={T} N={N} {name:<10} "
                  + (f"{ms[name]:9.2f} ms" if name in ms else "skipped"), flush=True)
    return rows


def training_rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    c = p["train"]
    data = torch.randint(0, c["vocab"], (c["batch"], c["seq_len"] + 1))
    steps = {}
    for scan in ("chunked", "sequential"):
        torch.manual_seed(0)
        model = create_model("lm-tiny", mixer={"name": "mamba", "scan": scan}, dim=c["dim"], depth=c["depth"],
                             num_heads=1, vocab_size=c["vocab"], max_seq_len=c["seq_len"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            logits = model(data[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[scan] = step
    ms = interleaved_median_ms(steps, torch.device("cpu"), *p["train_timing"], lambda: None)
    rows = [{"model": "lm-tiny", "mixer": "mamba", "scan": scan, **c, "step_ms": ms[scan],
             "samples_per_s": 1e3 * c["batch"] / ms[scan]} for scan in steps]
    for r in rows:
        print(f"training scan={r['scan']:<10} {r['step_ms']:9.1f} ms/step {r['samples_per_s']:9.0f} samples/s", flush=True)
    return rows


def markdown(report: dict[str, Any]) -> str:
    ms = {(r["batch"], r["d_inner"], r["seq_len"], r["d_state"], r["scan"]): r["fwd_bwd_ms"] for r in report["scans"]}
    fmt = lambda x: "skipped" if x is None else f"{x:.2f}"
    shapes = dict.fromkeys(k[:4] for k in ms)
    body = [(*shape, *(fmt(ms[(*shape, s)]) for s in SCANS), f"{ms[(*shape, 'chunked')] / ms[(*shape, 'sequential')]:.1f}")
            for shape in shapes]
    train = {r["scan"]: r for r in report["training"]}
    return (f"# Mamba's selective scans on CPU\n\nMachine: **{report['machine']}**, {report['threads']} threads; "
            f"torch {report['torch']}. float32, fwd+bwd, median of timings taken in turns.\n\n## Scans\n\n"
            + markdown_table(("batch", "d_inner", "T", "d_state", *(f"{s} ms" for s in SCANS), "chunked/sequential"), body)
            + "\n## Training step (lm-tiny with Mamba at the MQAR quick cell's size)\n\n"
            + markdown_table(("scan", "ms/step", "samples/s"),
                             [(s, f"{r['step_ms']:.1f}", f"{r['samples_per_s']:.0f}") for s, r in train.items()])
            + f"\nchunked/sequential step time: {train['chunked']['step_ms'] / train['sequential']['step_ms']:.1f}x\n")


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    p = PRESETS["smoke" if args.smoke else "cpu"]
    torch.manual_seed(0)
    report = {"machine": f"{platform.machine()} CPU", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "scans": scan_rows(p), "training": training_rows(p)}
    return write_report(report, args.out, "mamba_cpu", markdown)


if __name__ == "__main__":
    main()
