"""Mamba (``mamba``) against independent references: the token-by-token selective scan
(``selective_scan_ref``, as mamba-ssm's) and the block written out one sequence at a time with an
explicitly left-padded conv. Both fast scans (chunked, and sequential with its hand-written backward) are
checked against the reference, alone and inside the mixer.

Tolerances (``mixer_checks``): float32 1e-5 of ``max(1, max|expected|)`` for outputs, states and
gradients; bfloat16 weights: ``BF16_TOL`` = 3e-2 against the float32 reference on the same
bf16-rounded weights, the output's error at most 2x (+ ``BF16_RATIO_EPS`` = 1e-3) that of the
reference run with bf16 weights; autocast (bf16): within ``BF16_TOL`` of the float32 reference.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layers.mamba
from layers.mamba import (Mamba, selective_scan_chunked, selective_scan_ref, selective_scan_sequential,
                          selective_state_update)
from mixer_checks import (BF16_TOL, assert_close, check_bf16_chunked_vs_naive, check_compile_fullgraph,
                          check_decoding_after_masked_prefill, check_fully_padded_rows, check_input_errors,
                          check_mixer_matches_reference_grads, check_padding_equals_alone_and_reference, check_prefill_gradient,
                          check_prefill_then_steps, check_step_gradients, linear, max_err, padding_mask, per_sequence,
                          shape_ids, state_checker)

STATE_KEYS = ("conv", "ssm", "pos")


# --- the selective scan ------------------------------------------------------------------------------


def scan_inputs(batch, d, T, N, requires_grad=True):
    """u, delta, A (log decays spread over [-8, 0)), B, C, D, z, delta_bias, initial state."""
    t = {"u": torch.randn(batch, d, T), "delta": torch.randn(batch, d, T), "A": -8 * torch.rand(d, N) - 1e-3,
         "B": torch.randn(batch, N, T), "C": torch.randn(batch, N, T), "D": torch.randn(d), "z": torch.randn(batch, d, T),
         "delta_bias": torch.randn(d), "initial_state": torch.randn(batch, d, N)}
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


FAST_SCANS = {"chunked": lambda **a: selective_scan_chunked(**a, chunk_size=8), "sequential": selective_scan_sequential}


@pytest.mark.parametrize("scan", list(FAST_SCANS))
@pytest.mark.parametrize("T", [1, 7, 16, 37])
@pytest.mark.parametrize("optional", [True, False], ids=["all-options", "plain"])
def test_fast_scans_match_reference_forward_and_grads(scan, T, optional):
    inputs = scan_inputs(2, 5, T, 4)
    if not optional:  # no D, z, bias, softplus or initial state (delta must then be positive)
        inputs = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
        inputs["delta"] = inputs["delta"].detach().abs().requires_grad_()
    kw = {"delta_softplus": optional}
    dy = torch.randn(2, 5, T)
    results = []
    for fn in (selective_scan_ref, FAST_SCANS[scan]):
        y, h = fn(**inputs, **kw)
        ((y * dy).sum() + h.pow(2).sum()).backward()
        results.append((y, h, {k: v.grad.clone() for k, v in inputs.items()}))
        for v in inputs.values():
            v.grad = None
    (y0, h0, g0), (y1, h1, g1) = results
    assert_close(y1, y0)
    assert_close(h1, h0)
    for k in g0:
        assert g0[k].abs().max() > 0 or (k == "A" and T == 1 and not optional), k  # A acts from the 2nd token on
        assert_close(g1[k], g0[k], msg=f"grad of {k}")


@pytest.mark.parametrize("scan", list(FAST_SCANS))
def test_scan_strong_decay_is_finite(scan):
    """Cumulative log decays far below -88 inside a chunk (exp would underflow / its inverse overflow)."""
    inputs = scan_inputs(1, 3, 64, 4)
    inputs["A"] = torch.full((3, 4), -50.0, requires_grad=True)
    inputs["delta"] = (inputs["delta"].detach().abs() + 0.5).requires_grad_()
    dy = torch.randn(1, 3, 64)
    results = []
    for fn in (selective_scan_ref, FAST_SCANS[scan]):
        y, h = fn(**inputs)
        grads = torch.autograd.grad((y * dy).sum() + h.sum(), list(inputs.values()))
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
        results.append((y, h, *grads))
    for got, want in zip(*results[::-1]):
        assert_close(got, want)


def test_sequential_scan_under_autocast_stays_float32():
    """The sequential scan's matmuls are autocast-eligible; it must not run them in bfloat16."""
    inputs = scan_inputs(2, 6, 21, 5, requires_grad=False)
    want = selective_scan_ref(**inputs, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = selective_scan_sequential(**inputs, delta_softplus=True)
    assert got[0].dtype == got[1].dtype == torch.float32
    for g, w in zip(got, want):
        assert_close(g, w)


def test_state_update_is_one_scan_step():
    i = scan_inputs(2, 5, 1, 4, requires_grad=False)
    dt = F.softplus(i["delta"] + i["delta_bias"][:, None])
    y, h = selective_state_update(i["initial_state"], i["u"][..., 0], dt[..., 0], i["A"], i["B"][..., 0], i["C"][..., 0],
                                  i["D"], i["z"][..., 0])
    y_ref, h_ref = selective_scan_ref(**i, delta_softplus=True)
    assert_close(y, y_ref[..., 0])
    assert_close(h, h_ref)


# --- the mixer: an independent reference ---------------------------------------------------------------


def reference_mamba_module(m: Mamba, x, mask=None, dtype=torch.float32):
    """What ``m(x, mask)`` must compute, one sequence at a time, weights cast to ``dtype`` (the scan
    in float32 with the float32 A_log, D, dt bias). Differentiable w.r.t. x and the weights."""
    lin = lambda layer, t: linear(layer, t, dtype)

    def one(xb):
        x_in, z = lin(m.in_proj, xb).chunk(2, dim=-1)  # [n, d_inner]
        bias = None if m.conv1d.bias is None else m.conv1d.bias.to(dtype)
        padded = F.pad(x_in.T[None], (m.d_conv - 1, 0))  # zeros before the first token
        u = F.silu(F.conv1d(padded, m.conv1d.weight.to(dtype), bias, groups=m.d_inner))[0]  # [d_inner, n]
        dt_r, B, C = F.linear(u.T, m.x_proj.weight.to(dtype)).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        delta = F.linear(dt_r, m.dt_proj.weight.to(dtype))
        y, _ = selective_scan_ref(u[None], delta.T[None], -torch.exp(m.A_log), B.T[None], C.T[None], m.D, z.T[None],
                                  delta_bias=m.dt_proj.bias, delta_softplus=True)
        return lin(m.out_proj, y[0].T.to(dtype))

    return per_sequence(x, mask, one, dtype)


def make_mixer(dim, num_heads=2, dtype=torch.float32, **kwargs) -> Mamba:
    """mamba-ssm's init, D and the conv bias perturbed so their gradients are not degenerate."""
    m = Mamba(dim, num_heads, chunk_size=kwargs.pop("chunk_size", 16), **kwargs)
    with torch.no_grad():
        m.D.normal_(1.0, 0.3)
        if m.conv1d.bias is not None:
            m.conv1d.bias.normal_(0, 0.3)
    return m.to(dtype)


SHAPES = [(1, 1, 32, 2), (2, 7, 48, 3), (2, 33, 32, 4), (1, 70, 16, 1)]
VARIANTS = {  # on CPU "auto" takes the sequential scan; "chunked-scan" keeps the chunked one tested in the mixer
    "default": {},
    "chunked-scan": {"scan": "chunked"},
    "small": {"d_state": 4, "d_conv": 2, "expand": 1.5, "dt_rank": 3, "bias": True, "chunk_size": 8},
    "no-conv-memory": {"d_conv": 1, "conv_bias": False, "dt_min": 0.05, "dt_max": 2.0},  # strong decays
}


@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=shape_ids(SHAPES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference(B, T, D, H, variant):
    m = make_mixer(D, H, **VARIANTS[variant])
    x = torch.randn(B, T, D)
    assert_close(m(x), reference_mamba_module(m, x))


def test_defaults_follow_mamba_ssm():
    m = Mamba(64, 4)
    assert (m.d_inner, m.d_state, m.d_conv, m.dt_rank, m.chunk_size) == (128, 16, 4, 4, 64)
    assert m.in_proj.out_features == 256 and m.in_proj.bias is None and m.out_proj.bias is None
    assert m.x_proj.out_features == 4 + 32 and m.x_proj.bias is None and m.conv1d.bias is not None
    assert torch.equal(m.A_log, torch.arange(1, 17.0).log().expand(128, 16)) and torch.equal(m.D, torch.ones(128))
    assert Mamba(65, 5).dt_rank == 5  # ceil(65 / 16)
    assert "d_state=16" in repr(m)


@pytest.mark.parametrize("scan", ["chunked", "sequential"])
def test_backward_matches_reference(scan):
    B, T, D = 3, 37, 32
    m = make_mixer(D, 2, bias=True, scan=scan)
    mask = padding_mask([37, 20, 5], T, "left")
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    want = check_mixer_matches_reference_grads(m, reference_mamba_module, x0, dy, mask)
    assert set(want) == {"x"} | {n for n, _ in m.named_parameters()}


# --- decoding -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [0, 1, 16, 23])
def test_prefill_then_steps_matches_forward(prompt):
    m = make_mixer(32, chunk_size=8)
    x = torch.randn(2, 30, 32)
    check_prefill_then_steps(m, x, prompt, check_states=state_checker(STATE_KEYS))


def test_step_gradients_match_forward():
    """Decoding one token at a time is differentiable and has the forward pass's gradients (x and all weights)."""
    check_step_gradients(make_mixer(32), torch.randn(2, 9, 32), torch.randn(2, 9, 32))


def test_fully_padded_rows():
    m = make_mixer(32)
    mask = padding_mask([7, 0], 7, "right")
    check_fully_padded_rows(m, torch.randn(2, 7, 32), mask)
    _, state = m.prefill(torch.randn(2, 7, 32), m.init_state(2), mask)
    assert torch.all(state["conv"][1] == 0) and torch.all(state["ssm"][1] == 0) and state["pos"][1] == 0


def test_prefill_gradient_matches_forward():
    m = make_mixer(32)
    x0, dy = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    check_prefill_gradient(m, x0, dy, "dt_proj.bias")


@pytest.mark.parametrize("scan", ["chunked", "sequential"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_equals_running_alone(side, scan):
    m = make_mixer(32, chunk_size=8, scan=scan)
    x, mask = check_padding_equals_alone_and_reference(m, reference_mamba_module, side, state_keys=STATE_KEYS)
    check_decoding_after_masked_prefill(m, x, mask)


def test_right_padded_conv_state_is_last_real_inputs():
    m = make_mixer(32, d_conv=4)
    x, mask = torch.randn(2, 9, 32), padding_mask([9, 5], 9, "right")
    _, state = m.prefill(x, m.init_state(2), mask)
    x_in = m.in_proj(x)[..., : m.d_inner]
    assert_close(state["conv"][1], x_in[1, 2:5].T)
    assert state["pos"].tolist() == [9, 5]


@pytest.mark.parametrize("D", [32, 48])
def test_state_size(D):
    m = Mamba(D, 2, d_state=8)
    assert m.state_size(1) == m.state_size(5000) == 2 * D * (3 + 8)
    s = m.init_state(2)
    assert s["conv"][0].numel() + s["ssm"][0].numel() == m.state_size(3) and s["ssm"].dtype == torch.float32


def test_compile_fullgraph():
    m = make_mixer(16, chunk_size=8)
    x = torch.randn(2, 19, 16)
    check_compile_fullgraph(m, x, [None, padding_mask([19, 6], 19, "right")])


def test_auto_scan_is_sequential_on_eager_cpu_and_chunked_when_compiled(monkeypatch):
    calls = []
    for name in ("selective_scan_chunked", "selective_scan_sequential"):
        scan = getattr(layers.mamba, name)
        monkeypatch.setattr(layers.mamba, name, lambda *a, _scan=scan, _name=name, **k: calls.append(_name) or _scan(*a, **k))
    m, x = make_mixer(32, chunk_size=8), torch.randn(2, 11, 32)  # state 2 x 64 x 16 > SEQUENTIAL_MIN_STATE
    m(x)
    torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    m(x[:1])  # state 1 x 64 x 16: the break-even size, chunked
    assert calls == ["selective_scan_sequential", "selective_scan_chunked", "selective_scan_chunked"]
    small, large = torch.randn(1, 64, 5), torch.randn(4, 64, 5)  # u [B, d_inner, T]
    assert make_mixer(32, scan="sequential")._sequential(small) and not make_mixer(32, scan="chunked")._sequential(large)


# --- precision ----------------------------------------------------------------------------------------------


def test_bf16_weights_vs_fp32_reference():
    m, ref_m = make_mixer(32, dtype=torch.bfloat16), make_mixer(32)
    x, dy = torch.randn(2, 40, 32, dtype=torch.bfloat16), torch.randn(2, 40, 32)
    check_bf16_chunked_vs_naive(m, ref_m, reference_mamba_module, x, dy, "x_proj.weight")


def test_autocast_bf16_keeps_ssm_in_fp32():
    m = make_mixer(32)
    x = torch.randn(2, 25, 32)
    want = reference_mamba_module(m, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        _, state = m.prefill(x, m.init_state(2))
    assert y.dtype == torch.bfloat16 and state["ssm"].dtype == torch.float32
    assert 0 < max_err(y, want) <= BF16_TOL
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_casting_keeps_ssm_parameters_fp32():
    m = make_mixer(32)
    fp32 = {n: m.get_parameter(n).detach().clone() for n in Mamba.fp32_params}
    for cast in (lambda mod: mod.to(torch.bfloat16), lambda mod: mod.half()):
        c = cast(make_mixer(32))
        c.load_state_dict(m.state_dict())  # loading keeps the float32 values unrounded
        for name, p in c.named_parameters():
            assert p.dtype == (torch.float32 if name in fp32 else c.in_proj.weight.dtype), name
        for name, want in fp32.items():
            assert torch.equal(c.get_parameter(name), want), name
    b = m.to(torch.bfloat16)
    assert torch.equal(b.A_log, fp32["A_log"]) and torch.equal(b.dt_proj.bias, fp32["dt_proj.bias"])  # not rounded
    assert b(torch.randn(1, 5, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert m.double().A_log.dtype == torch.float64  # only half precision is refused


# --- initialisation -----------------------------------------------------------------------------------------


def test_dt_bias_init_survives_generic_reinit():
    m = Mamba(256, 4, dt_min=1e-3, dt_max=1e-1)
    assert m.dt_proj.bias._no_reinit and m.A_log._no_weight_decay and m.D._no_weight_decay
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert abs(dt.log().mean().item() - math.log(1e-2)) < 0.3  # log-uniform: centred on the log midpoint
    before = m.dt_proj.bias.detach().clone()
    with torch.no_grad():  # a model-wide re-init that honours _no_reinit
        for p in m.parameters():
            if not getattr(p, "_no_reinit", False):
                nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.zeros_(p)
    assert torch.equal(m.dt_proj.bias, before)
    m.reset_parameters()
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5) and not torch.equal(m.dt_proj.bias, before)
    assert torch.equal(m.A_log, torch.arange(1, 17.0).log().expand(512, 16)) and torch.equal(m.D, torch.ones(512))
    std = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= std and m.dt_proj.weight.std() > std / 3


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    ({"d_state": 0}, "d_state"), ({"d_conv": 0}, "d_conv"), ({"d_conv": -2}, "d_conv"), ({"expand": 0}, "expand"),
    ({"dt_rank": 0}, "dt_rank"), ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min"), ({"dt_scale": 0}, "dt_scale"),
    ({"chunk_size": 48}, "chunk_size"), ({"causal": False}, "causal=False"), ({"scan": "parallel"}, "scan"),
])
def test_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Mamba(32, 2, **kwargs)


def test_bad_inputs():
    m = make_mixer(32)
    check_input_errors(m)
