"""The ``nystromformer`` mixer (bidirectional only, no mask) against ``naive_nystromformer``.

Tolerances (max abs error scaled by max(1, max|expected|), see ``mixer_checks``):
* float32, same math (``naive_nystromformer(..., pinv_iters=6)``, explicit per-segment means, an explicit
  conv residual): 1e-5, forward and backward.
* float32, iterative pseudo-inverse vs ``torch.linalg.pinv``: ``PINV_TOL`` = 1e-4, *for a well-conditioned
  landmark kernel A* (cond(A) <= ``MAX_COND`` = 10, asserted by the test; observed errors ~1e-6). The
  6-iteration approximation is only accurate there: for near-uniform A (cond ~ 100, e.g. random q and k of
  unit scale) it is off by O(0.1-10) -- a property of the paper's method, not of this implementation
  (more iterations converge, see ``test_iterative_pinv_converges``). The test inputs therefore use q/k
  projections that are nearly tied (scale 2-3, head dim 16-32), which makes A diagonally dominant.
* bfloat16: ``check_bf16_chunked_vs_naive`` (BF16_TOL and the 2x-naive ratio rule); the kernels and the
  pseudo-inverse run in float32 in both paths.
T <= num_landmarks: exact softmax attention, checked against the ``attention`` mixer (same qkv/proj, rope=False).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import layers
import layers.nystromformer  # noqa: F401  (registers "nystromformer" until layers/__init__.py imports it)
from layers.nystromformer import PINV_ITERS, Nystromformer, iterative_pinv, naive_nystromformer, segment_means
from mixer_checks import ref_qk_norm
from mixer_checks import (assert_close, check_bf16_chunked_vs_naive, check_compile_fullgraph,
                          check_backends_match_reference, init_params, linear, max_err, per_sequence, shape_ids)

PINV_TOL = 1e-4
MAX_COND = 10.0


def conv_residual(m: Nystromformer, v: torch.Tensor) -> torch.Tensor:
    """The depthwise conv over the sequence, written out: v [1, H, n, Dh]; out[t] = sum_j w[h, j] v[t + j - K//2]."""
    K, n = m.conv_kernel, v.shape[-2]
    w = m.conv.weight.to(v.dtype)[:, 0, :, 0]  # [H, K]
    vp = torch.nn.functional.pad(v, (0, 0, K // 2, K // 2))
    return sum(w[None, :, j, None, None] * vp[:, :, j : j + n] for j in range(K))


def reference_nystrom_module(m: Nystromformer, x, mask=None, dtype=torch.float32, pinv_iters: int | None = 6):
    """What ``m(x)`` must compute, one sequence at a time, weights cast to ``dtype``, ``naive_nystromformer``
    (float32) inside; ``pinv_iters=None``: with ``torch.linalg.pinv``. Differentiable w.r.t. x and the weights."""
    assert mask is None
    H, Dh = m.num_heads, m.head_dim

    def one(xb):
        n = len(xb)
        q, k, v = (t.transpose(0, 1)[None] for t in linear(m.qkv, xb, dtype).view(n, 3, H, Dh).unbind(1))
        q, k = ref_qk_norm(m, q, k)
        o = naive_nystromformer(q, k, v, m.num_landmarks, pinv_iters)
        if m.conv is not None:
            o = o + conv_residual(m, v)
        return linear(m.proj, o[0].transpose(0, 1).reshape(n, H * Dh), dtype)

    return per_sequence(x, None, one, dtype)


def make_mixer(dim, num_heads, dtype=torch.float32, qk_scale=3.0, **kwargs) -> Nystromformer:
    """Random weights with nearly tied q/k projections of scale ``qk_scale`` (well-conditioned landmark kernels)."""
    m = layers.create_mixer("nystromformer", dim, num_heads, causal=False, **kwargs)
    init_params(m, lambda p: 1.0 / math.sqrt(p.shape[-1]))
    with torch.no_grad():
        wq, wk, _ = m.qkv.weight.chunk(3, dim=0)
        wq.mul_(qk_scale)
        wk.copy_(wq + 0.1 * torch.randn_like(wq) / math.sqrt(dim))
    return m.to(dtype)


def landmark_cond(m: Nystromformer, x: torch.Tensor) -> float:
    """The largest condition number of the landmark kernel A over the batch and heads of ``m(x)``."""
    B, T, _ = x.shape
    q, k, _ = linear(m.qkv, x.float()).view(B, T, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    ql, kl = segment_means(q, m.num_landmarks), segment_means(k, m.num_landmarks)
    A = (ql @ kl.transpose(-1, -2) / math.sqrt(m.head_dim)).softmax(-1)
    return torch.linalg.cond(A).max().item()


# --- building blocks --------------------------------------------------------------------------------


@pytest.mark.parametrize("T,m", [(8, 8), (9, 8), (15, 4), (16, 4), (33, 32), (100, 7)])
def test_segment_means(T, m):
    """tensor_split segments (the first T % m one token longer); T divisible by m: the paper's reshape means."""
    x = torch.randn(2, 3, T, 5)
    want = torch.stack([x[..., idx, :].mean(-2) for idx in torch.tensor_split(torch.arange(T), m)], dim=-2)
    assert_close(segment_means(x, m), want)
    if T % m == 0:
        assert_close(segment_means(x, m), x.view(2, 3, m, T // m, 5).mean(-2))


def test_iterative_pinv_converges():
    """On a well-conditioned row-stochastic matrix 6 iterations reach pinv; on a near-uniform (ill-conditioned)
    one they do not, but more iterations do (the iteration converges, just slowly from the paper's Z0)."""
    good = (3 * torch.eye(8) + 0.3 * torch.randn(8, 8)).softmax(-1)
    assert torch.linalg.cond(good) < MAX_COND
    assert_close(iterative_pinv(good), torch.linalg.inv(good), tol=PINV_TOL)
    bad = (0.3 * torch.randn(8, 8)).softmax(-1).double()
    assert torch.linalg.cond(bad) > 10
    err6 = max_err(iterative_pinv(bad, 6), torch.linalg.inv(bad))
    assert err6 > 1e-2 and max_err(iterative_pinv(bad, 60), torch.linalg.inv(bad)) < 1e-6 * max(1, err6)


# --- the mixer -----------------------------------------------------------------------------------------

SHAPES = [(1, 1, 32, 2), (2, 8, 32, 2), (2, 9, 48, 3), (2, 37, 64, 4), (1, 64, 32, 1)]


@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=shape_ids(SHAPES))
@pytest.mark.parametrize("conv_kernel", [0, 1, 5])
def test_forward_matches_reference(B, T, D, H, conv_kernel):
    """num_landmarks=8: T < m, T == m, T = m + 1, ragged (37) and divisible (64) landmark segments."""
    m = make_mixer(D, H, num_landmarks=8, conv_kernel=conv_kernel, qkv_bias=True, proj_bias=True)
    x = torch.randn(B, T, D)
    assert_close(m(x), reference_nystrom_module(m, x))


@pytest.mark.parametrize("T", [8, 37])
def test_backward_matches_reference(T):
    """Gradients of x and of every weight (the conv's included) agree with the reference's."""
    B, D, H = 2, 32, 2
    m = make_mixer(D, H, num_landmarks=8, conv_kernel=5, qkv_bias=True, proj_bias=True)
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    check_backends_match_reference({"ref": copy.deepcopy(m), "nystromformer": m}, reference_nystrom_module, x0, dy,
                                   expected_params={"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "conv.weight"})


@pytest.mark.parametrize("T,num_landmarks", [(40, 8), (100, 32)])
def test_six_iterations_on_ill_conditioned_kernels(T, num_landmarks):
    """PINV_ITERS is the paper's 6. Untied unit-scale q/k (cond(A) ~ 30-400): still the same math as the reference with 6 iterations
    (float32 tol), and measurably not 5 or 7 (so the iteration count is the paper's)."""
    m = make_mixer(64, 4, qk_scale=1.0, num_landmarks=num_landmarks, conv_kernel=5)
    with torch.no_grad():
        m.qkv.weight[64:128].normal_(0, 1 / 8)  # untie k from q
    x = torch.randn(2, T, 64)
    assert landmark_cond(m, x) > 3 * MAX_COND
    y = m(x)
    assert_close(y, reference_nystrom_module(m, x, pinv_iters=PINV_ITERS))
    for iters in (5, 7):
        assert max_err(y, reference_nystrom_module(m, x, pinv_iters=iters)) > 1e-3


@pytest.mark.parametrize("T,num_landmarks", [(40, 8), (64, 16), (100, 32), (33, 32)])
def test_iterative_pinv_close_to_exact_pinv(T, num_landmarks):
    """The mixer (6 iterations) vs the same math with torch.linalg.pinv: PINV_TOL for cond(A) <= MAX_COND."""
    m = make_mixer(64, 2, qk_scale=2.0, num_landmarks=num_landmarks, conv_kernel=0)
    x = torch.randn(2, T, 64)
    assert landmark_cond(m, x) <= MAX_COND
    assert_close(m(x), reference_nystrom_module(m, x, pinv_iters=None), tol=PINV_TOL)


@pytest.mark.parametrize("T", [1, 5, 16])
@pytest.mark.parametrize("qk_scale", [1.0, 3.0])
def test_short_sequences_equal_exact_attention(T, qk_scale):
    """T <= num_landmarks (16): exactly the ``attention`` mixer with the same qkv/proj weights and rope=False."""
    m = make_mixer(32, 2, qk_scale=qk_scale, num_landmarks=16, conv_kernel=0, qkv_bias=True, proj_bias=True)
    att = layers.create_mixer("attention", 32, 2, causal=False, rope=False, backend="math", qkv_bias=True, proj_bias=True)
    att.load_state_dict(m.state_dict())
    x = torch.randn(3, T, 32)
    assert_close(m(x), att(x))


def test_default_options():
    m = layers.create_mixer("nystromformer", 64, 4, causal=False)
    assert m.num_landmarks == 32 and m.conv_kernel == 33 and m.conv.weight.shape == (4, 1, 33, 1)
    assert m.qkv.bias is None and m.proj.bias is None
    assert m(torch.randn(1, 70, 64)).shape == (1, 70, 64)
    assert layers.create_mixer("nystromformer", 64, 4, causal=False, conv_kernel=0).conv is None


def test_compile_fullgraph():
    m = make_mixer(16, 2, num_landmarks=4, conv_kernel=3)
    for T in (3, 19):
        check_compile_fullgraph(m, torch.randn(2, T, 16), [None])


def test_bf16_error_ratio():
    B, T, D, H = 2, 70, 64, 2
    m = make_mixer(D, H, dtype=torch.bfloat16, num_landmarks=8, conv_kernel=5, qkv_bias=True)
    x = torch.randn(B, T, D, dtype=torch.bfloat16)
    dy = torch.randn(B, T, D)
    ref_m = make_mixer(D, H, num_landmarks=8, conv_kernel=5, qkv_bias=True)  # the helper loads m's bf16 weights
    check_bf16_chunked_vs_naive(m, ref_m, reference_nystrom_module, x, dy, "qkv.weight")


# --- errors ---------------------------------------------------------------------------------------


def test_error_causal():
    assert Nystromformer.supports_causal is False and Nystromformer.supports_bidirectional
    with pytest.raises(ValueError, match=r"Nystromformer does not support causal=True \(it is bidirectional only\)"):
        layers.create_mixer("nystromformer", 32, 2)  # create_mixer's default is causal=True
    with pytest.raises(ValueError, match="does not support causal=True"):
        Nystromformer(32, 2, causal=True)


def test_error_mask_not_supported():
    assert Nystromformer.supports_mask is False
    m = make_mixer(32, 2, num_landmarks=4)
    with pytest.raises(ValueError, match="Nystromformer does not accept a padding mask"):
        m(torch.randn(2, 9, 32), mask=torch.ones(2, 9, dtype=torch.bool))


def test_error_bad_options():
    for bad in (0, -1, 2.5, None, True):
        with pytest.raises(ValueError, match="num_landmarks must be an int >= 1"):
            Nystromformer(32, 2, num_landmarks=bad)
    for bad in (-1, 3.0, None, False):
        with pytest.raises(ValueError, match="conv_kernel must be an int >= 0"):
            Nystromformer(32, 2, conv_kernel=bad)
    for bad in (2, 32):
        with pytest.raises(ValueError, match="conv_kernel must be odd"):
            Nystromformer(32, 2, conv_kernel=bad)
    with pytest.raises(TypeError, match="unknown argument 'landmarks'"):
        layers.create_mixer("nystromformer", 32, 2, causal=False, landmarks=8)


def test_error_inputs_and_decoding():
    m = make_mixer(32, 2)
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len, 32\]"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(NotImplementedError, match="no incremental decoding"):
        m.init_state(1)


def test_repr_and_registry():
    assert "nystromformer" in layers.list_mixers()
    r = repr(make_mixer(32, 2, num_landmarks=8, conv_kernel=0))
    assert "causal=False" in r and "num_landmarks=8" in r and "conv_kernel=0" in r
