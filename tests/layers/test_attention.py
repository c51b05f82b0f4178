"""Softmax attention: every backend and the decoding path against an independent reference.

Tolerances are on the max absolute error, scaled by ``max(1, max|expected|)`` (outputs here are
O(1-10); weight gradients, sums over B*T tokens, reach ~50):
* float32: 1e-5 (observed: ~1e-7 relative).
* bfloat16: compared against the float32 reference computed from the *same* (bf16-rounded)
  weights and inputs, with ``BF16_TOL`` = 3e-2 (bf16 keeps 8 mantissa bits, 2**-8 ~ 4e-3 per
  rounding, several roundings deep; observed 0.5-1%). On top of that, as in
  flash-linear-attention's tests, the fast backend's error must be at most 2x (+
  ``BF16_RATIO_EPS``) the error of the plain-math backend run in bf16, so a kernel that is
  "within tolerance" but clearly worse than the naive computation still fails.
The tolerance helpers and the checks shared with the other mixers' tests are in ``mixer_checks.py``.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layers
from layers.attention import ATTENTION_BACKENDS, Attention, naive_attention, resolve_backend, sdpa_attention, xformers_available
from mixer_checks import (BF16_TOL, assert_close, check_backends_match_reference, check_bf16_backends,
                          check_bf16_ratio_with_and_without_mask, check_bidirectional_cannot_decode,
                          check_fully_padded_rows, check_padded_equals_alone, check_padding_gets_no_gradient,
                          check_prefill_gradient, check_prefill_then_steps, init_params, max_err, padding_mask,
                          prefill_chunks, rand_x, reference_softmax_module, shape_ids, step_through)

# (batch, seq_len, dim, num_heads): T=1, odd T (7, 33), a single head, head_dim 16 and 32.
SHAPES = [(1, 1, 32, 2), (2, 7, 48, 3), (3, 33, 64, 4), (2, 16, 64, 1), (2, 5, 64, 2)]
SHAPE_IDS = shape_ids(SHAPES)
BACKENDS = ["sdpa", "math", "auto"]


# --- an independent reference -------------------------------------------------------------


def reference_attention_module(mixer: Attention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """What ``mixer(x, mask)`` must compute, one sequence and one head at a time, in float32.

    Padded tokens neither attend nor are attended to; real tokens are numbered 0, 1, ... as if
    the sequence ran alone; padded outputs are zero. Differentiable w.r.t. x and the weights.
    """

    def attend(q, k, v):  # [n, H, Dh] each: an explicit softmax per head
        heads = []
        for h in range(mixer.num_heads):
            scores = q[:, h] @ k[:, h].T / math.sqrt(mixer.head_dim)
            if mixer.causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, h])
        return torch.cat(heads, dim=-1)

    return reference_softmax_module(mixer, x, mask, attend, rope_base=mixer.rotary_base)


def make_mixers(dim, num_heads, causal=True, backends=("sdpa", "math"), dtype=torch.float32, **kwargs) -> dict[str, Attention]:
    """Mixers with identical weights (biases made random so they matter), one per backend."""
    first = None
    out = {}
    for backend in backends:
        # "ref" names a float32 twin that the tests feed to reference_attention_module
        m = layers.create_mixer("attention", dim, num_heads, causal=causal, backend="math" if backend == "ref" else backend, **kwargs)
        if first is None:
            first = init_params(m, 1.5 / math.sqrt(dim))  # weights ~ 1.5/sqrt(dim): O(1) outputs, attention far from uniform
        else:
            m.load_state_dict(first.state_dict())
        m.rotary_base = kwargs.get("rope_base", 10000.0)
        out[backend] = m.to(dtype)
    return out


# --- the reference itself -------------------------------------------------------------------


@pytest.mark.parametrize("tq,tk", [(1, 1), (5, 5), (1, 6), (3, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_naive_attention_matches_explicit_loop(tq, tk, causal):
    """naive_attention is what everything else is checked against: check it element by element."""
    B, H, Dh = 2, 2, 8
    q, k, v = torch.randn(B, H, tq, Dh), torch.randn(B, H, tk, Dh), torch.randn(B, H, tk, Dh)
    allowed = torch.rand(B, 1, tq, tk) > 0.3
    allowed |= torch.eye(tq, tk, dtype=torch.bool).roll(tk - tq, dims=1)  # each query sees its aligned key: no empty row
    got = naive_attention(q, k, v, allowed=allowed, causal=causal)
    want = torch.empty_like(got)
    for b in range(B):
        for h in range(H):
            for i in range(tq):
                # causal alignment: the last query sees every key; query i sees keys j <= i + (tk - tq)
                ok = [j for j in range(tk) if allowed[b, 0, i, j] and (not causal or j <= i + tk - tq)]
                s = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(Dh) for j in ok])
                want[b, h, i] = (s.softmax(0)[:, None] * v[b, h, ok]).sum(0)
    assert_close(got, want)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tq,tk", [(1, 1), (7, 7), (1, 9), (4, 9)])
def test_sdpa_kernel_matches_naive(tq, tk, causal):
    q, k, v = torch.randn(2, 3, tq, 16), torch.randn(2, 3, tk, 16), torch.randn(2, 3, tk, 16)
    allowed = torch.rand(2, 1, tq, tk) > 0.3
    allowed |= torch.eye(tq, tk, dtype=torch.bool).roll(tk - tq, dims=1)
    for mask in (None, allowed):
        assert_close(sdpa_attention(q, k, v, mask, causal), naive_attention(q, k, v, mask, causal))


def test_auto_backend_is_sdpa_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) is sdpa_attention
    assert resolve_backend("math", torch.device("cpu")) is naive_attention


# --- forward and backward: backends vs reference ----------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=SHAPE_IDS)
def test_forward_backends_match_reference(B, T, D, H, causal):
    mixers = make_mixers(D, H, causal=causal, backends=BACKENDS, qkv_bias=True, proj_bias=True)
    x = rand_x(B, T, D)
    want = reference_attention_module(mixers["sdpa"], x)
    for backend, m in mixers.items():
        assert_close(m(x), want, msg=backend)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=SHAPE_IDS)
def test_backward_backends_match_reference(B, T, D, H, causal):
    """Gradients of x and of every weight (qkv, proj, with biases) agree with the reference's."""
    mixers = make_mixers(D, H, causal=causal, backends=("sdpa", "math", "ref"), qkv_bias=True, proj_bias=True)
    x0 = rand_x(B, T, D)
    dy = torch.randn(B, T, D)  # a random upstream gradient, so every output element matters
    check_backends_match_reference(mixers, reference_attention_module, x0, dy,
                                   expected_params={"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"})


@pytest.mark.parametrize("rope", [None, False, True])
def test_rope_default_and_override(rope):
    """rope=None means rope when causal; the reference applies it the same way."""
    for causal in (True, False):
        m = make_mixers(32, 2, causal=causal, backends=("sdpa",), rope=rope)["sdpa"]
        assert m.rope == (causal if rope is None else rope)
        assert (m.rotary is not None) == m.rope
        x = rand_x(2, 9, 32)
        assert_close(m(x), reference_attention_module(m, x))


def test_rope_base_is_used():
    a = make_mixers(32, 2, backends=("sdpa",), rope_base=10000.0)["sdpa"]
    b = make_mixers(32, 2, backends=("sdpa",), rope_base=100.0)["sdpa"]
    b.load_state_dict(a.state_dict())
    x = rand_x(1, 9, 32)
    assert_close(b(x), reference_attention_module(b, x))
    assert (a(x) - b(x)).abs().max() > 1e-3


# --- incremental decoding -----------------------------------------------------------------------


@pytest.mark.parametrize("max_len", ["none", "exact", "larger", "too_small"])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=SHAPE_IDS)
def test_step_matches_forward(B, T, D, H, backend, max_len):
    """Token-by-token decoding through the KV cache equals the causal forward pass."""
    m = make_mixers(D, H, backends=(backend,), qkv_bias=True)[backend]
    x = rand_x(B, T, D)
    cap = {"none": None, "exact": T, "larger": T + 5, "too_small": max(T // 3, 1)}[max_len]
    state = m.init_state(B, max_len=cap)
    with torch.no_grad():
        full = m(x)
        y, state = step_through(m, x, state)
    assert state["pos"] == T
    assert state["k"].shape[2] >= T
    assert_close(y, full)


@pytest.mark.parametrize("prompt", [1, 4, 7])
@pytest.mark.parametrize("preallocate", [False, True])
def test_prefill_then_steps_matches_forward(prompt, preallocate):
    B, T, D, H = 2, 11, 48, 3
    m = make_mixers(D, H, backends=("sdpa",))["sdpa"]
    x = rand_x(B, T, D)
    check_prefill_then_steps(m, x, prompt, state=m.init_state(B, max_len=T if preallocate else None))


def test_chunked_prefill_matches_forward():
    """Prefill in chunks (a query block at the end of a cache: causal alignment with Tq < Tk)."""
    B, T, D, H = 2, 13, 32, 2
    for backend in ("sdpa", "math"):
        m = make_mixers(D, H, backends=(backend,))[backend]
        x = rand_x(B, T, D)
        with torch.no_grad():
            y, _ = prefill_chunks(m, x, [(0, 3), (3, 4), (4, 9), (9, 13)], m.init_state(B))
            assert_close(y, m(x))


def test_prefill_gradient_matches_forward():
    """A single prefill call is differentiable and has the forward pass's gradients."""
    m = make_mixers(32, 2, backends=("sdpa",))["sdpa"]
    x0, dy = rand_x(2, 6, 32), torch.randn(2, 6, 32)
    check_prefill_gradient(m, x0, dy, "qkv.weight")


def test_init_state_shapes_and_dtype():
    m = make_mixers(48, 3, backends=("sdpa",))["sdpa"]
    s = m.init_state(4, max_len=10)
    assert s["pos"] == 0 and s["k"].shape == s["v"].shape == (4, 3, 10, 16)
    assert s["k"].dtype == torch.float32
    assert m.init_state(1, dtype=torch.bfloat16)["v"].dtype == torch.bfloat16
    assert m.init_state(2)["k"].shape == (2, 3, 0, 16)


@pytest.mark.parametrize("T", [1, 7, 33, 2048])
@pytest.mark.parametrize("D,H", [(32, 2), (64, 4), (96, 1)])
def test_state_size_is_kv_cache(T, D, H):
    m = layers.create_mixer("attention", D, H)
    assert m.state_size(T) == 2 * D * T
    # ... which is exactly the number of floats the cache holds per sequence
    s = m.init_state(1, max_len=T)
    assert s["k"].numel() + s["v"].numel() == m.state_size(T)


# --- padding masks -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_equals_running_alone(side, causal, rope, backend):
    """Real tokens of a padded batch get exactly their unpadded output; padded outputs are 0."""
    B, T, D, H = 4, 9, 32, 2
    lengths = [9, 5, 1, 3]
    m = make_mixers(D, H, causal=causal, backends=(backend,), rope=rope, qkv_bias=True, proj_bias=True)[backend]
    mask = padding_mask(lengths, T, side)
    x = rand_x(B, T, D)
    y = check_padded_equals_alone(m, x, mask)
    assert_close(y, reference_attention_module(m, x, mask))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_padding_gets_no_gradient(causal):
    """Padded inputs influence nothing: their gradient is exactly zero; real ones match running alone."""
    B, T, D, H = 3, 8, 32, 2
    m = make_mixers(D, H, causal=causal, backends=("sdpa",), proj_bias=True)["sdpa"]
    mask = padding_mask([8, 3, 5], T, "left")
    x = rand_x(B, T, D)
    dy = torch.randn(B, T, D)
    check_padding_gets_no_gradient(m, x, mask, dy)


def test_fully_padded_row_is_zero_and_finite():
    m = make_mixers(32, 2, backends=("sdpa",), proj_bias=True)["sdpa"]
    mask = torch.tensor([[True, True, True], [False, False, False]])
    check_fully_padded_rows(m, rand_x(2, 3, 32), mask)


def test_all_true_mask_equals_no_mask():
    for causal in (True, False):
        m = make_mixers(32, 2, causal=causal, backends=("sdpa",))["sdpa"]
        x = rand_x(2, 7, 32)
        assert_close(m(x, mask=torch.ones(2, 7, dtype=torch.bool)), m(x))


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3), pad_left=st.booleans(), causal=st.booleans(),
       data=st.data())
def test_padding_property(lengths, pad_left, causal, data):
    """Random lengths and padding sides: each sequence's real outputs match its unpadded run."""
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    T = max(lengths) + data.draw(st.integers(0, 2))
    m = make_mixers(16, 2, causal=causal, backends=("sdpa",))["sdpa"]
    mask = padding_mask(lengths, T, "left" if pad_left else "right")
    check_padded_equals_alone(m, rand_x(len(lengths), T, 16), mask)


# --- bfloat16 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("B,T,D,H", [(2, 7, 64, 2), (2, 33, 64, 4)], ids=["T7", "T33"])
def test_bf16_fast_path_error_ratio(B, T, D, H, causal):
    """bf16 sdpa and bf16 math vs the float32 reference (same bf16-rounded weights and inputs)."""
    mixers = make_mixers(D, H, causal=causal, backends=("sdpa", "math"), dtype=torch.bfloat16, qkv_bias=True, proj_bias=True)
    ref = make_mixers(D, H, causal=causal, backends=("ref",), qkv_bias=True, proj_bias=True)["ref"]  # gets the bf16 weights
    x = rand_x(B, T, D, dtype=torch.bfloat16)
    dy = torch.randn(B, T, D)
    check_bf16_backends(mixers, ref, reference_attention_module, x, dy, fast="sdpa", naive="math")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_cuda_bf16_sdpa_vs_math(causal):
    """On CUDA (flash / mem-efficient kernels), bf16 sdpa stays as close to the fp32 reference as bf16 math."""
    dev = torch.device("cuda")
    mixers = make_mixers(128, 2, causal=causal, backends=("sdpa", "math", "ref"), qkv_bias=True)
    for k in ("sdpa", "math"):
        mixers[k].to(dev, torch.bfloat16)
    mixers["ref"].load_state_dict({k: v.float() for k, v in mixers["sdpa"].state_dict().items()})
    mixers["ref"].to(dev)
    x = torch.randn(4, 257, 128, device=dev, dtype=torch.bfloat16)
    mask = padding_mask([257, 100, 1, 200], 257, "left").to(dev)
    # against the fp32 math backend (the loop reference is too slow here)
    check_bf16_ratio_with_and_without_mask(mixers["sdpa"], mixers["math"], mixers["ref"], x, mask, what="sdpa vs math")
    # decoding on CUDA matches the forward pass too
    m = mixers["sdpa"]
    if causal:
        with torch.no_grad():
            state = m.init_state(4, device=dev, max_len=257)
            y_p, state = m.prefill(x[:, :200], state)
            y_s, _ = step_through(m, x[:, 200:], state)
            assert max_err(torch.cat([y_p, y_s], 1), m(x)) <= BF16_TOL


# --- errors -------------------------------------------------------------------------------------


@pytest.fixture
def mixer():
    return layers.create_mixer("attention", 32, 2)


def test_error_wrong_rank(mixer):
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len, 32\]"):
        mixer(torch.randn(5, 32))
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len, 32\]"):
        mixer(torch.randn(1, 2, 5, 32))


def test_error_wrong_width(mixer):
    with pytest.raises(ValueError, match=r"got \(2, 5, 31\)"):
        mixer(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="32"):
        mixer.prefill(torch.randn(2, 5, 31), mixer.init_state(2))


def test_error_int_dtype(mixer):
    with pytest.raises(TypeError, match="floating-point"):
        mixer(torch.randint(0, 5, (2, 5, 32)))
    with pytest.raises(TypeError, match="torch.Tensor"):
        mixer([[0.5] * 32])


@pytest.mark.parametrize("bad_mask", [
    torch.ones(2, 4, dtype=torch.bool),          # wrong length
    torch.ones(5, dtype=torch.bool),             # wrong rank
    torch.ones(2, 5, 1, dtype=torch.bool),       # extra dim
    torch.ones(2, 5, dtype=torch.long),          # int, not bool
    torch.ones(2, 5),                            # float, not bool
], ids=["short", "rank1", "rank3", "long", "float"])
def test_error_bad_mask(mixer, bad_mask):
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 5\)"):
        mixer(torch.randn(2, 5, 32), mask=bad_mask)


@pytest.mark.parametrize("dim,heads", [(30, 4), (32, 3), (7, 2)])
def test_error_dim_not_divisible(dim, heads):
    with pytest.raises(ValueError, match="divisible"):
        layers.create_mixer("attention", dim, heads)


@pytest.mark.parametrize("dim,heads", [(0, 1), (-8, 2), (32, 0), (32.0, 2)])
def test_error_bad_dim_or_heads(dim, heads):
    with pytest.raises(ValueError, match="positive int"):
        layers.create_mixer("attention", dim, heads)


def test_error_odd_head_dim_with_rope():
    with pytest.raises(ValueError, match="even head_dim"):
        layers.create_mixer("attention", 30, 2)  # head_dim 15, rope on by default when causal
    layers.create_mixer("attention", 30, 2, rope=False)  # ... fine without rope


def test_error_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of auto, sdpa, math, xformers; got 'flash'"):
        layers.create_mixer("attention", 32, 2, backend="flash")


@pytest.mark.skipif(xformers_available(), reason="xformers is installed here, so backend='xformers' is legitimately accepted")
def test_error_xformers_not_installed():
    with pytest.raises(ValueError, match="xformers is not installed"):
        layers.create_mixer("attention", 32, 2, backend="xformers")


def test_error_step_on_bidirectional_mixer():
    # even with a cache borrowed from a causal twin, a bidirectional mixer cannot decode
    check_bidirectional_cannot_decode("attention")


def test_error_step_needs_one_token(mixer):
    state = mixer.init_state(2)
    with pytest.raises(ValueError, match=r"x_t must have shape \[batch, 1, 32\]"):
        mixer.step(torch.randn(2, 3, 32), state)
    with pytest.raises(ValueError, match=r"x_t must have shape"):
        mixer.step(torch.randn(2, 32), state)


def test_backends_registry_and_repr():
    assert set(ATTENTION_BACKENDS) == {"sdpa", "math", "xformers"}
    m = layers.create_mixer("attention", 32, 2, backend="math")
    assert "backend='math'" in repr(m) and "causal=True" in repr(m) and "rope=True" in repr(m)
