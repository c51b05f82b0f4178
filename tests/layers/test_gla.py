"""Gated Linear Attention (``gla``) against an independent reference: the explicit quadratic form
with per-dimension decays exp(b_i - b_j), the low-rank gate, per-head RMSNorm and swish gate
written out, one sequence at a time.

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
from layers.gla import GatedLinearAttention, naive_gla
from layers.linear_attention import chunk_gla, naive_recurrent_gla
from mixer_checks import ref_qk_norm
from mixer_checks import (assert_close, check_bf16_chunked_vs_naive, check_compile_fullgraph, check_fla_matches_torch,
                          check_mixer_matches_reference_grads, check_padded_equals_alone, check_prefill_gradient,
                          check_prefill_then_steps, init_params, linear, padding_mask, per_sequence, rand_qkv,
                          shape_ids)


# --- the naive forms --------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [(-12.0, -8.0), (-1e-3, 0.0), (-10.0, 0.0)], ids=["strong", "weak", "mixed"])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_quadratic_form_matches_recurrence_and_chunks(T, decay):
    B, H, Dk, Dv = 2, 2, 6, 5
    q, k, v = rand_qkv(B, H, T, Dk, Dv)
    lo, hi = decay
    g = lo + (hi - lo) * torch.rand(B, H, T, Dk)
    S0 = torch.randn(B, H, Dk, Dv)
    o_quad = naive_gla(q, k, v, g, scale=0.4, initial_state=S0)
    o_rec, S_rec = naive_recurrent_gla(q, k, v, g, S0, scale=0.4)
    o_chk, S_chk = chunk_gla(q, k, v, g, S0, scale=0.4, chunk_size=8)
    assert_close(o_rec, o_quad)
    assert_close(o_chk, o_quad)
    assert_close(S_chk, S_rec)


# --- the mixer: an independent reference -----------------------------------------------------------


def reference_gla_module(m: GatedLinearAttention, x, mask=None, dtype=torch.float32):
    """What ``m(x, mask)`` must compute, one sequence at a time, weights cast to ``dtype`` (gates,
    norm and output gate in float32, as the layer). Differentiable w.r.t. x and the weights."""
    H, Dk, Dv = m.num_heads, m.head_k_dim, m.head_v_dim
    lin = lambda layer, t: linear(layer, t, dtype)

    def one(xb):
        n = len(xb)
        q, k, v = lin(m.q_proj, xb).view(n, H, Dk), lin(m.k_proj, xb).view(n, H, Dk), lin(m.v_proj, xb).view(n, H, Dv)
        q, k = ref_qk_norm(m, q, k)
        logits = lin(m.gk_proj[1], lin(m.gk_proj[0], xb)).float()
        g = -torch.log1p(torch.exp(-logits)) / m.gate_logit_normalizer  # log sigmoid
        if m.clamp_min is not None:
            g = torch.maximum(g, torch.tensor(m.clamp_min))
        heads = lambda t: t.transpose(0, 1)[None]
        o = naive_gla(heads(q), heads(k), heads(v), heads(g.view(n, H, Dk)), scale=Dk ** -0.5)
        o = o[0].transpose(0, 1).float()
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + m.g_norm.eps) * m.g_norm.weight.float()
        o = o.reshape(n, H * Dv)
        if m.use_output_gate:
            gate = lin(m.g_proj, xb).float()
            o = o * gate * torch.sigmoid(gate)
        return lin(m.proj, o.to(dtype))

    return per_sequence(x, mask, one, dtype)


def _init_gates(name, p):
    if name.startswith("g_norm"):
        p.normal_(1.0, 0.1)
    elif name == "gk_proj.1.bias":
        p.uniform_(-3, 3)  # a spread of decay rates
    else:
        return False
    return True


def make_mixer(dim, num_heads, dtype=torch.float32, **kwargs) -> GatedLinearAttention:
    m = layers.create_mixer("gla", dim, num_heads, chunk_size=kwargs.pop("chunk_size", 16), **kwargs)
    return init_params(m, lambda p: 1.0 / math.sqrt(p.shape[-1]), special=_init_gates).to(dtype)


SHAPES = [(1, 1, 32, 2), (2, 7, 48, 3), (2, 33, 64, 4), (1, 70, 32, 1)]
SHAPE_IDS = shape_ids(SHAPES)
VARIANTS = {
    "default": {},
    "strong-decay": {"gate_logit_normalizer": 0.2, "qkv_bias": True, "proj_bias": True},  # log_g down to ~ -20
    "clamped-nogate": {"gate_logit_normalizer": 1.0, "clamp_min": -0.5, "use_output_gate": False, "expand_k": 1.0},
}


@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference(B, T, D, H, variant):
    m = make_mixer(D, H, **VARIANTS[variant])
    x = torch.randn(B, T, D)
    assert_close(m(x), reference_gla_module(m, x))


def test_defaults_follow_fla():
    m = layers.create_mixer("gla", 64, 4)
    assert (m.key_dim, m.value_dim, m.head_k_dim, m.head_v_dim) == (32, 64, 8, 16)
    assert m.gate_logit_normalizer == 16 and m.clamp_min is None and m.use_output_gate and m.chunk_size == 64
    assert m.gk_proj[0].out_features == 16 and m.gk_proj[0].bias is None and m.gk_proj[1].bias is not None
    x = torch.randn(2, 9, 64)
    g = m.log_gate(x)
    assert g.shape == (2, 9, 4, 8) and g.dtype == torch.float32 and torch.all(g < 0)


@pytest.mark.parametrize("variant", ["default", "strong-decay"])
def test_backward_matches_reference(variant):
    B, T, D, H = 3, 37, 32, 2
    m = make_mixer(D, H, **VARIANTS[variant])
    mask = padding_mask([37, 20, 5], T, "left")
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    want = check_mixer_matches_reference_grads(m, reference_gla_module, x0, dy, mask)
    assert {"gk_proj.0.weight", "gk_proj.1.weight", "gk_proj.1.bias", "g_proj.weight"} <= set(want)


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [0, 1, 16, 23])
def test_prefill_then_steps_matches_forward(prompt):
    B, T, D, H = 2, 30, 32, 2
    m = make_mixer(D, H, gate_logit_normalizer=1.0)
    x = torch.randn(B, T, D)
    check_prefill_then_steps(m, x, prompt, check_states=lambda state, s2: assert_close(state["S"], s2["S"]))


def test_prefill_gradient_matches_forward():
    m = make_mixer(32, 2)
    x0, dy = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    check_prefill_gradient(m, x0, dy, "gk_proj.0.weight")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_equals_running_alone(side):
    B, T, D, H = 4, 21, 32, 2
    lengths = [21, 9, 1, 14]
    m = make_mixer(D, H, gate_logit_normalizer=1.0)
    mask = padding_mask(lengths, T, side)
    x = torch.randn(B, T, D)
    y = check_padded_equals_alone(m, x, mask)
    assert_close(y, reference_gla_module(m, x, mask))
    _, state = m.prefill(x, m.init_state(B), mask)
    for b in range(B):  # padded positions neither write to nor decay the state
        _, alone = m.prefill(x[b : b + 1, mask[b]], m.init_state(1))
        assert_close(state["S"][b], alone["S"][0])


@pytest.mark.parametrize("D,H", [(32, 2), (64, 4)])
def test_state_size(D, H):
    m = layers.create_mixer("gla", D, H)
    assert m.state_size(1) == m.state_size(5000) == H * (D // 2 // H) * (D // H)
    assert m.init_state(2)["S"][0].numel() == m.state_size(3)


def test_compile_fullgraph():
    m = make_mixer(16, 2, chunk_size=8)
    x = torch.randn(2, 19, 16)
    check_compile_fullgraph(m, x, [padding_mask([19, 6], 19, "right")])


def test_bf16_error_ratio():
    B, T, D, H = 2, 70, 64, 2
    m = make_mixer(D, H, dtype=torch.bfloat16, gate_logit_normalizer=1.0)
    ref_m = make_mixer(D, H, gate_logit_normalizer=1.0)
    x = torch.randn(B, T, D, dtype=torch.bfloat16)
    dy = torch.randn(B, T, D)
    check_bf16_chunked_vs_naive(m, ref_m, reference_gla_module, x, dy, "gk_proj.1.weight")


# --- errors ---------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(ValueError, match="causal only"):
        layers.create_mixer("gla", 32, 2, causal=False)
    with pytest.raises(ValueError, match="expand_k"):
        layers.create_mixer("gla", 48, 4, expand_k=0.3)  # key width 14.4
    with pytest.raises(ValueError, match="expand_k"):
        layers.create_mixer("gla", 48, 4, expand_k=0.125)  # key width 6: not divisible by 4 heads
    with pytest.raises(ValueError, match="expand_v"):
        layers.create_mixer("gla", 48, 4, expand_v=0)
    with pytest.raises(ValueError, match="gate_low_rank_dim"):
        layers.create_mixer("gla", 32, 2, gate_low_rank_dim=0)
    with pytest.raises(ValueError, match="gate_logit_normalizer"):
        layers.create_mixer("gla", 32, 2, gate_logit_normalizer=0)
    with pytest.raises(ValueError, match="clamp_min"):
        layers.create_mixer("gla", 32, 2, clamp_min=0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        layers.create_mixer("gla", 32, 2, chunk_size=48)
    with pytest.raises(ValueError, match="state_dtype"):
        layers.create_mixer("gla", 32, 2, state_dtype="float32")
    m = layers.create_mixer("gla", 32, 2)
    with pytest.raises(ValueError, match=r"x_t must have shape \[batch, 1, 32\]"):
        m.step(torch.randn(1, 32), m.init_state(1))
    assert "gate_logit_normalizer=16.0" in repr(m)


def test_auto_backend_falls_back_once_when_fla_fails(monkeypatch):
    """backend='auto': an fla failure at call time warns once and the torch path is used."""
    import layers.linear_attention as la
    m = make_mixer(32, 2)
    x = torch.randn(2, 9, 32)
    want = m(x)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("Triton refuses this GPU")

    monkeypatch.setattr(la, "FLA_AVAILABLE", True)
    monkeypatch.setattr(la, "_KERNEL_FAILED", set())
    monkeypatch.setattr(m, "_use_fla", lambda t: True)  # pretend the input is on CUDA
    monkeypatch.setattr(m, "_fla_chunk", broken)
    with pytest.warns(RuntimeWarning, match="Triton refuses this GPU"):
        assert_close(m(x), want)
    assert_close(m(x), want)  # no second attempt, no second warning
    assert len(calls) == 1
    m.backend = "fla"  # explicit fla: the error propagates
    with pytest.raises(RuntimeError, match="Triton refuses"):
        m(x)


# --- fla (GPU) ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_fla_matches_torch():
    """fla's chunk_gla / fused_recurrent_gla against the torch path (bf16), masks and decoding."""
    check_fla_matches_torch(make_mixer, "left", masked_backward=False, gate_logit_normalizer=2.0)
