"""RWKV-6 (``rwkv6`` time mix and ``RWKV6ChannelMix``) against independent references: the WKV
recurrence's explicit quadratic form, and the layer's token shift, ddlerp LoRAs, decay, per-head
GroupNorm and gate written out one sequence at a time.

Tolerances: float32 1e-5 of ``max(1, max|expected|)`` (``assert_close``); bfloat16 ``BF16_TOL`` = 3e-2
against the float32 reference on the same bf16-rounded weights, and the chunked path's error at most
2x (+ ``BF16_RATIO_EPS``) that of the reference run in bf16 (``mixer_checks.py``).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import layers
from layers.rwkv6 import RWKV6, RWKV6ChannelMix, chunk_rwkv6, naive_rwkv6, rwkv6_step, token_shift
from mixer_checks import (BF16_RATIO_EPS, assert_bf16_ratio, assert_close, check_compile_fullgraph, check_fla_matches_torch,
                          check_masked_prefill_states, check_mixer_matches_reference_grads, check_padded_equals_alone,
                          check_prefill_gradient, check_prefill_then_steps, check_step_gradients, forward_backward, init_params,
                          linear, max_err, padding_mask, per_sequence, shape_ids, state_checker, step_through)


# --- the WKV recurrence --------------------------------------------------------------------------------


def quadratic_rwkv6(r, k, v, log_w, u, S0, scale):
    """o_t = scale * (sum_{s<t} (r_t * k_s * exp(b_{t-1} - b_s)) . v_s + (r_t . (u * k_t)) v_t + (r_t * exp(b_{t-1})) S0)
    with b the inclusive cumulative log decay (b_{-1} = 0); float64, [B, H, T, D] layout."""
    r, k, v, log_w, u, S0 = (t.double() for t in (r, k, v, log_w, u, S0))
    T = r.shape[2]
    b = log_w.cumsum(dim=2)
    b_prev = F.pad(b, (0, 0, 1, 0))[:, :, :T]  # b_{t-1}
    strict = torch.ones(T, T, dtype=torch.bool).tril(-1)[..., None]
    decay = (b_prev[:, :, :, None] - b[:, :, None, :]).masked_fill(~strict, float("-inf")).exp()  # [B, H, T, T, Dk]
    A = (r[:, :, :, None] * k[:, :, None, :] * decay).sum(-1)
    A = A + torch.diag_embed((r * u[:, None] * k).sum(-1))
    return scale * (A @ v + (r * b_prev.exp()) @ S0)


def rand_wkv(B, H, T, Dk, Dv, decay, dtype=torch.float32):
    lo, hi = decay
    r, k, v = torch.randn(B, H, T, Dk), torch.randn(B, H, T, Dk), torch.randn(B, H, T, Dv)
    log_w = lo + (hi - lo) * torch.rand(B, H, T, Dk)
    return [t.to(dtype) for t in (r, k, v, log_w, torch.randn(H, Dk), torch.randn(B, H, Dk, Dv))]


DECAYS = {"strong": (-12.0, -6.0), "weak": (-1e-3, 0.0), "mixed": (-10.0, 0.0)}


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("T", [1, 7, 33])
def test_chunked_and_steps_match_reference(T, decay):
    r, k, v, log_w, u, S0 = rand_wkv(2, 2, T, 6, 5, DECAYS[decay])
    want = quadratic_rwkv6(r, k, v, log_w, u, S0, 0.7)
    o_naive, S_naive = naive_rwkv6(r, k, v, log_w, u, S0, scale=0.7)
    o_chunk, S_chunk = chunk_rwkv6(r, k, v, log_w, u, S0, scale=0.7, chunk_size=8)
    S, outs = S0, []
    for t in range(T):
        o_t, S = rwkv6_step(r[:, :, t], k[:, :, t], v[:, :, t], log_w[:, :, t], u, S, scale=0.7)
        outs.append(o_t)
    assert_close(o_naive, want.float())
    assert_close(o_chunk, want.float())
    assert_close(torch.stack(outs, 2), want.float())
    assert_close(S_chunk, S_naive)
    assert_close(S, S_naive)


@pytest.mark.parametrize("T", [1, 21])
def test_chunked_gradients_match_naive(T):
    inputs = rand_wkv(2, 2, T, 6, 5, DECAYS["mixed"])
    do, dS = torch.randn(2, 2, T, 5), torch.randn(2, 2, 6, 5)
    grads = []
    for fn in (naive_rwkv6, lambda *a: chunk_rwkv6(*a, chunk_size=8)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        o, S = fn(*leaves)
        ((o * do).sum() + (S * dS).sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(["r", "k", "v", "log_w", "u", "S0"], *grads):
        assert want.abs().max() > 0
        assert_close(got, want, msg=f"grad of {name}")


def test_token_shift_skips_padding():
    x = torch.randn(2, 5, 3)
    last = torch.randn(2, 3)
    mask = torch.tensor([[False, True, True, False, True], [True, True, True, True, True]])
    x_prev, new_last = token_shift(x, mask, last)
    assert_close(x_prev[0, [1, 2, 4]], torch.stack([last[0], x[0, 1], x[0, 2]]))
    assert_close(x_prev[1], torch.cat([last[1:], x[1, :4]]))
    assert_close(new_last, x[:, 4])
    assert_close(token_shift(x, mask)[0][0, 1], torch.zeros(3))
    x_prev_nomask, last_nomask = token_shift(x, None, last)
    assert_close(x_prev_nomask, torch.cat([last[:, None], x[:, :4]], 1))
    assert_close(last_nomask, x[:, 4])


# --- the mixer: an independent reference ----------------------------------------------------------------


def reference_rwkv6_module(m: RWKV6, x, mask=None, dtype=torch.float32):
    """What ``m(x, mask)`` must compute, one sequence at a time, weights cast to ``dtype`` (decay, norm and
    gate in float32, as the layer). Differentiable w.r.t. x and the weights."""
    H, Dh, D, R = m.num_heads, m.head_dim, m.dim, m.mix_rank
    P = lambda p: p.to(dtype)

    def one(xb):
        n = len(xb)
        dx = torch.cat([xb.new_zeros(1, D), xb[:-1]]) - xb
        hidden = torch.tanh((xb + dx * P(m.time_maa_x)) @ P(m.time_maa_w1))  # [n, 5R]
        mixed = {c: xb + dx * (P(getattr(m, f"time_maa_{c}")) + hidden[:, i * R:(i + 1) * R] @ P(m.time_maa_w2[i]))
                 for i, c in enumerate("wkvrg")}
        r, k, v = linear(m.receptance, mixed["r"], dtype), linear(m.key, mixed["k"], dtype), linear(m.value, mixed["v"], dtype)
        lora = (torch.tanh(mixed["w"] @ P(m.time_decay_w1)) @ P(m.time_decay_w2)).float()
        log_w = -torch.exp(P(m.time_decay).float() + lora)
        heads = lambda t: t.reshape(n, H, Dh).transpose(0, 1)[None]
        o, _ = naive_rwkv6(heads(r), heads(k), heads(v), heads(log_w), P(m.time_faaaa))
        o = o[0].transpose(0, 1).float()  # [n, H, Dh]
        o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + m.ln_x.eps)
        o = o.reshape(n, D) * P(m.ln_x.weight).float() + P(m.ln_x.bias).float()
        gate = linear(m.gate, mixed["g"], dtype).float()
        return linear(m.output, (o * gate * torch.sigmoid(gate)).to(dtype), dtype)

    return per_sequence(x, mask, one, dtype)


def _init_special(decay_range):
    def special(name, p):
        if name.startswith("time_maa_") and p.dim() == 1:
            p.uniform_(0, 1)
        elif name == "time_decay":
            p.uniform_(*decay_range)  # log_w = -exp(time_decay + lora)
        elif name == "ln_x.weight":
            p.normal_(1.0, 0.1)
        else:
            return False
        return True
    return special


def make_mixer(dim, num_heads, dtype=torch.float32, decay_range=(-3.0, 1.0), **kwargs) -> RWKV6:
    m = layers.create_mixer("rwkv6", dim, num_heads, chunk_size=kwargs.pop("chunk_size", 16), **kwargs)
    return init_params(m, lambda p: 1.0 / math.sqrt(min(p.shape[-2:])), special=_init_special(decay_range)).to(dtype)


SHAPES = [(1, 1, 32, 2), (2, 7, 48, 3), (2, 33, 64, 4), (1, 40, 32, 1)]
VARIANTS = {
    "default": {},
    "strong-decay": {"decay_range": (1.0, 2.5), "mix_rank": 4, "decay_rank": 8},  # log_w down to ~ -12
    "head_size": {"head_size": 8},  # overrides num_heads
}


@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=shape_ids(SHAPES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference(B, T, D, H, variant):
    m = make_mixer(D, H, **VARIANTS[variant])
    x = torch.randn(B, T, D)
    assert_close(m(x), reference_rwkv6_module(m, x))


def test_defaults():
    m = layers.create_mixer("rwkv6", 128, 2)
    assert (m.num_heads, m.head_dim, m.mix_rank, m.decay_rank, m.scale, m.chunk_size) == (2, 64, 32, 64, 1.0, 64)
    assert m.time_faaaa.shape == (2, 64) and m.time_maa_w2.shape == (5, 32, 128) and m.ln_x.num_groups == 2
    assert layers.create_mixer("rwkv6", 128, 8, head_size=32).num_heads == 4
    assert torch.all(m.time_maa_w1 == 0) and torch.all(m.time_decay_w1 == 0)  # the LoRAs start at zero
    assert -6 <= m.time_decay.min() and m.time_decay.max() <= -1
    x = torch.randn(2, 5, 128)
    log_w = m._features(x, token_shift(x)[0])[3]
    assert log_w.dtype == torch.float32 and torch.all(log_w < 0)


def test_backward_matches_reference():
    B, T, D, H = 3, 37, 32, 2
    m = make_mixer(D, H)
    mask = padding_mask([37, 20, 5], T, "left")
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    want = check_mixer_matches_reference_grads(m, reference_rwkv6_module, x0, dy, mask)
    assert {n for n, _ in m.named_parameters()} | {"x"} == set(want)


# --- decoding --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [0, 1, 16, 23])
def test_prefill_then_steps_matches_forward(prompt):
    m = make_mixer(32, 2)
    x = torch.randn(2, 30, 32)
    check_prefill_then_steps(m, x, prompt, check_states=state_checker(["S", "shift", "pos"]))


def test_prefill_gradient_matches_forward():
    m = make_mixer(32, 2)
    x0, dy = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    check_prefill_gradient(m, x0, dy, "time_maa_w1")


def test_step_gradients_match_forward():
    """Decoding one token at a time is differentiable and has the forward pass's gradients (x and all weights)."""
    check_step_gradients(make_mixer(32, 2), torch.randn(2, 9, 32), torch.randn(2, 9, 32))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_alone_then_decoding(side):
    B, T, D = 4, 21, 32
    m = make_mixer(D, 2)
    mask = padding_mask([21, 9, 1, 14], T, side)
    x, cont = torch.randn(B, T, D), torch.randn(B, 4, D)
    y = check_padded_equals_alone(m, x, mask)
    assert_close(y, reference_rwkv6_module(m, x, mask))
    check_masked_prefill_states(m, x, mask, ["S", "shift"])
    with torch.no_grad():
        _, state = m.prefill(x, m.init_state(B), mask)
        y_cont, _ = step_through(m, cont, state)
        for b in range(B):
            alone = m(torch.cat([x[b, mask[b]], cont[b]])[None])
            assert_close(y_cont[b], alone[0, -4:], msg=f"sequence {b}")


@pytest.mark.parametrize("D,H", [(32, 2), (64, 4)])
def test_state_size(D, H):
    m = layers.create_mixer("rwkv6", D, H)
    assert m.state_size(1) == m.state_size(5000) == H * (D // H) ** 2 + D
    state = m.init_state(2)
    assert set(state) == {"S", "shift", "pos"} and state["S"].shape == (2, H, D // H, D // H)
    assert state["S"][0].numel() + state["shift"][0].numel() == m.state_size(3)


def test_compile_fullgraph():
    m = make_mixer(16, 2, chunk_size=8)
    x = torch.randn(2, 11, 16)
    check_compile_fullgraph(m, x, [padding_mask([11, 6], 11, "left")])


def test_bf16_chunked_core_error_ratio():
    """bf16 r, k, v (log decays and u in float32): the chunked form's error against the float64 quadratic
    form is within BF16_TOL and at most 2x (+ BF16_RATIO_EPS) that of the sequential form."""
    r, k, v, log_w, u, S0 = rand_wkv(2, 2, 70, 16, 16, DECAYS["mixed"])
    want = quadratic_rwkv6(r, k, v, log_w, u, S0, 16 ** -0.5)
    bf = [t.bfloat16() for t in (r, k, v)]
    o_chunk, _ = chunk_rwkv6(*bf, log_w, u, S0, scale=16 ** -0.5, chunk_size=16)
    o_naive, _ = naive_rwkv6(*bf, log_w, u, S0, scale=16 ** -0.5)
    assert o_chunk.dtype == torch.bfloat16
    assert_bf16_ratio(max_err(o_chunk, want), max_err(o_naive, want), what="chunk_rwkv6")


def test_bf16_error_ratio():
    """The bf16 mixer against the float32 reference on the same bf16-rounded weights: the output's error is
    within BF16_TOL and at most 2x (+ BF16_RATIO_EPS) that of the reference run in bf16; the input and
    parameter gradients' errors are at most 2x (+ BF16_RATIO_EPS) the bf16 reference's. (Not also within
    BF16_TOL: the per-head GroupNorm of the first tokens' nearly rank-1 outputs is ill-conditioned, and for
    some random inputs even the sequential computation in bf16 is off by more than 3e-2 in dx.)"""
    B, T, D, H = 2, 70, 64, 2
    m = make_mixer(D, H, dtype=torch.bfloat16)
    ref = make_mixer(D, H)
    ref.load_state_dict({name: p.float() for name, p in m.state_dict().items()})
    x, dy = torch.randn(B, T, D, dtype=torch.bfloat16), torch.randn(B, T, D)
    naive = make_mixer(D, H, dtype=torch.bfloat16)
    naive.load_state_dict(m.state_dict())
    params = ("time_decay_w1", "time_maa_w1", "key.weight")
    runs = {}
    for name, mod, fn in (("ref", ref, lambda t: reference_rwkv6_module(ref, t)), ("fast", m, m),
                          ("naive", naive, lambda t: reference_rwkv6_module(naive, t, dtype=torch.bfloat16))):
        y, dx = forward_backward(fn, x.float() if name == "ref" else x, dy)
        runs[name] = {"y": y, "dx": dx, **{p: mod.get_parameter(p).grad for p in params}}
    assert runs["fast"]["y"].dtype == torch.bfloat16
    err = {name: {key: max_err(t, runs["ref"][key]) for key, t in runs[name].items()} for name in ("fast", "naive")}
    assert err["fast"]["y"] > 0, "bf16 output exactly equals the fp32 reference: is bf16 really used?"
    assert_bf16_ratio(err["fast"]["y"], err["naive"]["y"], what="y")
    for key in ("dx", *params):
        fast, slow = err["fast"][key], err["naive"][key]
        assert fast <= 2 * slow + BF16_RATIO_EPS, f"{key}: bf16 error {fast:.3g} > 2x naive bf16 error {slow:.3g}"


# --- errors ---------------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(ValueError, match="causal=False"):
        layers.create_mixer("rwkv6", 32, 2, causal=False)
    with pytest.raises(ValueError, match=r"head_size \(12\) must divide dim \(32\)"):
        layers.create_mixer("rwkv6", 32, 2, head_size=12)
    with pytest.raises(ValueError, match="head_size"):
        layers.create_mixer("rwkv6", 32, 2, head_size=0)
    with pytest.raises(ValueError, match="mix_rank"):
        layers.create_mixer("rwkv6", 32, 2, mix_rank=0)
    with pytest.raises(ValueError, match="decay_rank"):
        layers.create_mixer("rwkv6", 32, 2, decay_rank=2.5)
    with pytest.raises(ValueError, match="init_depth"):
        layers.create_mixer("rwkv6", 32, 2, init_depth=1.5)
    with pytest.raises(ValueError, match="norm_eps"):
        layers.create_mixer("rwkv6", 32, 2, norm_eps=0)
    with pytest.raises(ValueError, match="chunk_size"):
        layers.create_mixer("rwkv6", 32, 2, chunk_size=48)
    with pytest.raises(ValueError, match="backend"):
        layers.create_mixer("rwkv6", 32, 2, backend="triton")
    with pytest.raises(ValueError, match="backend='fla'"):  # not installed here, or installed but not on CUDA
        layers.create_mixer("rwkv6", 32, 2, backend="fla")(torch.randn(1, 3, 32))
    with pytest.raises(TypeError, match="head_sise"):
        layers.create_mixer("rwkv6", 32, 2, head_sise=16)
    m = layers.create_mixer("rwkv6", 32, 2)
    with pytest.raises(ValueError, match=r"x_t must have shape \[batch, 1, 32\]"):
        m.step(torch.randn(1, 2, 32), m.init_state(1))
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len, 32\]"):
        m(torch.randn(1, 3, 31))
    assert "mix_rank=32" in repr(m)


def test_auto_backend_falls_back_once_when_fla_fails(monkeypatch):
    """backend='auto': an fla failure at call time warns once and the torch path is used."""
    import layers.linear_attention as la
    m = make_mixer(32, 2)
    x = torch.randn(2, 9, 32)
    want = m(x)

    def broken(*args, **kwargs):
        raise RuntimeError("Triton refuses this GPU")

    monkeypatch.setattr(la, "FLA_AVAILABLE", True)
    monkeypatch.setattr(la, "_KERNEL_FAILED", set())
    monkeypatch.setattr(m, "_use_fla", lambda t: True)
    monkeypatch.setattr(m, "_fla_chunk", broken)
    with pytest.warns(RuntimeWarning, match="Triton refuses this GPU"):
        assert_close(m(x), want)
    m.backend = "fla"
    with pytest.raises(RuntimeError, match="Triton refuses"):
        m(x)


# --- the channel mix ------------------------------------------------------------------------------------


def reference_channel_mix(c: RWKV6ChannelMix, x, mask=None):
    def one(xb):
        dx = torch.cat([xb.new_zeros(1, c.dim), xb[:-1]]) - xb
        k = torch.relu(linear(c.key, xb + dx * c.time_maa_k)) ** 2
        return torch.sigmoid(linear(c.receptance, xb + dx * c.time_maa_r)) * linear(c.value, k)
    return per_sequence(x, mask, one)


def make_channel_mix(dim=32, **kwargs):
    c = RWKV6ChannelMix(dim, **kwargs)
    return init_params(c, lambda p: 1.0 / math.sqrt(p.shape[-1]),
                       special=lambda n, p: n.startswith("time_maa") and p.uniform_(0, 1) is not None)


@pytest.mark.parametrize("side", ["left", "right"])
def test_channel_mix_matches_reference_and_decodes(side):
    c = make_channel_mix()
    assert c.hidden_dim == 96 and RWKV6ChannelMix(64).hidden_dim == 224
    x = torch.randn(3, 11, 32)
    mask = padding_mask([11, 6, 1], 11, side)
    assert_close(c(x), reference_channel_mix(c, x))
    check_padded_equals_alone(c, x, mask)
    assert_close(c(x, mask), reference_channel_mix(c, x, mask))
    with torch.no_grad():
        y_p, state = c.prefill(x[:, :4], c.init_state(3))
        y_s, state = step_through(c, x[:, 4:], state)
        assert_close(torch.cat([y_p, y_s], 1), c(x))
        assert_close(state["shift"], x[:, -1])
    x_g = x.clone().requires_grad_()
    (c(x_g) * torch.randn_like(x)).sum().backward()
    assert c.time_maa_k.grad.abs().max() > 0 and torch.isfinite(x_g.grad).all()


def test_channel_mix_errors():
    with pytest.raises(ValueError, match="hidden_dim"):
        RWKV6ChannelMix(32, hidden_dim=0)
    with pytest.raises(ValueError, match="init_depth"):
        RWKV6ChannelMix(32, init_depth=-0.1)
    c = RWKV6ChannelMix(32)
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len, 32\]"):
        c(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"x_t must have shape \[batch, 1, 32\]"):
        c.step(torch.randn(2, 3, 32), c.init_state(2))


# --- fla (GPU) ------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_fla_matches_torch():
    """fla's chunk_rwkv6 / fused_recurrent_rwkv6 against the torch path (bf16), masks and decoding."""
    check_fla_matches_torch(make_mixer, "left")
