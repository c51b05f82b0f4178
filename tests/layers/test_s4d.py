"""S4D (``s4d``) against an independent reference: the diagonal recurrence run one token at a time
(``naive_s4d``), with A, C, the activation and the output projection written out, one sequence at a time.

Tolerances (``mixer_checks``): float32 ``FP32_TOL`` = 1e-5 of ``max(1, max|expected|)`` for every
path (FFT convolution, prefill, recurrent steps) against the recurrence, outputs and gradients;
bfloat16: ``BF16_TOL`` = 3e-2 against the float32 reference on the same bf16-rounded weights, and
the FFT path's output error at most 2x (+ ``BF16_RATIO_EPS``) that of the reference run from bf16
inputs and weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import layers
import layers.s4d  # noqa: F401  (registers "s4d")
from layers.s4d import S4D, naive_s4d, vandermonde
from mixer_checks import (BF16_TOL, assert_close, check_bf16_chunked_vs_naive, check_bidirectional_cannot_decode,
                          check_compile_fullgraph, check_mixer_matches_reference_grads, check_padded_equals_alone,
                          check_prefill_gradient, check_prefill_then_steps, check_step_gradients, linear, max_err, padding_mask,
                          per_sequence, shape_ids, step_through)


def reference_s4d_module(m: S4D, x, mask=None, dtype=torch.float32):
    """What ``m(x, mask)`` must compute, one sequence at a time: the recurrence (float32) on the inputs
    cast to ``dtype``, then activation and out_proj with weights cast to ``dtype``."""
    A = -m.log_A_real.float().exp()
    C = m.C.float()
    if m.mode == "complex":
        A = A + 1j * m.A_imag.float()
        C = C[..., 0] + 1j * C[..., 1]
    scale = 2.0 if m.mode == "complex" else 1.0

    def one(xb):
        u = xb[None].float()
        y, _ = naive_s4d(u, m.log_dt, A, C[0], m.D, scale)
        if not m.causal:
            y = y + naive_s4d(u.flip(1), m.log_dt, A, C[1], None, scale)[0].flip(1)
        y = linear(m.out_proj, F.gelu(y.to(dtype)) if m.activation == "gelu" else y.to(dtype), dtype)
        return (F.glu(y, -1) if m.glu else y)[0]

    return per_sequence(x, mask, one, dtype)


def make_mixer(dim, num_heads, dtype=torch.float32, **kwargs) -> S4D:
    return layers.create_mixer("s4d", dim, num_heads, **{"d_state": 8, **kwargs}).to(dtype)


SHAPES = [(1, 1, 16, 2), (2, 7, 16, 1), (3, 33, 32, 4), (2, 70, 16, 2)]
VARIANTS = {
    "complex": {},
    "real": {"mode": "real"},
    "complex-bidir": {"causal": False},
    "real-bidir-glu": {"mode": "real", "causal": False, "glu": True, "activation": "identity"},
    "fast-dt": {"dt_min": 0.1, "dt_max": 1.0, "d_state": 16},  # strong decays, high frequencies
}


@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=shape_ids(SHAPES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_recurrence(B, T, D, H, variant):
    m = make_mixer(D, H, **VARIANTS[variant])
    x = torch.randn(B, T, D)
    assert_close(m(x), reference_s4d_module(m, x))


@pytest.mark.parametrize("variant", ["complex", "real", "complex-bidir"])
def test_backward_matches_recurrence(variant):
    """Gradients of x and of every parameter, with left padding."""
    B, T, D = 3, 29, 16
    m = make_mixer(D, 2, **VARIANTS[variant])
    mask = padding_mask([29, 12, 3], T, "left")
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    want = check_mixer_matches_reference_grads(m, reference_s4d_module, x0, dy, mask)
    assert {"log_dt", "log_A_real", "C", "D", "out_proj.weight"} <= set(want)
    assert ("A_imag" in want) == (m.mode == "complex")


@pytest.mark.parametrize("T", [1, 2, 7, 16, 17, 1000])
def test_vandermonde_is_the_powers_of_abar(T):
    """The factorised powers against exp(l dt A) in complex128, decays strong and weak, fast rotations."""
    dtA = torch.complex(-torch.rand(3, 8) * torch.tensor([[0.01], [0.5], [5.0]]), torch.randn(3, 8) * 10)
    powers = lambda a, real: (a[..., None] * torch.arange(T, dtype=real)).exp()
    want = powers(dtA.to(torch.complex128), torch.float64)
    got = vandermonde(dtA, T)
    assert got.shape == (3, 8, T) and got.dtype == torch.complex64
    # float32 angles l Im(dt A) reach ~1e4 here, so the direct float32 form errs too: at most twice its error
    direct_err = (powers(dtA, torch.float32) - want).abs().max()
    assert (got - want).abs().max() <= 2 * direct_err + 1e-6


def test_init_follows_s4d():
    m = layers.create_mixer("s4d", 32, 4)
    assert m.d_state == 64 and m.mode == "complex" and m.activation == "gelu" and not m.glu
    A = m.ssm_A()
    assert A.shape == (32, 32) and torch.all(A.real == -0.5)
    assert_close(A.imag, torch.pi * torch.arange(32.0).expand(32, -1))
    dt = m.log_dt.exp()
    assert torch.all((dt >= 1e-3) & (dt <= 1e-1))
    r = layers.create_mixer("s4d", 32, 4, mode="real", d_state=5, causal=False)
    assert_close(r.ssm_A(), -torch.arange(1.0, 6.0).expand(32, -1))
    assert r.C.shape == (2, 32, 5) and r.A_imag is None


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["complex", "real"])
@pytest.mark.parametrize("prompt", [0, 1, 16, 23])
def test_prefill_then_steps_matches_forward(mode, prompt):
    B, T, D = 2, 30, 16
    m = make_mixer(D, 2, mode=mode, dt_min=0.01, dt_max=0.5)
    x = torch.randn(B, T, D)
    state = check_prefill_then_steps(m, x, prompt, check_states=lambda s1, s2: assert_close(s1["h"], s2["h"]))
    _, h = naive_s4d(x, m.log_dt, m.ssm_A(), m.ssm_C()[0], m.D, m.scale)
    assert_close(state["h"], h)


def test_prefill_in_chunks_matches_forward():
    m = make_mixer(16, 2, dt_min=0.01, dt_max=0.5)
    x = torch.randn(2, 25, 16)
    with torch.no_grad():
        y1, s = m.prefill(x[:, :9], m.init_state(2))
        y2, s = m.prefill(x[:, 9:], s)
    assert_close(torch.cat([y1, y2], 1), m(x))


def test_prefill_gradient_matches_forward():
    m = make_mixer(16, 2)
    x0, dy = torch.randn(2, 19, 16), torch.randn(2, 19, 16)
    check_prefill_gradient(m, x0, dy, "A_imag")


def test_step_gradients_match_forward():
    """Decoding one token at a time is differentiable and has the forward pass's gradients (x and all weights)."""
    check_step_gradients(make_mixer(16, 2), torch.randn(2, 9, 16), torch.randn(2, 9, 16))


@pytest.mark.parametrize("mode", ["complex", "real"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_equals_running_alone(side, mode):
    B, T, D = 4, 21, 16
    lengths = [21, 9, 1, 14]
    m = make_mixer(D, 2, mode=mode, dt_min=0.01, dt_max=0.5)
    mask = padding_mask(lengths, T, side)
    x, x_next = torch.randn(B, T, D), torch.randn(B, 3, D)
    y = check_padded_equals_alone(m, x, mask)
    assert_close(y, reference_s4d_module(m, x, mask))
    with torch.no_grad():
        y_p, state = m.prefill(x, m.init_state(B), mask)
        y_s, state_s = step_through(m, x_next, state)
        y_c, state_c = m.prefill(x, state_s, mask)  # a second masked prompt, after a nonzero state
    assert_close(y_p, y)
    for b in range(B):
        alone = x[b : b + 1, mask[b]]
        _, s_alone = m.prefill(alone, m.init_state(1))
        assert_close(state["h"][b], s_alone["h"][0], msg=f"state of sequence {b}")
        full = m(torch.cat([alone, x_next[b : b + 1], alone], 1))[0]
        n = len(alone[0])
        assert_close(y_s[b], full[n : n + 3], msg=f"steps after sequence {b}")
        assert_close(y_c[b, mask[b]], full[n + 3 :], msg=f"second prompt of sequence {b}")
        _, s_full = m.prefill(torch.cat([alone, x_next[b : b + 1], alone], 1), m.init_state(1))
        assert_close(state_c["h"][b], s_full["h"][0], msg=f"state after the second chunk, sequence {b}")


def test_bidirectional_padding_equals_running_alone():
    m = make_mixer(16, 2, causal=False)
    mask = padding_mask([13, 5, 1], 13, "left")
    x = torch.randn(3, 13, 16)
    assert_close(check_padded_equals_alone(m, x, mask), reference_s4d_module(m, x, mask))


@pytest.mark.parametrize("mode", ["complex", "real"])
def test_state_size(mode):
    m = make_mixer(16, 2, d_state=6, mode=mode)
    s = m.init_state(3)
    floats = lambda t: t[0].numel() * (2 if t.is_complex() else 1)
    assert floats(s["h"]) == m.state_size(1) == m.state_size(4096) == 16 * 6
    _, s = m.prefill(torch.randn(3, 11, 16), s)
    _, s = m.step(torch.randn(3, 1, 16), s)
    assert set(s) == {"h"} and floats(s["h"]) == m.state_size(12)


def test_compile_fullgraph():
    x = torch.randn(2, 19, 16)
    check_compile_fullgraph(make_mixer(16, 2), x, [padding_mask([19, 6], 19, "right")])
    check_compile_fullgraph(make_mixer(16, 2, mode="real", causal=False), x, [padding_mask([19, 6], 19, "left")])


# --- bfloat16 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["complex", "real"])
def test_bf16_error_ratio(mode):
    B, T, D = 2, 70, 32
    m = make_mixer(D, 2, dtype=torch.bfloat16, mode=mode)
    ref_m = make_mixer(D, 2, mode=mode)
    x = torch.randn(B, T, D, dtype=torch.bfloat16)
    check_bf16_chunked_vs_naive(m, ref_m, reference_s4d_module, x, torch.randn(B, T, D), "C")


def test_autocast_bf16_keeps_the_ssm_in_float32():
    m = make_mixer(32, 2, mode="real")
    x = torch.randn(2, 40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        K = m.kernel(40)
    assert y.dtype == torch.bfloat16 and K.dtype == torch.float32
    err = max_err(y, reference_s4d_module(m, x))
    assert 0 < err <= BF16_TOL, err


# --- errors ---------------------------------------------------------------------------------------


def test_errors():
    for bad in (0, -4, 2.0):
        with pytest.raises(ValueError, match="d_state"):
            layers.create_mixer("s4d", 16, 2, d_state=bad)
    with pytest.raises(ValueError, match="d_state must be even"):
        layers.create_mixer("s4d", 16, 2, d_state=7)
    with pytest.raises(ValueError, match="unknown mode 'lin'; valid ones: complex, real"):
        layers.create_mixer("s4d", 16, 2, mode="lin")
    with pytest.raises(ValueError, match="unknown activation 'relu'; valid ones: gelu, identity"):
        layers.create_mixer("s4d", 16, 2, activation="relu")
    with pytest.raises(ValueError, match="dt_min"):
        layers.create_mixer("s4d", 16, 2, dt_min=0.5, dt_max=0.1)
    with pytest.raises(TypeError, match="d_sate"):
        layers.create_mixer("s4d", 16, 2, d_sate=8)
    check_bidirectional_cannot_decode("s4d", dim=16)
    m = layers.create_mixer("s4d", 32, 2)
    with pytest.raises(ValueError, match=r"x_t must have shape \[batch, 1, 32\]"):
        m.step(torch.randn(2, 3, 32), m.init_state(2))
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len, 32\]"):
        m(torch.randn(2, 5, 31))
    assert "mode='complex'" in repr(m)
