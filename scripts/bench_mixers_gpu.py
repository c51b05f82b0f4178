"""GPU benchmark of the gated-linear-attention mixers: writes ``mixers_gpu.json`` and ``mixers_gpu.md``.

(a) Kernels, side by side in one run (B*T = 65536, 16 heads of 64, bf16, fwd+bwd, median ms):
    ``fla``        the raw fla-core op (``chunk_linear_attn``, ``chunk_retention``, ``chunk_gla``,
                   ``chunk_delta_rule``, ``chunk_gated_delta_rule``);
    ``ours-fla``   the same op through our mixer's core with ``backend="fla"`` (target <= 1.05x fla; the two
                   are timed in turns, one call of each per round, so clock drift weighs on both alike);
    ``ours-torch`` our chunked PyTorch path (``backend="torch"``; target <= 2.5x fla at T = 16k);
    ``sdpa``       causal ``F.scaled_dot_product_attention`` on the same q, k, v (the crossover: the
                   smallest T at which a mixer's time drops below it).
(b) Decoding: lm-125m with attention (KV cache, eager) against lm-125m-gla / -retnet / -deltanet / -mamba2: a
    prompt of ``context`` tokens is prefilled (in 1024-token pieces), then ``steps`` tokens are decoded one at
    a time, eagerly, as a replayed CUDA graph, and as a replayed graph of the torch.compile'd step; tokens/s
    of the decoding steps and the peak memory while decoding (target: >= 5x the attention model's tokens/s
    at 16k, with memory flat in the context).

    python scripts/bench_mixers_gpu.py [--out DIR] [--only kernels|decoding] [--mixers linear,retnet] [--seq-lens 16384]
                                       [--compile] [--iters 20]   # --compile: also the torch path compiled
    python scripts/bench_mixers_gpu.py --smoke --out DIR   # CPU, tiny sizes, torch paths only
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling scripts, as top-level modules

import torch
import torch.nn.functional as F

import layers
from layers.deltanet import l2norm
from layers.linear_attention import call_fla, fla_available
from zoo.bench import DECODE_MODES, decode_modes, decode_throughput, interleaved_median_ms, markdown_table, release, write_report

from bench_ssm_gpu import guarded

FLA_TARGET = 1.05  # ours-fla / fla, at most
PAIRED = ("ours-fla", "fla")  # timed in turns
TORCH_TARGET = 2.5  # ours-torch / fla at T = 16k, at most
DECODE_TARGET = 5.0  # recurrent / attention decoding tokens/s at the longest context, at least

PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(device="cuda", dtype=torch.bfloat16, tokens=65536, heads=16, head_dim=64,
                seq_lens=(1024, 4096, 16384), warmup=2, iters=5, decode_batch=8,
                contexts=(1024, 4096, 16384), decode_steps=64, prefill_piece=1024,
                decode_models=("lm-125m", "lm-125m-gla", "lm-125m-retnet", "lm-125m-deltanet", "lm-125m-mamba2")),
    "smoke": dict(device="cpu", dtype=torch.float32, tokens=256, heads=2, head_dim=16, seq_lens=(64, 128), warmup=1,
                  iters=2, decode_batch=2, contexts=(32, 64), decode_steps=4, prefill_piece=32,
                  decode_models=("lm-tiny", "lm-tiny-gla")),
}


def say(text: str) -> None:
    print(text, flush=True)


# --- (a) kernels --------------------------------------------------------------------------------------


@dataclass
class KernelCase:
    """One op: random inputs [B, T, H, D] (fla's layout), the raw fla call and our core's call on them."""

    mixer: str
    fla_op: str
    extra: Callable[[int, int, int, int, torch.device], dict[str, torch.Tensor]]  # (B, T, H, D, device) -> gates
    fla_call: Callable[..., Any]
    ours_call: Callable[..., Any]  # (mixer, q, k, v, **extra) -> (o, state)
    options: dict[str, Any] = field(default_factory=dict)  # mixer options that make ours the same op as fla's


def _log_gates(B, T, H, D, device):
    return {"log_g": (F.logsigmoid(torch.randn(B, T, H, D, device=device)) / 16).requires_grad_()}


def _beta(B, T, H, D, device):
    return {"beta": torch.rand(B, T, H, device=device).sigmoid().requires_grad_()}


def _beta_decay(B, T, H, D, device):
    return {**_beta(B, T, H, D, device), "g": (F.logsigmoid(torch.randn(B, T, H, device=device)) / 16).requires_grad_()}


KERNELS = [
    KernelCase("linear", "fla.ops.linear_attn.chunk_linear_attn", lambda *a: {},
               lambda q, k, v: call_fla("fla.ops.linear_attn.chunk_linear_attn", q, k, v, scale=q.shape[-1] ** -0.5,
                                        output_final_state=True, normalize=False),
               lambda m, q, k, v: m._core(q, k, v, None, None, False), {"normalize": False}),
    KernelCase("retnet", "fla.ops.retention.chunk_retention", lambda *a: {},
               lambda q, k, v: call_fla("fla.ops.retention.chunk_retention", q, k, v, scale=q.shape[-1] ** -0.5,
                                        output_final_state=True),
               lambda m, q, k, v: m._core(q, k, v, m.log_decay, None, False)),  # the decays the mixer keeps as a buffer
    KernelCase("gla", "fla.ops.gla.chunk_gla", _log_gates,
               lambda q, k, v, log_g: call_fla("fla.ops.gla.chunk_gla", q, k, v, log_g, scale=q.shape[-1] ** -0.5,
                                               output_final_state=True),
               lambda m, q, k, v, log_g: m._core(q, k, v, log_g, None, False)),
    KernelCase("deltanet", "fla.ops.delta_rule.chunk_delta_rule", _beta,
               lambda q, k, v, beta: call_fla("fla.ops.delta_rule.chunk_delta_rule", l2norm(q), l2norm(k), v, beta,
                                              scale=q.shape[-1] ** -0.5, output_final_state=True),
               lambda m, q, k, v, beta: m._core(l2norm(q), l2norm(k), v, beta, None, None, False)),
    KernelCase("gated_deltanet", "fla.ops.gated_delta_rule.chunk_gated_delta_rule", _beta_decay,
               lambda q, k, v, beta, g: call_fla("fla.ops.gated_delta_rule.chunk_gated_delta_rule", l2norm(q), l2norm(k), v,
                                                 g, beta, scale=q.shape[-1] ** -0.5, output_final_state=True),
               lambda m, q, k, v, beta, g: m._core(l2norm(q), l2norm(k), v, beta, g, None, False)),
]


def time_fwd_bwd(fns: dict[str, Callable[[], Any]], inputs: list[torch.Tensor], device: torch.device, warmup: int,
                 iters: int) -> dict[str, float]:
    """Median ms of forward + backward of each ``fn()`` (its first output, against a fixed random cotangent), the
    functions timed in turns (:func:`zoo.bench.interleaved_median_ms`)."""

    def fwd_bwd(fn):
        dy = torch.randn_like(fn()[0])
        return lambda: torch.autograd.backward(fn()[0], dy)

    def clear():
        for t in inputs:
            t.grad = None

    return interleaved_median_ms({name: fwd_bwd(fn) for name, fn in fns.items()}, device, warmup, iters, clear)


def kernel_rows(p: dict[str, Any], names: list[str], compile: bool = False) -> list[dict[str, Any]]:
    """Every implementation of every case at every length; ``compile`` adds ``ours-torch-compiled``, the torch path
    under ``torch.compile`` (compiled once per length, before timing)."""
    device, dtype, H, D = torch.device(p["device"]), p["dtype"], p["heads"], p["head_dim"]
    use_fla = fla_available() and device.type == "cuda"
    rows = []
    for case in (c for c in KERNELS if c.mixer in names):
        mixers = {f"ours-{b}": layers.create_mixer(case.mixer, H * D, H, backend=b, **case.options).to(device)
                  for b in (("torch", "fla") if use_fla else ("torch",))}
        for T in p["seq_lens"]:
            B = max(1, p["tokens"] // T)
            q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            extra = case.extra(B, T, H, D, device)
            inputs = [q, k, v, *extra.values()]
            impls: dict[str, Callable[[], Any]] = {
                "sdpa": lambda: (F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                                is_causal=True),),
                **{name: (lambda m=m: case.ours_call(m, q, k, v, **extra)) for name, m in mixers.items()},
            }
            if compile:
                compiled = torch.compile(functools.partial(case.ours_call, mixers["ours-torch"]), dynamic=False)
                impls["ours-torch-compiled"] = lambda: compiled(q, k, v, **extra)
            if use_fla:
                impls["fla"] = lambda: case.fla_call(q, k, v, **extra)
            # ours-fla and fla (the same kernels) are timed in turns: their ratio is read against a 1.05 target
            groups = [[impl] for impl in impls if impl not in PAIRED] + [[i for i in PAIRED if i in impls]]
            for group in filter(None, groups):
                base = {"section": "kernels", "mixer": case.mixer, "batch": B, "seq_len": T, "heads": H, "head_dim": D,
                        "dtype": str(dtype).removeprefix("torch."), "fwd_bwd_ms": None, "error": None}
                try:
                    times = time_fwd_bwd({i: impls[i] for i in group}, inputs, device, p["warmup"], p["iters"])
                except Exception as e:  # noqa: BLE001 - a refused kernel is a result to report, not a crash
                    times, base["error"] = {}, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                release(device)
                for impl in group:
                    row = {**base, "impl": impl, "op": case.fla_op if impl == "fla" else None, "fwd_bwd_ms": times.get(impl)}
                    rows.append(row)
                    say(f"kernels {case.mixer:<15} T={T:>6} B={B:<3} {impl:<11} "
                        + (f"{row['fwd_bwd_ms']:9.3f} ms" if row["fwd_bwd_ms"] is not None else row["error"]))
    return rows


def kernel_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mixer and T: ours-fla / fla, ours-torch / fla and each implementation / sdpa; and the crossover T."""
    ms = {(r["mixer"], r["seq_len"], r["impl"]): r["fwd_bwd_ms"] for r in rows}
    ratio = lambda a, b: a / b if a is not None and b is not None else None
    summary = []
    for mixer in dict.fromkeys(r["mixer"] for r in rows):
        lengths = sorted({r["seq_len"] for r in rows if r["mixer"] == mixer})
        per_t = [{"seq_len": T,
                  "ours_fla_vs_fla": ratio(ms.get((mixer, T, "ours-fla")), ms.get((mixer, T, "fla"))),
                  "ours_torch_vs_fla": ratio(ms.get((mixer, T, "ours-torch")), ms.get((mixer, T, "fla"))),
                  "ours_torch_compiled_vs_fla": ratio(ms.get((mixer, T, "ours-torch-compiled")), ms.get((mixer, T, "fla"))),
                  **{f"{impl.replace('-', '_')}_vs_sdpa": ratio(ms.get((mixer, T, impl)), ms.get((mixer, T, "sdpa")))
                     for impl in ("fla", "ours-fla", "ours-torch")}} for T in lengths]
        crossover = {impl: next((r["seq_len"] for r in per_t if (r[f"{impl}_vs_sdpa"] or 2.0) < 1.0), None)
                     for impl in ("fla", "ours_fla", "ours_torch")}
        summary.append({"mixer": mixer, "per_seq_len": per_t, "crossover_vs_sdpa": crossover})
    return summary


# --- (b) decoding -------------------------------------------------------------------------------------


def decoding_rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model, decoding mode (``zoo.bench.decode_modes``) and context; a failed compile, capture or an
    out-of-memory is reported in its row and the run goes on."""
    device, rows = torch.device(p["device"]), []
    for name, mode, context in ((n, m, c) for n in p["decode_models"] for m in decode_modes(n, device) for c in p["contexts"]):
        row = {"section": "decoding", "model": name, "mode": mode, "context": context,
               "batch": p["decode_batch"], "steps": p["decode_steps"], "error": None}
        rows.append(guarded(row, device, lambda: decode_throughput(
            name, context, p["decode_batch"], p["decode_steps"], device, p["dtype"], p["prefill_piece"], **DECODE_MODES[mode])))
        say(f"decoding {name:<18} {row['mode']:<20} context={context:>6} " + (
            f"{row['tokens_per_s']:10,.0f} tok/s  step {row['step_ms']:.2f} ms  peak {row['peak_decode_mb'] or 0:,.0f} MB"
            f"  state {row['state_mb']:,.1f} MB" if not row.get("error") else row["error"]))
    return rows


def decoding_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tokens/s of each model and mode over the attention model's eager decoding (the first rows) at each context."""
    base = rows[0]["model"]
    tps = {(r["model"], r["mode"], r["context"]): r.get("tokens_per_s") for r in rows}
    longest = max(r["context"] for r in rows)
    out = []
    for model, mode in dict.fromkeys((r["model"], r["mode"]) for r in rows if r["model"] != base):
        ratios = {c: (tps[(model, mode, c)] / tps[(base, "eager", c)])
                  if tps.get((model, mode, c)) and tps.get((base, "eager", c)) else None
                  for c in sorted({r["context"] for r in rows})}
        out.append({"model": model, "mode": mode, "vs": f"{base} (eager, KV cache)", "ratio_by_context": ratios,
                    "meets_target": (ratios[longest] or 0) >= DECODE_TARGET})
    return out


# --- report -------------------------------------------------------------------------------------------


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    parts = ["# Mixer GPU benchmark\n", f"Card: **{report['device_name']}**; torch {report['torch']}; "
             f"fla {report['fla_version']}.\n"]
    if "kernels" in report:
        k = report["kernels"]
        body = []
        for s in k["summary"]:
            for r in s["per_seq_len"]:
                body.append((s["mixer"], r["seq_len"], fmt(r["ours_fla_vs_fla"], ".3f"), fmt(r["ours_torch_vs_fla"]),
                             fmt(r["ours_torch_compiled_vs_fla"]), fmt(r["fla_vs_sdpa"]), fmt(r["ours_fla_vs_sdpa"]),
                             fmt(r["ours_torch_vs_sdpa"])))
        parts += [f"## Kernels (B*T = {k['tokens']}, {k['heads']} heads of {k['head_dim']}, {k['dtype']}, fwd+bwd)\n",
                  f"Targets: ours-fla/fla <= {FLA_TARGET}; ours-torch/fla <= {TORCH_TARGET} at T = 16k (eager, and "
                  "under torch.compile where `--compile` ran). x/sdpa < 1 means faster than causal SDPA.\n",
                  markdown_table(("mixer", "T", "ours-fla/fla", "ours-torch/fla", "ours-torch-compiled/fla", "fla/sdpa",
                                  "ours-fla/sdpa", "ours-torch/sdpa"), body),
                  "Crossover (smallest T faster than causal SDPA):\n",
                  markdown_table(("mixer", "fla", "ours-fla", "ours-torch"), (
                      (s["mixer"], *(s["crossover_vs_sdpa"][i] or "not reached" for i in ("fla", "ours_fla", "ours_torch")))
                      for s in k["summary"])),
                  "Raw times (ms):\n",
                  markdown_table(("mixer", "T", "B", "impl", "fwd+bwd ms", "error"), (
                      (r["mixer"], r["seq_len"], r["batch"], r["impl"], fmt(r["fwd_bwd_ms"], ".3f"), r["error"] or "")
                      for r in k["rows"]))]
    if "decoding" in report:
        d = report["decoding"]
        parts += [f"## Decoding (batch {d['batch']}, {d['steps']} greedy steps after the context, bf16; eager, and for "
                  "models with fixed-size states replayed CUDA graphs of the eager or the torch.compile'd step)\n",
                  markdown_table(("model", "mode", "context", "tokens/s", "ms/step", "peak MB while decoding", "state MB",
                                  "error"), (
                      (r["model"], r["mode"], r["context"], fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("step_ms")),
                       fmt(r.get("peak_decode_mb"), ",.0f"), fmt(r.get("state_mb"), ",.1f"), r.get("error") or "")
                      for r in d["rows"])),
                  f"Ratio of tokens/s to {d['summary'][0]['vs'] if d['summary'] else 'attention'} "
                  f"(target >= {DECODE_TARGET} at the longest context):\n",
                  markdown_table(("model", "mode", *[f"context {c}" for c in d["contexts"]], "target met"), (
                      (s["model"], s["mode"], *[fmt(s["ratio_by_context"][c]) for c in d["contexts"]],
                       "yes" if s["meets_target"] else "no")
                      for s in d["summary"]))]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, torch paths only: check the script runs")
    parser.add_argument("--only", choices=("kernels", "decoding"), help="run one section")
    parser.add_argument("--mixers", help="comma-separated kernel cases to run (default: all)")
    parser.add_argument("--seq-lens", help="comma-separated kernel lengths T (default: the preset's)")
    parser.add_argument("--compile", action="store_true", help="also time the torch path under torch.compile")
    parser.add_argument("--iters", type=int, help="timed iterations per kernel row (default: the preset's)")
    args = parser.parse_args(argv)
    p = PRESETS["smoke" if args.smoke else "gpu"]
    if args.seq_lens:
        p = {**p, "seq_lens": tuple(int(t) for t in args.seq_lens.split(","))}
    if args.iters:
        p = {**p, "iters": args.iters}
    if p["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run this on the GPU machine, or pass --smoke for the CPU check")
    device_name = torch.cuda.get_device_name() if p["device"] == "cuda" else "cpu"
    fla_version = None
    if fla_available():
        import fla

        fla_version = getattr(fla, "__version__", "unknown")
    say(f"mixer benchmark on {device_name} (torch {torch.__version__}, fla {fla_version}){' [smoke]' if args.smoke else ''}")
    report: dict[str, Any] = {"device_name": device_name, "torch": torch.__version__, "fla_version": fla_version}
    if args.only in (None, "kernels"):
        names = args.mixers.split(",") if args.mixers else [c.mixer for c in KERNELS]
        unknown = sorted(set(names) - {c.mixer for c in KERNELS})
        if unknown:
            raise SystemExit(f"--mixers: unknown {unknown}; choose from {[c.mixer for c in KERNELS]}")
        rows = kernel_rows(p, names, args.compile)
        report["kernels"] = {"tokens": p["tokens"], "heads": p["heads"], "head_dim": p["head_dim"],
                             "dtype": str(p["dtype"]).removeprefix("torch."), "rows": rows, "summary": kernel_summary(rows)}
    if args.only in (None, "decoding"):
        rows = decoding_rows(p)
        report["decoding"] = {"batch": p["decode_batch"], "steps": p["decode_steps"], "contexts": list(p["contexts"]),
                              "rows": rows, "summary": decoding_summary(rows)}
    stem = "_".join(["mixers_gpu", *([args.only] if args.only else []), *([args.mixers.replace(",", "_")] if args.mixers else [])])
    return write_report(report, args.out, stem, markdown)


if __name__ == "__main__":
    main()
