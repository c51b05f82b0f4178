"""Latency and throughput of registered models and mixers, each next to a plain peer (``zoo.peers``).

``benchmark`` measures every name at every sequence length in two regimes, ``latency`` (batch 1)
and ``throughput`` (a full batch), because a change can speed one up and slow the other down.
Each row also carries FLOPs from ``torch.utils.flop_counter`` and, on our rows, the fwd+bwd time
ratio to the peer measured in the same run. ``write_results`` saves rows as JSON, Markdown and a plot.
"""
from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import layers
from layers.registry import signature_kwargs, unknown_name_error
from zoo.peers import SDPAAttention, plain_gpt_like, timm_peer_name, timm_vit_like
from zoo.registry import create_model, list_models
from zoo.train import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REGIMES = ("latency", "throughput")
# the default throughput batch of LMs and mixers fills this many tokens (a GPU's, and a CPU's: 65,536 tokens of
# lm-tiny and vit-tiny's rows at T = 256 and 1024 took over 20 minutes on two cores)
TOKENS_PER_BATCH = {"cuda": 65536, "cpu": 4096}


@dataclass
class Target:
    """One benchmark name: how to build ours (and its peer, labelled), and how to feed them."""

    name: str
    kind: str  # "model" or "mixer"
    build: Callable[[], nn.Module]
    peer: tuple[str, Callable[[], nn.Module]] | None
    inputs: Callable[[int, int, torch.device, torch.dtype], tuple[torch.Tensor, ...]]  # (batch, seq_len, ...) -> args
    seq_lens: tuple[int, ...]
    throughput_batch: Callable[[int, torch.device], int]  # (seq_len, device) -> batch
    unit: str = "tokens"  # throughput is reported per token, and also per image for "images"


def tokens_batch(seq_len: int, device: torch.device) -> int:
    return max(1, TOKENS_PER_BATCH["cuda" if device.type == "cuda" else "cpu"] // seq_len)


def lm_target(name: str, meta: nn.Module, seq_lens: tuple[int, ...], **_) -> Target:
    """Token ids [B, T]; ``max_seq_len`` grows to the longest T asked for (rotary LMs have no length-sized weights)."""
    max_len = max(meta.config.max_seq_len, *seq_lens)
    with torch.device("meta"):
        long_enough = create_model(name, max_seq_len=max_len)
    vocab = meta.config.vocab_size
    return Target(
        name, "model",
        build=lambda: create_model(name, max_seq_len=max_len),
        peer=("PlainGPT", lambda: plain_gpt_like(long_enough)),
        inputs=lambda b, t, device, dtype: (torch.randint(0, vocab, (b, t), device=device),),
        seq_lens=seq_lens,
        throughput_batch=tokens_batch,
    )


def vit_target(name: str, meta: nn.Module, **_) -> Target:
    """Images [B, C, S, S] at the model's size; its token count (patches + CLS) replaces the asked lengths."""
    c = meta.config
    return Target(
        name, "model",
        build=lambda: create_model(name),
        peer=(f"timm/{timm_peer_name(c) or 'VisionTransformer'}", lambda: timm_vit_like(c)),
        inputs=lambda b, t, device, dtype: (torch.randn(b, c.in_chans, c.img_size, c.img_size, device=device, dtype=dtype),),
        seq_lens=((c.img_size // c.patch_size) ** 2 + 1,),
        throughput_batch=lambda t, device: 64 if device.type == "cuda" else 8,
        unit="images",
    )


def timm_target(name: str, meta: nn.Module, **_) -> Target:
    """Images [B, C, S, S] at the model's ``img_size``, beside the bare timm model (the wrapper's overhead);
    seq_len is the image's count of 16x16 patches. Both run in eval mode: batch norm cannot train on the
    latency regime's single image (the backward still runs, through the running statistics)."""
    from zoo.models.timm_family import build_timm

    c = meta.config
    size = c.resolution()
    return Target(
        name, "model",
        build=lambda: create_model(name).eval(),
        peer=(f"timm/{c.timm_name}", lambda: build_timm(c).eval()),
        inputs=lambda b, t, device, dtype: (torch.randn(b, c.in_chans, size, size, device=device, dtype=dtype),),
        seq_lens=(max(1, (size // 16) ** 2),),
        throughput_batch=lambda t, device: 64 if device.type == "cuda" else 8,
        unit="images",
    )


FAMILY_TARGETS: dict[str, Callable[..., Target]] = {"lm": lm_target, "vit": vit_target, "timm": timm_target}

MIXER_PEERS: dict[str, Callable[[layers.Mixer], tuple[str, Callable[[], nn.Module]]]] = {
    "attention": lambda m: ("SDPAAttention", lambda: SDPAAttention(m.dim, m.num_heads, rope=m.rope)),
}


def mixer_target(name: str, seq_lens: tuple[int, ...], dim: int, num_heads: int) -> Target:
    """The mixer alone on x: [B, T, dim] (requiring grad, as inside a network), causal where it supports it."""
    cls = layers.get_mixer_class(name)
    causal = cls.supports_causal
    # fixed-length mixers (linformer, cosformer) get the longest benchmarked length
    options = {"max_seq_len": max(seq_lens)} if "max_seq_len" in (signature_kwargs(cls.__init__) or []) else {}
    with torch.device("meta"):
        meta = layers.create_mixer(name, dim, num_heads, causal=causal, **options)
    return Target(
        name, "mixer",
        build=lambda: layers.create_mixer(name, dim, num_heads, causal=causal, **options),
        peer=MIXER_PEERS[name](meta) if name in MIXER_PEERS else None,
        inputs=lambda b, t, device, dtype: (torch.randn(b, t, dim, device=device, dtype=dtype, requires_grad=True),),
        seq_lens=seq_lens,
        throughput_batch=tokens_batch,
    )


def make_target(name: str, seq_lens: tuple[int, ...], dim: int, num_heads: int) -> Target:
    if name in list_models():
        with torch.device("meta"):
            meta = create_model(name)
        if meta.family not in FAMILY_TARGETS:
            raise ValueError(f"model {name!r} is of family {meta.family!r}, which the benchmark cannot feed "
                             f"(it knows {', '.join(sorted(FAMILY_TARGETS))})")
        return FAMILY_TARGETS[meta.family](name, meta, seq_lens=seq_lens)
    if name in layers.list_mixers():
        return mixer_target(name, seq_lens, dim, num_heads)
    raise unknown_name_error("model or mixer", name, [*list_models(), *layers.list_mixers()], listing="zoo.list_models() and layers.list_mixers()")


# --- measuring ------------------------------------------------------------------------------------


def cuda_ms(fn: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def cpu_ms(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


TIMERS = {"cuda": cuda_ms, "cpu": cpu_ms}


def median_ms(fn: Callable[[], None], device: torch.device, warmup: int, iters: int, before: Callable[[], None]) -> float:
    """Median wall time of ``fn`` over ``iters`` calls after ``warmup`` untimed ones; ``before`` runs untimed before each."""
    return interleaved_median_ms({"fn": fn}, device, warmup, iters, before)["fn"]


def interleaved_median_ms(fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, iters: int,
                          before: Callable[[], None]) -> dict[str, float]:
    """Median wall time of each of ``fns``, timed in turns (one call of each per round, ``iters`` rounds after
    ``warmup`` untimed ones), so that drifting clocks or a warming card weigh on all of them alike. Python's
    garbage collector is off while timing (as in ``timeit``): its full passes over every object an earlier
    benchmark left alive landed in host-bound steps (an MoE LM's step read 173-175 ms with it on, 155 ms off,
    on an H200)."""
    for _ in range(warmup):
        for fn in fns.values():
            before()
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(iters):
            for name, fn in fns.items():
                before()
                times[name].append(TIMERS[device.type](fn))
    finally:
        if was_enabled:
            gc.enable()
    return {name: statistics.median(t) for name, t in times.items()}


# The CPU's fused SDPA kernel has no formula in torch's counter; count it as the CUDA kernels are counted.
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def count_flops(module: nn.Module, fn: Callable[[], None], batch: int, seq_len: int, backward: bool) -> tuple[int, str]:
    """FLOPs of ``fn`` (which runs ``module``) and their source, ``counter`` or ``analytic``.

    The counter counts 2 FLOPs per multiply-add in matmuls, convolutions and SDPA (attention is counted
    in full, not halved for causal masks). A submodule the counter sees no FLOPs in (a custom kernel)
    may define ``analytic_flops(batch, seq_len)``, its forward FLOPs; it is used instead, times 3 when
    ``fn`` includes the backward pass (which costs about twice the forward).
    """
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        fn()
    counts = counter.get_flop_counts()
    root = type(module).__name__  # the counter names modules by the root's class, then attribute paths
    unseen = [
        m for path, m in module.named_modules()
        if hasattr(m, "analytic_flops") and not sum(counts.get(f"{root}.{path}" if path else root, {}).values())
    ]
    analytic = sum(m.analytic_flops(batch, seq_len) for m in unseen) * (3 if backward else 1)
    return counter.get_total_flops() + analytic, "analytic" if unseen else "counter"


def measure(module: nn.Module, inputs: tuple[torch.Tensor, ...], device: torch.device, compile: bool, warmup: int,
            iters: int, batch: int, seq_len: int) -> dict[str, Any]:
    """Forward (inference, no autograd) and forward+backward (of the output's sum) times, peak memory and FLOPs."""
    if compile:
        torch._dynamo.reset()  # a fresh compile per shape, clear of the recompile limit
    run = torch.compile(module, dynamic=False) if compile else module

    def forward():
        with torch.no_grad():
            run(*inputs)

    def forward_backward():
        run(*inputs).sum().backward()

    def clear_grads():
        module.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None

    cuda = device.type == "cuda"
    fwd_ms = median_ms(forward, device, warmup, iters, before=clear_grads)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    fwd_bwd_ms = median_ms(forward_backward, device, warmup, iters, before=clear_grads)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None

    def eager_forward():
        with torch.no_grad():
            module(*inputs)

    fwd_flops, source = count_flops(module, eager_forward, batch, seq_len, backward=False)
    fwd_bwd_flops, _ = count_flops(module, lambda: module(*inputs).sum().backward(), batch, seq_len, backward=True)
    clear_grads()
    return {
        "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "tokens_per_s": batch * seq_len / (fwd_bwd_ms / 1e3), "peak_mem_mb": peak,
        "fwd_flops": fwd_flops, "fwd_bwd_flops": fwd_bwd_flops, "macs": fwd_flops // 2, "flops_source": source,
    }


def tensor_bytes(tree: Any) -> int:
    """Bytes of every tensor in a nest of dicts and lists (a model's decoding states)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return sum(tensor_bytes(t) for t in items)


# how a decoding benchmark can step a model: decode_throughput's graph / compile flags by mode name
DECODE_MODES: dict[str, dict[str, bool]] = {"eager": dict(graph=False), "cuda graph": dict(graph=True),
                                            "cuda graph + compile": dict(graph=True, compile=True)}


def decode_modes(name: str, device: torch.device) -> list[str]:
    """The :data:`DECODE_MODES` model ``name`` decodes in on ``device``: eager, plus (CUDA, and a decoding state of
    fixed size, so no KV cache: ``zoo.decoding``) the replayed graphs of the eager and of the compiled step."""
    from zoo.decoding import has_fixed_size_state

    if device.type != "cuda":
        return ["eager"]
    with torch.device("meta"):
        return list(DECODE_MODES) if has_fixed_size_state(create_model(name)) else ["eager"]


def decode_throughput(name: str, context: int, batch: int, steps: int, device: torch.device, dtype: torch.dtype,
                      prefill_piece: int = 1024, graph: bool = False, compile: bool = False) -> dict[str, Any]:
    """Decoding speed of LM ``name``: prefill ``context`` random tokens (in ``prefill_piece``-token pieces),
    then time ``steps`` greedy single-token steps, eagerly or (``graph``) as replays of a captured CUDA
    graph (``zoo.decoding.GraphedDecoder``; with ``compile``, of the torch.compile'd step). Returns tokens/s,
    ms per step, the decoding state's size and the peak memory while decoding (CUDA)."""
    from zoo.decoding import GraphedDecoder

    with torch.device(device):
        model = create_model(name, max_seq_len=max(context + steps, 1024)).to(dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    with torch.no_grad():
        states = model.init_state(batch, device=device, dtype=dtype, max_len=context + steps)
        for start in range(0, context, prefill_piece):
            logits, states = model.prefill(ids[:, start:start + prefill_piece], states)
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        del logits
        state_mb = tensor_bytes(states) / 2**20
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if graph:
            advance = GraphedDecoder(model, states, compile=compile).step
        else:
            def advance(ids):
                nonlocal states
                logits, states = model.prefill(ids, states)
                return logits[:, -1]
        start = time.perf_counter()
        for _ in range(steps):
            next_ids = advance(next_ids).argmax(-1, keepdim=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return {"tokens_per_s": batch * steps / elapsed, "step_ms": elapsed / steps * 1e3, "state_mb": state_mb,
            "peak_decode_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def write_report(report: dict[str, Any], out_dir: str | Path, stem: str, markdown: Callable[[dict[str, Any]], str]) -> dict[str, Path]:
    """``out_dir/stem.json`` (everything measured) and ``out_dir/stem.md`` (``markdown(report)``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(report))
    print(f"wrote {paths['json']} and {paths['md']}", flush=True)
    return paths


def release(device: torch.device) -> None:
    """Hand freed CUDA memory back (after a model, a row or an out-of-memory error), so the next run starts clean."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    torch_device = resolve_device(device)
    if torch_device.type not in TIMERS:
        raise ValueError(f"device={device!r}: the benchmark runs on {' or '.join(TIMERS)}, not {torch_device.type}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if torch_device.type != "cuda" and dtype != "float32":
        raise ValueError(f"dtype={dtype!r} runs only on CUDA; on {torch_device.type} use dtype='float32'")
    return torch_device, DTYPES[dtype]


def add_peer_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``ratio_vs_peer`` = ours fwd+bwd ms / the peer's, on our rows whose peer row ran at the same point."""
    key = lambda r: (r["name"], r["regime"], r["batch"], r["seq_len"])
    peers = {key(r): r for r in rows if r["impl"].startswith("peer:")}
    for row in rows:
        peer = peers.get(key(row))
        if row["impl"] == "ours" and peer and row["fwd_bwd_ms"] and peer["fwd_bwd_ms"]:
            row["ratio_vs_peer"] = row["fwd_bwd_ms"] / peer["fwd_bwd_ms"]
    return rows


def benchmark(names: Sequence[str], device: str = "auto", dtype: str = "float32", batch: int | None = None,
              seq_lens: Sequence[int] = (1024,), compile: bool = False, warmup: int = 3, iters: int = 10,
              dim: int = 1024, num_heads: int = 16, with_peer: bool = True) -> list[dict[str, Any]]:
    """Benchmark registered models and mixers (and their peers); one row per name, impl, seq_len and regime.

    ``latency`` rows run batch 1; ``throughput`` rows run ``batch``, by default ~64k tokens for LMs and
    mixers (``65536 // T``; ``4096 // T`` on CPU) and 64 images for ViTs (8 on CPU). ``dim``/``num_heads`` shape mixers only;
    ViTs run at their own image size, whatever ``seq_lens`` says. ``dtype`` casts weights and inputs
    (bfloat16/float16 on CUDA only). ``macs`` is ``fwd_flops / 2``: the counter counts 2 FLOPs per
    multiply-add. A row whose run hit CUDA out-of-memory carries ``error: "oom"`` and no timings.
    """
    torch_device, torch_dtype = resolve(device, dtype)
    device_name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"
    setting = {"dtype": dtype, "device": str(torch_device), "device_name": device_name, "compile": compile}
    targets = [make_target(name, tuple(seq_lens), dim, num_heads) for name in names]  # unknown names fail before any run
    rows = []
    for target in targets:
        impls = {"ours": target.build}
        if with_peer and target.peer is not None:
            impls[f"peer:{target.peer[0]}"] = target.peer[1]
        for impl, build in impls.items():
            rows += benchmark_impl(target, impl, build, torch_device, torch_dtype, batch, setting, warmup, iters)
            release(torch_device)
    return add_peer_ratios(rows)


def benchmark_impl(target: Target, impl: str, build: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype,
                   batch: int | None, setting: dict[str, Any], warmup: int, iters: int) -> list[dict[str, Any]]:
    """The rows of one implementation of ``target``, over its lengths and both regimes (``setting``: dtype, device, compile)."""
    rows = []
    try:
        with torch.device(device):
            module = build().to(dtype)
    except torch.OutOfMemoryError:
        module = None
    for seq_len in target.seq_lens:
        for regime in REGIMES:
            b = 1 if regime == "latency" else batch or target.throughput_batch(seq_len, device)
            row = {
                "name": target.name, "kind": target.kind, "impl": impl, "regime": regime, "batch": b, "seq_len": seq_len,
                **setting, "fwd_ms": None, "fwd_bwd_ms": None, "tokens_per_s": None, "images_per_s": None,
                "peak_mem_mb": None, "params": None if module is None else sum(p.numel() for p in module.parameters()),
                "fwd_flops": None, "fwd_bwd_flops": None, "macs": None, "flops_source": None, "ratio_vs_peer": None,
                "error": None if module is not None else "oom",
            }
            try:
                if module is not None:
                    row.update(measure(module, target.inputs(b, seq_len, device, dtype), device, setting["compile"], warmup,
                                       iters, b, seq_len))
            except torch.OutOfMemoryError:
                row["error"] = "oom"
            release(device)
            if target.unit == "images" and row["fwd_bwd_ms"]:
                row["images_per_s"] = b / (row["fwd_bwd_ms"] / 1e3)
            rows.append(row)
    return rows


# --- reporting ------------------------------------------------------------------------------------


def fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, cells)) + " |" for cells in body]) + "\n"


TABLE_COLUMNS = ("name", "impl", "regime", "batch", "T", "dtype", "compile", "fwd ms", "fwd+bwd ms", "tokens/s", "images/s",
                 "peak MB", "fwd GFLOP", "ours/peer")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of benchmark rows (tokens/s and images/s are for fwd+bwd, GFLOP for fwd)."""
    return markdown_table(TABLE_COLUMNS, (
        (r["name"], r["impl"], r["regime"], r["batch"], r["seq_len"], r["dtype"], r["compile"],
         "OOM" if r["error"] == "oom" else fmt(r["fwd_ms"], ".3f"), fmt(r["fwd_bwd_ms"], ".3f"), fmt(r["tokens_per_s"], ",.0f"),
         fmt(r["images_per_s"], ",.1f"), fmt(r["peak_mem_mb"], ",.0f"), fmt(r["fwd_flops"] and r["fwd_flops"] / 1e9, ",.2f"),
         fmt(r["ratio_vs_peer"], ".3f"))
        for r in rows
    ))


def plot_latency(rows: list[dict[str, Any]], path: Path) -> Path:
    """fwd+bwd ms against sequence length, one panel per regime, one colour per name: ours solid, peer dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, len(REGIMES), figsize=(6 * len(REGIMES), 4.5), squeeze=False)
    names = list(dict.fromkeys(r["name"] for r in rows))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    for ax, regime in zip(axes[0], REGIMES):
        series: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for r in rows:
            if r["regime"] == regime and r["fwd_bwd_ms"] is not None:
                series.setdefault((r["name"], r["impl"]), []).append((r["seq_len"], r["fwd_bwd_ms"]))
        for (name, impl), points in series.items():
            xs, ys = zip(*sorted(points))
            ours = impl == "ours"
            ax.plot(xs, ys, color=colors[name], linestyle="-" if ours else "--", marker="o" if ours else "^",
                    fillstyle="full" if ours else "none", label=f"{name} {impl}")
        ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="fwd+bwd ms", title=regime)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.legend(fontsize="small")
    fig.suptitle(", ".join(sorted({r["device_name"] for r in rows})))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(rows: list[dict[str, Any]], out_dir: str | Path, plot: bool = False) -> dict[str, Path]:
    """Write ``bench.json`` (the rows), ``bench.md`` (a table) and, with ``plot=True``, ``bench.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md"}
    paths["json"].write_text(json.dumps(rows, indent=2) + "\n")
    devices = ", ".join(sorted({r["device_name"] for r in rows}))
    paths["md"].write_text(f"# Benchmark\n\nDevice: {devices}\n\n{format_table(rows)}")
    if plot:
        paths["png"] = plot_latency(rows, out / "bench.png")
    return paths
