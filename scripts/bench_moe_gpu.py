"""GPU benchmark of the mixture-of-experts layer and LM: writes ``moe_gpu.json`` and ``moe_gpu.md``
(default ``docs/benchmarks/``).

(a) The ``layers.MoE`` layer alone, fwd+bwd in bf16 on 65536 tokens of dim 1024, 64 experts, dropless softmax
    top-k routing, two settings: top-2 with expert hidden 1024 (Mixtral-like) and top-6 with expert hidden 512
    (fine-grained). Expert FLOPs are those of the routed SwiGLU GEMMs only: ``tokens * top_k * 3 * dim * hidden
    * 2`` forward, x3 for fwd+bwd. Rows, side by side in one run:
    ``dense``         the same FLOPs as one plain bf16 SwiGLU on [tokens * top_k, dim] (x @ [dim, 2 hidden],
                      then @ [hidden, dim]) with torch's activation (``silu(gate) * up``): the attainable rate;
    ``dense_fused``   the same with the layers' fused activation (:func:`layers.swiglu.swiglu`), which the
                      experts also run: the rate against a dense MLP that gains what the experts gained;
    ``grouped_gemm``  the experts' grouped GEMMs alone on a pre-sorted, evenly split buffer;
    ``grouped_mm``    the whole layer (routing, permutation, GEMMs, combine) with ``implementation="grouped_mm"``;
    ``loop``          the whole layer with the per-expert ``implementation="loop"``;
    ``dense_compiled``, ``grouped_mm_compiled``: ``dense`` and ``grouped_mm`` under torch.compile (inductor
                      fuses the dense activation into one pointwise kernel beside the GEMMs, and the layer's
                      routing ops): the same comparison once both sides are compiled.
    Targets: the layer's expert TFLOP/s >= 80% of ``dense``'s; loop / grouped_mm time >= 5. The rates over
    ``dense_fused`` and compiled over compiled, and ``auto``'s choice for these inputs, are reported beside them.
(b) Training steps (bf16 autocast, fused AdamW, grad clip: bench_spine_gpu's ``train_step``) of lm-350m-moe
    against lm-350m with ``mlp_hidden`` chosen so both have the same active parameters (B = 8, T = 1024), both
    models resident and their steps timed in turns, eager (and with ``--compile`` also both torch.compile'd); one
    and eight micro-batches per optimiser step (the optimiser, clipping and weight casts cost in proportion to all
    parameters, 3.2x the dense model's, once per step); target: MoE tokens/s >= 0.7x the dense model's.

Failures (out of memory, a refused implementation) are reported in their row (``error``); the run goes on.

    python scripts/bench_moe_gpu.py [--out DIR] [--only layer|training] [--compile] [--profile]
    python scripts/bench_moe_gpu.py --smoke --out DIR   # CPU, tiny sizes
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling scripts, as top-level modules

import torch

from layers.moe import MoE, grouped_mm_unsupported
from layers.swiglu import naive_swiglu, swiglu
from bench_ssm_gpu import build_training, fmt, guarded, ratio, say, yes_no
from zoo.bench import interleaved_median_ms, markdown_table, median_ms, write_report
from zoo.registry import create_model

EFFICIENCY_TARGET = 0.8  # MoE layer expert TFLOP/s over the dense GEMM's, at least
LOOP_TARGET = 5.0  # loop / grouped_mm layer time, at least
TRAIN_TARGET = 0.7  # MoE LM tokens/s over the dense LM's of the same active parameters, at least
HIDDEN_MULTIPLE = 64  # the matched dense mlp_hidden is a multiple of this

PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(device="cuda", dtype=torch.bfloat16, tokens=65536, dim=1024, num_experts=64,
                settings=({"top_k": 2, "hidden": 1024}, {"top_k": 6, "hidden": 512}), timing={"fast": (3, 10), "slow": (2, 5)},
                compile_backend="inductor",
                pairs=(("lm-350m-moe", "lm-350m"),), train_batch=8, train_seq_len=1024, train_accums=(1, 8), train_warmup=3,
                train_steps=10,
                autocast=torch.bfloat16),
    "smoke": dict(device="cpu", dtype=torch.bfloat16, tokens=256, dim=64, num_experts=8,
                  settings=({"top_k": 2, "hidden": 64}, {"top_k": 6, "hidden": 32}), timing={"fast": (0, 1), "slow": (0, 1)},
                  compile_backend="aot_eager",  # traces the same graphs without inductor's CPU compile
                  pairs=(("lm-tiny-moe", "lm-tiny"),), train_batch=1, train_seq_len=64, train_accums=(1, 2), train_warmup=0,
                  train_steps=1,
                  autocast=None),
}


# --- (a) the layer --------------------------------------------------------------------------------------


def expert_flops(tokens: int, top_k: int, dim: int, hidden: int) -> int:
    """fwd+bwd FLOPs of the routed SwiGLU expert GEMMs: 2 per multiply-add, backward twice the forward."""
    return tokens * top_k * 3 * dim * hidden * 2 * 3


def time_fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], device: torch.device, warmup: int,
                 iters: int) -> float:
    """Median ms of ``fn()`` and its backward against a fixed random cotangent; ``leaves``' grads cleared between runs."""
    dy = torch.randn_like(fn())

    def clear():
        for t in leaves:
            t.grad = None

    return median_ms(lambda: torch.autograd.backward(fn(), dy), device, warmup, iters, clear)


def build_moe(p: dict[str, Any], setting: dict[str, int], implementation: str) -> MoE:
    """The layer of ``setting``, seeded so every implementation gets the same weights (and so the same routing)."""
    torch.manual_seed(0)
    with torch.device(p["device"]):
        return MoE(p["dim"], setting["hidden"], p["num_experts"], setting["top_k"], implementation=implementation).to(p["dtype"])


def dense_case(activation: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., tuple[Callable[[], torch.Tensor], list]]:
    """One SwiGLU over all tokens * top_k rows (``activation`` of the fused gate/up product): the expert GEMMs'
    FLOPs as plain dense matmuls."""
    def case(p: dict[str, Any], setting: dict[str, int]):
        rows, dim, hidden = p["tokens"] * setting["top_k"], p["dim"], setting["hidden"]
        leaf = lambda *shape, scale=1.0: (torch.randn(*shape, device=p["device"], dtype=p["dtype"]) * scale).requires_grad_()
        x, w_in, w_out = leaf(rows, dim), leaf(dim, 2 * hidden, scale=dim ** -0.5), leaf(hidden, dim, scale=hidden ** -0.5)
        return (lambda: activation(x @ w_in) @ w_out), [x, w_in, w_out]

    return case


def grouped_gemm_case(p: dict[str, Any], setting: dict[str, int]) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """The experts' grouped GEMMs alone, every expert given the same number of rows (a multiple of 16)."""
    experts = build_moe(p, setting, "grouped_mm").experts
    per_expert = 16 * -(-p["tokens"] * setting["top_k"] // (p["num_experts"] * 16))
    x = torch.randn(per_expert * p["num_experts"], p["dim"], device=p["device"], dtype=p["dtype"], requires_grad=True)
    offs = torch.arange(1, p["num_experts"] + 1, device=p["device"], dtype=torch.int32) * per_expert
    return (lambda: experts.grouped(x, offs)), [x, *experts.parameters()]


def layer_case(implementation: str) -> Callable[..., tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]:
    def case(p: dict[str, Any], setting: dict[str, int]):
        moe = build_moe(p, setting, implementation)
        x = torch.randn(p["tokens"], p["dim"], device=p["device"], dtype=p["dtype"], requires_grad=True)
        return (lambda: moe(x)[0]), [x, *moe.parameters()]

    return case


Case = Callable[..., tuple[Callable[[], torch.Tensor], list]]  # (preset, setting) -> (fn, leaves)


def compiled(case: Case) -> Case:
    """``case`` with its function under torch.compile (the preset's ``compile_backend``)."""
    def compiled_case(p: dict[str, Any], setting: dict[str, int]):
        fn, leaves = case(p, setting)
        return torch.compile(fn, backend=p["compile_backend"]), leaves

    return compiled_case


# impl -> (builder of (fn, leaves), timing)
LAYER_IMPLS: dict[str, tuple[Callable[..., Any], str]] = {
    "dense": (dense_case(naive_swiglu), "fast"),
    "dense_fused": (dense_case(swiglu), "fast"),
    "grouped_gemm": (grouped_gemm_case, "fast"),
    "grouped_mm": (layer_case("grouped_mm"), "fast"),
    "loop": (layer_case("loop"), "slow"),
    "dense_compiled": (compiled(dense_case(naive_swiglu)), "fast"),
    "grouped_mm_compiled": (compiled(layer_case("grouped_mm")), "fast"),
}


def auto_choice(p: dict[str, Any], setting: dict[str, int]) -> str:
    """What ``implementation="auto"`` runs for these inputs (and why, when it falls back to the loop)."""
    moe = build_moe(p, setting, "auto")
    reason = grouped_mm_unsupported(torch.zeros(16, p["dim"], device=p["device"], dtype=p["dtype"]), moe.experts)
    return "grouped_mm" if reason is None else f"loop ({reason})"


def layer_rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    device, rows = torch.device(p["device"]), []
    for setting in p["settings"]:
        flops = expert_flops(p["tokens"], setting["top_k"], p["dim"], setting["hidden"])
        for impl, (case, timing) in LAYER_IMPLS.items():
            warmup, iters = p["timing"][timing]
            row = {"section": "layer", "impl": impl, "tokens": p["tokens"], "dim": p["dim"], "num_experts": p["num_experts"],
                   **setting, "dtype": str(p["dtype"]).removeprefix("torch."), "expert_flops": flops, "iters": iters,
                   "fwd_bwd_ms": None, "tflops": None, "error": None}

            def measure():
                fn, leaves = case(p, setting)
                ms = time_fwd_bwd(fn, leaves, device, warmup, iters)
                return {"fwd_bwd_ms": ms, "tflops": flops / (ms / 1e3) / 1e12}

            rows.append(guarded(row, device, measure))
            say(f"layer top-{setting['top_k']} hidden {setting['hidden']:<5} {impl:<12} " + (
                f"{row['fwd_bwd_ms']:9.3f} ms {row['tflops']:8.2f} TFLOP/s" if row["error"] is None else row["error"]))
    return rows


def layer_summary(rows: list[dict[str, Any]], p: dict[str, Any]) -> list[dict[str, Any]]:
    """Per setting: the layer's and the bare grouped GEMMs' rate over dense, loop / grouped_mm, auto's choice."""
    out = []
    for setting in p["settings"]:
        ms = {r["impl"]: r["fwd_bwd_ms"] for r in rows if (r["top_k"], r["hidden"]) == (setting["top_k"], setting["hidden"])}
        efficiency = ratio(ms["dense"], ms["grouped_mm"])  # same FLOPs, so the rate ratio is the inverse time ratio
        speedup = ratio(ms["loop"], ms["grouped_mm"])
        out.append({**setting, "efficiency": efficiency, "efficiency_vs_fused_dense": ratio(ms["dense_fused"], ms["grouped_mm"]),
                    "grouped_gemm_efficiency": ratio(ms["dense_fused"], ms["grouped_gemm"]),  # both the fused activation
                    "compiled_efficiency": ratio(ms["dense_compiled"], ms["grouped_mm_compiled"]),
                    "loop_speedup": speedup, "auto_choice": auto_choice(p, setting),
                    "meets_efficiency_target": (efficiency or 0) >= EFFICIENCY_TARGET,
                    "meets_loop_target": (speedup or 0) >= LOOP_TARGET})
    return out


def profile_layer(p: dict[str, Any], setting: dict[str, int], iters: int = 3, top: int = 15) -> list[dict[str, Any]]:
    """The kernels (CUDA) or ops (CPU) taking the most self time in the grouped_mm layer's fwd+bwd, per iteration."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(p["device"])
    fn, leaves = layer_case("grouped_mm")(p, setting)
    dy = torch.randn_like(fn())
    for _ in range(2):  # warm up (kernel selection, allocator)
        torch.autograd.backward(fn(), dy)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            for t in leaves:
                t.grad = None
            torch.autograd.backward(fn(), dy)
        if cuda:
            torch.cuda.synchronize()
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = sorted(prof.key_averages(), key=self_us, reverse=True)[:top]
    return [{"name": e.key[:90], "ms_per_iter": self_us(e) / 1e3 / iters, "calls_per_iter": e.count / iters}
            for e in events if self_us(e) > 0]


# --- (b) training ---------------------------------------------------------------------------------------


def matched_dense_hidden(name: str, active_params: int) -> int:
    """The ``mlp_hidden`` (a multiple of HIDDEN_MULTIPLE) giving ``create_model(name)`` nearest ``active_params``
    parameters: the count is linear in mlp_hidden, so two meta-device builds fix it."""
    with torch.device("meta"):
        count = lambda h: create_model(name, mlp_hidden=h).num_params()
        low, high = count(HIDDEN_MULTIPLE), count(2 * HIDDEN_MULTIPLE)
    units = 1 + (active_params - low) / (high - low)
    return HIDDEN_MULTIPLE * max(1, round(units))


def moe_dispatch(name: str, p: dict[str, Any]) -> list[str]:
    """What reaches the MoE layers of model ``name`` in a (no-grad) forward under the training autocast: the
    tokens' and expert weights' dtypes and whether ``grouped_mm`` accepts them (else ``auto`` runs the loop)."""
    device = torch.device(p["device"])
    with torch.device(device):
        model = create_model(name)
    seen = set()

    def record(moe: MoE, args: tuple) -> None:
        reason = grouped_mm_unsupported(args[0].reshape(-1, moe.dim), moe.experts)
        seen.add(f"implementation={moe.implementation}: tokens {args[0].dtype}, experts {moe.experts.w_in.dtype}, "
                 + ("grouped_mm accepts them" if reason is None else f"grouped_mm refuses ({reason})"))

    for module in model.modules():
        if isinstance(module, MoE):
            module.register_forward_pre_hook(record)
    with torch.no_grad(), torch.autocast(device.type, dtype=p["autocast"], enabled=p["autocast"] is not None):
        model(torch.zeros(1, 16, dtype=torch.long, device=device))
    return sorted(seen)


def training_pair(moe_name: str, dense_name: str, hidden: int, p: dict[str, Any], compile: bool) -> dict[int, dict[str, dict]]:
    """Per number of micro-batches per optimiser step (``train_accums``): training rows of the MoE LM and its dense
    twin, both resident and timed step by step in turns (:func:`zoo.bench.interleaved_median_ms`): timed one after
    the other, the same model's step time moved by up to 15% between runs on an H200, more than the gap to the
    target."""
    device, T = torch.device(p["device"]), p["train_seq_len"]
    counts, runs = {}, {}
    for kind, name, overrides in (("moe", moe_name, {}), ("dense", dense_name, {"mlp_hidden": hidden})):
        counts[kind] = {"model": name, "overrides": overrides, "params": None, "active_params": None, "peak_mb": None,
                        "error": None}

        def build(kind=kind, name=name, overrides=overrides):
            built, runs[kind] = build_training(name, p["train_batch"], p, compile, overrides)
            return built

        guarded(counts[kind], device, build)
    out = {}
    for accum in p["train_accums"]:
        rows = out[accum] = {kind: {"section": "training", **counts[kind], "batch": p["train_batch"], "seq_len": T,
                                    "accum": accum, "compile": compile, "autocast": str(p["autocast"]), "step_ms": None,
                                    "tokens_per_s": None} for kind in counts}
        if runs:
            times = interleaved_median_ms({kind: (lambda run=run: run(accum)) for kind, run in runs.items()}, device, 1,
                                          p["train_steps"], lambda: None)
            for kind, ms in times.items():
                rows[kind].update(step_ms=ms, tokens_per_s=p["train_batch"] * T * accum / (ms / 1e3))
        for row in rows.values():
            say(f"training {row['model']:<16} B={row['batch']} T={T} accum={accum} compile={compile} " + (
                f"{row['tokens_per_s']:10,.0f} tok/s  step {row['step_ms']:.1f} ms  peak {fmt(row['peak_mb'], ',.0f')} MB"
                if row["error"] is None else row["error"]))
    return out


def training_pairs(p: dict[str, Any], compile: bool) -> list[dict[str, Any]]:
    out = []
    for moe_name, dense_name in p["pairs"]:
        with torch.device("meta"):
            active = create_model(moe_name).num_active_params()
        hidden = matched_dense_hidden(dense_name, active)
        dispatch = guarded({"in_model": None, "error": None}, torch.device(p["device"]),
                           lambda: {"in_model": moe_dispatch(moe_name, p)})
        say(f"training {moe_name}: MoE layers see {dispatch['in_model'] or dispatch['error']}")
        for accum, rows in training_pair(moe_name, dense_name, hidden, p, compile).items():
            moe, dense = rows["moe"], rows["dense"]
            speed = ratio(moe["tokens_per_s"], dense["tokens_per_s"])
            say(f"training {moe_name} / {dense_name}(mlp_hidden={hidden}) accum={accum} compile={compile} tokens/s = "
                f"{fmt(speed, '.3f')} (target >= {TRAIN_TARGET}: {'ok' if (speed or 0) >= TRAIN_TARGET else 'MISSED'})")
            out.append({"moe": moe, "dense": dense, "dense_mlp_hidden": hidden, "moe_active_params": active,
                        "dispatch": dispatch, "ratio": speed, "meets_target": (speed or 0) >= TRAIN_TARGET})
    return out


# --- report ---------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    parts = ["# Mixture-of-experts GPU benchmark\n", f"Card: **{report['device_name']}**; torch {report['torch']}.\n"]
    if "layer" in report:
        lay = report["layer"]
        parts += [f"## MoE layer ({lay['tokens']} tokens, dim {lay['dim']}, {lay['num_experts']} experts, "
                  f"{lay['dtype']}, fwd+bwd)\n",
                  "Expert FLOPs = tokens * top_k * 3 * dim * hidden * 2 * 3 (the routed SwiGLU GEMMs, fwd+bwd). "
                  f"Targets: layer rate / dense rate >= {EFFICIENCY_TARGET}; loop / grouped_mm time >= {LOOP_TARGET}.\n",
                  markdown_table(("top_k", "hidden", "layer / dense rate", "target met", "layer / dense_fused rate",
                                  "compiled layer / compiled dense rate", "grouped GEMMs alone / dense_fused",
                                  "loop / grouped_mm", "target met", "auto runs"), (
                      (s["top_k"], s["hidden"], fmt(s["efficiency"], ".1%"), yes_no(s["meets_efficiency_target"]),
                       fmt(s["efficiency_vs_fused_dense"], ".1%"), fmt(s["compiled_efficiency"], ".1%"),
                       fmt(s["grouped_gemm_efficiency"], ".1%"), fmt(s["loop_speedup"], ".1f"),
                       yes_no(s["meets_loop_target"]), s["auto_choice"]) for s in lay["summary"])),
                  "Raw times:\n",
                  markdown_table(("top_k", "hidden", "impl", "iters", "fwd+bwd ms", "expert TFLOP/s", "error"), (
                      (r["top_k"], r["hidden"], r["impl"], r["iters"], fmt(r["fwd_bwd_ms"], ".3f"), fmt(r["tflops"]),
                       r["error"] or "") for r in lay["rows"]))]
        for prof in lay.get("profiles", []):
            parts += [f"Where the grouped_mm layer's time goes (top-{prof['top_k']}, hidden {prof['hidden']}; self time "
                      "per fwd+bwd, torch.profiler):\n",
                      markdown_table(("kernel / op", "ms", "calls"), (
                          (e["name"].replace("|", "/"), fmt(e["ms_per_iter"], ".3f"), fmt(e["calls_per_iter"], ".0f"))
                          for e in prof["events"]))]
    if "training" in report:
        pairs = report["training"]
        rows = [(pair[kind], pair) for pair in pairs for kind in ("moe", "dense")]
        parts += [f"## Training steps, MoE LM vs the dense LM of the same active parameters (target >= {TRAIN_TARGET})\n",
                  "A step is `accum` micro-batches of batch x T tokens, then one optimiser step (clip, fused AdamW).\n",
                  markdown_table(("model", "overrides", "compiled", "batch", "T", "accum", "params", "active params",
                                  "ms/step", "tokens/s", "peak MB", "MoE / dense", "target met", "error"), (
                      (r["model"], json.dumps(r["overrides"]), yes_no(r["compile"]), r["batch"], r["seq_len"], r["accum"],
                       fmt(r["params"], ",d"),
                       fmt(r["active_params"], ",d"), fmt(r["step_ms"], ".1f"), fmt(r["tokens_per_s"], ",.0f"),
                       fmt(r["peak_mb"], ",.0f"), fmt(pair["ratio"], ".3f"), yes_no(pair["meets_target"]), r["error"] or "")
                      for r, pair in rows)),
                  "What the MoE layers receive under the training autocast:\n",
                  *[f"- {pair['moe']['model']}: {'; '.join(pair['dispatch']['in_model'] or [pair['dispatch']['error']])}\n"
                    for pair in pairs if not pair["moe"]["compile"] and pair["moe"]["accum"] == 1]]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check the script runs")
    parser.add_argument("--only", choices=("layer", "training"), help="run one section")
    parser.add_argument("--compile", action="store_true", help="also time both models torch.compile'd in the training section")
    parser.add_argument("--profile", action="store_true", help="also profile the grouped_mm layer (top kernels)")
    args = parser.parse_args(argv)
    p = PRESETS["smoke" if args.smoke else "gpu"]
    if p["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run this on the GPU machine, or pass --smoke for the CPU check")
    device_name = torch.cuda.get_device_name() if p["device"] == "cuda" else "cpu"
    say(f"moe benchmark on {device_name} (torch {torch.__version__}){' [smoke]' if args.smoke else ''}")
    report: dict[str, Any] = {"device_name": device_name, "torch": torch.__version__, "smoke": args.smoke}
    if args.only in (None, "layer"):
        rows = layer_rows(p)
        report["layer"] = {"tokens": p["tokens"], "dim": p["dim"], "num_experts": p["num_experts"],
                           "dtype": str(p["dtype"]).removeprefix("torch."), "rows": rows, "summary": layer_summary(rows, p)}
        if args.profile:
            report["layer"]["profiles"] = [{**setting, "events": profile_layer(p, setting)} for setting in p["settings"]]
            for prof in report["layer"]["profiles"]:
                for e in prof["events"]:
                    say(f"profile top-{prof['top_k']}: {e['ms_per_iter']:8.3f} ms x{e['calls_per_iter']:.0f} {e['name']}")
    if args.only in (None, "training"):
        report["training"] = [pair for compile in ((False, True) if args.compile else (False,))
                              for pair in training_pairs(p, compile)]
    return write_report(report, args.out, "moe_gpu" if not args.only else f"moe_gpu_{args.only}", markdown)


if __name__ == "__main__":
    main()
