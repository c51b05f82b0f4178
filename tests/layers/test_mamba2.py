"""Mamba-2 (``mamba2``) against independent references: the SSD's quadratic "attention" form
(``ssd_quadratic_ref``, L = exp(segsum(dt A))) and its token-by-token recurrence
(``ssd_recurrent_ref``), and the mixer written out one sequence at a time with an explicitly
left-padded conv and the gated RMSNorm spelled out.

Tolerances (``mixer_checks``): float32 1e-5 of ``max(1, max|expected|)`` for outputs, states and
gradients; bfloat16 weights: ``BF16_TOL`` = 3e-2 against the float32 reference on the same
bf16-rounded weights, the output's error at most 2x (+ ``BF16_RATIO_EPS`` = 1e-3) that of the
reference run with bf16 weights; autocast (bf16): within ``BF16_TOL`` of the float32 reference.
The SSD forms with strong decays (dt A down to -80) are compared in float64 (see the comment there).
"""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layers import mamba2
from layers.mamba2 import (Mamba2, mamba_ssm_unavailable, segsum, ssd_chunked, ssd_mamba_ssm, ssd_quadratic_ref,
                           ssd_recurrent_ref, ssd_step)
from mixer_checks import (BF16_TOL, assert_close, check_bf16_chunked_vs_naive, check_compile_fullgraph,
                          check_decoding_after_masked_prefill, check_fully_padded_rows, check_input_errors,
                          check_mixer_matches_reference_grads, check_padding_equals_alone_and_reference, check_prefill_gradient,
                          check_prefill_then_steps, check_step_gradients, linear, max_err, padding_mask, per_sequence,
                          state_checker)

STATE_KEYS = ("conv", "ssm", "pos")


# --- the SSD forms -----------------------------------------------------------------------------------


def test_segsum():
    a = torch.randn(2, 5)
    s = segsum(a)
    for i in range(5):
        for j in range(5):
            want = a[:, j + 1 : i + 1].sum(-1) if j <= i else torch.full((2,), float("-inf"))
            assert_close(s[:, i, j], want)


def ssd_inputs(batch, T, H, P, G, N, A_scale=4.0, dtype=torch.float32):
    """x, dt (positive, up to 2), A (negative, down to -A_scale), B, C, D and an initial state, all requiring grad."""
    t = {"x": torch.randn(batch, T, H, P), "dt": 2 * torch.rand(batch, T, H) + 1e-3, "A": -A_scale * torch.rand(H) - 0.1,
         "B": torch.randn(batch, T, G, N), "C": torch.randn(batch, T, G, N), "D": torch.randn(H),
         "initial_state": torch.randn(batch, H, P, N)}
    return {k: v.to(dtype).requires_grad_() for k, v in t.items()}


# Strong decays (dt A down to -80) are compared in float64: in float32 the chunked form's gradient of the
# log decays (so of A and dt) carries the rounding of terms that cancel exactly (exp(b_i - b_j) on the
# diagonal), an absolute error ~ 1e-7 x their magnitude, above 1e-5 x max(1, |grad|) when the gradient is ~0.
@pytest.mark.parametrize("T", [1, 7, 16, 37])
@pytest.mark.parametrize("A_scale,dtype", [(1.0, torch.float32), (40.0, torch.float64)], ids=["weak-fp32", "strong-fp64"])
@pytest.mark.parametrize("G", [1, 2])
def test_chunked_equals_quadratic_equals_recurrent(T, A_scale, dtype, G):
    inputs = ssd_inputs(2, T, 4, 3, G, 5, A_scale, dtype)
    dy = torch.randn(2, T, 4, 3, dtype=dtype)
    results = {}
    forms = {"recurrent": ssd_recurrent_ref, "quadratic": ssd_quadratic_ref,
             "chunked": lambda **a: ssd_chunked(**a, chunk_size=8)}
    for name, fn in forms.items():
        y, h = fn(**inputs)
        ((y * dy).sum() + h.pow(2).sum()).backward()
        results[name] = (y, h, {k: v.grad.clone() for k, v in inputs.items()})
        for v in inputs.values():
            v.grad = None
    y0, h0, g0 = results["recurrent"]
    for name in ("quadratic", "chunked"):
        y, h, g = results[name]
        assert_close(y, y0, msg=name)
        assert_close(h, h0, msg=name)
        for k in g0:
            assert g0[k].abs().max() > 0, k
            assert g[k].dtype == dtype
            assert_close(g[k], g0[k], msg=f"{name} grad of {k}")


def test_step_is_one_recurrent_step():
    i = {k: v.detach() for k, v in ssd_inputs(2, 1, 4, 3, 2, 5).items()}
    y, h = ssd_step(**i)
    y_ref, h_ref = ssd_recurrent_ref(**i)
    assert_close(y, y_ref)
    assert_close(h, h_ref)


# --- the mixer: an independent reference ---------------------------------------------------------------


def reference_mamba2_module(m: Mamba2, x, mask=None, dtype=torch.float32):
    """What ``m(x, mask)`` must compute, one sequence at a time, weights cast to ``dtype`` (dt, the SSD,
    the norm in float32 with the float32 A_log, D, dt_bias). Differentiable w.r.t. x and the weights."""
    H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state

    def one(xb):
        n = len(xb)
        z, xBC, dt = linear(m.in_proj, xb, dtype).split([m.d_inner, m.conv_dim, H], dim=-1)
        bias = None if m.conv1d.bias is None else m.conv1d.bias.to(dtype)
        padded = F.pad(xBC.T[None], (m.d_conv - 1, 0))  # zeros before the first token
        xBC = F.silu(F.conv1d(padded, m.conv1d.weight.to(dtype), bias, groups=m.conv_dim))[0].T
        xs, B, C = xBC.split([m.d_inner, G * N, G * N], dim=-1)
        dt = F.softplus(dt.float() + m.dt_bias)
        y, _ = ssd_quadratic_ref(xs.reshape(1, n, H, P), dt[None], -torch.exp(m.A_log), B.reshape(1, n, G, N),
                                 C.reshape(1, n, G, N), m.D)
        y = (y.reshape(n, G, -1).float() * F.silu(z.float()).reshape(n, G, -1))
        y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + m.norm.eps)
        return linear(m.out_proj, (y.reshape(n, -1) * m.norm.weight.float()).to(dtype), dtype)

    return per_sequence(x, mask, one, dtype)


def make_mixer(dim=32, dtype=torch.float32, **kwargs) -> Mamba2:
    """Small heads; mamba-ssm's init with D, the norm weight and the conv bias perturbed."""
    kw = {"d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8, **kwargs}
    m = Mamba2(dim, 2, **kw)
    with torch.no_grad():
        m.D.normal_(1.0, 0.3)
        m.norm.weight.normal_(1.0, 0.2)
        if m.conv1d.bias is not None:
            m.conv1d.bias.normal_(0, 0.3)
    return m.to(dtype)


SHAPES = [(1, 1, 32), (2, 7, 32), (2, 33, 48), (1, 70, 16)]
VARIANTS = {
    "default": {},
    "one-group": {"ngroups": 1, "d_conv": 2, "expand": 1, "bias": True},
    "strong-decay": {"ngroups": 4, "headdim": 8, "d_conv": 1, "conv_bias": False, "dt_min": 0.5, "dt_max": 4.0,
                     "chunk_size": 16},
}


@pytest.mark.parametrize("B,T,D", SHAPES, ids=[f"B{b}-T{t}-D{d}" for b, t, d in SHAPES])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference(B, T, D, variant):
    m = make_mixer(D, **VARIANTS[variant])
    x = torch.randn(B, T, D)
    assert_close(m(x), reference_mamba2_module(m, x))


def test_defaults_follow_mamba_ssm():
    m = Mamba2(64, 4)
    assert (m.d_inner, m.d_state, m.d_conv, m.headdim, m.nheads, m.ngroups, m.chunk_size) == (128, 128, 4, 64, 2, 1, 64)
    assert m.conv_dim == 128 + 2 * 128 and m.in_proj.out_features == 128 + m.conv_dim + 2
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.conv1d.bias is not None
    A = torch.exp(m.A_log)
    assert A.shape == (2,) and torch.all((A >= 1) & (A <= 16)) and torch.equal(m.D, torch.ones(2))
    assert m.norm.group_size == 128 and torch.equal(m.norm.weight, torch.ones(128))
    assert "nheads=2" in repr(m)


def test_backward_matches_reference():
    B, T, D = 3, 37, 32
    m = make_mixer(D, bias=True)
    mask = padding_mask([37, 20, 5], T, "left")
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    want = check_mixer_matches_reference_grads(m, reference_mamba2_module, x0, dy, mask)
    assert set(want) == {"x"} | {n for n, _ in m.named_parameters()}


# --- decoding -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [0, 1, 16, 23])
def test_prefill_then_steps_matches_forward(prompt):
    m = make_mixer()
    x = torch.randn(2, 30, 32)
    check_prefill_then_steps(m, x, prompt, check_states=state_checker(STATE_KEYS))


def test_step_gradients_match_forward():
    """Decoding one token at a time is differentiable and has the forward pass's gradients (x and all weights)."""
    check_step_gradients(make_mixer(), torch.randn(2, 9, 32), torch.randn(2, 9, 32))


def test_fully_padded_rows():
    m = make_mixer()
    mask = padding_mask([7, 0], 7, "right")
    check_fully_padded_rows(m, torch.randn(2, 7, 32), mask)
    _, state = m.prefill(torch.randn(2, 7, 32), m.init_state(2), mask)
    assert torch.all(state["conv"][1] == 0) and torch.all(state["ssm"][1] == 0) and state["pos"][1] == 0


def test_prefill_gradient_matches_forward():
    m = make_mixer()
    x0, dy = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    check_prefill_gradient(m, x0, dy, "dt_bias")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_equals_running_alone(side):
    m = make_mixer()
    x, mask = check_padding_equals_alone_and_reference(m, reference_mamba2_module, side, state_keys=STATE_KEYS)
    check_decoding_after_masked_prefill(m, x, mask)


def test_right_padded_conv_state_is_last_real_inputs():
    m = make_mixer(d_conv=4)
    x, mask = torch.randn(2, 9, 32), padding_mask([9, 5], 9, "right")
    _, state = m.prefill(x, m.init_state(2), mask)
    xBC = m.in_proj(x)[..., m.d_inner : m.d_inner + m.conv_dim]
    assert_close(state["conv"][1], xBC[1, 2:5].T)
    assert state["pos"].tolist() == [9, 5]


def test_state_size():
    m = make_mixer(32)  # d_inner 64, 4 heads of 16, 2 groups of B, C with d_state 8
    assert m.state_size(1) == m.state_size(5000) == (64 + 2 * 2 * 8) * 3 + 4 * 16 * 8
    s = m.init_state(2)
    assert s["conv"][0].numel() + s["ssm"][0].numel() == m.state_size(3) and s["ssm"].dtype == torch.float32


def test_compile_fullgraph():
    m = make_mixer(16)
    x = torch.randn(2, 19, 16)
    check_compile_fullgraph(m, x, [None, padding_mask([19, 6], 19, "right")])


# --- precision ----------------------------------------------------------------------------------------------


def test_bf16_weights_vs_fp32_reference():
    m, ref_m = make_mixer(dtype=torch.bfloat16), make_mixer()
    x, dy = torch.randn(2, 40, 32, dtype=torch.bfloat16), torch.randn(2, 40, 32)
    check_bf16_chunked_vs_naive(m, ref_m, reference_mamba2_module, x, dy, "in_proj.weight")


def test_autocast_bf16_keeps_ssm_parameters_and_state_fp32():
    m = make_mixer()
    x = torch.randn(2, 25, 32)
    want = reference_mamba2_module(m, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        _, state = m.prefill(x, m.init_state(2))
    assert y.dtype == torch.bfloat16 and state["ssm"].dtype == torch.float32
    assert 0 < max_err(y, want) <= BF16_TOL
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_casting_keeps_ssm_parameters_fp32():
    m = make_mixer()
    fp32 = {n: m.get_parameter(n).detach().clone() for n in Mamba2.fp32_params}
    for cast in (lambda mod: mod.to(torch.bfloat16), lambda mod: mod.half()):
        c = cast(make_mixer())
        c.load_state_dict(m.state_dict())
        for name, p in c.named_parameters():
            assert p.dtype == (torch.float32 if name in fp32 else c.in_proj.weight.dtype), name
        for name, want in fp32.items():
            assert torch.equal(c.get_parameter(name), want), name
    b = m.to(torch.bfloat16)
    assert torch.equal(b.dt_bias, fp32["dt_bias"]) and torch.equal(b.A_log, fp32["A_log"])  # not rounded
    assert b(torch.randn(1, 5, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --- initialisation -----------------------------------------------------------------------------------------


def test_dt_bias_init_survives_generic_reinit():
    m = Mamba2(512, 2, d_state=4, headdim=4)  # 256 heads
    assert m.dt_bias._no_reinit and m.A_log._no_weight_decay and m.D._no_weight_decay
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert abs(dt.log().mean().item() - math.log(1e-2)) < 0.3
    before = m.dt_bias.detach().clone()
    with torch.no_grad():
        for p in m.parameters():
            if not getattr(p, "_no_reinit", False):
                nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.zeros_(p)
    assert torch.equal(m.dt_bias, before)
    m.reset_parameters()
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5) and not torch.equal(m.dt_bias, before)
    A = torch.exp(m.A_log)
    assert torch.all((A >= 1) & (A <= 16)) and torch.equal(m.D, torch.ones(256))


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    ({"d_state": 0}, "d_state"), ({"d_conv": 0}, "d_conv"), ({"expand": 0}, "expand"), ({"headdim": 0}, "headdim"),
    ({"headdim": 24}, "headdim"), ({"ngroups": 3}, "ngroups"), ({"ngroups": 0}, "ngroups"),
    ({"A_init_range": (0, 16)}, "A_init_range"), ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
    ({"chunk_size": 48}, "chunk_size"), ({"causal": False}, "causal=False"),
])
def test_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Mamba2(32, 2, **{"headdim": 16, **kwargs})


def test_bad_inputs():
    m = make_mixer()
    check_input_errors(m)


# --- mamba-ssm's SSD as a backend -----------------------------------------------------------------------------


def test_mamba_ssm_backend_refused_without_mamba_ssm(monkeypatch):
    monkeypatch.setattr(mamba2, "MAMBA_SSM_MODULE", "effzoo_no_such_module.ssd_combined")
    assert mamba_ssm_unavailable().startswith("ModuleNotFoundError")
    with pytest.raises(ValueError, match="backend='mamba_ssm' needs mamba-ssm's Triton SSD"):
        Mamba2(32, 2, headdim=16, backend="mamba_ssm")


def test_mamba_ssm_backend_call(monkeypatch):
    """With mamba-ssm importable (a stand-in module here), the layer builds; CPU tensors are refused (its kernels
    are CUDA only); ``ssd_mamba_ssm`` passes the chunk size, D and the initial state on in mamba_chunk_scan_combined's
    signature and returns (y, final state)."""
    calls = []

    def combined(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=False):
        calls.append((chunk_size, D is not None, initial_states is not None, return_final_states))
        return ssd_chunked(x, dt, A, B, C, D, initial_states, chunk_size)

    monkeypatch.setitem(sys.modules, "fake_ssd_combined", types.SimpleNamespace(mamba_chunk_scan_combined=combined))
    monkeypatch.setattr(mamba2, "MAMBA_SSM_MODULE", "fake_ssd_combined")
    assert mamba_ssm_unavailable() is None
    m = Mamba2(32, 2, headdim=16, d_state=8, chunk_size=16, backend="mamba_ssm")
    with pytest.raises(ValueError, match="backend='mamba_ssm' needs CUDA tensors"):
        m(torch.randn(1, 5, 32))
    x, B, C = torch.randn(2, 9, 3, 4), torch.randn(2, 9, 1, 8), torch.randn(2, 9, 1, 8)
    dt, A, D, h0 = torch.rand(2, 9, 3), -torch.rand(3), torch.randn(3), torch.randn(2, 3, 4, 8)
    y, h = ssd_mamba_ssm(x, dt, A, B, C, D, h0, chunk_size=16)
    assert calls == [(16, True, True, True)] and y.shape == x.shape and h.shape == h0.shape


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mamba_ssm_backend_matches_torch_on_cuda(dtype):
    """Outputs and every gradient against the torch path, with and without padding (mamba-ssm's dots run at
    Triton's default precision, TF32 in float32, so only the lower precisions are compared)."""
    if (why := mamba_ssm_unavailable()) is not None:
        pytest.skip(f"mamba-ssm's Triton SSD does not import here ({why})")
    from ssd_kernel_checks import check_mixer
    check_mixer("cuda", dtype, ngroups=2, backend="mamba_ssm")
