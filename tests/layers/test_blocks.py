"""Rotary embeddings, norms and MLPs. float32 throughout; tolerance 1e-5 unless stated."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import layers
from layers import RotaryEmbedding, SwiGLU, create_mlp, create_norm, gelu_mlp

TOL = dict(atol=1e-5, rtol=1e-5)


# --- rotary embeddings ------------------------------------------------------------------------


def rotate(rope: RotaryEmbedding, v: torch.Tensor, pos: int) -> torch.Tensor:
    """Rotate one head vector v [Dh] as if it sat at position ``pos``."""
    return rope(v.view(1, 1, 1, -1), torch.tensor([pos]))[0, 0, 0]


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(-200, 200), head_dim=st.sampled_from([2, 8, 16, 64]),
       seed=st.integers(0, 2**16))
def test_rope_scores_depend_only_on_relative_position(m, n, shift, head_dim, seed):
    """<rot(q, m), rot(k, n)> == <rot(q, m + s), rot(k, n + s)> for any shift s: only m - n matters."""
    g = torch.Generator().manual_seed(seed)
    rope = RotaryEmbedding(head_dim)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    s = max(shift, -min(m, n))  # keep positions >= 0
    a = rotate(rope, q, m) @ rotate(rope, k, n)
    b = rotate(rope, q, m + s) @ rotate(rope, k, n + s)
    # angles up to ~700 rad in float32: cos/sin carry ~700 * 6e-8 ~ 4e-5 absolute error
    assert torch.allclose(a, b, atol=1e-3 * math.sqrt(head_dim), rtol=1e-4), (a.item(), b.item())


def test_rope_relative_property_catches_absolute_encoding():
    """The property above is not vacuous: q.k changes with m - n (and is not the plain dot product)."""
    rope = RotaryEmbedding(16)
    q, k = torch.randn(16), torch.randn(16)
    scores = [float(rotate(rope, q, d) @ rotate(rope, k, 0)) for d in range(6)]
    assert len({round(s, 4) for s in scores}) == 6
    assert scores[0] == pytest.approx(float(q @ k), abs=1e-5)  # position 0 is the identity


def test_rope_preserves_norm_and_layout():
    rope = RotaryEmbedding(8, base=100.0)
    x = torch.randn(2, 5, 3, 8)
    pos = torch.arange(5)
    y = rope(x, pos)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), **TOL)  # a rotation
    # GPT-NeoX half layout: feature i pairs with i + Dh/2, rotated by pos * base**(-2i/Dh)
    i, p = 1, 3
    theta = p * 100.0 ** (-2 * i / 8)
    x1, x2 = x[:, p, :, i], x[:, p, :, i + 4]
    torch.testing.assert_close(y[:, p, :, i], x1 * math.cos(theta) - x2 * math.sin(theta), **TOL)
    torch.testing.assert_close(y[:, p, :, i + 4], x2 * math.cos(theta) + x1 * math.sin(theta), **TOL)


def test_rope_batched_positions_equal_per_row():
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 4, 2, 16)
    pos = torch.tensor([[0, 1, 2, 3], [5, 5, 6, 9]])
    y = rope(x, pos)
    for b in range(2):
        torch.testing.assert_close(y[b : b + 1], rope(x[b : b + 1], pos[b]), **TOL)


def test_rope_bf16_keeps_dtype():
    rope = RotaryEmbedding(16)
    x = torch.randn(1, 7, 2, 16)
    y = rope(x.bfloat16(), torch.arange(7))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), rope(x.bfloat16().float(), torch.arange(7)), atol=2e-2, rtol=1e-2)  # bf16: 8-bit mantissa


@pytest.mark.parametrize("head_dim", [1, 3, 15, 33])
def test_rope_odd_head_dim_raises(head_dim):
    with pytest.raises(ValueError, match=f"even head_dim, got {head_dim}"):
        RotaryEmbedding(head_dim)


def test_rope_buffer_not_saved():
    """inv_freq is derived, so it stays out of checkpoints."""
    assert "inv_freq" not in RotaryEmbedding(8).state_dict()


# --- norms ------------------------------------------------------------------------------------


def test_rmsnorm_by_name_matches_formula():
    norm = create_norm("rmsnorm", 24)
    assert isinstance(norm, layers.RMSNorm) and norm.eps == 1e-6
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 24) * 3
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want, **TOL)


def test_layernorm_by_name_matches_formula():
    norm = create_norm("layernorm", 24, eps=1e-5)
    assert isinstance(norm, layers.LayerNorm) and norm.eps == 1e-5
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 5, 24) * 3 + 1
    mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    torch.testing.assert_close(norm(x), (x - mu) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias, **TOL)


@pytest.mark.parametrize("name", ["batchnorm", "RMSNorm", "rms", ""])
def test_create_norm_unknown(name):
    with pytest.raises(ValueError, match=f"unknown norm {name!r}"):
        create_norm(name, 8)


def test_create_norm_suggests():
    with pytest.raises(ValueError, match="Did you mean: rmsnorm"):
        create_norm("rmsnrom", 8)


# --- MLPs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_equals_unfused_formula(bias):
    """w3(silu(x Wg) * (x Wu)), with Wg the first and Wu the second half of the fused w12."""
    mlp = SwiGLU(16, 40, bias=bias)
    if bias:
        with torch.no_grad():
            mlp.w12.bias.normal_()
            mlp.w3.bias.normal_()
    x = torch.randn(2, 3, 16)
    w_gate, w_up = mlp.w12.weight[:40], mlp.w12.weight[40:]
    b_gate, b_up = (mlp.w12.bias[:40], mlp.w12.bias[40:]) if bias else (0, 0)
    gate = x @ w_gate.T + b_gate
    up = x @ w_up.T + b_up
    hidden = gate * torch.sigmoid(gate) * up
    want = hidden @ mlp.w3.weight.T + (mlp.w3.bias if bias else 0)
    torch.testing.assert_close(mlp(x), want, **TOL)
    assert sum(p.numel() for p in mlp.parameters()) == 3 * 16 * 40 + (2 * 40 + 16 if bias else 0)


def test_swiglu_by_name():
    mlp = create_mlp("swiglu", 16, 32)
    assert isinstance(mlp, SwiGLU) and mlp.w12.bias is None
    assert mlp(torch.randn(4, 16)).shape == (4, 16)


@pytest.mark.parametrize("bias", [True, False])
def test_gelu_mlp_shape_and_formula(bias):
    mlp = gelu_mlp(12, 48, bias=bias)
    x = torch.randn(2, 7, 12)
    y = mlp(x)
    assert y.shape == (2, 7, 12)
    assert (mlp.fc1.bias is not None) == bias and (mlp.fc2.bias is not None) == bias
    assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features) == (12, 48, 12)
    want = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)  # exact (erf) GELU
    torch.testing.assert_close(y, want, **TOL)


def test_gelu_mlp_by_name():
    mlp = create_mlp("gelu", 8, 16, bias=True)
    assert mlp.fc1.bias is not None
    assert mlp(torch.randn(3, 8)).shape == (3, 8)


@pytest.mark.parametrize("name", ["relu", "SwiGLU", "mlp"])
def test_create_mlp_unknown(name):
    with pytest.raises(ValueError, match=f"unknown mlp {name!r}"):
        create_mlp(name, 8, 16)


def test_create_mlp_suggests():
    with pytest.raises(ValueError, match="Did you mean: swiglu"):
        create_mlp("swiglue", 8, 16)
