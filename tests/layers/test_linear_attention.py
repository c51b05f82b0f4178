"""The gated-linear-attention core (``naive_recurrent_gla``, ``chunk_gla``, ``recurrent_step``) and
the ``linear`` mixer.

Tolerances are on the max absolute error, scaled by ``max(1, max|expected|)``:
* float32: 1e-5 (observed: ~1e-6 for the core, whose chunked form sums in another order).
* bfloat16: the mixer in bf16 against the float32 reference run on the *same* bf16-rounded
  weights and inputs, ``BF16_TOL`` = 3e-2 (8 mantissa bits, several roundings deep; observed
  ~1%). As in fla's tests, the chunked (fast) path's error must also be at most 2x (+
  ``BF16_RATIO_EPS``) the error of the naive reference run in bf16 (bf16 projections, the
  recurrence in float32). For the core alone, bf16 chunked vs float32: ``CORE_BF16_TOL`` = 1e-2 (observed ~4e-3).
The tolerance helpers and the checks shared with the other mixers' tests are in ``mixer_checks.py``.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layers
from layers.linear_attention import (FEATURE_MAPS, LinearAttention, chunk_gla, chunk_states, fla_available, naive_linear_attention,
                                     naive_recurrent_gla, recurrent_step)
from mixer_checks import ref_qk_norm
from mixer_checks import (assert_close, check_backward_with_left_padding, check_bf16_mixer_vs_naive,
                          check_bidirectional_cannot_decode, check_compile_fullgraph, check_fla_matches_torch,
                          check_input_errors, check_padded_equals_alone, check_padding_equals_alone_and_reference,
                          check_prefill_gradient, check_prefill_then_steps, check_state_dtype_option, init_params,
                          linear, max_err, padding_mask, per_sequence, rand_qkv, shape_ids, state_checker)

CORE_BF16_TOL = 1e-2

# --- the core ---------------------------------------------------------------------------------------

GATES = ["none", "head", "token", "vector"]
DECAYS = {"strong": (-12.0, -8.0), "weak": (-1e-3, 0.0), "mixed": (-10.0, 0.0)}


def rand_gate(kind, B, H, T, Dk, decay="mixed", dtype=torch.float32):
    lo, hi = DECAYS[decay]
    u = lambda *shape: (lo + (hi - lo) * torch.rand(*shape)).to(dtype)
    return {"none": None, "head": u(H), "token": u(B, H, T, 1), "vector": u(B, H, T, Dk)}[kind]


def loop_reference(q, k, v, g, S0, scale):
    """o_i = scale q_i (prod_{t<=i} a_t) S0 + scale sum_{j<=i} (q_i * prod_{j<t<=i} a_t) . k_j v_j,
    a_t = exp(g_t) per key dim, element by element in float64."""
    B, H, T, Dk = q.shape
    q, k, v, S0 = q.double(), k.double(), v.double(), S0.double()
    if g is None:
        a = torch.ones(B, H, T, Dk, dtype=torch.float64)
    elif g.dim() == 1:
        a = g.double().exp().view(1, H, 1, 1).expand(B, H, T, Dk)
    else:
        a = g.double().exp().expand(B, H, T, Dk)
    o = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                acc = (q[b, h, i] * a[b, h, : i + 1].prod(0)) @ S0[b, h]
                for j in range(i + 1):
                    w = q[b, h, i] * a[b, h, j + 1 : i + 1].prod(0)
                    acc = acc + (w @ k[b, h, j]) * v[b, h, j]
                o[b, h, i] = scale * acc
    return o


@pytest.mark.parametrize("kind", GATES)
def test_naive_recurrence_matches_explicit_products(kind):
    B, H, T, Dk, Dv = 2, 2, 5, 3, 4
    q, k, v = rand_qkv(B, H, T, Dk, Dv)
    g = rand_gate(kind, B, H, T, Dk, "mixed")
    g = g if g is None else g / 4  # decays of order one, so every term matters
    S0 = torch.randn(B, H, Dk, Dv)
    o, S = naive_recurrent_gla(q, k, v, g, S0, scale=0.7)
    assert o.shape == (B, H, T, Dv) and S.shape == (B, H, Dk, Dv) and S.dtype == torch.float32
    assert_close(o.double(), loop_reference(q, k, v, g, S0, 0.7))
    # the final state is the one a query sees after the last token: o_T = scale q_T S_T
    assert_close((0.7 * q[:, :, -1:] @ S), o[:, :, -1:])


def _run_steps(q, k, v, g, S):
    outs = []
    for t in range(q.shape[2]):
        g_t = g if g is None or g.dim() == 1 else g[:, :, t]
        o_t, S = recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], g_t, S)
        outs.append(o_t)
    return torch.stack(outs, dim=2), S


GATE_DECAYS = [("none", "mixed")] + [(kind, decay) for kind in GATES[1:] for decay in DECAYS]


@pytest.mark.parametrize("kind,decay", GATE_DECAYS, ids=[f"{k}-{d}" for k, d in GATE_DECAYS])
@pytest.mark.parametrize("T", [1, 7, 33, 70])
def test_chunk_and_step_match_naive(T, kind, decay):
    """chunk (chunk 16: T=1, shorter than a chunk, ragged last chunk) and one-token steps vs the
    recurrence, from a random initial state, for strong (~-10), weak (~0) and mixed log decays."""
    B, H, Dk, Dv = 2, 3, 8, 6
    q, k, v = rand_qkv(B, H, T, Dk, Dv)
    g = rand_gate(kind, B, H, T, Dk, decay)
    S0 = torch.randn(B, H, Dk, Dv)
    o_ref, S_ref = naive_recurrent_gla(q, k, v, g, S0)
    o_c, S_c = chunk_gla(q, k, v, g, S0, chunk_size=16)
    assert o_c.shape == o_ref.shape and S_c.dtype == torch.float32
    assert_close(o_c, o_ref, msg="chunk output")
    assert_close(S_c, S_ref, msg="chunk final state")
    o_s, S_s = _run_steps(q, k, v, g, S0)
    assert_close(o_s, o_ref, msg="step output")
    assert_close(S_s, S_ref, msg="step final state")


@pytest.mark.parametrize("chunk_size", [1, 2, 8, 128])
@pytest.mark.parametrize("kind", ["token", "vector"])
def test_chunk_size_does_not_change_the_result(chunk_size, kind):
    B, H, T, Dk, Dv = 1, 2, 21, 4, 3
    q, k, v = rand_qkv(B, H, T, Dk, Dv)
    g = rand_gate(kind, B, H, T, Dk, "mixed")
    o_ref, S_ref = naive_recurrent_gla(q, k, v, g)
    o, S = chunk_gla(q, k, v, g, chunk_size=chunk_size)
    assert_close(o, o_ref)
    assert_close(S, S_ref)


@pytest.mark.parametrize("kind", GATES)
def test_chunk_backward_matches_naive(kind):
    """Gradients of q, k, v, the log gates and the initial state through the chunked form."""
    B, H, T, Dk, Dv = 2, 2, 37, 8, 5
    q0, k0, v0 = rand_qkv(B, H, T, Dk, Dv)
    g0 = rand_gate(kind, B, H, T, Dk, "mixed")
    g0 = g0 if g0 is None else g0 / 5  # gradients reach back over a few tokens
    S00 = torch.randn(B, H, Dk, Dv)
    do, dS = torch.randn(B, H, T, Dv), torch.randn(B, H, Dk, Dv)
    grads = []
    for fn in (naive_recurrent_gla, lambda *a: chunk_gla(*a, chunk_size=16)):
        leaves = [t.clone().requires_grad_() for t in (q0, k0, v0, S00)] + ([] if g0 is None else [g0.clone().requires_grad_()])
        q, k, v, S0 = leaves[:4]
        o, S = fn(q, k, v, None if g0 is None else leaves[4], S0)
        ((o * do).sum() + (S * dS).sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, ref, got in zip(["q", "k", "v", "S0", "g"], *grads):
        assert ref.abs().max() > 0
        assert_close(got, ref, msg=f"grad of {name}")


@pytest.mark.parametrize("batch_of_b", [2, 1], ids=["b-per-batch", "b-broadcast"])
def test_leaf_scores_backward_is_the_gradient(batch_of_b):
    """The leaf blocks' scores have a hand-written backward (``_LeafScores``): gradcheck in float64 against
    finite differences, with decays strong enough that the masked upper triangle would matter, and with b
    broadcast over the batch (its gradient summed back). Compiled, the backward recomputes the decays instead of
    keeping them: same gradients."""
    from layers.linear_attention import _LeafScores
    q, k = (torch.randn(2, 2, 2, 8, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b = (-4 * torch.rand(batch_of_b, 2, 2, 8, 3, dtype=torch.float64)).cumsum(-2).requires_grad_()
    assert _LeafScores.apply(q, k, b).dtype == torch.float64
    assert torch.autograd.gradcheck(_LeafScores.apply, (q, k, b))
    ds = torch.randn(2, 2, 2, 8, 8, dtype=torch.float64)
    eager = torch.autograd.grad((_LeafScores.apply(q, k, b) * ds).sum(), (q, k, b))
    compiled_fn = torch.compile(lambda q, k, b: (_LeafScores.apply(q, k, b) * ds).sum(), backend="aot_eager",
                                fullgraph=True)
    for got, ref in zip(torch.autograd.grad(compiled_fn(q, k, b), (q, k, b)), eager):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["head", "vector"])
def test_chunk_bf16_close_to_float32(kind):
    B, H, T, Dk, Dv = 2, 2, 70, 16, 16
    q, k, v = rand_qkv(B, H, T, Dk, Dv, torch.bfloat16)
    g = rand_gate(kind, B, H, T, Dk, "mixed") / 5
    o_ref, S_ref = naive_recurrent_gla(q.float(), k.float(), v.float(), g)
    o, S = chunk_gla(q, k, v, g, chunk_size=16)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert 0 < max_err(o, o_ref) <= CORE_BF16_TOL
    assert max_err(S, S_ref) <= CORE_BF16_TOL


def test_core_errors():
    q, k, v = rand_qkv(1, 2, 5, 4, 3)
    for bad in (0, -16, 3, 48, 16.0, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive power of two"):
            chunk_gla(q, k, v, chunk_size=bad)
    for bad_g in (torch.zeros(3), torch.zeros(1, 2, 5, 2), torch.zeros(1, 2, 6, 4), torch.zeros(2, 5, 4)):
        with pytest.raises(ValueError, match="log_g"):
            chunk_gla(q, k, v, bad_g)
        with pytest.raises(ValueError, match="log_g"):
            naive_recurrent_gla(q, k, v, bad_g)


# --- the linear mixer: an independent reference -----------------------------------------------------


def ref_feature_map(name, x):
    return {"elu1": lambda t: torch.where(t > 0, t + 1, t.exp()), "relu": lambda t: t.clamp(min=0),
            "identity": lambda t: t}[name](x)


def reference_linear_module(m: LinearAttention, x, mask=None, dtype=torch.float32):
    """What ``m(x, mask)`` must compute, one sequence at a time, with the weights cast to ``dtype``
    (the quadratic form in float32 inside). Differentiable w.r.t. x and the weights."""
    H, Dh = m.num_heads, m.head_dim
    lin = lambda layer, t: linear(layer, t, dtype)
    scale = 1.0 if m.normalize else Dh ** -0.5

    def one(xb):
        n = len(xb)
        heads = lambda t: t.view(n, H, -1).transpose(0, 1)[None]  # [1, H, n, Dh]
        q, k = ref_qk_norm(m, lin(m.q_proj, xb).view(n, H, Dh), lin(m.k_proj, xb).view(n, H, Dh))
        q, k = heads(ref_feature_map(m.feature_map, q)), heads(ref_feature_map(m.feature_map, k))
        v = heads(lin(m.v_proj, xb))
        o = naive_linear_attention(q, k, v, causal=m.causal, normalize=m.normalize, scale=scale, eps=m.eps)
        return lin(m.proj, o[0].transpose(0, 1).reshape(n, H * Dh))

    return per_sequence(x, mask, one, dtype)


def make_mixer(dim, num_heads, dtype=torch.float32, **kwargs) -> LinearAttention:
    m = layers.create_mixer("linear", dim, num_heads, chunk_size=kwargs.pop("chunk_size", 16), **kwargs)
    return init_params(m, lambda p: 1.0 / math.sqrt(p.shape[-1])).to(dtype)


@pytest.mark.parametrize("causal", [True, False])
def test_naive_linear_attention_matches_loop(causal):
    B, H, T, Dk, Dv = 1, 2, 6, 3, 4
    q, k, v = torch.rand(B, H, T, Dk), torch.rand(B, H, T, Dk), torch.randn(B, H, T, Dv)
    mask = torch.tensor([[True, False, True, True, False, True]])
    got = naive_linear_attention(q, k, v, causal=causal, normalize=True, scale=0.5, eps=1e-3, mask=mask)
    for h in range(H):
        for i in range(T):
            js = [j for j in range(T) if mask[0, j] and (not causal or j <= i)]
            w = torch.stack([0.5 * q[0, h, i] @ k[0, h, j] for j in js])
            assert_close(got[0, h, i], (w[:, None] * v[0, h, js]).sum(0) / (w.sum() + 1e-3))


SHAPES = [(1, 1, 32, 2), (2, 7, 48, 3), (2, 33, 64, 4), (1, 70, 32, 1)]
SHAPE_IDS = shape_ids(SHAPES)


@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("feature_map,normalize", [("elu1", True), ("relu", True), ("identity", False), ("elu1", False)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_forward_matches_reference(B, T, D, H, feature_map, normalize, causal):
    m = make_mixer(D, H, causal=causal, feature_map=feature_map, normalize=normalize, qkv_bias=True, proj_bias=True)
    x = torch.randn(B, T, D)
    assert_close(m(x), reference_linear_module(m, x))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("normalize", [True, False])
def test_backward_matches_reference(causal, normalize):
    """Gradients of x and of every weight agree with the reference's (padding mask on)."""
    m = make_mixer(32, 2, causal=causal, normalize=normalize, qkv_bias=True, proj_bias=True)
    check_backward_with_left_padding(m, reference_linear_module, 9)


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("prompt", [0, 1, 16, 23])
def test_prefill_then_steps_matches_forward(prompt, normalize):
    """prefill (the chunked form) + one-token steps == forward; the state after prefill equals
    the state after stepping through the same prompt."""
    B, T, D, H = 2, 30, 32, 2
    m = make_mixer(D, H, normalize=normalize)
    x = torch.randn(B, T, D)
    check_states = state_checker({"S", "z", "pos"} if normalize else {"S", "pos"})
    state = check_prefill_then_steps(m, x, prompt, check_states=check_states)
    assert state["pos"].tolist() == [T] * B


def test_prefill_gradient_matches_forward():
    m = make_mixer(32, 2)
    x0, dy = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    check_prefill_gradient(m, x0, dy, "q_proj.weight")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_padding_mask_equals_running_alone(side, causal):
    m = make_mixer(32, 2, causal=causal, qkv_bias=True)
    # if causal: the final states of a masked prefill are each sequence's own
    check_padding_equals_alone_and_reference(m, reference_linear_module, side, ("S", "z") if causal else None)


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3), pad_left=st.booleans(), data=st.data())
def test_padding_property(lengths, pad_left, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    T = max(lengths) + data.draw(st.integers(0, 3))
    m = make_mixer(16, 2, chunk_size=4)
    mask = padding_mask(lengths, T, "left" if pad_left else "right")
    check_padded_equals_alone(m, torch.randn(len(lengths), T, 16), mask)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("D,H", [(32, 2), (64, 4), (48, 1)])
def test_state_size(D, H, normalize):
    m = layers.create_mixer("linear", D, H, normalize=normalize)
    Dh = D // H
    assert m.state_size(1) == m.state_size(4096) == H * Dh * Dh + (H * Dh if normalize else 0)
    s = m.init_state(3)
    assert sum(s[k][0].numel() for k in s if k != "pos") == m.state_size(10)
    assert s["S"].dtype == torch.float32


def test_state_dtype_option():
    m = make_mixer(32, 2, state_dtype=torch.float64)
    check_state_dtype_option(m, ("S", "z"))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_compile_fullgraph(causal):
    m = make_mixer(16, 2, causal=causal, chunk_size=8)
    x = torch.randn(2, 19, 16)
    check_compile_fullgraph(m, x, [padding_mask([19, 6], 19, "left")])


# --- bfloat16 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_bf16_error_ratio(causal):
    check_bf16_mixer_vs_naive(make_mixer, reference_linear_module, "q_proj.weight", causal=causal, qkv_bias=True)


# --- errors ---------------------------------------------------------------------------------------


def test_error_unknown_feature_map():
    with pytest.raises(ValueError, match="unknown feature_map 'softplus'; valid ones: elu1, relu, identity"):
        layers.create_mixer("linear", 32, 2, feature_map="softplus")
    assert set(FEATURE_MAPS) == {"elu1", "relu", "identity"}


@pytest.mark.parametrize("bad", [0, -64, 24, 1.5, None])
def test_error_bad_chunk_size(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        layers.create_mixer("linear", 32, 2, chunk_size=bad)


def test_error_bad_options():
    with pytest.raises(ValueError, match="backend must be one of auto, torch, fla; got 'triton'"):
        layers.create_mixer("linear", 32, 2, backend="triton")
    with pytest.raises(ValueError, match="state_dtype"):
        layers.create_mixer("linear", 32, 2, state_dtype=torch.int32)
    with pytest.raises(ValueError, match="eps"):
        layers.create_mixer("linear", 32, 2, eps=-1.0)
    with pytest.raises(TypeError, match="unknown argument 'feature'"):
        layers.create_mixer("linear", 32, 2, feature="relu")


@pytest.mark.skipif(fla_available(), reason="fla is installed here")
def test_error_fla_backend_without_fla():
    with pytest.raises(ValueError, match="backend='fla'.*not installed"):
        layers.create_mixer("linear", 32, 2, backend="fla")


def test_error_fla_backend_on_cpu(monkeypatch):
    """Even where fla is installed, backend='fla' refuses CPU tensors (checked at call time)."""
    import layers.linear_attention as la
    monkeypatch.setattr(la, "FLA_AVAILABLE", True)
    m = layers.create_mixer("linear", 32, 2, backend="fla")
    with pytest.raises(ValueError, match="backend='fla' needs CUDA tensors"):
        m(torch.randn(1, 4, 32))


def test_error_decoding_a_bidirectional_mixer():
    check_bidirectional_cannot_decode("linear")


def test_error_inputs():
    check_input_errors(layers.create_mixer("linear", 32, 2))


def test_repr_and_registry():
    assert "linear" in layers.list_mixers()
    r = repr(layers.create_mixer("linear", 32, 2, feature_map="relu", backend="torch"))
    assert "feature_map='relu'" in r and "backend='torch'" in r and "normalize=True" in r


# --- fla (GPU) ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [True, False])
def test_cuda_fla_matches_torch(normalize):
    """fla's chunk_linear_attn / fused_recurrent_linear_attn against the torch path (bf16)."""
    check_fla_matches_torch(make_mixer, "left", normalize=normalize)


@pytest.mark.parametrize("decay", ["none", "per_head", "per_dim"])
@pytest.mark.parametrize("N", [1, 2, 5, 37])
@pytest.mark.parametrize("with_S0", [False, True], ids=["no_S0", "S0"])
def test_chunk_states_scan_matches_the_sequential_recursion(N, decay, with_S0):
    """The parallel prefix over chunks equals S_n = exp(a_n) S_{n-1} + kv_n run one chunk at a time, values and grads."""
    B, H, Dk, Dv = 2, 3, 4, 5
    kv = torch.randn(B, H, N, Dk, Dv, requires_grad=True)
    shapes = {"none": None, "per_head": (1, H, N, 1, 1), "per_dim": (B, H, N, Dk, 1)}
    a = None if shapes[decay] is None else (-3 * torch.rand(shapes[decay])).requires_grad_()
    S0 = torch.randn(B, H, Dk, Dv, requires_grad=True) if with_S0 else None
    states, final = chunk_states(kv, a, S0)
    S, expected = (torch.zeros(B, H, Dk, Dv) if S0 is None else S0), []
    for n in range(N):
        expected.append(S)
        S = (S if a is None else a[:, :, n].exp() * S) + kv[:, :, n]
    expected = torch.stack(expected, dim=2)
    assert_close(states, expected)
    assert_close(final, S)
    leaves = [t for t in (kv, a, S0) if t is not None]
    dy, df = torch.randn_like(states), torch.randn_like(final)
    grad = lambda loss: torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    got = grad((states * dy).sum() + (final * df).sum())
    want = grad((expected * dy).sum() + (S * df).sum())
    for g, w in zip(got, want):
        assert_close(g, w)


def test_fla_can_be_switched_off_by_environment():
    """EFFZOO_NO_FLA=1 makes an installed fla count as absent (backend='auto' then runs the torch paths)."""
    from layers.linear_attention import fla_usable

    installed = lambda name: object() if name == "fla" else None
    missing = lambda name: None
    assert fla_usable({}, installed) and fla_usable({"EFFZOO_NO_FLA": "0"}, installed)
    assert not fla_usable({"EFFZOO_NO_FLA": "1"}, installed)
    assert not fla_usable({}, missing)
