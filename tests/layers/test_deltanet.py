"""DeltaNet: the delta-rule ops (naive recurrence, chunked WY form, decoding step) and the mixer.

The module-level tests (``test_mixer_*``) take the mixer name from the ``name`` fixture and are
imported by ``test_gated_deltanet.py``, which overrides the fixture, so both mixers run them.

Tolerances are on the max absolute error, scaled by ``max(1, max|expected|)``:
* float32: ``FP32_TOL`` = 1e-5 against a float64 reference (observed ~1e-6 for the chunked
  form against the token-by-token recurrence).
* bfloat16: ``BF16_TOL`` = 3e-2 against the float64 reference computed from the same
  bf16-rounded weights and inputs (8 mantissa bits, several roundings deep; observed 0.3-1.7%).
  On top of that, as in flash-linear-attention's tests, the bf16 chunked path's error must be
  at most 2x the bf16 naive path's error (the same inputs through the token-by-token
  recurrence, which computes in float32 inside; at the mixer level the same mixer with the
  naive recurrence as its core) plus ``BF16_RATIO_EPS`` = 2**-8: one bf16 ulp relative to the
  largest element, below which values stored in bf16 cannot be compared. The chunked path
  rounds matmul operands to bf16, so ~1-2x the naive error is expected (observed <= 1.0x of the
  bound at the mixer level over 10 seeds).
* The gradients of gated DeltaNet's two per-head decay parameters (``A_log``, ``dt_bias``) are
  sums over every token of terms that cancel, so a few ulp of error per token become a large
  relative error in the sum, for the naive path as much as the chunked one (observed up to
  5% for both). They get ``BF16_DECAY_TOL`` = 0.1 and no ratio check (with 2 elements the
  naive error is a lottery: 0.0002 one seed, 0.03 the next); ``a_proj.weight``, whose gradient
  carries the same decay-gradient signal per token, gets both the normal tolerance and the ratio.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import layers
import layers.deltanet  # noqa: F401  (registers "deltanet")
import layers.gated_deltanet  # noqa: F401  (registers "gated_deltanet")
from layers.deltanet import (
    DeltaNet,
    affine_scan,
    chunk_delta_rule,
    fla_gated_backward_refused,
    l2norm,
    naive_recurrent_delta_rule,
    recurrent_gated_delta_step,
)
from layers.gated_deltanet import naive_recurrent_gated_delta_rule
from layers.linear_attention import fla_available
from mixer_checks import ref_qk_norm

FP32_TOL = 1e-5
BF16_TOL = 3e-2
BF16_RATIO_EPS = 2**-8
BF16_DECAY_TOL = 0.1
DECAY_PARAMS = ("A_log", "dt_bias")


def _scale(expected: torch.Tensor) -> float:
    return max(1.0, expected.detach().abs().max().item())


def assert_close(actual, expected, tol: float = FP32_TOL, msg: str = "") -> None:
    """max |actual - expected| <= tol * max(1, max|expected|) (plus rtol=tol elementwise slack)."""
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, atol=tol * _scale(expected), rtol=tol,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() / _scale(b)


def padding_mask(lengths, T, side):
    ar = torch.arange(T)[None]
    lens = torch.tensor(lengths)[:, None]
    return ar < lens if side == "right" else ar >= T - lens


# --- op-level inputs ------------------------------------------------------------------------------

BETA_MODES = ["uniform", "near0", "near1"]


def op_inputs(B, H, T, Dk, Dv, beta_mode="uniform", dtype=torch.float64, state=True, g_mode=None):
    """Random q, k (unit), v, beta (by ``beta_mode``), an initial state and, with ``g_mode``, log decays."""
    q = torch.randn(B, H, T, Dk, dtype=dtype)
    k = l2norm(torch.randn(B, H, T, Dk, dtype=dtype))
    v = torch.randn(B, H, T, Dv, dtype=dtype)
    u = torch.rand(B, H, T, dtype=dtype)
    beta = {"uniform": u, "near0": 1e-4 * u, "near1": 1 - 1e-4 * u}[beta_mode]
    S0 = torch.randn(B, H, Dk, Dv, dtype=dtype) if state else None
    if g_mode is None:
        return q, k, v, beta, S0
    g = {"mild": -0.5 * torch.rand(B, H, T, dtype=dtype),
         "strong": -torch.rand(B, H, T, dtype=dtype) * 30 - 5,      # alpha ~ e^-5 .. e^-35 per step
         "mixed": torch.where(torch.rand(B, H, T) < 0.3, -50.0, -0.01 * torch.rand(B, H, T)).to(dtype),
         "zero": torch.zeros(B, H, T, dtype=dtype)}[g_mode]
    return q, k, v, beta, g, S0


# --- the reference itself ------------------------------------------------------------------------


def test_naive_orthonormal_keys_store_and_retrieve():
    """beta = 1 with orthonormal keys: the state is a key-value memory; querying k_j returns v_j."""
    H, Dk, Dv, T = 2, 8, 5, 6
    keys = torch.linalg.qr(torch.randn(H, Dk, Dk, dtype=torch.float64))[0][..., :T].transpose(-1, -2)  # [H, T, Dk]
    v = torch.randn(1, H, T, Dv, dtype=torch.float64)
    q = keys[None].clone()
    _, S = naive_recurrent_delta_rule(q, keys[None], v, torch.ones(1, H, T, dtype=torch.float64), scale=1.0)
    assert_close(keys[None] @ S, v)  # k_j^T S = v_j for every j
    # and each output o_t = S_t^T k_t = v_t (the key was just written)
    o, _ = naive_recurrent_delta_rule(q, keys[None], v, torch.ones(1, H, T, dtype=torch.float64), scale=1.0)
    assert_close(o, v)


def test_naive_same_key_overwrites():
    """beta = 1 and one repeated key: the memory under it holds the latest value only; beta=0 writes nothing."""
    Dk, Dv, T = 4, 3, 5
    k = l2norm(torch.randn(1, 1, 1, Dk, dtype=torch.float64)).expand(1, 1, T, Dk)
    v = torch.randn(1, 1, T, Dv, dtype=torch.float64)
    S0 = torch.randn(1, 1, Dk, Dv, dtype=torch.float64)
    o, S = naive_recurrent_delta_rule(k, k, v, torch.ones(1, 1, T, dtype=torch.float64), S0, scale=1.0)
    assert_close(o[0, 0], v[0, 0])
    assert_close((k[:, :, :1] @ S)[0, 0, 0], v[0, 0, -1])
    o0, S_0 = naive_recurrent_delta_rule(k, k, v, torch.zeros(1, 1, T, dtype=torch.float64), S0, scale=1.0)
    assert torch.equal(S_0, S0)
    assert_close(o0, (k @ S0))


def test_naive_equals_explicit_sum_for_tiny_case():
    """Two steps by hand: S1 = S0 + b1 k1 (v1 - S0^T k1)^T, S2 = S1 + b2 k2 (v2 - S1^T k2)^T."""
    q, k, v, beta, S0 = op_inputs(1, 1, 2, 3, 2)
    s = 0.7
    S = S0[0, 0]
    outs = []
    for t in range(2):
        kt, vt, bt = k[0, 0, t], v[0, 0, t], beta[0, 0, t]
        S = S + bt * torch.outer(kt, vt - S.T @ kt)
        outs.append(s * S.T @ q[0, 0, t])
    o, S_n = naive_recurrent_delta_rule(q, k, v, beta, S0, scale=s)
    assert_close(o[0, 0], torch.stack(outs))
    assert_close(S_n[0, 0], S)
    # default scale is Dk ** -0.5
    default = naive_recurrent_delta_rule(q, k, v, beta, S0)[0]
    assert_close(default, naive_recurrent_delta_rule(q, k, v, beta, S0, scale=3 ** -0.5)[0])


# --- chunked and recurrent ops vs the reference ----------------------------------------------------


@pytest.mark.parametrize("beta_mode", BETA_MODES)
@pytest.mark.parametrize("T,chunk", [(1, 16), (7, 16), (33, 16), (70, 16), (16, 16), (9, 1), (20, 64)])
def test_chunk_delta_rule_matches_naive(T, chunk, beta_mode):
    """Forward (outputs, final state) and backward (q, k, v, beta, initial state) in float32."""
    B, H, Dk, Dv = 2, 3, 8, 12
    inputs = op_inputs(B, H, T, Dk, Dv, beta_mode, dtype=torch.float32)
    dy, dS = torch.randn(B, H, T, Dv), torch.randn(B, H, Dk, Dv)
    results = {}
    for kind in ("naive", "chunk"):
        xs = [t.clone().requires_grad_() for t in inputs]
        if kind == "naive":
            o, S = naive_recurrent_delta_rule(*xs)
        else:
            o, S = chunk_delta_rule(*xs, chunk_size=chunk)
        ((o * dy).sum() + (S * dS).sum()).backward()
        results[kind] = (o, S, [t.grad for t in xs])
    o_n, S_n, g_n = results["naive"]
    o_c, S_c, g_c = results["chunk"]
    assert o_c.shape == (B, H, T, Dv) and S_c.shape == (B, H, Dk, Dv) and S_c.dtype == torch.float32
    assert_close(o_c, o_n, msg="o")
    assert_close(S_c, S_n, msg="final state")
    for name, a, b in zip("q k v beta S0".split(), g_c, g_n):
        assert b.abs().max() > 0, name
        assert_close(a, b, msg=f"grad {name}")


def test_chunk_delta_rule_without_initial_state_and_default_scale():
    q, k, v, beta, _ = op_inputs(2, 2, 21, 8, 8, dtype=torch.float32, state=False)
    o_n, S_n = naive_recurrent_delta_rule(q, k, v, beta)
    o_c, S_c = chunk_delta_rule(q, k, v, beta, chunk_size=8)
    assert_close(o_c, o_n)
    assert_close(S_c, S_n)
    # splitting the sequence and carrying the state gives the same result
    o1, S1 = chunk_delta_rule(q[:, :, :10], k[:, :, :10], v[:, :, :10], beta[:, :, :10], chunk_size=8)
    o2, S2 = chunk_delta_rule(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], beta[:, :, 10:], S1, chunk_size=8)
    assert_close(torch.cat([o1, o2], 2), o_n)
    assert_close(S2, S_n)


@pytest.mark.parametrize("beta_mode", BETA_MODES)
def test_recurrent_step_matches_naive(beta_mode):
    """The decoding step (what the mixer's step runs) over T tokens equals the reference."""
    q, k, v, beta, S0 = op_inputs(2, 3, 13, 8, 6, beta_mode, dtype=torch.float32)
    S, outs = S0.clone(), []
    for t in range(13):
        o, S = recurrent_gated_delta_step(q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], None, S, 8 ** -0.5)
        outs.append(o)
    o_n, S_n = naive_recurrent_delta_rule(q, k, v, beta, S0)
    assert_close(torch.stack(outs, 2), o_n)
    assert_close(S, S_n)


def check_bf16_op(naive_fn, chunk_fn, inputs):
    """bf16 chunked op vs the float64 reference. q, k, v, beta are bf16; the log decays and the
    initial state stay float32, as in the mixer (the state holds bf16-representable values, so
    the comparison starts from the same numbers on both paths). Outputs, final state and every input
    gradient must be within BF16_TOL; the bf16 quantities (o and the gradients of q, k, v, beta)
    must also be within 2x (+eps) of the bf16 naive op's error. The float32 ones (final state,
    gradients of g and of the initial state) get no ratio: the naive op computes in float32, so
    for them it does no bf16 arithmetic at all (its state error is ~1e-7), while the chunked op
    rounds matmul operands, as any bf16 kernel (fla's included) does."""
    n_low = 4
    lowp = [t.to(torch.bfloat16) if i < n_low else t for i, t in enumerate(inputs)]
    lowp[-1] = lowp[-1].to(torch.bfloat16).float()
    B, H, T, _ = inputs[0].shape
    do, dS = torch.randn(B, H, T, inputs[2].shape[-1]), torch.randn(*inputs[-1].shape)
    res = {}
    for kind, fn, dtype in (("ref", naive_fn, torch.float64), ("naive", naive_fn, None), ("chunk", chunk_fn, None)):
        xs = [(t.to(dtype) if dtype else t).clone().requires_grad_() for t in lowp]
        o, S = fn(*xs)
        if kind == "chunk":
            assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
        ((o.double() * do.double()).sum() + (S.double() * dS.double()).sum()).backward()
        res[kind] = [o] + [x.grad for x in xs[:n_low]] + [S] + [x.grad for x in xs[n_low:]]
    names = ["o", "dq", "dk", "dv", "dbeta", "S"] + (["dg", "dS0"] if len(inputs) == 6 else ["dS0"])
    for i, (nm, c, n, r) in enumerate(zip(names, res["chunk"], res["naive"], res["ref"])):
        e_c, e_n = max_err(c, r), max_err(n, r)
        assert e_c <= BF16_TOL, f"{nm}: bf16 chunk error {e_c:.3g}"
        if i <= n_low:
            assert e_c <= 2 * e_n + BF16_RATIO_EPS, f"{nm}: bf16 chunk error {e_c:.3g} > 2x naive {e_n:.3g}"


@pytest.mark.parametrize("beta_mode", BETA_MODES)
@pytest.mark.parametrize("T", [7, 70])
def test_chunk_delta_rule_bf16(T, beta_mode):
    inputs = op_inputs(2, 2, T, 32, 32, beta_mode, dtype=torch.float32)
    check_bf16_op(naive_recurrent_delta_rule, lambda *a: chunk_delta_rule(*a, chunk_size=16), inputs)
    # a bf16 state_dtype is honoured
    lowp = [t.to(torch.bfloat16) for t in inputs]
    assert chunk_delta_rule(*lowp, chunk_size=16, state_dtype=torch.bfloat16)[1].dtype == torch.bfloat16


def test_chunk_size_error():
    q, k, v, beta, _ = op_inputs(1, 1, 4, 4, 4, dtype=torch.float32)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            chunk_delta_rule(q, k, v, beta, chunk_size=bad)


# --- the mixer: an independent reference -----------------------------------------------------------


def make_mixer(name, dim=32, heads=2, dtype=torch.float32, **kwargs):
    """The mixer with every parameter randomised (RMSNorm weights, biases), so each one matters."""
    m = layers.create_mixer(name, dim, heads, **kwargs)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if pname == "o_norm.weight":
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif pname.endswith("bias") and pname != "dt_bias":
                p.normal_(0, 0.1)
            elif pname == "A_log":
                p.copy_(torch.empty_like(p).uniform_(0.5, 8).log())
    return m.to(dtype)


def reference_module(m, x, mask=None):
    """What ``m(x, mask)`` must compute, in float64, one sequence at a time with a per-token conv
    loop and the naive recurrence. Returns ``(y [B, T, D], [(S, conv cache) per sequence])``;
    differentiable w.r.t. x and the weights."""
    B, T, D = x.shape
    H, Dk, Dv = m.num_heads, m.head_k_dim, m.head_v_dim
    lin = lambda mod, z: F.linear(z, mod.weight.double(), None if mod.bias is None else mod.bias.double())
    ys, states = [], []
    for b in range(B):
        real = torch.ones(T, dtype=torch.bool) if mask is None else mask[b]
        idx = real.nonzero().flatten()
        xb = x[b, idx].double()                       # [n, D]
        n = len(idx)
        pre = lin(m.qkv, xb)                          # [n, C]
        if m.use_short_conv:
            K = m.conv_size
            w = m.conv.weight[:, 0].double()          # [C, K]; tap K-1 multiplies the current token
            rows = []
            for t in range(n):
                acc = sum(w[:, K - 1 - j] * pre[t - j] for j in range(K) if t - j >= 0)
                if m.conv.bias is not None:
                    acc = acc + m.conv.bias.double()
                rows.append(acc if torch.is_tensor(acc) else torch.zeros_like(pre[0]))
            act = torch.stack(rows) if rows else pre
            cache = torch.cat([pre.new_zeros(K - 1, pre.shape[1]), pre])[n:]   # last K-1 inputs
        else:
            act, cache = pre, None
        act = F.silu(act)
        q, k, v = act.split([m.key_dim, m.key_dim, m.value_dim], dim=-1)
        unit = lambda z: z / torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-6)
        q, k = ref_qk_norm(m, q.reshape(n, H, Dk), k.reshape(n, H, Dk))
        q, k = unit(q), unit(k)
        v = v.reshape(n, H, Dv)
        beta = torch.sigmoid(lin(m.b_proj, xb))       # [n, H]
        hf = lambda z: z.transpose(0, 1)[None]        # [n, H, ...] -> [1, H, n, ...]
        if m.gated:
            g = -m.A_log.double().exp() * F.softplus(lin(m.a_proj, xb) + m.dt_bias.double())
            o, S = naive_recurrent_gated_delta_rule(hf(q), hf(k), hf(v), hf(beta), hf(g))
        else:
            o, S = naive_recurrent_delta_rule(hf(q), hf(k), hf(v), hf(beta))
        o = o[0].transpose(0, 1).double()             # [n, H, Dv]
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + m.o_norm.eps) * m.o_norm.weight.double()
        if m.use_gate:
            o = o * F.silu(lin(m.g_proj, xb)).reshape(n, H, Dv)
        y_real = lin(m.proj, o.reshape(n, H * Dv))
        ys.append(torch.zeros(T, D, dtype=torch.float64).index_put((idx,), y_real))
        states.append((S[0], cache))
    return torch.stack(ys), states


def naive_core_mixer(m):
    """Make ``m`` run the naive token-by-token recurrence (in m's dtype at its boundaries) as its core."""

    def _core(self, q, k, v, beta, g, S, decoding):
        tr = lambda t: t.transpose(1, 2)
        if g is None:
            o, S_new = naive_recurrent_delta_rule(tr(q), tr(k), tr(v), tr(beta), S, self.head_k_dim ** -0.5)
        else:
            o, S_new = naive_recurrent_gated_delta_rule(tr(q), tr(k), tr(v), tr(beta), tr(g), S, self.head_k_dim ** -0.5)
        return tr(o), S_new.to(self.state_dtype)

    m._core = types.MethodType(_core, m)
    return m


# option sets: defaults, no conv, gate on/off, expand_v = 2 with conv bias and projection biases
OPTIONS = [
    {},
    {"use_short_conv": False},
    {"use_gate": True, "expand_v": 2, "conv_bias": True, "qkv_bias": True, "proj_bias": True},
    {"use_gate": False, "conv_size": 2},
]
OPTION_IDS = ["default", "noconv", "gate-ev2-bias", "nogate-conv2"]
SHAPES = [(1, 1, 32, 2), (2, 7, 48, 3), (2, 33, 64, 4), (1, 70, 32, 1)]
SHAPE_IDS = [f"B{b}-T{t}-D{d}-H{h}" for b, t, d, h in SHAPES]


@pytest.fixture
def name():
    return "deltanet"


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=SHAPE_IDS)
def test_mixer_forward_backward_match_reference(name, B, T, D, H, opts):
    """Chunked forward (chunk 16) and the gradients of x and every weight against the float64 reference."""
    m = make_mixer(name, D, H, chunk_size=16, **opts)
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    grads = {}
    for kind in ("mixer", "ref"):
        m.zero_grad()
        x = x0.clone().requires_grad_()
        y = m(x) if kind == "mixer" else reference_module(m, x)[0]
        if kind == "mixer":
            assert y.shape == (B, T, D) and y.dtype == torch.float32
            y_mixer = y
        else:
            assert_close(y_mixer, y, msg="forward")
        (y * dy.to(y.dtype)).sum().backward()
        grads[kind] = {"x": x.grad, **{n: p.grad.clone() for n, p in m.named_parameters()}}
    assert set(grads["ref"]) == {"x", *dict(m.named_parameters())}
    for pname, g in grads["ref"].items():
        # one token from a zero state: the decay has nothing to act on
        if not (T == 1 and pname in (*DECAY_PARAMS, "a_proj.weight")):
            assert g.abs().max() > 0, pname
        assert_close(grads["mixer"][pname], g, msg=f"grad of {pname}")


@pytest.mark.parametrize("opts", OPTIONS[:3], ids=OPTION_IDS[:3])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_mixer_steps_and_prefill_match_forward(name, T, opts):
    """Token-by-token decoding, and prefill(prompt) + steps, equal the chunked forward; the final
    states of prefill and of the steps agree (and match the reference's state)."""
    B, D, H = 2, 48, 3
    m = make_mixer(name, D, H, chunk_size=16, **opts)
    x = torch.randn(B, T, D)
    with torch.no_grad():
        full = m(x)
        state = m.init_state(B)
        outs = []
        for t in range(T):
            y_t, state = m.step(x[:, t : t + 1], state)
            assert y_t.shape == (B, 1, D)
            outs.append(y_t)
        assert_close(torch.cat(outs, 1), full, msg="steps")
        _, ref_states = reference_module(m, x)
        for b in range(B):
            assert_close(state["S"][b], ref_states[b][0], msg="step state")
            if m.use_short_conv:
                assert_close(state["conv"][b], ref_states[b][1], msg="step conv cache")
        for prompt in sorted({1, T // 2, T} - {0}):
            st_p = m.init_state(B)
            y_p, st_p = m.prefill(x[:, :prompt], st_p)
            ys = [y_p]
            for t in range(prompt, T):
                y_t, st_p = m.step(x[:, t : t + 1], st_p)
                ys.append(y_t)
            assert_close(torch.cat(ys, 1), full, msg=f"prefill {prompt} + steps")
            assert_close(st_p["S"], state["S"], msg="final state")
            if m.use_short_conv:
                assert_close(st_p["conv"], state["conv"], msg="final conv cache")


def test_mixer_prefill_in_pieces_and_gradient(name):
    """Prefill in several pieces equals one forward; a prefill is differentiable like forward."""
    B, T, D, H = 2, 29, 32, 2
    m = make_mixer(name, D, H, chunk_size=8)
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    with torch.no_grad():
        state, outs = m.init_state(B), []
        for lo, hi in [(0, 3), (3, 4), (4, 20), (20, 29)]:
            y, state = m.prefill(x0[:, lo:hi], state)
            outs.append(y)
        assert_close(torch.cat(outs, 1), m(x0))
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    (m(x1) * dy).sum().backward()
    g_fwd = m.qkv.weight.grad.clone()
    m.zero_grad()
    y, _ = m.prefill(x2, m.init_state(B))
    (y * dy).sum().backward()
    assert_close(x2.grad, x1.grad)
    assert_close(m.qkv.weight.grad, g_fwd)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_mixer_chunk_size_does_not_change_result(name, chunk):
    m = make_mixer(name, 32, 2, chunk_size=16)
    x = torch.randn(2, 23, 32)
    y16 = m(x)
    m.chunk_size = chunk
    assert_close(m(x), y16)


def test_mixer_init_state_and_state_size(name):
    m = make_mixer(name, 48, 3)
    s = m.init_state(4)
    assert s["S"].shape == (4, 3, 16, 16) and s["S"].dtype == torch.float32
    assert s["conv"].shape == (4, 3, 3 * 48)
    for T in (1, 7, 2048):
        assert m.state_size(T) == 3 * 16 * 16 + 3 * 3 * 48  # constant in T
        assert sum(t[0].numel() for t in m.init_state(1).values()) == m.state_size(T)
    m2 = make_mixer(name, 48, 3, use_short_conv=False, expand_v=2, state_dtype=torch.float64)
    s2 = m2.init_state(2, dtype=torch.bfloat16)
    assert set(s2) == {"S"} and s2["S"].shape == (2, 3, 16, 32) and s2["S"].dtype == torch.float64
    assert m2.state_size(100) == 3 * 16 * 32
    assert m.init_state(1, dtype=torch.bfloat16)["conv"].dtype == torch.bfloat16


def test_mixer_state_dtype_is_carried(name):
    """With state_dtype=float64 the state stays float64 through prefill and steps."""
    m = make_mixer(name, 32, 2, state_dtype=torch.float64)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        y, st = m.prefill(x[:, :5], m.init_state(2))
        assert st["S"].dtype == torch.float64
        y2, st = m.step(x[:, 5:6], st)
        assert st["S"].dtype == torch.float64
        assert_close(torch.cat([y, y2], 1), m(x[:, :6]))


# --- padding masks -----------------------------------------------------------------------------


@pytest.mark.parametrize("opts", OPTIONS[:3], ids=OPTION_IDS[:3])
@pytest.mark.parametrize("side", ["left", "right"])
def test_mixer_padding_mask_equals_running_alone(name, side, opts):
    """Real tokens get their unpadded outputs, padded outputs are zero, padded inputs get zero
    gradient; prefill(x, state, mask) returns each sequence's own final state (S and conv cache)."""
    B, T, D, H = 4, 21, 32, 2
    lengths = [21, 5, 1, 13]
    m = make_mixer(name, D, H, chunk_size=8, **opts)
    mask = padding_mask(lengths, T, side)
    x = torch.randn(B, T, D, requires_grad=True)
    dy = torch.randn(B, T, D)
    y = m(x, mask=mask)
    assert torch.all(y[~mask] == 0)
    y_ref, ref_states = reference_module(m, x.detach(), mask)
    assert_close(y, y_ref)
    (y * dy).sum().backward()
    assert torch.all(x.grad[~mask] == 0)
    with torch.no_grad():
        y_p, st = m.prefill(x, m.init_state(B), mask=mask)
        assert_close(y_p, y)
    for b in range(B):
        xb = x.detach()[b : b + 1, mask[b]].clone().requires_grad_()
        alone = m(xb)
        assert_close(y[b, mask[b]], alone[0])
        (alone * dy[b : b + 1, mask[b]]).sum().backward()
        assert_close(x.grad[b, mask[b]], xb.grad[0])
        with torch.no_grad():
            _, st_alone = m.prefill(xb, m.init_state(1))
        for key in st_alone:
            assert_close(st[key][b], st_alone[key][0], msg=f"final {key} of sequence {b}")
        assert_close(st["S"][b], ref_states[b][0])


def test_mixer_masked_prefill_then_steps(name):
    """Left-padded prompts prefilled with a mask, then decoded: each sequence matches its own run."""
    B, T, D, H = 3, 10, 32, 2
    lengths = [10, 4, 7]
    m = make_mixer(name, D, H, chunk_size=4)
    mask = padding_mask(lengths, T, "left")
    x, nxt = torch.randn(B, T, D), torch.randn(B, 3, D)
    with torch.no_grad():
        _, st = m.prefill(x, m.init_state(B), mask=mask)
        ys = []
        for t in range(3):
            y_t, st = m.step(nxt[:, t : t + 1], st)
            ys.append(y_t)
        for b in range(B):
            alone = m(torch.cat([x[b : b + 1, mask[b]], nxt[b : b + 1]], 1))
            assert_close(torch.cat(ys, 1)[b], alone[0, -3:])


def test_mixer_all_true_mask_and_fully_padded_row(name):
    m = make_mixer(name, 32, 2, chunk_size=4)
    x = torch.randn(2, 7, 32, requires_grad=True)
    assert_close(m(x, mask=torch.ones(2, 7, dtype=torch.bool)), m(x))
    mask = torch.tensor([[True] * 7, [False] * 7])
    y = m(x, mask=mask)
    assert torch.all(y[1] == 0) and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[1] == 0)


@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3), pad_left=st.booleans(), seed=st.integers(0, 2**16))
def test_mixer_padding_property(lengths, pad_left, seed):
    """Random lengths and sides (both mixers, no fixture: hypothesis runs it once per file)."""
    torch.manual_seed(seed)
    T = max(lengths) + seed % 3
    for name_ in ("deltanet", "gated_deltanet"):
        m = make_mixer(name_, 16, 2, chunk_size=4)
        mask = padding_mask(lengths, T, "left" if pad_left else "right")
        x = torch.randn(len(lengths), T, 16)
        y = m(x, mask=mask)
        for b in range(len(lengths)):
            assert_close(y[b, mask[b]], m(x[b : b + 1, mask[b]])[0])
        assert torch.all(y[~mask] == 0)


# --- torch.compile ---------------------------------------------------------------------------------


def test_mixer_compile_fullgraph(name):
    torch._dynamo.reset()
    m = make_mixer(name, 32, 2, chunk_size=8)
    x = torch.randn(2, 19, 32)
    mask = padding_mask([19, 6], 19, "left")
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), m(x))
    assert_close(compiled(x, mask=mask), m(x, mask=mask))
    step = torch.compile(m.step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        y1, s1 = step(x[:, :1], m.init_state(2))
        y2, s2 = m.step(x[:, :1], m.init_state(2))
    assert_close(y1, y2)
    assert_close(s1["S"], s2["S"])


# --- bfloat16 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [7, 70])
def test_mixer_bf16_error_ratio(name, T):
    """bf16 chunked mixer vs the float64 reference (same bf16-rounded weights and inputs): within
    BF16_TOL, and at most 2x (+eps) the error of the same bf16 mixer running the naive recurrence."""
    B, D, H = 2, 64, 2
    m = make_mixer(name, D, H, chunk_size=16, dtype=torch.bfloat16)
    naive = naive_core_mixer(make_mixer(name, D, H, chunk_size=16, dtype=torch.bfloat16))
    naive.load_state_dict(m.state_dict())
    x = torch.randn(B, T, D, dtype=torch.bfloat16)
    dy = torch.randn(B, T, D)
    xr = x.double().requires_grad_()
    y_ref = reference_module(m, xr)[0]
    (y_ref * dy.double()).sum().backward()
    ref_grads = {"x": xr.grad, **{n: p.grad.clone() for n, p in m.named_parameters()}}
    errs = {}
    for kind, mod in (("chunk", m), ("naive", naive)):
        mod.zero_grad()
        xb = x.clone().requires_grad_()
        y = mod(xb)
        assert y.dtype == torch.bfloat16
        (y.float() * dy).sum().backward()
        errs[kind] = {"y": max_err(y, y_ref), "dx": max_err(xb.grad, ref_grads["x"]),
                      **{n: max_err(p.grad, ref_grads[n]) for n, p in mod.named_parameters()}}
    for kind in errs:
        for key, err in errs[kind].items():
            tol = BF16_DECAY_TOL if key in DECAY_PARAMS else BF16_TOL
            assert err <= tol, f"bf16 {kind} {key}: scaled error {err:.3g}"
    assert errs["chunk"]["y"] > 0 and errs["chunk"]["dx"] > 0  # really computed in bf16
    for key in errs["chunk"]:
        if key in DECAY_PARAMS:
            continue
        fast, slow = errs["chunk"][key], errs["naive"][key]
        assert fast <= 2 * slow + BF16_RATIO_EPS, f"{key}: bf16 chunk error {fast:.3g} > 2x naive {slow:.3g}"


# --- errors ----------------------------------------------------------------------------------------


def test_mixer_errors(name):
    with pytest.raises(ValueError, match="causal"):
        layers.create_mixer(name, 32, 2, causal=False)
    for bad in (0, -4, 1.5):
        with pytest.raises(ValueError, match="chunk_size"):
            layers.create_mixer(name, 32, 2, chunk_size=bad)
    with pytest.raises(ValueError, match="conv_size"):
        layers.create_mixer(name, 32, 2, conv_size=0)
    with pytest.raises(ValueError, match="expand_v"):
        layers.create_mixer(name, 32, 2, expand_v=1.5)
    with pytest.raises(ValueError, match="state_dtype"):
        layers.create_mixer(name, 32, 2, state_dtype=torch.int32)
    with pytest.raises(ValueError, match="backend must be one of auto, torch, fla; got 'triton'"):
        layers.create_mixer(name, 32, 2, backend="triton")
    with pytest.raises(TypeError, match="unknown argument"):
        layers.create_mixer(name, 32, 2, feature_map="elu")
    m = layers.create_mixer(name, 32, 2)
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len, 32\]"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor"):
        m(torch.randn(2, 5, 32), mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"x_t must have shape \[batch, 1, 32\]"):
        m.step(torch.randn(2, 3, 32), m.init_state(2))
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len, 32\]"):
        m.prefill(torch.randn(2, 3, 30), m.init_state(2))


@pytest.mark.skipif(fla_available(), reason="fla is installed here, so backend='fla' is legitimately accepted")
def test_mixer_fla_not_installed(name):
    with pytest.raises(ValueError, match="backend='fla'.*not installed"):
        layers.create_mixer(name, 32, 2, backend="fla")


def test_mixer_auto_backend_is_torch_on_cpu(name):
    m = layers.create_mixer(name, 32, 2)
    assert m._use_fla(torch.randn(1, 3, 32)) is False
    assert m._use_fla(torch.randn(1, 3, 32, dtype=torch.bfloat16), decoding=True) is False
    assert "backend='auto'" in repr(m) and "chunk_size=64" in repr(m)


@pytest.mark.parametrize("backend", ["auto", "fla"])
def test_gated_call_where_fla_refuses_its_backward(backend, monkeypatch):
    """Where fla refuses the gated backward (simulated, with fla simulated present): a gated call that needs
    gradients runs the torch path under 'auto' and is refused up front under 'fla'; calls without gradients, and
    ungated ones, still go to fla."""
    import layers.deltanet as deltanet

    class FlaCalled(Exception):
        pass

    def fake_fla(*args, **kwargs):
        raise FlaCalled

    monkeypatch.setattr(deltanet, "fla_gated_backward_refused", lambda: True)
    monkeypatch.setattr(deltanet, "fla_delta_rule", fake_fla)
    torch.manual_seed(0)
    m = layers.create_mixer("gated_deltanet", 32, 2)
    m.backend = backend
    monkeypatch.setattr(m, "_use_fla", lambda x, decoding=False: True)
    q = torch.randn(1, 3, 2, 16)
    assert m._fla_runs(q, gated=False, grad=True, decoding=False)
    assert m._fla_runs(q, gated=True, grad=False, decoding=False)
    assert not m._fla_runs(q, gated=True, grad=True, decoding=True)  # a decoding step with gradients: torch
    x = torch.randn(2, 5, 32, requires_grad=True)
    with torch.no_grad(), pytest.raises(FlaCalled):
        m(x)
    if backend == "fla":
        with pytest.raises(ValueError, match="backend='fla': fla refuses the gated delta rule's backward"):
            m(x)
    else:
        m(x).square().sum().backward()  # the torch path: fla is never called
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_fla_gated_backward_refused_is_false_off_hopper():
    """Without fla (CPU CI) or off a Hopper GPU, nothing is refused."""
    if fla_available() and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        pytest.skip("on a Hopper GPU with fla the answer depends on Triton and tilelang: the GPU test checks it")
    assert fla_gated_backward_refused() is False


def test_registered():
    assert "deltanet" in layers.list_mixers() and "gated_deltanet" in layers.list_mixers()
    assert isinstance(layers.create_mixer("deltanet", 32, 2), DeltaNet)
    assert not DeltaNet.supports_bidirectional and DeltaNet.supports_causal and DeltaNet.supports_mask


# --- fla (GPU only) ----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_mixer_fla_matches_torch_on_cuda(name):
    """On CUDA with fla installed: the fla backend (chunk kernels in bf16) against the torch path:
    forward with and without masks, prefill states, fused-recurrent decoding steps, the fp32
    path, then the backward. fla 0.6 refuses its gated backward on Hopper with Triton < 3.7.1
    unless tilelang is installed: there ``backend='auto'`` must train through the torch path
    instead, and ``backend='fla'`` must refuse before the forward (the fla backward is then skipped,
    after everything else has been checked)."""
    pytest.importorskip("fla")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    m_t = make_mixer(name, 256, 4, backend="torch").to(dev, torch.bfloat16)
    m_f = make_mixer(name, 256, 4, backend="fla").to(dev, torch.bfloat16)
    m_f.load_state_dict(m_t.state_dict())
    ref = make_mixer(name, 256, 4, backend="torch").to(dev)
    ref.load_state_dict({k: v.float() for k, v in m_t.state_dict().items()})
    x = torch.randn(3, 300, 256, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(3, 300, 256, device=dev)
    mask = padding_mask([300, 77, 1], 300, "left").to(dev)
    with torch.no_grad():
        for kw in ({}, {"mask": mask}):
            y_ref = ref(x.float(), **kw)
            e_fla, e_torch = max_err(m_f(x, **kw), y_ref), max_err(m_t(x, **kw), y_ref)
            assert e_fla <= BF16_TOL and e_fla <= 2 * e_torch + BF16_RATIO_EPS, (e_fla, e_torch)
        y_p, s_f = m_f.prefill(x[:, :200], m_f.init_state(3, device=dev))
        _, s_t = m_t.prefill(x[:, :200], m_t.init_state(3, device=dev))
        assert s_f["S"].dtype == torch.float32 and max_err(s_f["S"], s_t["S"]) <= BF16_TOL
        ys = [y_p]
        for t in range(200, 300):
            y_t, s_f = m_f.step(x[:, t : t + 1], s_f)
            ys.append(y_t)
        assert max_err(torch.cat(ys, 1), m_t(x)) <= BF16_TOL
        # fp32 inputs: 'auto' keeps the torch path; 'fla' runs fla's fused recurrent kernel
        assert not ref._use_fla(x.float())
        m_f32 = make_mixer(name, 256, 4, backend="fla").to(dev)
        m_f32.load_state_dict(ref.state_dict())
        assert max_err(m_f32(x.float()), ref(x.float())) <= 1e-3
    with pytest.raises(ValueError, match="backend='fla' needs CUDA"):
        make_mixer(name, 32, 2, backend="fla")(torch.randn(1, 3, 32))
    # backward: input gradients of fla vs torch (both bf16) against the fp32 torch path
    refused = name == "gated_deltanet" and fla_gated_backward_refused()
    m_auto = make_mixer(name, 256, 4, backend="auto").to(dev, torch.bfloat16)
    m_auto.load_state_dict(m_t.state_dict())
    for kw in ({}, {"mask": mask}):
        xr = x.float().requires_grad_()
        (ref(xr, **kw) * dy).sum().backward()
        errs = {}
        for kind, mod in (("torch", m_t), ("auto", m_auto)) + ((() if refused else (("fla", m_f),))):
            xb = x.clone().requires_grad_()
            (mod(xb, **kw).float() * dy).sum().backward()
            errs[kind] = max_err(xb.grad, xr.grad)
        assert errs["auto"] <= BF16_TOL and errs["auto"] <= 2 * errs["torch"] + BF16_RATIO_EPS, errs
        if not refused:
            assert errs["fla"] <= BF16_TOL and errs["fla"] <= 2 * errs["torch"] + BF16_RATIO_EPS, errs
    if refused:
        with pytest.raises(ValueError, match="fla refuses the gated delta rule's backward"):
            m_f(x.clone().requires_grad_())
        pytest.skip("fla's gated backward needs a GPU other than Hopper, Triton >= 3.7.1 or tilelang; "
                    "checked here: auto trains through the torch path and backend='fla' refuses up front")


@pytest.mark.parametrize("N", [1, 2, 3, 8, 21])
def test_affine_scan_matches_the_sequential_recursion(N):
    """All states of S_{n+1} = M_n S_n + X_n from the parallel scan equal the loop's, values and grads (float64)."""
    B, H, Dk, Dv = 2, 2, 3, 4
    M = (0.5 * torch.randn(B, H, N, Dk, Dk, dtype=torch.float64)).requires_grad_()
    X = torch.randn(B, H, N, Dk, Dv, dtype=torch.float64, requires_grad=True)
    S0 = torch.randn(B, H, Dk, Dv, dtype=torch.float64, requires_grad=True)
    states, final = affine_scan(M, X, S0, torch.matmul)
    S, expected = S0, []
    for n in range(N):
        expected.append(S)
        S = M[:, :, n] @ S + X[:, :, n]
    expected = torch.stack(expected, dim=2)
    assert_close(states, expected, tol=1e-12)
    assert_close(final, S, tol=1e-12)
    dy, df = torch.randn_like(states), torch.randn_like(final)
    got = torch.autograd.grad((states * dy).sum() + (final * df).sum(), (M, X, S0))
    want = torch.autograd.grad((expected * dy).sum() + (S * df).sum(), (M, X, S0))
    for g, w in zip(got, want):
        assert_close(g, w, tol=1e-12)
