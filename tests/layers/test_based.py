"""Based linear attention (``based``) against an independent reference: the explicit quadratic form
with the Taylor kernel 1 + s + s^2/2 (s = q.k / sqrt(d')) normalised over j <= i, projections written
out, one sequence at a time (so no feature map is involved on the reference side).

Tolerances as in ``test_linear_attention.py``: float32 1e-5 of ``max(1, max|expected|)``; bfloat16
``BF16_TOL`` = 3e-2 against the float32 reference on the same bf16-rounded weights, and the chunked
path's output error at most 2x (+ ``BF16_RATIO_EPS``) that of the naive reference run in bf16.
"""
from __future__ import annotations

import math

import pytest
import torch

import layers
from layers.based import Based, naive_based, taylor_feature_map
from layers.linear_attention import chunk_gla, naive_recurrent_gla
from mixer_checks import ref_qk_norm
from mixer_checks import (assert_close, check_backward_with_left_padding, check_bf16_chunked_vs_naive,
                          check_compile_fullgraph, check_input_errors, check_padding_equals_alone_and_reference,
                          check_prefill_gradient, check_prefill_then_steps, check_state_dtype_option, init_params,
                          linear, padding_mask, per_sequence, prefill_chunks, state_checker, step_through)


def reference_based_module(m: Based, x, mask=None, dtype=torch.float32):
    """What ``m(x, mask)`` must compute, one sequence at a time, with the weights cast to ``dtype``
    (the quadratic form in float32 inside). Differentiable w.r.t. x and the weights."""
    H, d, Dh = m.num_heads, m.feature_dim, m.head_dim

    def one(xb):
        n = len(xb)
        q, k, v = linear(m.qkv, xb, dtype).split([H * d, H * d, H * Dh], dim=-1)
        q, k = ref_qk_norm(m, q.reshape(n, H, d), k.reshape(n, H, d))
        heads = lambda t: t.reshape(n, H, -1).transpose(0, 1)[None]  # [1, H, n, D]
        o = naive_based(heads(q), heads(k), heads(v), eps=m.eps)
        return linear(m.proj, o[0].transpose(0, 1).reshape(n, H * Dh), dtype)

    return per_sequence(x, mask, one, dtype)


def make_mixer(dim, num_heads, dtype=torch.float32, **kwargs) -> Based:
    m = layers.create_mixer("based", dim, num_heads, chunk_size=kwargs.pop("chunk_size", 16), **kwargs)
    return init_params(m, lambda p: 1.0 / math.sqrt(p.shape[-1])).to(dtype)


# --- the feature map and the naive form ---------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3, 16])
def test_taylor_feature_map_identity(d):
    """phi(q) . phi(k) = 1 + q.k/sqrt(d) + (q.k)^2 / (2 d), with 1 + d + d^2 features."""
    q, k = torch.randn(5, 7, d, dtype=torch.float64), torch.randn(5, 7, d, dtype=torch.float64)
    pq, pk = taylor_feature_map(q), taylor_feature_map(k)
    assert pq.shape == (5, 7, 1 + d + d * d)
    s = (q * k).sum(-1)
    torch.testing.assert_close((pq * pk).sum(-1), 1 + s / math.sqrt(d) + s * s / (2 * d), rtol=1e-12, atol=1e-12)


def test_naive_based_matches_loop():
    B, H, T, d, Dv = 1, 2, 6, 3, 4
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, H, T, d), torch.randn(B, H, T, Dv)
    mask = torch.tensor([[True, False, True, True, False, True]])
    got = naive_based(q, k, v, eps=1e-3, mask=mask)
    for h in range(H):
        for i in range(T):
            js = [j for j in range(i + 1) if mask[0, j]]
            if not js:
                assert torch.all(got[0, h, i] == 0)
                continue
            s = torch.stack([q[0, h, i] @ k[0, h, j] for j in js]) / math.sqrt(d)
            w = 1 + s + s**2 / 2
            assert_close(got[0, h, i], (w[:, None] * v[0, h, js]).sum(0) / (w.sum() + 1e-3))


@pytest.mark.parametrize("T", [1, 7, 33, 70])
def test_core_on_features_matches_quadratic_form(T):
    """chunk_gla / naive_recurrent_gla on the Taylor features, divided by phi(q).z, == naive_based."""
    B, H, d, Dv = 2, 2, 4, 5
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, H, T, d), torch.randn(B, H, T, Dv)
    pq, pk = taylor_feature_map(q), taylor_feature_map(k)
    den = (pq * pk.cumsum(2)).sum(-1, keepdim=True) + 1e-6
    want = naive_based(q, k, v)
    for o, _ in (chunk_gla(pq, pk, v, scale=1.0, chunk_size=16), naive_recurrent_gla(pq, pk, v, scale=1.0)):
        assert_close(o / den, want)


# --- the mixer ------------------------------------------------------------------------------------------

SHAPES = [(2, 1, 32, 2), (2, 7, 48, 3), (2, 33, 32, 4), (1, 70, 32, 1)]


@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=[f"T{s[1]}" for s in SHAPES])
def test_chunk_reference_step_prefill_agree(B, T, D, H):
    """chunked forward == quadratic reference == one-token steps == prefill + steps (chunk 16); the
    state after a prefill equals that after stepping through the same prompt."""
    m = make_mixer(D, H, feature_dim=4, qkv_bias=True, proj_bias=True)
    x = torch.randn(B, T, D)
    y = m(x)
    assert_close(y, reference_based_module(m, x))
    with torch.no_grad():
        y_steps, s_steps = step_through(m, x, m.init_state(B))
        assert_close(y_steps, y)
    check_states = state_checker({"S", "z", "pos"})
    state = check_prefill_then_steps(m, x, T // 2, check_states=check_states)
    check_states(state, s_steps)
    assert state["pos"].tolist() == [T] * B
    if T > 1:
        with torch.no_grad():  # several prefill calls in a row (the core takes no empty prompt)
            cut = [(0, max(1, T // 3)), (max(1, T // 3), T)]
            assert_close(prefill_chunks(m, x, cut, m.init_state(B))[0], y)


def test_default_feature_dim_matches_reference():
    m = make_mixer(64, 2, chunk_size=64)
    assert m.feature_dim == 16 and m.head_k_dim == 273
    x = torch.randn(2, 70, 64)
    assert_close(m(x), reference_based_module(m, x))


def test_backward_matches_reference():
    """Gradients of x, qkv and proj (weights and biases) agree with the reference's (left padding)."""
    m = make_mixer(32, 2, feature_dim=4, qkv_bias=True, proj_bias=True)
    check_backward_with_left_padding(m, reference_based_module, 5)


def test_prefill_gradient_matches_forward():
    m = make_mixer(32, 2, feature_dim=4)
    x0, dy = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    check_prefill_gradient(m, x0, dy, "qkv.weight")


def test_bf16_error_ratio():
    B, T, D, H = 2, 70, 64, 2
    m = make_mixer(D, H, dtype=torch.bfloat16, feature_dim=8, qkv_bias=True)
    x = torch.randn(B, T, D, dtype=torch.bfloat16)
    ref_m = make_mixer(D, H, feature_dim=8, qkv_bias=True)  # the helper loads m's bf16 weights into it
    check_bf16_chunked_vs_naive(m, ref_m, reference_based_module, x, torch.randn(B, T, D), "qkv.weight")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_equals_running_alone(side):
    """Real outputs equal each sequence alone (and the reference); masked prefill's final states are
    each sequence's own; padded inputs get no gradient."""
    m = make_mixer(32, 2, feature_dim=4, qkv_bias=True)
    x, mask = check_padding_equals_alone_and_reference(m, reference_based_module, side, ("S", "z"))
    xg = x.clone().requires_grad_()
    m(xg, mask=mask).sum().backward()
    assert torch.all(xg.grad[~mask] == 0) and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("feature_dim", [16, 4])
@pytest.mark.parametrize("D,H", [(32, 2), (48, 1)])
def test_state_size(D, H, feature_dim):
    m = layers.create_mixer("based", D, H, feature_dim=feature_dim)
    Df, Dv = 1 + feature_dim + feature_dim**2, D // H
    assert m.state_size(1) == m.state_size(4096) == H * Df * Dv + H * Df
    s = m.init_state(3)
    assert set(s) == {"S", "z", "pos"}
    assert s["S"].shape == (3, H, Df, Dv) and s["z"].shape == (3, H, Df)
    assert sum(s[k][0].numel() for k in s if k != "pos") == m.state_size(10)
    assert s["S"].dtype == s["z"].dtype == torch.float32


def test_state_dtype_option():
    m = make_mixer(32, 2, feature_dim=4, state_dtype=torch.float64)
    check_state_dtype_option(m, ("S", "z"), keys_after=("S", "z"))


def test_compile_fullgraph():
    m = make_mixer(16, 2, feature_dim=4, chunk_size=8)
    x = torch.randn(2, 19, 16)
    check_compile_fullgraph(m, x, [None, padding_mask([19, 6], 19, "left")])


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, None])
def test_error_bad_feature_dim(bad):
    with pytest.raises(ValueError, match="feature_dim must be a positive int"):
        layers.create_mixer("based", 32, 2, feature_dim=bad)


def test_error_bad_options():
    with pytest.raises(ValueError, match="does not support causal=False"):
        layers.create_mixer("based", 32, 2, causal=False)
    with pytest.raises(ValueError, match="chunk_size"):
        layers.create_mixer("based", 32, 2, chunk_size=24)
    with pytest.raises(ValueError, match="state_dtype"):
        layers.create_mixer("based", 32, 2, state_dtype=torch.int32)
    with pytest.raises(ValueError, match="eps"):
        layers.create_mixer("based", 32, 2, eps=-1.0)
    with pytest.raises(TypeError, match="unknown argument 'backend'"):
        layers.create_mixer("based", 32, 2, backend="fla")


def test_error_inputs():
    check_input_errors(layers.create_mixer("based", 32, 2))


def test_repr_and_registry():
    assert "based" in layers.list_mixers()
    assert layers.get_mixer_class("based") is Based
    m = layers.create_mixer("based", 32, 2, feature_dim=8)
    assert "feature_dim=8" in repr(m) and "chunk_size=64" in repr(m)
    assert m.qkv.weight.shape == (2 * 2 * 8 + 32, 32) and m.qkv.bias is None and m.proj.bias is None
