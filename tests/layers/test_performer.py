"""The ``performer`` mixer (FAVOR+) and its reference ``naive_performer_attention``.

Tolerances (max absolute error scaled by ``max(1, max|expected|)``, see ``mixer_checks.py``):
* float32: 1e-5 against the explicit quadratic form with the *same* random features (so the
  comparison is exact up to rounding; observed ~1e-7).
* bfloat16: the shared ratio rule (``check_bf16_chunked_vs_naive``): the kernel core runs in float32,
  so the error comes from the bf16 projections.
* The approximation of softmax attention is statistical: on fixed seeds, the mean max error over a
  few inputs at 1024 features is below half that at 16 features and below 0.1 (observed ~0.3 -> ~0.07).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import layers
import layers.performer  # noqa: F401  (registers "performer" until layers/__init__.py imports it)
from layers.performer import Performer, naive_performer_attention, orthogonal_gaussian_features
from mixer_checks import ref_qk_norm
from mixer_checks import (assert_close, check_backward_with_left_padding, check_bf16_mixer_vs_naive,
                          check_bidirectional_cannot_decode, check_compile_fullgraph, check_fully_padded_rows,
                          check_input_errors, check_padding_equals_alone_and_reference, check_prefill_gradient,
                          check_prefill_then_steps, check_state_dtype_option, init_params, linear, padding_mask,
                          per_sequence, shape_ids, state_checker)


def reference_module(m: Performer, x, mask=None, dtype=torch.float32):
    """What ``m(x, mask)`` must compute, one sequence at a time (weights cast to ``dtype``, the
    quadratic form in float32 with m's projection matrix). Differentiable w.r.t. x and the weights."""
    H, Dh = m.num_heads, m.head_dim

    def one(xb):
        n = len(xb)
        q, k, v = linear(m.qkv, xb, dtype).view(n, 3, H, Dh).permute(1, 2, 0, 3)[:, None].unbind(0)  # [1, H, n, Dh]
        q, k = ref_qk_norm(m, q, k)
        o = naive_performer_attention(q, k, v, m.projection.float(), causal=m.causal, eps=m.eps)
        return linear(m.proj, o[0].transpose(0, 1).reshape(n, H * Dh), dtype)

    return per_sequence(x, mask, one, dtype)


def make_mixer(dim, num_heads, dtype=torch.float32, **kwargs) -> Performer:
    kwargs.setdefault("chunk_size", 16)
    kwargs.setdefault("seed", 0)
    m = layers.create_mixer("performer", dim, num_heads, **kwargs)
    return init_params(m, lambda p: 1.0 / math.sqrt(p.shape[-1])).to(dtype)


# --- the random features -------------------------------------------------------------------------


@pytest.mark.parametrize("m,d", [(16, 8), (20, 8), (5, 8), (64, 16)])
def test_orthogonal_gaussian_features(m, d):
    g = torch.Generator().manual_seed(3)
    W = orthogonal_gaussian_features(m, d, g)
    assert W.shape == (m, d) and W.dtype == torch.float32
    norms = W.double().norm(dim=1)
    for lo in range(0, m, d):  # each block of d rows is orthogonal
        blk = W[lo : lo + d].double()
        gram = blk @ blk.T
        assert_close(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram), tol=1e-5)
    assert norms.min() > 0 and norms.std() > 0  # chi-distributed norms, not all equal
    assert torch.equal(W, orthogonal_gaussian_features(m, d, torch.Generator().manual_seed(3)))
    assert not torch.equal(W, orthogonal_gaussian_features(m, d, torch.Generator().manual_seed(4)))


def test_feature_norms_are_chi_distributed():
    W = orthogonal_gaussian_features(4096, 16, torch.Generator().manual_seed(0)).double()
    sq = W.norm(dim=1) ** 2  # chi^2 with 16 degrees of freedom: mean 16, variance 32
    assert abs(sq.mean().item() - 16) < 0.5 and abs(sq.var().item() - 32) < 4


# --- the reference --------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_naive_matches_unstabilised_loop(causal):
    """The explicit form, token by token with unstabilised features phi(x) = exp(w.x - |x|^2/2)/sqrt(m)
    in float64 (eps = 0: the stabilisers cancel exactly)."""
    B, H, T, d, nf = 1, 2, 6, 4, 8
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3))
    W = orthogonal_gaussian_features(nf, d, torch.Generator().manual_seed(1)).double()
    mask = torch.tensor([[True, False, True, True, False, True]])
    got = naive_performer_attention(q, k, v, W, causal=causal, mask=mask, eps=0.0)

    def phi(x):
        x = x * d ** -0.25
        return torch.exp(W @ x - x @ x / 2) / math.sqrt(nf)

    for h in range(H):
        for i in range(T):
            js = [j for j in range(T) if mask[0, j] and (not causal or j <= i)]
            if not js:
                continue
            w = torch.stack([phi(q[0, h, i]) @ phi(k[0, h, j]) for j in js])
            assert_close(got[0, h, i], (w[:, None] * v[0, h, js]).sum(0) / w.sum())


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_approximates_softmax_attention(causal):
    """More features, closer to softmax attention (fixed seeds; small inputs, d = 8, T = 16)."""

    def mean_err(num_features):
        errs = []
        for s in range(4):
            g = torch.Generator().manual_seed(100 + s)
            q, k, v = (torch.randn(1, 1, 16, 8, generator=g, dtype=torch.float64) * f for f in (0.5, 0.5, 1.0))
            W = orthogonal_gaussian_features(num_features, 8, torch.Generator().manual_seed(s)).double()
            o = naive_performer_attention(q, k, v, W, causal=causal, eps=0.0)
            errs.append((o - F.scaled_dot_product_attention(q, k, v, is_causal=causal)).abs().max().item())
        return sum(errs) / len(errs)

    e16, e1024 = mean_err(16), mean_err(1024)
    assert e1024 < 0.5 * e16 and e1024 < 0.1, (e16, e1024)


# --- the mixer vs the reference -------------------------------------------------------------------

SHAPES = [(1, 1, 32, 2), (2, 7, 48, 3), (2, 33, 64, 4), (1, 70, 32, 1)]


@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=shape_ids(SHAPES))
@pytest.mark.parametrize("num_features", [8, 37])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_forward_matches_reference(B, T, D, H, num_features, causal):
    m = make_mixer(D, H, causal=causal, num_features=num_features, qkv_bias=True, proj_bias=True)
    x = torch.randn(B, T, D)
    assert_close(m(x), reference_module(m, x))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_large_inputs_stay_finite_and_exact(causal):
    """Exponents of several hundred: the stabilisers keep everything finite (and still exact)."""
    m = make_mixer(32, 2, causal=causal)
    x = torch.randn(2, 21, 32) * 30
    y = m(x)
    assert torch.isfinite(y).all()
    assert_close(y, reference_module(m, x))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_backward_matches_reference(causal):
    """Gradients of x and of every weight agree with the reference's (padding mask on)."""
    m = make_mixer(32, 2, causal=causal, qkv_bias=True, proj_bias=True)
    check_backward_with_left_padding(m, reference_module, 5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_padding_mask_equals_running_alone(side, causal):
    m = make_mixer(32, 2, causal=causal, qkv_bias=True)
    # if causal: the final states of a masked prefill are each sequence's own
    check_padding_equals_alone_and_reference(m, reference_module, side, ("S", "z", "c") if causal else None)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_fully_padded_rows(causal):
    m = make_mixer(32, 2, causal=causal)
    check_fully_padded_rows(m, torch.randn(2, 9, 32), padding_mask([9, 0], 9, "right"))


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [0, 1, 16, 23])
def test_prefill_then_steps_matches_forward(prompt):
    B, T, D, H = 2, 30, 32, 2
    m = make_mixer(D, H)
    x = torch.randn(B, T, D)
    state = check_prefill_then_steps(m, x, prompt, check_states=state_checker({"S", "z", "c", "pos"}))
    assert state["pos"].tolist() == [T] * B


def test_prefill_gradient_matches_forward():
    m = make_mixer(32, 2)
    x0, dy = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    check_prefill_gradient(m, x0, dy, "qkv.weight")


@pytest.mark.parametrize("num_features", [16, 64])
@pytest.mark.parametrize("D,H", [(32, 2), (48, 1)])
def test_state_size(D, H, num_features):
    m = layers.create_mixer("performer", D, H, num_features=num_features)
    Dh = D // H
    assert m.state_size(1) == m.state_size(4096) == H * num_features * (Dh + 1) + H
    s = m.init_state(3)
    assert sum(s[k][0].numel() for k in s if k != "pos") == m.state_size(10)
    assert s["S"].dtype == torch.float32 and torch.isinf(s["c"]).all()


def test_state_dtype_option():
    m = make_mixer(32, 2, state_dtype=torch.float64)
    check_state_dtype_option(m, ("S", "z", "c"))


# --- random features: redraw, seed, state dict -----------------------------------------------------


def test_projection_is_a_saved_buffer():
    m = make_mixer(32, 2, causal=False, seed=1)
    assert "projection" in m.state_dict() and "projection" not in dict(m.named_parameters())
    other = layers.create_mixer("performer", 32, 2, causal=False, seed=2)
    assert not torch.equal(other.projection, m.projection)
    other.load_state_dict(m.state_dict())
    x = torch.randn(2, 9, 32)
    assert torch.equal(other(x), m(x))


def test_seed_reproducible():
    a, b = (layers.create_mixer("performer", 32, 2, seed=7) for _ in range(2))
    assert torch.equal(a.projection, b.projection)
    torch.manual_seed(5)
    c = layers.create_mixer("performer", 32, 2)
    torch.manual_seed(5)
    assert torch.equal(c.projection, layers.create_mixer("performer", 32, 2).projection)


def test_redraw_in_training_only():
    m = make_mixer(32, 2, redraw=True, seed=3)
    x = torch.randn(1, 5, 32)
    w0 = m.projection.clone()
    m.train()
    m(x)
    w1 = m.projection.clone()
    assert not torch.equal(w0, w1)
    m(x)
    assert not torch.equal(w1, m.projection)
    m.eval()
    w2 = m.projection.clone()
    y = m(x)
    assert torch.equal(m.projection, w2) and torch.equal(m(x), y)
    fixed = make_mixer(32, 2, redraw=False).train()
    w = fixed.projection.clone()
    fixed(x)
    assert torch.equal(fixed.projection, w)
    # the redraws of a seeded module are reproducible
    twin = make_mixer(32, 2, redraw=True, seed=3).train()
    twin(x)
    assert torch.equal(twin.projection, w1)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_compile_fullgraph(causal):
    m = make_mixer(16, 2, causal=causal, chunk_size=8).eval()
    x = torch.randn(2, 19, 16)
    check_compile_fullgraph(m, x, [None, padding_mask([19, 6], 19, "left")])


# --- bfloat16 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_bf16_error_ratio(causal):
    check_bf16_mixer_vs_naive(make_mixer, reference_module, "qkv.weight", causal=causal, qkv_bias=True)


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    ({"num_features": 0}, "num_features"), ({"num_features": 8.0}, "num_features"), ({"num_features": True}, "num_features"),
    ({"redraw": 1}, "redraw"), ({"seed": 1.5}, "seed"), ({"seed": "0"}, "seed"), ({"eps": -1.0}, "eps"),
    ({"chunk_size": 24}, "chunk_size"), ({"state_dtype": torch.int32}, "state_dtype"),
])
def test_error_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        layers.create_mixer("performer", 32, 2, **kw)


def test_error_unknown_argument():
    with pytest.raises(TypeError, match="unknown argument 'features'"):
        layers.create_mixer("performer", 32, 2, features=16)


def test_error_decoding_a_bidirectional_mixer():
    check_bidirectional_cannot_decode("performer")


def test_error_inputs():
    check_input_errors(layers.create_mixer("performer", 32, 2))


def test_repr_and_registry():
    assert "performer" in layers.list_mixers()
    r = repr(layers.create_mixer("performer", 32, 2, num_features=16, redraw=True, seed=4))
    assert "num_features=16" in r and "redraw=True" in r and "seed=4" in r
