"""Helpers shared by the sequence-mixer tests (attention, sliding window, block sparse, linear attention,
RetNet, GLA): tolerances, random inputs, reference building blocks and the checks every mixer repeats.

Tolerance conventions (all errors are max absolute errors scaled by ``max(1, max|expected|)``):
* float32: ``FP32_TOL`` = 1e-5 (see ``assert_close``).
* bfloat16: ``BF16_TOL`` = 3e-2 against the float32 reference computed from the *same* bf16-rounded
  weights and inputs; and, as in flash-linear-attention's tests, the fast path's error must be at most
  2x the naive path's error (the plain computation run in bf16) plus ``BF16_RATIO_EPS`` = 1e-3, so a
  kernel "within tolerance" but clearly worse than the naive computation still fails
  (see ``assert_bf16_ratio``).

Imported by the test files as a sibling module (``from mixer_checks import ...``): with no
``__init__.py`` in ``tests/`` pytest's default ``prepend`` import mode puts ``tests/layers`` on
``sys.path``, as ``test_gated_deltanet.py`` already relies on for ``test_deltanet``.
Assertions here carry explicit messages (pytest does not rewrite asserts outside test modules).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layers
from layers.linear_attention import fla_available
from layers.sparse_attention import naive_masked_attention

FP32_TOL = 1e-5
BF16_TOL = 3e-2
BF16_RATIO_EPS = 1e-3


# --- tolerances ------------------------------------------------------------------------------------


def _scale(expected: torch.Tensor) -> float:
    """The error scale: max(1, max|expected|)."""
    return max(1.0, expected.detach().abs().max().item())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = FP32_TOL, msg: str = "") -> None:
    """max |actual - expected| <= tol * max(1, max|expected|) (plus rtol=tol elementwise slack); tol defaults to 1e-5."""
    torch.testing.assert_close(actual, expected, atol=tol * _scale(expected), rtol=tol,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute error of ``a`` against the reference ``b``, divided by max(1, max|b|) (computed in float32)."""
    return (a.float() - b.float()).abs().max().item() / _scale(b)


def assert_bf16_ratio(err_fast: float, err_naive: float, what: str = "") -> None:
    """bf16: err_fast <= BF16_TOL (3e-2) and err_fast <= 2 * err_naive + BF16_RATIO_EPS (1e-3)."""
    assert err_fast <= BF16_TOL, f"{what} bf16 error {err_fast:.3g} > {BF16_TOL} (naive: {err_naive:.3g})"
    assert err_fast <= 2 * err_naive + BF16_RATIO_EPS, f"{what} bf16 error {err_fast:.3g} > 2x naive bf16 error {err_naive:.3g}"


# --- inputs ----------------------------------------------------------------------------------------


def shape_ids(shapes: Iterable[tuple[int, int, int, int]]) -> list[str]:
    """Test ids for (batch, seq_len, dim, num_heads) shapes."""
    return [f"B{b}-T{t}-D{d}-H{h}" for b, t, d, h in shapes]


def rand_x(B: int, T: int, D: int, dtype=torch.float32, requires_grad: bool = False) -> torch.Tensor:
    """A standard-normal mixer input [B, T, D]."""
    return torch.randn(B, T, D, dtype=dtype).requires_grad_(requires_grad)


def rand_qkv(B: int, H: int, T: int, Dk: int, Dv: int, dtype=torch.float32):
    """Standard-normal q, k [B, H, T, Dk] and v [B, H, T, Dv] (drawn in that order)."""
    return torch.randn(B, H, T, Dk, dtype=dtype), torch.randn(B, H, T, Dk, dtype=dtype), torch.randn(B, H, T, Dv, dtype=dtype)


def padding_mask(lengths: Sequence[int], T: int, side: str) -> torch.Tensor:
    """[B, T] bool, True on real tokens: sequence b has lengths[b] real tokens, padded on ``side`` ("left"/"right")."""
    ar = torch.arange(T)[None]
    lens = torch.tensor(lengths)[:, None]
    return ar < lens if side == "right" else ar >= T - lens


def init_params(m: nn.Module, weight_std: float | Callable[[torch.Tensor], float],
                special: Callable[[str, torch.Tensor], bool] | None = None) -> nn.Module:
    """Random parameters, in ``named_parameters`` order: ``special(name, p)`` first (True: it drew p),
    else normal(0, 0.1) for biases and normal(0, weight_std) (a float, or a function of p) for the rest."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if special is not None and special(name, p):
                continue
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, weight_std(p) if callable(weight_std) else weight_std)
    return m


def twin_mixer(m: nn.Module, mixer_name: str, options: Iterable[str] = (), **overrides) -> nn.Module:
    """A copy of the softmax-attention-like mixer ``m`` (same weights, dtype) with some constructor options changed.

    Copies causal, backend, rope, qkv_bias, proj_bias and the attributes named in ``options``."""
    kw = dict(causal=m.causal, backend=m.backend, rope=m.rope, qkv_bias=m.qkv.bias is not None,
              proj_bias=m.proj.bias is not None, **{o: getattr(m, o) for o in options})
    kw.update(overrides)
    t = layers.create_mixer(mixer_name, m.dim, m.num_heads, **kw)
    t.load_state_dict(m.state_dict())
    return t.to(m.qkv.weight.dtype)


# --- reference building blocks -----------------------------------------------------------------------


def ref_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """GPT-NeoX RoPE written with complex numbers: feature i pairs with i + Dh/2. x: [T, H, Dh]."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    rot = torch.polar(torch.ones(len(positions), half, dtype=torch.float64), positions.double()[:, None] * freqs)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * rot[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def ref_qk_norm(m: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``qk_norm`` option written out: with ``m.qk_norm``, ``t / sqrt(mean(t^2) + eps) * weight`` over the last
    (head) dim of q and of k, in their dtype, with ``m.q_norm`` / ``m.k_norm``'s weights and eps; else q, k as given."""
    if not getattr(m, "qk_norm", False):
        return q, k
    norm = lambda t, n: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + n.eps) * n.weight.to(t.dtype)
    return norm(q, m.q_norm), norm(k, m.k_norm)


def linear(layer: nn.Linear, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``layer(t)`` with the weight and bias cast to ``dtype`` (differentiable w.r.t. both)."""
    return F.linear(t, layer.weight.to(dtype), None if layer.bias is None else layer.bias.to(dtype))


def per_sequence(x: torch.Tensor, mask: torch.Tensor | None, fn: Callable[[torch.Tensor], torch.Tensor],
                 dtype=torch.float32) -> torch.Tensor:
    """Runs each sequence alone: ``fn(x_b)`` on its real tokens ``x_b`` [n, D] (cast to ``dtype``), which are
    numbered 0..n-1 as if there were no padding; padded outputs are zero. Differentiable w.r.t. x."""
    B, T, D = x.shape
    outs = []
    for b in range(B):
        idx = (torch.ones(T, dtype=torch.bool) if mask is None else mask[b]).nonzero().flatten()
        y = torch.zeros(T, D, dtype=dtype)
        if len(idx):
            y = y.index_put((idx,), fn(x[b, idx].to(dtype)))
        outs.append(y)
    return torch.stack(outs)


def reference_softmax_module(m: nn.Module, x: torch.Tensor, mask: torch.Tensor | None,
                             attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                             rope_base: float | None = None) -> torch.Tensor:
    """What a softmax-attention mixer (``qkv`` and ``proj`` linears, optional RoPE) must compute, in float32,
    one sequence at a time (see ``per_sequence``): ``attend(q, k, v)`` maps [n, H, Dh] each to the heads'
    outputs ([n, H, Dh] or [n, H * Dh]); RoPE uses ``rope_base`` (default ``m.rotary.base``)."""
    H, Dh = m.num_heads, m.head_dim

    def one(xb):
        n = len(xb)
        q, k, v = linear(m.qkv, xb).view(n, 3, H, Dh).unbind(1)
        q, k = ref_qk_norm(m, q, k)
        if m.rope:
            pos, base = torch.arange(n), m.rotary.base if rope_base is None else rope_base
            q, k = ref_rope(q, pos, base), ref_rope(k, pos, base)
        return linear(m.proj, attend(q, k, v).reshape(n, H * Dh))

    return per_sequence(x, mask, one)


def masked_attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``naive_masked_attention`` on one sequence laid out [n, H, Dh]; ``allowed`` [n, n]; returns [n, H, Dh]."""
    o = naive_masked_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), allowed)
    return o[0].transpose(0, 1)


# --- runs ----------------------------------------------------------------------------------------------


def forward_backward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor):
    """y = fn(x') for a fresh leaf copy x' of x, then backward of (y.float() * dy).sum(); returns (y, x'.grad)."""
    x_ = x.detach().clone().requires_grad_()
    y = fn(x_)
    (y.float() * dy).sum().backward()
    return y, x_.grad


def param_grads(m: nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of ``m``'s parameters, by name (cloned)."""
    return {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}


def step_through(m: nn.Module, x: torch.Tensor, state):
    """Decodes ``x`` [B, T, D] one token at a time from ``state``; returns (outputs [B, T, D], state)."""
    B, T, D = x.shape
    outs = []
    for t in range(T):
        y_t, state = m.step(x[:, t : t + 1], state)
        assert y_t.shape == (B, 1, D), f"step output shape {tuple(y_t.shape)} != {(B, 1, D)}"
        outs.append(y_t)
    return (torch.cat(outs, 1) if outs else x[:, :0]), state


def prefill_chunks(m: nn.Module, x: torch.Tensor, chunks: Iterable[tuple[int, int]], state):
    """Prefills ``x[:, lo:hi]`` for each (lo, hi) in turn; returns (the outputs concatenated, state)."""
    outs = []
    for lo, hi in chunks:
        y, state = m.prefill(x[:, lo:hi], state)
        outs.append(y)
    return torch.cat(outs, 1), state


# --- checks ----------------------------------------------------------------------------------------------


def check_grads_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str = "") -> None:
    """Every reference gradient is nonzero (so the comparison means something) and ``got`` matches it (fp32 tol)."""
    for name, g in want.items():
        assert g is not None and g.abs().max() > 0, f"reference grad of {name} is missing or zero"
        assert_close(got[name], g, msg=f"{label}grad of {name}")


def check_step_gradients(m: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    """Decoding one token at a time is differentiable and has the forward pass's gradients (x and all weights)."""
    grads = []
    for fn in (m, lambda t: step_through(m, t, m.init_state(x.shape[0]))[0]):
        m.zero_grad()
        _, gx = forward_backward(fn, x, dy)
        grads.append({"x": gx, **param_grads(m)})
    check_grads_match(grads[1], grads[0])


def check_backends_match_reference(mixers: dict[str, nn.Module], reference: Callable, x: torch.Tensor, dy: torch.Tensor,
                                   expected_params: set[str] | None = None) -> None:
    """Gradients of x and of every parameter: each mixer vs ``mixers["ref"]`` run through ``reference(m, x)``."""
    grads = {}
    for name, m in mixers.items():
        fn = (lambda t, m=m: reference(m, t)) if name == "ref" else m
        _, gx = forward_backward(fn, x, dy)
        grads[name] = {"x": gx, **param_grads(m)}
    if expected_params is not None:
        assert set(grads["ref"]) == {"x"} | expected_params, sorted(grads["ref"])
    for name in mixers:
        if name != "ref":
            check_grads_match(grads[name], grads["ref"], label=f"{name} ")


def check_mixer_matches_reference_grads(m: nn.Module, reference: Callable, x: torch.Tensor, dy: torch.Tensor,
                                        mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of x and of every parameter of ``m(x, mask)`` vs ``reference(m, x, mask)`` (same module);
    padded inputs get exactly zero gradient. Returns the reference's gradients, by name."""
    grads = []
    for fn in (lambda t: m(t, mask), lambda t: reference(m, t, mask)):
        m.zero_grad()
        _, gx = forward_backward(fn, x, dy)
        grads.append({"x": gx, **param_grads(m)})
    check_grads_match(grads[0], grads[1])
    assert torch.all(grads[0]["x"][~mask] == 0), "padded inputs got a gradient"
    return grads[1]


def check_padded_equals_alone(m: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's real outputs in the padded batch equal its unpadded run; padded outputs are exactly 0.
    Returns ``m(x, mask=mask)``."""
    y = m(x, mask=mask)
    assert torch.all(y[~mask] == 0), "padded outputs are not zero"
    for b in range(x.shape[0]):
        assert_close(y[b, mask[b]], m(x[b : b + 1, mask[b]])[0], msg=f"sequence {b}")
    return y


def check_padding_gets_no_gradient(m: nn.Module, x: torch.Tensor, mask: torch.Tensor, dy: torch.Tensor) -> None:
    """Padded inputs get exactly zero gradient; real ones get the gradient of running their sequence alone."""
    _, gx = forward_backward(lambda t: m(t, mask=mask), x, dy)
    assert torch.all(gx[~mask] == 0), "padded inputs got a gradient"
    for b in range(x.shape[0]):
        _, gb = forward_backward(m, x[b : b + 1, mask[b]], dy[b : b + 1, mask[b]])
        assert_close(gx[b, mask[b]], gb[0], msg=f"sequence {b}")


def check_fully_padded_rows(m: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> None:
    """Sequences with no real token give zero outputs; outputs and input gradients stay finite."""
    x = x.detach().clone().requires_grad_()
    y = m(x, mask=mask)
    empty = ~mask.any(1)
    assert empty.any(), "the mask has no fully padded row"
    assert torch.all(y[empty] == 0) and torch.isfinite(y).all(), "fully padded row not zero, or non-finite output"
    y.sum().backward()
    assert torch.isfinite(x.grad).all(), "non-finite input gradient"


def check_prefill_gradient(m: nn.Module, x: torch.Tensor, dy: torch.Tensor, param: str) -> None:
    """A single prefill call is differentiable and has the forward pass's gradients (of x and of ``param``)."""
    _, g_x = forward_backward(m, x, dy)
    g_param = m.get_parameter(param).grad.clone()
    m.zero_grad()
    _, g_x_prefill = forward_backward(lambda t: m.prefill(t, m.init_state(x.shape[0]))[0], x, dy)
    assert_close(g_x_prefill, g_x)
    assert_close(m.get_parameter(param).grad, g_param)


def check_prefill_then_steps(m: nn.Module, x: torch.Tensor, prompt: int, state=None,
                             check_states: Callable[[dict, dict], None] | None = None):
    """Prefill ``x[:, :prompt]`` (if prompt > 0) into ``state`` (default ``m.init_state(B)``), then one-token steps:
    the outputs equal ``m(x)``. With a prompt, ``check_states(after_prefill, after_stepping)`` compares the state
    after prefill with that after stepping through the same prompt from a fresh state. Returns the final state."""
    B = x.shape[0]
    with torch.no_grad():
        full = m(x)
        y_p, state = x[:, :0], m.init_state(B) if state is None else state
        if prompt:
            y_p, state = m.prefill(x[:, :prompt], state)
            if check_states is not None:
                check_states(state, step_through(m, x[:, :prompt], m.init_state(B))[1])
        y_s, state = step_through(m, x[:, prompt:], state)
    assert_close(torch.cat([y_p, y_s], 1), full)
    return state


def check_compile_fullgraph(m: nn.Module, x: torch.Tensor, masks: Iterable[torch.Tensor | None]) -> None:
    """``torch.compile(m, fullgraph=True)`` (aot_eager backend, after a dynamo reset) equals eager, for each mask."""
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for mask in masks:
        assert_close(compiled(x, mask=mask), m(x, mask=mask))


def check_bidirectional_cannot_decode(mixer_name: str, dim: int = 32, num_heads: int = 2) -> dict:
    """A causal=False mixer refuses ``init_state``, and ``step`` / ``prefill`` even with a cache borrowed from a
    causal twin (ValueError naming "causal"). Returns that causal twin's (empty) state."""
    bidir = layers.create_mixer(mixer_name, dim, num_heads, causal=False)
    with pytest.raises(ValueError, match="causal"):
        bidir.init_state(1)
    state = layers.create_mixer(mixer_name, dim, num_heads).init_state(1)
    with pytest.raises(ValueError, match="causal"):
        bidir.step(torch.randn(1, 1, dim), state)
    with pytest.raises(ValueError, match="causal"):
        bidir.prefill(torch.randn(1, 3, dim), state)
    return state


def check_bf16_backends(mixers: dict[str, nn.Module], ref: nn.Module, reference: Callable, x: torch.Tensor,
                        dy: torch.Tensor, params: Sequence[str] = ("qkv.weight", "proj.weight"),
                        fast: str = "sdpa", naive: str = "math") -> dict[str, dict[str, float]]:
    """bf16 mixers (same weights) vs ``reference(ref, x)`` in float32, ``ref`` loaded here with the ``fast`` mixer's
    bf16-rounded weights: the errors of y, dx and the ``params``' gradients are in (0, BF16_TOL] for every mixer,
    and the ``fast`` one's are at most 2x the ``naive`` one's + BF16_RATIO_EPS. Returns the errors."""
    ref.load_state_dict({k: v.float() for k, v in mixers[fast].state_dict().items()})  # exactly the bf16 weights
    y_ref, dx_ref = forward_backward(lambda t: reference(ref, t), x.float(), dy)
    errs = {}
    for name, m in mixers.items():
        y, dx = forward_backward(m, x, dy)
        assert y.dtype == torch.bfloat16, f"{name}: output dtype {y.dtype}"
        errs[name] = {"y": max_err(y, y_ref), "dx": max_err(dx, dx_ref),
                      **{f"d{p}": max_err(m.get_parameter(p).grad, ref.get_parameter(p).grad) for p in params}}
    for name, e in errs.items():
        for key, err in e.items():
            assert 0 < err <= BF16_TOL, f"bf16 {name} {key}: scaled max error {err:.3g} vs fp32 reference"
    for key in errs[fast]:
        assert_bf16_ratio(errs[fast][key], errs[naive][key], what=f"{key}: {fast} vs {naive}")
    return errs


def check_bf16_ratio_with_and_without_mask(fast: Callable, naive: Callable, ref: Callable, x: torch.Tensor,
                                           mask: torch.Tensor, what: str = "") -> None:
    """The bf16 ``fast`` and ``naive`` paths vs the float32 ``ref`` (same bf16-rounded weights) on ``x.float()``,
    without and then with the padding ``mask``: ``assert_bf16_ratio`` on their scaled max errors."""
    for kw in ({}, {"mask": mask}):
        want = ref(x.float(), **kw)
        assert_bf16_ratio(max_err(fast(x, **kw), want), max_err(naive(x, **kw), want),
                          what=f"{what} ({'with' if kw else 'without'} mask)")


def check_matches_dense_fp32(m: nn.Module, ref: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, tol: float,
                             decode_prompt: int | None = None, **state_kw) -> None:
    """float32 ``m`` vs ``ref`` (the same weights on a dense path): outputs and the gradients of x and of
    ``qkv.weight`` (for a random upstream gradient) within ``tol`` (see ``assert_close``). With ``decode_prompt``,
    prefill of that many tokens (state from ``m.init_state(B, device=x.device, **state_kw)``) then one-token
    steps through ``m`` reproduce its forward output within ``tol``."""
    dy = torch.randn_like(x)
    y1, g1 = forward_backward(lambda t: m(t, mask=mask), x, dy)
    y2, g2 = forward_backward(lambda t: ref(t, mask=mask), x, dy)
    assert_close(y1, y2, tol=tol)
    assert_close(g1, g2, tol=tol)
    assert_close(m.qkv.weight.grad, ref.qkv.weight.grad, tol=tol)
    if decode_prompt is not None:
        with torch.no_grad():
            y_p, state = m.prefill(x[:, :decode_prompt], m.init_state(x.shape[0], device=x.device, **state_kw))
            y_s, _ = step_through(m, x[:, decode_prompt:], state)
            assert_close(torch.cat([y_p, y_s], 1), y1.detach(), tol=tol)


def check_fla_matches_torch(make_mixer: Callable[..., nn.Module], mask_side: str, masked_backward: bool = True,
                            skip_triton_refusal: bool = False, device: str = "cuda", **mixer_kw) -> None:
    """GPU: the ``backend="fla"`` mixer in bf16 vs the same weights on ``backend="torch"`` in bf16, both against the
    float32 torch mixer (fast = fla, naive = torch; see ``assert_bf16_ratio``), without and with a padding mask;
    fla's backward runs (finite input gradients, zero on padding when ``masked_backward``); prefill + decoding
    steps through fla stay within BF16_TOL of the float32 forward. ``skip_triton_refusal``: a forward error that
    names Triton skips the test (fla's kernels refuse some GPU / Triton combinations)."""
    if not fla_available():
        pytest.skip("fla-core is not installed, or EFFZOO_NO_FLA=1 switches it off")
    dev = torch.device(device)
    torch_m = make_mixer(256, 4, backend="torch", chunk_size=64, **mixer_kw).to(dev, torch.bfloat16)
    fla_m = make_mixer(256, 4, backend="fla", **mixer_kw).to(dev, torch.bfloat16)
    fla_m.load_state_dict(torch_m.state_dict())
    ref = make_mixer(256, 4, backend="torch", **mixer_kw).to(dev)
    ref.load_state_dict({k: v.float() for k, v in torch_m.state_dict().items()})
    B, T = 3, 300
    x = torch.randn(B, T, 256, device=dev, dtype=torch.bfloat16)
    mask = padding_mask([300, 100, 7], T, mask_side).to(dev)

    def fla_forward(t, **kw):
        try:
            return fla_m(t, **kw)
        except Exception as e:
            if skip_triton_refusal and "triton" in str(e).lower():
                pytest.skip(f"fla refused: {e}")
            raise

    check_bf16_ratio_with_and_without_mask(fla_forward, torch_m, ref, x, mask, what="fla vs torch")
    xg = x.clone().requires_grad_()
    if masked_backward:
        (fla_m(xg, mask=mask).float() * torch.randn(B, T, 256, device=dev)).sum().backward()
        assert torch.isfinite(xg.grad).all() and torch.all(xg.grad[~mask] == 0), "fla backward: bad input gradient"
    else:
        fla_m(xg).float().sum().backward()
        assert torch.isfinite(xg.grad).all(), "fla backward: non-finite input gradient"
    with torch.no_grad():  # prefill + decoding steps through fla
        y_p, s = fla_m.prefill(x[:, :250], fla_m.init_state(B))
        y_s, _ = step_through(fla_m, x[:, 250:], s)
        err = max_err(torch.cat([y_p, y_s], 1), ref(x.float()))
        assert err <= BF16_TOL, f"fla decoding: {err:.3g}"


def check_bf16_chunked_vs_naive(m: nn.Module, ref_m: nn.Module, reference: Callable, x: torch.Tensor, dy: torch.Tensor,
                                param: str) -> None:
    """The bf16 mixer ``m`` vs ``reference(ref_m, x)`` in float32, ``ref_m`` loaded here with m's bf16-rounded
    weights: the output's error is in (0, BF16_TOL] and at most 2x that of ``reference(m, x, dtype=bf16)`` +
    BF16_RATIO_EPS; the errors of dx and of ``param``'s gradient are <= BF16_TOL."""
    ref_m.load_state_dict({k: v.float() for k, v in m.state_dict().items()})  # exactly the bf16 weights
    y_ref, dx_ref = forward_backward(lambda t: reference(ref_m, t), x.float(), dy)
    y, dx = forward_backward(m, x, dy)
    assert y.dtype == torch.bfloat16, f"output dtype {y.dtype}"
    err_fast = max_err(y, y_ref)
    err_naive = max_err(reference(m, x, dtype=torch.bfloat16), y_ref)
    assert err_fast > 0, "bf16 output exactly equals the fp32 reference: is bf16 really used?"
    assert_bf16_ratio(err_fast, err_naive, what="y")
    assert max_err(dx, dx_ref) <= BF16_TOL, f"dx: {max_err(dx, dx_ref):.3g}"
    err_param = max_err(m.get_parameter(param).grad, ref_m.get_parameter(param).grad)
    assert err_param <= BF16_TOL, f"grad of {param}: {err_param:.3g}"


def check_backward_with_left_padding(m: nn.Module, reference: Callable, num_grads: int) -> None:
    """``check_mixer_matches_reference_grads`` on a random [3, 37, 32] batch left-padded to lengths
    [37, 20, 5]; ``num_grads`` is how many gradients (x's and the weights') it must compare."""
    B, T, D = 3, 37, 32
    mask = padding_mask([37, 20, 5], T, "left")
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    assert len(check_mixer_matches_reference_grads(m, reference, x0, dy, mask)) == num_grads


def check_masked_prefill_states(m: nn.Module, x: torch.Tensor, mask: torch.Tensor, keys: Iterable[str]) -> None:
    """The final states (``keys``, and ``pos``) of a masked prefill are each sequence's own."""
    keys = tuple(keys)
    _, state = m.prefill(x, m.init_state(len(x)), mask)
    for b in range(len(x)):
        _, alone = m.prefill(x[b : b + 1, mask[b]], m.init_state(1))
        for key in keys:
            assert_close(state[key][b], alone[key][0], msg=key)
        assert state["pos"][b] == int(mask[b].sum())


def check_padding_equals_alone_and_reference(m: nn.Module, reference: Callable, side: str,
                                             state_keys: Iterable[str] | None = None):
    """A random [4, 21, 32] batch of lengths [21, 9, 1, 14] padded on ``side``: outputs equal each
    sequence alone and ``reference(m, x, mask)``; with ``state_keys``, also ``check_masked_prefill_states``.
    Returns (x, mask)."""
    B, T, D = 4, 21, 32
    mask = padding_mask([21, 9, 1, 14], T, side)
    x = torch.randn(B, T, D)
    y = check_padded_equals_alone(m, x, mask)
    assert_close(y, reference(m, x, mask))
    if state_keys is not None:
        check_masked_prefill_states(m, x, mask, state_keys)
    return x, mask


def state_checker(keys: Iterable[str]) -> Callable[[dict, dict], None]:
    """A ``check_states`` for ``check_prefill_then_steps``: both states have exactly ``keys`` and agree."""
    keys = set(keys)

    def check_states(state, s2):
        assert set(state) == set(s2) == keys
        for key in state:
            assert_close(state[key].float(), s2[key].float(), msg=key)

    return check_states


def check_state_dtype_option(m: nn.Module, keys: Iterable[str], keys_after: Iterable[str] = ("S",)) -> None:
    """For a mixer made with ``state_dtype=torch.float64`` (dim 32): ``init_state`` has ``keys`` in
    float64, a prefill keeps ``keys_after`` in float64 with float32 output, and matches ``m(x)``."""
    x = torch.randn(2, 9, 32)
    s = m.init_state(2)
    assert all(s[k].dtype == torch.float64 for k in keys)
    y, s = m.prefill(x, s)
    assert all(s[k].dtype == torch.float64 for k in keys_after) and y.dtype == torch.float32
    assert_close(y, m(x))


def check_input_errors(m: nn.Module) -> None:
    """A dim-32 mixer rejects a step input of the wrong shape, x of the wrong width and a non-bool mask."""
    with pytest.raises(ValueError, match=r"x_t must have shape \[batch, 1, 32\]"):
        m.step(torch.randn(2, 3, 32), m.init_state(2))
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len, 32\]"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        m(torch.randn(2, 5, 32), mask=torch.ones(2, 5))


def check_bf16_mixer_vs_naive(make_mixer: Callable[..., nn.Module], reference: Callable, param: str, **kwargs) -> None:
    """``check_bf16_chunked_vs_naive`` on a random [2, 70, 64] batch, 2 heads: a bf16 mixer from
    ``make_mixer(64, 2, dtype=torch.bfloat16, **kwargs)`` against a float32 one (which gets its weights)."""
    B, T, D, H = 2, 70, 64, 2
    m = make_mixer(D, H, dtype=torch.bfloat16, **kwargs)
    x = torch.randn(B, T, D, dtype=torch.bfloat16)
    dy = torch.randn(B, T, D)
    ref_m = make_mixer(D, H, **kwargs)
    check_bf16_chunked_vs_naive(m, ref_m, reference, x, dy, param)


def check_decoding_after_masked_prefill(m: nn.Module, x: torch.Tensor, mask: torch.Tensor, steps: int = 3) -> None:
    """After ``prefill(x, mask)`` each sequence decodes ``steps`` more tokens exactly as if it had run alone."""
    more = torch.randn(len(x), steps, x.shape[-1])
    with torch.no_grad():
        _, state = m.prefill(x, m.init_state(len(x)), mask)
        y_more, _ = step_through(m, more, state)
        for b in range(len(x)):
            alone = m(torch.cat([x[b, mask[b]], more[b]])[None])[0, -steps:]
            assert_close(y_more[b], alone, msg=f"sequence {b}")
