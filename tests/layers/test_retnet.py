"""RetNet's multi-scale retention (``retnet``) against an independent reference: the parallel
(quadratic) form of retention with the decay matrix gamma^(i-j), RoPE written with complex
numbers, the per-head norm and swish gate written out, one sequence at a time.

Tolerances as in ``test_linear_attention.py``: float32 1e-5 of ``max(1, max|expected|)``;
bfloat16 ``BF16_TOL`` = 3e-2 against the float32 reference on the same bf16-rounded weights,
and the chunked path's error at most 2x (+ ``BF16_RATIO_EPS``) that of the naive reference run
in bf16. The tolerance helpers and the checks shared with the other mixers' tests are in ``mixer_checks.py``.
"""
from __future__ import annotations

import math

import pytest
import torch

import layers
from layers.linear_attention import chunk_gla, naive_recurrent_gla
from layers.retnet import MultiScaleRetention, naive_retention, retention_log_decay
from mixer_checks import ref_qk_norm
from mixer_checks import (assert_close, check_bf16_chunked_vs_naive, check_compile_fullgraph, check_fla_matches_torch,
                          check_mixer_matches_reference_grads, check_padded_equals_alone, check_prefill_then_steps,
                          init_params, linear, padding_mask, per_sequence, prefill_chunks, rand_qkv, ref_rope,
                          shape_ids)


# --- the decay and the naive forms ---------------------------------------------------------------


def test_gamma_is_the_papers():
    """gamma_h = 1 - 2^(-5-h): 31/32, 63/64, ... for heads 0, 1, ..."""
    gamma = retention_log_decay(4).exp()
    assert gamma.dtype == torch.float32
    torch.testing.assert_close(gamma, torch.tensor([31 / 32, 63 / 64, 127 / 128, 255 / 256]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("T", [1, 9, 40])
def test_parallel_form_matches_recurrence_and_chunks(T):
    """Retention's parallel form (the reference) == the recurrence with a per-head gate == chunks."""
    B, H, Dk, Dv = 2, 3, 4, 5
    q, k, v = rand_qkv(B, H, T, Dk, Dv)
    log_gamma = torch.tensor([-0.05, -0.7, -3.0])
    S0 = torch.randn(B, H, Dk, Dv)
    o_par = naive_retention(q, k, v, log_gamma, scale=0.5, initial_state=S0)
    o_rec, S_rec = naive_recurrent_gla(q, k, v, log_gamma, S0, scale=0.5)
    o_chk, S_chk = chunk_gla(q, k, v, log_gamma, S0, scale=0.5, chunk_size=8)
    assert_close(o_rec, o_par)
    assert_close(o_chk, o_par)
    assert_close(S_chk, S_rec)
    # the parallel form, element by element
    i, j, h = T - 1, 0, 1
    manual = sum(0.5 * (q[0, h, i] @ k[0, h, s]) * math.exp(-0.7 * (i - s)) * v[0, h, s] for s in range(j, i + 1))
    manual = manual + 0.5 * (q[0, h, i] * math.exp(-0.7 * (i + 1))) @ S0[0, h]
    assert_close(o_par[0, h, i], manual)


# --- the mixer: an independent reference -----------------------------------------------------------


def reference_retnet_module(m: MultiScaleRetention, x, mask=None, dtype=torch.float32):
    """What ``m(x, mask)`` must compute, one sequence at a time, weights cast to ``dtype`` (norm and
    gate in float32, as the layer). Differentiable w.r.t. x and the weights."""
    H, Dk, Dv = m.num_heads, m.head_k_dim, m.head_v_dim
    lin = lambda layer, t: linear(layer, t, dtype)
    log_gamma = torch.tensor([math.log(1 - 2 ** (-5 - h)) for h in range(H)])

    def one(xb):
        n = len(xb)
        q, k, v = lin(m.q_proj, xb).view(n, H, Dk), lin(m.k_proj, xb).view(n, H, Dk), lin(m.v_proj, xb).view(n, H, Dv)
        q, k = ref_qk_norm(m, q, k)
        if m.rope:
            q, k = ref_rope(q, torch.arange(n), m.rotary.base), ref_rope(k, torch.arange(n), m.rotary.base)
        heads = lambda t: t.transpose(0, 1)[None]
        o = naive_retention(heads(q), heads(k), heads(v), log_gamma, scale=Dk ** -0.5)[0].transpose(0, 1).float()
        w = m.g_norm.weight.float()
        if m.norm == "rmsnorm":
            o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + m.g_norm.eps) * w
        else:
            mu, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
            o = (o - mu) / torch.sqrt(var + m.g_norm.eps) * w + m.g_norm.bias.float()
        gate = lin(m.g_proj, xb).float()
        return lin(m.proj, (o.reshape(n, H * Dv) * gate * torch.sigmoid(gate)).to(dtype))

    return per_sequence(x, mask, one, dtype)


def _init_g_norm(name, p):
    if name.startswith("g_norm"):
        p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
        return True
    return False


def make_mixer(dim, num_heads, dtype=torch.float32, **kwargs) -> MultiScaleRetention:
    m = layers.create_mixer("retnet", dim, num_heads, chunk_size=kwargs.pop("chunk_size", 16), **kwargs)
    return init_params(m, lambda p: 1.0 / math.sqrt(p.shape[-1]), special=_init_g_norm).to(dtype)


SHAPES = [(1, 1, 32, 2), (2, 7, 48, 3), (2, 33, 64, 4), (1, 70, 32, 1)]
SHAPE_IDS = shape_ids(SHAPES)


@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("rope,norm", [(True, "rmsnorm"), (False, "layernorm")])
def test_forward_matches_reference(B, T, D, H, rope, norm):
    m = make_mixer(D, H, rope=rope, norm=norm, qkv_bias=True, proj_bias=True)
    x = torch.randn(B, T, D)
    assert_close(m(x), reference_retnet_module(m, x))


def test_expand_options_and_defaults():
    m = layers.create_mixer("retnet", 64, 4)
    assert (m.key_dim, m.value_dim, m.head_k_dim, m.head_v_dim) == (64, 128, 16, 32)
    assert m.rope and m.norm == "rmsnorm" and m.chunk_size == 64 and m.causal
    m = make_mixer(32, 2, expand_k=0.5, expand_v=1.5)
    assert (m.head_k_dim, m.head_v_dim) == (8, 24)
    x = torch.randn(2, 11, 32)
    assert_close(m(x), reference_retnet_module(m, x))


def test_backward_matches_reference():
    B, T, D, H = 3, 37, 32, 2
    m = make_mixer(D, H, qkv_bias=True, proj_bias=True)
    mask = padding_mask([37, 20, 5], T, "right")
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    assert len(check_mixer_matches_reference_grads(m, reference_retnet_module, x0, dy, mask)) == 11


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [0, 1, 16, 23])
def test_prefill_then_steps_matches_forward(prompt):
    B, T, D, H = 2, 30, 32, 2
    m = make_mixer(D, H)
    x = torch.randn(B, T, D)

    def check_states(state, s2):
        assert_close(state["S"], s2["S"])
        assert torch.equal(state["pos"], s2["pos"])

    state = check_prefill_then_steps(m, x, prompt, check_states=check_states)
    assert state["pos"].tolist() == [T] * B


def test_chunked_prefill_matches_forward():
    """Several prefill calls in a row continue the positions (RoPE) and the state."""
    m = make_mixer(32, 2)
    x = torch.randn(2, 29, 32)
    with torch.no_grad():
        y, _ = prefill_chunks(m, x, [(0, 3), (3, 4), (4, 21), (21, 29)], m.init_state(2))
        assert_close(y, m(x))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_equals_running_alone(side):
    B, T, D, H = 4, 21, 32, 2
    lengths = [21, 9, 1, 14]
    m = make_mixer(D, H, qkv_bias=True)
    mask = padding_mask(lengths, T, side)
    x = torch.randn(B, T, D)
    y = check_padded_equals_alone(m, x, mask)
    assert_close(y, reference_retnet_module(m, x, mask))
    _, state = m.prefill(x, m.init_state(B), mask)
    for b in range(B):  # right padding must not decay the state, left padding must not shift RoPE
        _, alone = m.prefill(x[b : b + 1, mask[b]], m.init_state(1))
        assert_close(state["S"][b], alone["S"][0])
    assert state["pos"].tolist() == lengths


@pytest.mark.parametrize("D,H,expand_v", [(32, 2, 2.0), (64, 4, 1.0)])
def test_state_size(D, H, expand_v):
    m = layers.create_mixer("retnet", D, H, expand_v=expand_v)
    assert m.state_size(1) == m.state_size(5000) == H * (D // H) * int(D * expand_v / H)
    assert m.init_state(3)["S"][0].numel() == m.state_size(7)


def test_compile_fullgraph():
    m = make_mixer(16, 2, chunk_size=8)
    x = torch.randn(2, 19, 16)
    check_compile_fullgraph(m, x, [padding_mask([19, 6], 19, "left")])


def test_bf16_error_ratio():
    B, T, D, H = 2, 70, 64, 2
    m = make_mixer(D, H, dtype=torch.bfloat16)
    ref_m = make_mixer(D, H)
    x = torch.randn(B, T, D, dtype=torch.bfloat16)
    dy = torch.randn(B, T, D)
    check_bf16_chunked_vs_naive(m, ref_m, reference_retnet_module, x, dy, "k_proj.weight")


# --- errors ---------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(ValueError, match="causal only"):
        layers.create_mixer("retnet", 32, 2, causal=False)
    with pytest.raises(ValueError, match="norm must be one of rmsnorm, layernorm; got 'batchnorm'"):
        layers.create_mixer("retnet", 32, 2, norm="batchnorm")
    with pytest.raises(ValueError, match="expand_v"):
        layers.create_mixer("retnet", 32, 2, expand_v=0.3)
    with pytest.raises(ValueError, match="expand_k"):
        layers.create_mixer("retnet", 32, 2, expand_k=-1)
    with pytest.raises(ValueError, match="even head_dim"):
        layers.create_mixer("retnet", 30, 2)  # head_k_dim 15 with rope
    layers.create_mixer("retnet", 30, 2, rope=False)
    with pytest.raises(ValueError, match="chunk_size"):
        layers.create_mixer("retnet", 32, 2, chunk_size=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        layers.create_mixer("retnet", 32, 2, backend="cuda")
    m = layers.create_mixer("retnet", 32, 2)
    with pytest.raises(ValueError, match=r"x_t must have shape \[batch, 1, 32\]"):
        m.step(torch.randn(1, 2, 32), m.init_state(1))
    assert "rope=True" in repr(m) and "norm='rmsnorm'" in repr(m)


# --- fla (GPU) ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_fla_matches_torch():
    """fla's chunk_retention (chunk_gla with a mask) / fused_recurrent_retention vs torch (bf16), backward too."""
    check_fla_matches_torch(make_mixer, "right", skip_triton_refusal=True)
