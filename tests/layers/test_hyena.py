"""The Hyena operator (``hyena``) against an independent reference: the implicit filter rebuilt from the
paper's formulas (complex-exponential positional embedding, ``linspace`` time and decay rates), the
short conv as an explicit sum over taps and the long convolutions as the explicit O(T^2) sum
(``naive_long_conv``), one sequence at a time.

Tolerances (``mixer_checks``): float32 ``FP32_TOL`` = 1e-5 of ``max(1, max|expected|)`` for every
path (FFT convolution, prefill, cached-convolution steps) against the reference, outputs and
gradients; bfloat16: ``BF16_TOL`` = 3e-2 against the float32 reference on the same bf16-rounded
weights, and the FFT path's output error at most 2x (+ ``BF16_RATIO_EPS``) that of the reference run
from bf16 inputs and weights (projections and short conv in bf16, as the layer).
"""
from __future__ import annotations

import math

import pytest
import torch

import layers
import layers.hyena  # noqa: F401  (registers "hyena")
from layers.hyena import Hyena, HyenaFilter, naive_long_conv
from layers.s4d import causal_fft_conv
from mixer_checks import (BF16_TOL, assert_close, check_bf16_chunked_vs_naive, check_compile_fullgraph,
                          check_mixer_matches_reference_grads, check_padded_equals_alone, check_prefill_gradient,
                          check_prefill_then_steps, check_step_gradients, linear, max_err, padding_mask, per_sequence,
                          shape_ids, state_checker, step_through)

MAX_LEN = 128


@pytest.mark.parametrize("T", [1, 7, 33, 100])
def test_fft_conv_matches_explicit_sum(T):
    u, h, b = torch.randn(2, 5, T), torch.randn(5, T) / math.sqrt(T), torch.randn(5)
    assert_close(causal_fft_conv(u, h) + b[:, None] * u, naive_long_conv(u, h, b))
    y = torch.stack([sum(h[:, t - s] * u[..., s] for s in range(t + 1)) for t in range(T)], -1)
    assert_close(naive_long_conv(u, h), y)


def reference_filter(f: HyenaFilter, T: int) -> torch.Tensor:
    """HyenaFilter's h [channels, T] as written in the paper's code (complex exponentials, linspaces)."""
    L, bands = f.max_seq_len, (f.emb_dim - 1) // 2
    t = torch.linspace(0, 1, L)[:T, None]
    w = 2 * math.pi * torch.linspace(0, L - 1, L)[:T, None] / L
    z = torch.exp(-1j * torch.linspace(1e-4, bands - 1, bands)[None] * w)
    e = torch.cat([t, z.real, z.imag], -1)
    for layer, freq in zip(f.layers, f.freq):
        e = torch.sin(freq.float() * linear(layer, e))
    target, fast, slow = 1e-2, 0.3, 1.5
    rates = torch.linspace(math.log(target) / slow, math.log(target) / fast, f.out.out_features)
    return (linear(f.out, e) * torch.exp(-t * rates.abs())).T


def reference_hyena_module(m: Hyena, x, mask=None, dtype=torch.float32):
    """What ``m(x, mask)`` must compute, one sequence at a time: projections and the short conv with weights
    cast to ``dtype``, the filter and the long convolutions in float32."""
    N, D, K = m.order, m.dim, m.short_filter_size

    def one(xb):
        n = len(xb)
        z = linear(m.in_proj, xb, dtype)
        zp = torch.cat([z.new_zeros(K - 1, z.shape[1]), z])
        w, b = m.short_conv.weight[:, 0].to(dtype), m.short_conv.bias.to(dtype)
        z = torch.stack([sum(w[:, k] * zp[t + k] for k in range(K)) + b for t in range(n)]).float()
        *gates, v = z.split(D, dim=-1)
        h = reference_filter(m.filter, n).view(N, D, n)
        for i in range(N):
            v = gates[i] * naive_long_conv(v.T, h[i], m.bias[i]).T
        return linear(m.out_proj, v.to(dtype), dtype)

    return per_sequence(x, mask, one, dtype)


def make_mixer(dim, num_heads, dtype=torch.float32, **kwargs) -> Hyena:
    return layers.create_mixer("hyena", dim, num_heads, **{"max_seq_len": MAX_LEN, "filter_order": 16, **kwargs}).to(dtype)


SHAPES = [(1, 1, 16, 2), (2, 7, 16, 1), (3, 33, 32, 4), (2, 70, 16, 2)]
VARIANTS = {
    "order2": {},
    "order1": {"order": 1},
    "order3-wide": {"order": 3, "filter_dim": 7, "short_filter_size": 4, "proj_bias": False},
}


@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=shape_ids(SHAPES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference(B, T, D, H, variant):
    m = make_mixer(D, H, **VARIANTS[variant])
    x = torch.randn(B, T, D)
    assert_close(m(x), reference_hyena_module(m, x))


@pytest.mark.parametrize("variant", ["order2", "order3-wide"])
def test_backward_matches_reference(variant):
    """Gradients of x and of every parameter (the filter MLP's included), with left padding."""
    B, T, D = 3, 29, 16
    m = make_mixer(D, 2, **VARIANTS[variant])
    mask = padding_mask([29, 12, 3], T, "left")
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    want = check_mixer_matches_reference_grads(m, reference_hyena_module, x0, dy, mask)
    assert {"bias", "filter.freq", "filter.layers.0.weight", "filter.out.weight", "short_conv.weight"} <= set(want)


def test_filter_does_not_depend_on_the_input_length():
    m = layers.create_mixer("hyena", 16, 2)
    assert (m.order, m.max_seq_len, m.filter.emb_dim, m.short_filter_size) == (2, 2048, 3, 3)
    h = m.long_filters(40)
    assert h.shape == (2, 16, 40) and h.dtype == torch.float32
    assert_close(m.long_filters(5), h[..., :5])
    assert_close(h.reshape(32, 40), reference_filter(m.filter, 40))


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [0, 1, 16, 23])
def test_prefill_then_steps_matches_forward(prompt):
    B, T, D = 2, 30, 16
    m = make_mixer(D, 2)
    x = torch.randn(B, T, D)
    check_prefill_then_steps(m, x, prompt, check_states=state_checker(["short", "long"]))


def test_prefill_in_chunks_matches_forward():
    m = make_mixer(16, 2, short_filter_size=4)
    x = torch.randn(2, 25, 16)
    with torch.no_grad():
        y1, s = m.prefill(x[:, :2], m.init_state(2))  # shorter than the short conv's window
        y2, s = m.prefill(x[:, 2:9], s)
        y3, s = m.prefill(x[:, 9:], s)
    assert_close(torch.cat([y1, y2, y3], 1), m(x))


def test_prefill_gradient_matches_forward():
    m = make_mixer(16, 2)
    x0, dy = torch.randn(2, 19, 16), torch.randn(2, 19, 16)
    check_prefill_gradient(m, x0, dy, "filter.out.weight")


def test_step_gradients_match_forward():
    """Decoding one token at a time is differentiable and has the forward pass's gradients (x and all weights)."""
    check_step_gradients(make_mixer(16, 2), torch.randn(2, 9, 16), torch.randn(2, 9, 16))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_equals_running_alone(side):
    B, T, D = 4, 21, 16
    m = make_mixer(D, 2)
    mask = padding_mask([21, 9, 1, 14], T, side)
    x, x_next = torch.randn(B, T, D), torch.randn(B, 3, D)
    y = check_padded_equals_alone(m, x, mask)
    assert_close(y, reference_hyena_module(m, x, mask))
    with torch.no_grad():
        y_p, state = m.prefill(x, m.init_state(B), mask)
        y_s, state_s = step_through(m, x_next, state)
        y_c, _ = m.prefill(x, state_s, mask)  # a second masked prompt, after a nonempty cache
    assert_close(y_p, y)
    for b in range(B):
        alone = x[b : b + 1, mask[b]]
        n = alone.shape[1]
        _, s_alone = m.prefill(alone, m.init_state(1))
        assert_close(state["short"][b], s_alone["short"][0], msg=f"short cache of sequence {b}")
        assert torch.all(state["long"][b, ..., : T - n] == 0), "padding in the long cache is not zero"
        assert_close(state["long"][b, ..., T - n :], s_alone["long"][0], msg=f"long cache of sequence {b}")
        full = m(torch.cat([alone, x_next[b : b + 1], alone], 1))[0]
        assert_close(y_s[b], full[n : n + 3], msg=f"steps after sequence {b}")
        assert_close(y_c[b, mask[b]], full[n + 3 :], msg=f"second prompt of sequence {b}")


def test_state_size():
    m = make_mixer(16, 2, order=3, short_filter_size=4)
    floats = lambda s: sum(t[0].numel() for t in s.values())
    s = m.init_state(2)
    assert floats(s) == m.state_size(0) == 3 * 4 * 16
    _, s = m.prefill(torch.randn(2, 11, 16), s)
    assert floats(s) == m.state_size(11)
    _, s = m.step(torch.randn(2, 1, 16), s)
    assert floats(s) == m.state_size(12) == 3 * 16 * 12 + 3 * 4 * 16


def test_compile_fullgraph():
    m = make_mixer(16, 2)
    check_compile_fullgraph(m, torch.randn(2, 19, 16), [padding_mask([19, 6], 19, "left")])


# --- bfloat16 -------------------------------------------------------------------------------------


def test_bf16_error_ratio():
    B, T, D = 2, 70, 32
    m = make_mixer(D, 2, dtype=torch.bfloat16)
    ref_m = make_mixer(D, 2)
    x = torch.randn(B, T, D, dtype=torch.bfloat16)
    check_bf16_chunked_vs_naive(m, ref_m, reference_hyena_module, x, torch.randn(B, T, D), "filter.out.weight")


def test_autocast_bf16_keeps_the_filter_in_float32():
    m = make_mixer(32, 2)
    x = torch.randn(2, 40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        h = m.long_filters(40)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    err = max_err(y, reference_hyena_module(m, x))
    assert 0 < err <= BF16_TOL, err


# --- errors ---------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(ValueError, match="causal only"):
        layers.create_mixer("hyena", 16, 2, causal=False)
    for name, bad in (("order", 0), ("max_seq_len", -1), ("filter_order", 2.5), ("short_filter_size", 0)):
        with pytest.raises(ValueError, match=name):
            layers.create_mixer("hyena", 16, 2, **{name: bad})
    for bad in (2, 4, 1):
        with pytest.raises(ValueError, match="filter_dim must be an odd int >= 3"):
            layers.create_mixer("hyena", 16, 2, filter_dim=bad)
    with pytest.raises(TypeError, match="filter_size"):
        layers.create_mixer("hyena", 16, 2, filter_size=3)
    m = make_mixer(16, 2, max_seq_len=8)
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_seq_len=8"):
        m(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="max_len 9 exceeds max_seq_len=8"):
        m.init_state(1, max_len=9)
    _, s = m.prefill(torch.randn(1, 5, 16), m.init_state(1))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        m.prefill(torch.randn(1, 4, 16), s)
    _, s = m.prefill(torch.randn(1, 3, 16), s)
    with pytest.raises(ValueError, match="decoded length 9 exceeds max_seq_len=8"):
        m.step(torch.randn(1, 1, 16), s)
    with pytest.raises(ValueError, match=r"x_t must have shape \[batch, 1, 16\]"):
        m.step(torch.randn(1, 2, 16), s)
    assert "order=2" in repr(m)
