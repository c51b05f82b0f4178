"""GPU benchmark of the state-space mixers: writes ``ssm_gpu.json`` and ``ssm_gpu.md`` (default ``docs/benchmarks/``).

(a) Scans, side by side in one run (bf16 activations, float32 dt/A/D as in the mixers, fwd+bwd, median ms):
    ``mamba2``  ``ssd_chunked`` against the token-by-token ``ssd_recurrent_ref`` (batch 4, 24 heads of 64,
                d_state 128, 1 group; target: chunked >= 20x faster at T = 4096) and, where fla-core and CUDA
                are present, fla's ``chunk_simple_gla`` on the same SSD (q = C, k = B, v = dt x, g = dt A,
                scale 1, plus the D skip; target: chunked/kernel <= 1.1); our Triton kernels (``fused_ssd``)
                and, where importable, mamba-ssm's Triton SSD (``mamba_chunk_scan_combined``, its default chunk
                of 256; target: ours/mamba-ssm <= 1.1);
    ``mamba``   ``selective_scan_chunked`` against ``selective_scan_ref`` (batch 2, d_inner 1536, d_state 16;
                target >= 10x at T = 4096).
    The sequential references run fewer iterations (they take seconds).
(b) Training at T = 16384: tokens/s of full steps (bf16 autocast, fused AdamW, grad clip: bench_spine_gpu's
    ``train_step``) of lm-125m-mamba2 / lm-125m-mamba against lm-125m (attention); target mamba2 >= 2x.
(c) Decoding: a prompt of ``context`` tokens is prefilled (in 1024-token pieces), then ``steps`` tokens are
    decoded one at a time, eagerly and (CUDA, fixed-size states) as replayed graphs of the eager and of the
    torch.compile'd step; tokens/s of the decoding steps, peak memory while decoding and the decoding state's
    size (every tensor in the nested state); target: >= 5x the attention model's eager tokens/s at 16k, with
    flat memory.

(d) The Mamba-2 layer (``layers.Mamba2``, dim 768 at [2, 16384], bf16 autocast): fwd+bwd with the SSD on the
    torch path (``backend="torch"``) and on our Triton kernels (``backend="triton"``), each eager and
    torch.compile'd; torch/triton time per mode (the layer's conv, projections and norm included).

Out-of-memory and other failures are reported in their row (``error``); the run goes on.

    python scripts/bench_ssm_gpu.py [--out DIR] [--only scans|training|decoding|layer] [--batch lm-125m=2] [--compile]
                                    [--models lm-125m-mamba2]   # training runs of these models (and the base) only
    python scripts/bench_ssm_gpu.py --smoke --out DIR   # CPU, tiny sizes, torch paths only
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling scripts, as top-level modules

import torch
import torch.nn.functional as F

from layers.linear_attention import call_fla, fla_available
from layers.mamba import selective_scan_chunked, selective_scan_ref
from layers.mamba2 import MAMBA_SSM_MODULE, Mamba2, mamba_ssm_unavailable, ssd_chunked, ssd_mamba_ssm, ssd_recurrent_ref
from layers.registry import close_matches
from layers.ssd_kernel import fused_ssd, triton
from bench_spine_gpu import train_step
from zoo.bench import DECODE_MODES, decode_modes, decode_throughput, markdown_table, median_ms, release, write_report
from zoo.registry import create_model
from zoo.tasks.lm import LanguageModeling

SPEEDUP_TARGETS = {"mamba2": 20.0, "mamba": 10.0}  # sequential / chunked fwd+bwd time at the longest T, at least
KERNEL_TARGET = 1.1  # chunked / kernel fwd+bwd time, at most
TRAIN_TARGET = 2.0  # tokens/s over the attention model's, at least
DECODE_TARGET = 5.0  # decoding tokens/s over the attention model's at the longest context, at least
FLAT_MEMORY = 1.05  # peak decoding memory (state size on CPU) at the longest context over the shortest, at most
FLA_SSD_OP = "fla.ops.simple_gla.chunk_simple_gla"

PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(device="cuda", dtype=torch.bfloat16, seq_lens=(1024, 4096), timing={"fast": (3, 10), "slow": (1, 3)},
                shapes={"mamba2": dict(batch=4, nheads=24, headdim=64, d_state=128, ngroups=1),
                        "mamba": dict(batch=2, d_inner=1536, d_state=16)},
                # (model, batch, create_model overrides). On the torch paths both SSM LMs ran out of memory at 16k
                # on a 139 GB H200 without recomputation; the SSD kernels keep no chunk-sized intermediates, so
                # lm-125m-mamba2 is also tried without it (an out-of-memory shows in its row).
                train_runs=(("lm-125m", 2, {}), ("lm-125m-mamba2", 2, {}), ("lm-125m-mamba2", 2, {"grad_checkpointing": True}),
                            ("lm-125m-mamba", 1, {"grad_checkpointing": True})), train_seq_len=16384,
                train_warmup=2, train_steps=5, autocast=torch.bfloat16, decode_batch=8, contexts=(1024, 4096, 16384),
                decode_steps=64, prefill_piece=1024, decode_models=("lm-125m", "lm-125m-mamba2", "lm-125m-mamba"),
                layer=dict(batch=2, seq_len=16384, dim=768), layer_timing=(3, 10), layer_compiled=(False, True)),
    "smoke": dict(device="cpu", dtype=torch.float32, seq_lens=(32, 64), timing={"fast": (0, 1), "slow": (0, 1)},
                  shapes={"mamba2": dict(batch=1, nheads=2, headdim=8, d_state=8, ngroups=1),
                          "mamba": dict(batch=1, d_inner=16, d_state=4)},
                  train_runs=(("lm-tiny", 1, {}), ("lm-tiny-mamba2", 1, {}), ("lm-tiny-mamba2", 1, {"grad_checkpointing": True})),
                  train_seq_len=64, train_warmup=0, train_steps=1,
                  autocast=None, decode_batch=1, contexts=(16, 32), decode_steps=2, prefill_piece=16,
                  decode_models=("lm-tiny", "lm-tiny-mamba2"), layer=dict(batch=1, seq_len=48, dim=32),
                  layer_timing=(0, 1), layer_compiled=(False,)),  # eager only: inductor's CPU compile takes ~15 s
}


def say(text: str) -> None:
    print(text, flush=True)


def error_text(e: BaseException) -> str:
    """A row's error: "oom" for out-of-memory, else the exception's type and first line."""
    if isinstance(e, torch.OutOfMemoryError):
        return "oom"
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def guarded(row: dict[str, Any], device: torch.device, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``row`` updated with ``measure()``'s results, or with its error; memory is released either way."""
    try:
        row.update(measure())
    except Exception as e:  # noqa: BLE001 - a failed row (OOM, a refused kernel) is a result, not a crash
        row["error"] = error_text(e)
    release(device)
    return row


# --- (a) scans ----------------------------------------------------------------------------------------


def mamba2_inputs(s: dict[str, int], T: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Mamba2 mixer layout: x [B, T, H, P], dt [B, T, H] (after softplus), A [H], B, C [B, T, G, N], D [H]."""
    b, H, G, N = s["batch"], s["nheads"], s["ngroups"], s["d_state"]
    act = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
    return {"x": act(b, T, H, s["headdim"]), "dt": F.softplus(torch.randn(b, T, H, device=device) - 3).requires_grad_(),
            "A": (-torch.empty(H, device=device).uniform_(1, 16)).requires_grad_(),
            "B": act(b, T, G, N), "C": act(b, T, G, N), "D": torch.ones(H, device=device, requires_grad=True)}


def mamba_inputs(s: dict[str, int], T: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Mamba mixer layout: u, z [B, D, T], delta [B, D, T] float32 (after softplus), A [D, N], B, C [B, N, T], D [D]."""
    b, D, N = s["batch"], s["d_inner"], s["d_state"]
    act = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
    return {"u": act(b, D, T), "delta": F.softplus(torch.randn(b, D, T, device=device) - 3).requires_grad_(),
            "A": (-torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(D, 1)).requires_grad_(),
            "B": act(b, N, T), "C": act(b, N, T), "D": torch.ones(D, device=device, requires_grad=True), "z": act(b, D, T)}


def ssd_fla(x, dt, A, B, C, D):
    """The SSD through fla's scalar-decay chunked kernel: q = C, k = B (per head), v = dt x, g = dt A, scale 1."""
    H = x.shape[2]
    q, k = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (C, B))
    v = (x.float() * dt[..., None]).to(x.dtype)
    o, state = call_fla(FLA_SSD_OP, q, k, v, g=dt * A, scale=1.0, output_final_state=True)
    return (o.float() + x.float() * D[:, None]).to(x.dtype), state


def ssd_mamba_ssm_default_chunk(x, dt, A, B, C, D):
    """The SSD through mamba-ssm's Triton kernels at the chunk its Mamba2 layer uses (256)."""
    return ssd_mamba_ssm(x, dt, A, B, C, D, chunk_size=256)


class ScanImpl(NamedTuple):
    name: str
    fn: Callable[..., Any]  # (**inputs) -> (y, final state)
    timing: str = "fast"  # which (warmup, iters) of the preset
    unavailable: Callable[[torch.device], str | None] = lambda device: None  # why it cannot run here, or None


def triton_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda" or triton is None:
        return "our SSD kernels need CUDA and Triton"
    return None


def fla_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "fla kernels need CUDA"
    return None if fla_available() else "fla-core is not importable"


def mamba_ssm_missing(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "mamba-ssm's kernels need CUDA"
    why = mamba_ssm_unavailable()
    return None if why is None else f"mamba-ssm is not importable ({why.split(':')[0]})"


SCANS: dict[str, tuple[Callable[..., dict[str, torch.Tensor]], list[ScanImpl]]] = {
    "mamba2": (mamba2_inputs, [ScanImpl("sequential", ssd_recurrent_ref, "slow"), ScanImpl("chunked", ssd_chunked),
                               ScanImpl("triton", fused_ssd, unavailable=triton_unavailable),
                               ScanImpl("kernel", ssd_fla, unavailable=fla_unavailable),
                               ScanImpl("mamba_ssm", ssd_mamba_ssm_default_chunk, unavailable=mamba_ssm_missing)]),
    "mamba": (mamba_inputs, [ScanImpl("sequential", selective_scan_ref, "slow"), ScanImpl("chunked", selective_scan_chunked)]),
}


def time_fwd_bwd(fn: Callable[..., Any], inputs: dict[str, torch.Tensor], device: torch.device, warmup: int,
                 iters: int) -> float:
    """Median ms of forward + backward of ``fn(**inputs)`` (its output y against a fixed random cotangent)."""
    dy = torch.randn_like(fn(**inputs)[0])

    def run():
        torch.autograd.backward(fn(**inputs)[0], dy)

    def clear():
        for t in inputs.values():
            t.grad = None

    return median_ms(run, device, warmup, iters, clear)


def scan_rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    device, dtype = torch.device(p["device"]), p["dtype"]
    rows = []
    for case, (make_inputs, impls) in SCANS.items():
        shape = p["shapes"][case]
        for T in p["seq_lens"]:
            for impl in impls:
                warmup, iters = p["timing"][impl.timing]
                row = {"section": "scans", "case": case, "impl": impl.name, "seq_len": T, **shape,
                       "dtype": str(dtype).removeprefix("torch."), "iters": iters, "fwd_bwd_ms": None,
                       "error": impl.unavailable(device)}
                if row["error"] is None:
                    row = guarded(row, device, lambda: {"fwd_bwd_ms": time_fwd_bwd(
                        impl.fn, make_inputs(shape, T, device, dtype), device, warmup, iters)})
                rows.append(row)
                say(f"scans {case:<7} T={T:>6} {impl.name:<11} "
                    + (f"{row['fwd_bwd_ms']:10.3f} ms" if row["fwd_bwd_ms"] is not None else row["error"]))
    return rows


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def scan_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case and T: sequential / chunked (the speed-up), chunked / kernel and our kernels / mamba-ssm's; targets
    at the longest T."""
    ms = {(r["case"], r["seq_len"], r["impl"]): r["fwd_bwd_ms"] for r in rows}
    longest = max(r["seq_len"] for r in rows)
    out = []
    for case, T in dict.fromkeys((r["case"], r["seq_len"]) for r in rows):
        speedup = ratio(ms.get((case, T, "sequential")), ms.get((case, T, "chunked")))
        vs_kernel = ratio(ms.get((case, T, "chunked")), ms.get((case, T, "kernel")))
        vs_mamba_ssm = ratio(ms.get((case, T, "triton")), ms.get((case, T, "mamba_ssm")))
        out.append({"case": case, "seq_len": T, "speedup": speedup, "speedup_target": SPEEDUP_TARGETS[case],
                    "chunked_vs_triton": ratio(ms.get((case, T, "chunked")), ms.get((case, T, "triton"))),
                    "chunked_vs_kernel": vs_kernel, "kernel_target": KERNEL_TARGET if (case, T, "kernel") in ms else None,
                    "meets_speedup_target": None if T != longest else (speedup or 0) >= SPEEDUP_TARGETS[case],
                    "meets_kernel_target": None if T != longest or vs_kernel is None else vs_kernel <= KERNEL_TARGET,
                    "triton_vs_mamba_ssm": vs_mamba_ssm,
                    "meets_mamba_ssm_target": None if T != longest or vs_mamba_ssm is None
                    else vs_mamba_ssm <= KERNEL_TARGET})
    return out


# --- (b) training ---------------------------------------------------------------------------------------


def build_training(name: str, batch: int, p: dict[str, Any], compile: bool,
                   overrides: dict[str, Any]) -> tuple[dict[str, Any], Callable[..., None]]:
    """``create_model(name, **overrides)`` at ``train_seq_len`` with its optimiser, warmed up: its (active)
    parameter counts and peak memory (above what was allocated before it was built), and ``run(accum=1)``: one
    full training step (``accum`` micro-batches, then one optimiser step) on a fixed batch."""
    device, T = torch.device(p["device"]), p["train_seq_len"]
    autocast = (lambda: torch.autocast(device.type, dtype=p["autocast"])) if p["autocast"] else nullcontext
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):
        model = create_model(name, **{"max_seq_len": T, **overrides})
    forward = torch.compile(model) if compile else model
    task = LanguageModeling()
    step = train_step(model, lambda b: task.loss(forward, b, with_metrics=False)[0], autocast, device)
    ids = torch.randint(0, model.config.vocab_size, (batch, T + 1), device=device)
    data = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
    for _ in range(p["train_warmup"]):
        step(data)
    peak = (torch.cuda.max_memory_allocated(device) - resident) / 2**20 if device.type == "cuda" else None
    return ({"params": model.num_params(), "active_params": model.num_active_params(), "peak_mb": peak},
            lambda accum=1: step(data, accum))


def training_row(name: str, batch: int, p: dict[str, Any], compile: bool, **overrides: Any) -> dict[str, Any]:
    """Median step time of full training steps (:func:`build_training`); tokens/s, peak memory and the counts."""
    device = torch.device(p["device"])
    counts, step = build_training(name, batch, p, compile, overrides)
    step_ms = median_ms(step, device, 0, p["train_steps"], lambda: None)
    return {**counts, "step_ms": step_ms, "tokens_per_s": batch * p["train_seq_len"] / (step_ms / 1e3)}


def run_label(name: str, overrides: dict[str, Any]) -> str:
    """The model's name and its overrides, e.g. ``lm-125m-mamba2 grad_checkpointing=True``."""
    return " ".join([name, *(f"{key}={value}" for key, value in overrides.items())])


def training_result(name: str, batch: int, p: dict[str, Any], compile: bool, **overrides: Any) -> dict[str, Any]:
    """One training row (its error in ``error``), printed."""
    row = {"section": "training", "model": name, "run": run_label(name, overrides), "overrides": overrides,
           "batch": batch, "seq_len": p["train_seq_len"],
           "compile": compile, "autocast": str(p["autocast"]), "params": None, "active_params": None, "step_ms": None,
           "tokens_per_s": None, "peak_mb": None, "error": None}
    guarded(row, torch.device(p["device"]), lambda: training_row(name, batch, p, compile, **overrides))
    say(f"training {row['run']:<16} B={batch} T={p['train_seq_len']} " + (
        f"{row['tokens_per_s']:10,.0f} tok/s  step {row['step_ms']:.1f} ms  peak {fmt(row['peak_mb'], ',.0f')} MB"
        if row["error"] is None else row["error"]))
    return row


def select_train_runs(runs: tuple, models: list[str]) -> tuple:
    """The base run (the first: the attention model) and the runs of ``models``; unknown names are an error."""
    known = dict.fromkeys(name for name, _, _ in runs)
    for name in models:
        if name not in known:
            matches = close_matches(name, known)
            raise ValueError(f"--models: {name!r} has no training run here; runs exist for {', '.join(known)}"
                             + (f" (did you mean {' or '.join(matches)}?)" if matches else ""))
    return runs[:1] + tuple(run for run in runs[1:] if run[0] in models)


def training_rows(p: dict[str, Any], compile: bool) -> list[dict[str, Any]]:
    return [training_result(name, batch, p, compile, **overrides) for name, batch, overrides in p["train_runs"]]


def versus_base(rows: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    """``key`` of each later row over the first row's (the attention model), by run label."""
    base = rows[0]
    return {r["run"]: ratio(r.get(key), base.get(key)) for r in rows[1:]}


# --- (c) decoding ---------------------------------------------------------------------------------------


def decode_row(name: str, context: int, p: dict[str, Any], mode: str) -> dict[str, Any]:
    """Decoding at ``context`` in ``mode`` (``zoo.bench.decode_throughput``, ``zoo.bench.DECODE_MODES``)."""
    return decode_throughput(name, context, p["decode_batch"], p["decode_steps"], torch.device(p["device"]), p["dtype"],
                             p["prefill_piece"], **DECODE_MODES[mode])


def decoding_rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    device, rows = torch.device(p["device"]), []
    for name in p["decode_models"]:
        for mode in decode_modes(name, device):
            for context in p["contexts"]:
                row = {"section": "decoding", "model": name, "mode": mode, "context": context, "batch": p["decode_batch"],
                       "steps": p["decode_steps"], "tokens_per_s": None, "step_ms": None, "state_mb": None,
                       "peak_decode_mb": None, "error": None}
                rows.append(guarded(row, device, lambda: decode_row(name, context, p, mode)))
                say(f"decoding {name:<16} {mode:<20} context={context:>6} " + (
                    f"{row['tokens_per_s']:10,.0f} tok/s  step {row['step_ms']:.2f} ms  "
                    f"peak {fmt(row['peak_decode_mb'], ',.0f')} MB  state {row['state_mb']:,.2f} MB"
                    if row["error"] is None else row["error"]))
    return rows


def decoding_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and mode: tokens/s over the attention model's (the first, eager) at each context, and its memory
    growth."""
    contexts = sorted({r["context"] for r in rows})
    by = {(r["model"], r["mode"], r["context"]): r for r in rows}
    base = rows[0]["model"]
    out = []
    for model, mode in dict.fromkeys((r["model"], r["mode"]) for r in rows):
        ratios = {c: ratio(by[model, mode, c]["tokens_per_s"], by[base, "eager", c]["tokens_per_s"]) for c in contexts}
        short, long = by[model, mode, contexts[0]], by[model, mode, contexts[-1]]
        memory = "peak_decode_mb" if short["peak_decode_mb"] is not None else "state_mb"
        growth = ratio(long[memory], short[memory])
        out.append({"model": model, "mode": mode, "vs": f"{base} (eager)", "ratio_by_context": ratios,
                    "memory_growth": growth, "memory_measure": memory,
                    "flat_memory": growth is not None and growth <= FLAT_MEMORY,
                    "meets_target": (ratios[contexts[-1]] or 0) >= DECODE_TARGET and growth is not None
                    and growth <= FLAT_MEMORY})
    return out


# --- (d) the Mamba-2 layer -----------------------------------------------------------------------------

LAYER_BACKENDS = ("torch", "triton")


def layer_row(backend: str, compiled: bool, p: dict[str, Any]) -> dict[str, Any]:
    """Median fwd+bwd ms of ``Mamba2(dim, backend=backend)`` on a fixed batch, eager or compiled."""
    device, s = torch.device(p["device"]), p["layer"]
    row = {"section": "layer", "backend": backend, "compiled": compiled, **s, "fwd_bwd_ms": None,
           "error": triton_unavailable(device) if backend == "triton" else None}
    autocast = (lambda: torch.autocast(device.type, dtype=p["autocast"])) if p["autocast"] else nullcontext

    def measure() -> dict[str, Any]:
        torch.manual_seed(0)
        layer = Mamba2(s["dim"], s["dim"] // 64 or 1, backend=backend).to(device)
        forward = torch.compile(layer) if compiled else layer
        u = torch.randn(s["batch"], s["seq_len"], s["dim"], device=device, requires_grad=True)

        def run():
            with autocast():
                out = forward(u)
            out.float().square().mean().backward()

        return {"fwd_bwd_ms": median_ms(run, device, *p["layer_timing"], lambda: None)}

    if row["error"] is None:
        row = guarded(row, device, measure)
    say(f"layer mamba2 {backend:<7} {'compiled' if compiled else 'eager':<9}"
        + (f"{row['fwd_bwd_ms']:10.3f} ms" if row["fwd_bwd_ms"] is not None else row["error"]))
    return row


def layer_rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    return [layer_row(backend, compiled, p) for compiled in p["layer_compiled"] for backend in LAYER_BACKENDS]


def layer_summary(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """torch / triton fwd+bwd time, per mode (eager, compiled)."""
    ms = {(r["backend"], r["compiled"]): r["fwd_bwd_ms"] for r in rows}
    return {("compiled" if compiled else "eager"): ratio(ms[("torch", compiled)], ms[("triton", compiled)])
            for compiled in dict.fromkeys(r["compiled"] for r in rows)}


# --- report ---------------------------------------------------------------------------------------------


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def yes_no(flag: bool | None) -> str:
    return "" if flag is None else "yes" if flag else "no"


def markdown(report: dict[str, Any]) -> str:
    parts = ["# State-space GPU benchmark\n",
             f"Card: **{report['device_name']}**; torch {report['torch']}; fla {report['fla_version']}.\n"]
    if "scans" in report:
        s = report["scans"]
        parts += [f"## Scans ({s['dtype']} activations, fwd+bwd)\n",
                  f"Shapes: {json.dumps(s['shapes'])}. Targets at the longest T: sequential/chunked at least the "
                  f"target column; chunked/kernel <= {KERNEL_TARGET} (kernel: fla's `{FLA_SSD_OP}`).\n",
                  "chunked/triton: our torch chunked path over our Triton SSD kernels (`layers/ssd_kernel.py`). "
                  f"triton/mamba-ssm: our kernels over mamba-ssm's `{MAMBA_SSM_MODULE}.mamba_chunk_scan_combined` "
                  f"(target <= {KERNEL_TARGET}).\n",
                  markdown_table(("case", "T", "sequential/chunked", "target", "target met", "chunked/triton",
                                  "chunked/kernel", "target met", "triton/mamba-ssm", "target met"), (
                      (r["case"], r["seq_len"], fmt(r["speedup"], ".1f"), r["speedup_target"], yes_no(r["meets_speedup_target"]),
                       fmt(r["chunked_vs_triton"], ".2f"), fmt(r["chunked_vs_kernel"], ".3f"), yes_no(r["meets_kernel_target"]),
                       fmt(r["triton_vs_mamba_ssm"], ".3f"), yes_no(r["meets_mamba_ssm_target"]))
                      for r in s["summary"])),
                  "Raw times:\n",
                  markdown_table(("case", "T", "impl", "iters", "fwd+bwd ms", "error"), (
                      (r["case"], r["seq_len"], r["impl"], r["iters"], fmt(r["fwd_bwd_ms"], ".3f"), r["error"] or "")
                      for r in s["rows"]))]
    if "training" in report:
        t = report["training"]
        parts += [f"## Training at T = {t['seq_len']} (autocast {t['rows'][0]['autocast']}, AdamW, "
                  f"compile={t['compile']})\n",
                  f"tokens/s over {t['rows'][0]['model']}'s (target >= {TRAIN_TARGET}).\n",
                  markdown_table(("run", "batch", "params", "ms/step", "tokens/s", "peak MB", "vs attention", "error"), (
                      (r["run"], r["batch"], fmt(r["params"], ",d"), fmt(r["step_ms"], ".1f"),
                       fmt(r["tokens_per_s"], ",.0f"), fmt(r["peak_mb"], ",.0f"), fmt(t["ratios"].get(r["run"])),
                       r["error"] or "") for r in t["rows"]))]
    if "decoding" in report:
        d = report["decoding"]
        parts += [f"## Decoding (batch {d['batch']}, {d['steps']} greedy steps after the context; eager, and for fixed-size "
                  "states replayed CUDA graphs of the eager and of the torch.compile'd step)\n",
                  markdown_table(("model", "mode", "context", "tokens/s", "ms/step", "peak MB while decoding", "state MB",
                                  "error"), (
                      (r["model"], r["mode"], r["context"], fmt(r["tokens_per_s"], ",.0f"), fmt(r["step_ms"]),
                       fmt(r["peak_decode_mb"], ",.0f"), fmt(r["state_mb"], ",.2f"), r["error"] or "")
                      for r in d["rows"])),
                  f"tokens/s over the attention model's (target >= {DECODE_TARGET} at the longest context, with memory "
                  f"growth longest/shortest context <= {FLAT_MEMORY}):\n",
                  markdown_table(("model", "mode", *[f"context {c}" for c in d["contexts"]], "memory growth", "target met"), (
                      (s["model"], s["mode"], *[fmt(s["ratio_by_context"][c]) for c in d["contexts"]],
                       f"{fmt(s['memory_growth'], '.3f')} ({s['memory_measure']})", yes_no(s["meets_target"]))
                      for s in d["summary"][1:]))]
    if "layer" in report:
        lay = report["layer"]
        shape = lay["rows"][0]
        parts += [f"## The Mamba-2 layer (dim {shape['dim']}, batch {shape['batch']}, T = {shape['seq_len']}, "
                  f"autocast {lay['autocast']}, fwd+bwd)\n",
                  markdown_table(("backend", "mode", "fwd+bwd ms", "error"), (
                      (r["backend"], "compiled" if r["compiled"] else "eager", fmt(r["fwd_bwd_ms"], ".3f"), r["error"] or "")
                      for r in lay["rows"])),
                  "torch/triton (the kernels' speed-up): " + ", ".join(
                      f"{mode} {fmt(x)}" for mode, x in lay["summary"].items()) + "\n"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, torch paths only: check the script runs")
    parser.add_argument("--only", choices=("scans", "training", "decoding", "layer"), help="run one section")
    parser.add_argument("--batch", action="append", default=[], metavar="MODEL=B",
                        help="training batch of every run of a model (repeatable)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models in the training section")
    parser.add_argument("--models", type=lambda s: s.split(","), default=None, metavar="MODEL[,MODEL]",
                        help="training runs of these models only (the attention model, the ratios' base, always runs)")
    args = parser.parse_args(argv)
    p = dict(PRESETS["smoke" if args.smoke else "gpu"])
    batches = {k: int(v) for k, v in (item.split("=", 1) for item in args.batch)}
    p["train_runs"] = tuple((name, batches.get(name, batch), overrides) for name, batch, overrides in p["train_runs"])
    if args.models is not None:
        p["train_runs"] = select_train_runs(p["train_runs"], args.models)
    if p["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run this on the GPU machine, or pass --smoke for the CPU check")
    device_name = torch.cuda.get_device_name() if p["device"] == "cuda" else "cpu"
    fla_version = None
    if fla_available():
        import fla

        fla_version = getattr(fla, "__version__", "unknown")
    say(f"ssm benchmark on {device_name} (torch {torch.__version__}, fla {fla_version}){' [smoke]' if args.smoke else ''}")
    report: dict[str, Any] = {"device_name": device_name, "torch": torch.__version__, "fla_version": fla_version,
                              "smoke": args.smoke}
    if args.only in (None, "scans"):
        rows = scan_rows(p)
        report["scans"] = {"dtype": str(p["dtype"]).removeprefix("torch."), "shapes": p["shapes"], "rows": rows,
                           "summary": scan_summary(rows)}
    if args.only in (None, "training"):
        rows = training_rows(p, args.compile)
        report["training"] = {"seq_len": p["train_seq_len"], "compile": args.compile, "rows": rows,
                              "ratios": versus_base(rows, "tokens_per_s"), "target": TRAIN_TARGET}
    if args.only in (None, "decoding"):
        rows = decoding_rows(p)
        report["decoding"] = {"batch": p["decode_batch"], "steps": p["decode_steps"], "contexts": list(p["contexts"]),
                              "rows": rows, "summary": decoding_summary(rows)}
    if args.only in (None, "layer"):
        rows = layer_rows(p)
        report["layer"] = {"autocast": str(p["autocast"]), "rows": rows, "summary": layer_summary(rows)}
    return write_report(report, args.out, "ssm_gpu" if not args.only else f"ssm_gpu_{args.only}", markdown)


if __name__ == "__main__":
    main()
