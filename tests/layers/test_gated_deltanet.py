"""Gated DeltaNet: the gated delta-rule ops and the mixer.

The mixer-level tests are those of ``test_deltanet.py`` (imported below) run with the ``name``
fixture overridden to ``gated_deltanet``; tolerances are documented there (float32: 1e-5 of
max(1, max|expected|) against a float64 reference; bf16: 3e-2 plus the 2x-naive error ratio).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layers
from layers.deltanet import chunk_delta_rule, naive_recurrent_delta_rule
from layers.gated_deltanet import (
    GatedDeltaNet,
    chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
    recurrent_gated_delta_rule,
)
from test_deltanet import (  # noqa: F401  (the shared mixer tests, collected here with name="gated_deltanet")
    BETA_MODES,
    assert_close,
    check_bf16_op,
    make_mixer,
    op_inputs,
    reference_module,
    test_mixer_all_true_mask_and_fully_padded_row,
    test_mixer_auto_backend_is_torch_on_cpu,
    test_mixer_bf16_error_ratio,
    test_mixer_chunk_size_does_not_change_result,
    test_mixer_compile_fullgraph,
    test_mixer_errors,
    test_mixer_fla_matches_torch_on_cuda,
    test_mixer_fla_not_installed,
    test_mixer_forward_backward_match_reference,
    test_mixer_init_state_and_state_size,
    test_mixer_masked_prefill_then_steps,
    test_mixer_padding_mask_equals_running_alone,
    test_mixer_prefill_in_pieces_and_gradient,
    test_mixer_state_dtype_is_carried,
    test_mixer_steps_and_prefill_match_forward,
)

G_MODES = ["mild", "strong", "mixed", "zero"]


@pytest.fixture
def name():
    return "gated_deltanet"


# --- the reference itself ------------------------------------------------------------------------


def test_naive_gated_two_steps_by_hand():
    """S_t = a_t (S_{t-1} + b_t k_t (v_t - S_{t-1}^T k_t)^T ... ) written out: a_t (I - b k k^T) S + b k v^T."""
    q, k, v, beta, g, S0 = op_inputs(1, 1, 2, 3, 2, g_mode="mild")
    S, outs = S0[0, 0], []
    for t in range(2):
        kt, vt, bt, at = k[0, 0, t], v[0, 0, t], beta[0, 0, t], g[0, 0, t].exp()
        S = at * (S - bt * torch.outer(kt, kt @ S)) + bt * torch.outer(kt, vt)
        outs.append(0.5 * S.T @ q[0, 0, t])
    o, S_n = naive_recurrent_gated_delta_rule(q, k, v, beta, g, S0, scale=0.5)
    assert_close(o[0, 0], torch.stack(outs))
    assert_close(S_n[0, 0], S)


def test_naive_gated_limits():
    """g = 0 is the plain delta rule; a huge decay wipes the past (only the current write remains)."""
    q, k, v, beta, g, S0 = op_inputs(2, 2, 9, 4, 3, g_mode="zero")
    o_g, S_g = naive_recurrent_gated_delta_rule(q, k, v, beta, g, S0)
    o_d, S_d = naive_recurrent_delta_rule(q, k, v, beta, S0)
    assert_close(o_g, o_d)
    assert_close(S_g, S_d)
    wipe = torch.full_like(g, -1e4)
    _, S_w = naive_recurrent_gated_delta_rule(q, k, v, beta, wipe, S0)
    last = beta[:, :, -1, None, None] * k[:, :, -1, :, None] * v[:, :, -1, None, :]
    assert_close(S_w, last)


# --- chunked and recurrent ops vs the reference ----------------------------------------------------


@pytest.mark.parametrize("g_mode", G_MODES)
@pytest.mark.parametrize("beta_mode", BETA_MODES)
@pytest.mark.parametrize("T,chunk", [(1, 16), (7, 16), (33, 16), (70, 16), (20, 64)])
def test_chunk_gated_delta_rule_matches_naive(T, chunk, beta_mode, g_mode):
    """Forward and backward (q, k, v, beta, g, initial state) in float32, incl. beta near 0/1 and strong decays."""
    B, H, Dk, Dv = 2, 2, 8, 12
    inputs = op_inputs(B, H, T, Dk, Dv, beta_mode, dtype=torch.float32, g_mode=g_mode)
    dy, dS = torch.randn(B, H, T, Dv), torch.randn(B, H, Dk, Dv)
    res = {}
    for kind in ("naive", "chunk"):
        xs = [t.clone().requires_grad_() for t in inputs]
        if kind == "naive":
            o, S = naive_recurrent_gated_delta_rule(*xs)
        else:
            o, S = chunk_gated_delta_rule(*xs, chunk_size=chunk)
        ((o * dy).sum() + (S * dS).sum()).backward()
        res[kind] = (o, S, [t.grad for t in xs])
    (o_n, S_n, g_n), (o_c, S_c, g_c) = res["naive"], res["chunk"]
    assert_close(o_c, o_n, msg="o")
    assert_close(S_c, S_n, msg="final state")
    for nm, a, b in zip("q k v beta g S0".split(), g_c, g_n):
        assert torch.isfinite(a).all(), nm
        if not (nm == "S0" and g_mode == "strong" and T > 1):  # a strongly decayed S0 has a ~0 gradient
            assert b.abs().max() > 0, nm
        assert_close(a, b, msg=f"grad {nm}")


def test_chunk_gated_zero_decay_equals_delta_rule():
    q, k, v, beta, g, S0 = op_inputs(2, 3, 37, 8, 8, dtype=torch.float32, g_mode="zero")
    o1, S1 = chunk_gated_delta_rule(q, k, v, beta, g, S0, chunk_size=16)
    o2, S2 = chunk_delta_rule(q, k, v, beta, S0, chunk_size=16)
    assert_close(o1, o2)
    assert_close(S1, S2)


def test_chunk_gated_extreme_decays_are_finite():
    """log decays of -1e4 per step (alpha underflows to 0): no inf/nan forward or backward, and the
    chunked form still equals the reference."""
    q, k, v, beta, g, S0 = op_inputs(1, 2, 40, 8, 8, dtype=torch.float32, g_mode="mild")
    g = torch.where(torch.rand_like(g) < 0.5, torch.full_like(g, -1e4), g).requires_grad_()
    o, S = chunk_gated_delta_rule(q, k, v, beta, g, S0, chunk_size=16)
    o_n, S_n = naive_recurrent_gated_delta_rule(q, k, v, beta, g, S0)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert_close(o, o_n)
    assert_close(S, S_n)
    (o.sum() + S.sum()).backward()
    assert torch.isfinite(g.grad).all()


@pytest.mark.parametrize("g_mode", G_MODES)
def test_recurrent_gated_matches_naive(g_mode):
    inputs = op_inputs(2, 3, 13, 8, 6, dtype=torch.float32, g_mode=g_mode)
    o_r, S_r = recurrent_gated_delta_rule(*inputs)
    o_n, S_n = naive_recurrent_gated_delta_rule(*inputs)
    assert_close(o_r, o_n)
    assert_close(S_r, S_n)


@pytest.mark.parametrize("g_mode", ["mild", "strong", "mixed"])
@pytest.mark.parametrize("beta_mode", BETA_MODES)
def test_chunk_gated_bf16(g_mode, beta_mode):
    """bf16 q, k, v, beta, state (fp32 log decays): tolerance and 2x-naive ratio, forward and backward."""
    inputs = op_inputs(2, 2, 70, 32, 32, beta_mode, dtype=torch.float32, g_mode=g_mode)
    check_bf16_op(naive_recurrent_gated_delta_rule, lambda *a: chunk_gated_delta_rule(*a, chunk_size=16), inputs)


# --- gated-specific mixer behaviour --------------------------------------------------------------


def test_log_decay_formula_and_init():
    m = layers.create_mixer("gated_deltanet", 64, 4)
    assert isinstance(m, GatedDeltaNet) and m.use_gate and hasattr(m, "g_proj")
    A = m.A_log.exp()
    assert torch.all((A >= 1 - 1e-5) & (A <= 16 + 1e-4))
    dt = F.softplus(m.dt_bias)
    assert torch.all((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001))
    x = torch.randn(2, 5, 64)
    g = m.log_decay(x)
    assert g.shape == (2, 5, 4) and g.dtype == torch.float32 and torch.all(g <= 0)
    want = -A * F.softplus(x @ m.a_proj.weight.T + m.dt_bias)
    assert_close(g, want)
    assert m.A_log._no_weight_decay and m.dt_bias._no_weight_decay


def test_decay_matters():
    """Changing A_log changes the output (the decay is actually applied)."""
    m = make_mixer("gated_deltanet", 32, 2, chunk_size=8)
    x = torch.randn(2, 17, 32)
    y = m(x)
    with torch.no_grad():
        m.A_log.add_(2.0)
    assert (m(x) - y).abs().max() > 1e-3
    assert_close(m(x), reference_module(m, x)[0])


def test_gated_errors():
    with pytest.raises(ValueError, match="A_init_range"):
        layers.create_mixer("gated_deltanet", 32, 2, A_init_range=(0.0, 4.0))
    with pytest.raises(ValueError, match="dt_min"):
        layers.create_mixer("gated_deltanet", 32, 2, dt_min=0.5, dt_max=0.1)
