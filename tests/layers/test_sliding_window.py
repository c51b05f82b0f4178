"""Sliding-window attention: the SDPA / math / FlexAttention paths and the ring-buffer decoding path
against an independent reference (one sequence, one head at a time, band mask built by loops).

Tolerances are on the max absolute error, scaled by ``max(1, max|expected|)`` (as in test_attention):
* float32: ``FP32_TOL`` = 1e-5 (observed ~1e-7).
* bfloat16: against the float32 reference computed from the same bf16-rounded weights and inputs,
  ``BF16_TOL`` = 3e-2 (observed 0.5-1%); and the fast path's error must be at most 2x (+
  ``BF16_RATIO_EPS``) the error of the plain-math path run in bf16.
The tolerance helpers and the checks shared with the other mixers' tests are in ``mixer_checks.py``.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layers
import layers.sliding_window  # noqa: F401  (registers "sliding_window")
from layers.sliding_window import SlidingWindowAttention, naive_sliding_window_attention
from layers.sparse_attention import (
    dense_allowed,
    flex_block_mask,
    naive_masked_attention,
    resolve_sparse_backend,
    sliding_window_allowed,
)
from mixer_checks import (assert_close, check_backends_match_reference, check_bf16_backends,
                          check_bf16_ratio_with_and_without_mask, check_bidirectional_cannot_decode,
                          check_compile_fullgraph, check_fully_padded_rows, check_matches_dense_fp32,
                          check_padded_equals_alone, check_padding_gets_no_gradient, check_prefill_gradient,
                          init_params, masked_attention_heads, max_err, padding_mask, prefill_chunks,
                          reference_softmax_module, shape_ids, step_through, twin_mixer)

# --- an independent reference ------------------------------------------------------------------


def loop_band(n: int, window: int, causal: bool) -> torch.Tensor:
    """The band mask of a length-n sequence, written as loops."""
    return torch.tensor([[(0 <= i - j < window) if causal else abs(i - j) < window for j in range(n)] for i in range(n)])


def reference_module(m: SlidingWindowAttention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """What ``m(x, mask)`` must compute, in float32, one sequence at a time (padding removed)."""
    attend = lambda q, k, v: masked_attention_heads(q, k, v, loop_band(len(q), m.window, m.causal))
    return reference_softmax_module(m, x, mask, attend)


def make(dim, heads, causal=True, window=4, backend="sdpa", dtype=torch.float32, **kw) -> SlidingWindowAttention:
    """A mixer with O(1) outputs and attention far from uniform (weights ~ 1.5/sqrt(dim), random biases)."""
    m = layers.create_mixer("sliding_window", dim, heads, causal=causal, window=window, backend=backend, **kw)
    return init_params(m, 1.5 / math.sqrt(dim)).to(dtype)


def twin(m, **overrides):
    """A copy of ``m`` with some constructor options changed (same weights)."""
    return twin_mixer(m, "sliding_window", ("window",), **overrides)


SHAPES = [(1, 1, 32, 2), (2, 7, 48, 3), (3, 33, 64, 4), (2, 16, 32, 1)]
SHAPE_IDS = shape_ids(SHAPES)


# --- the reference and the masks ----------------------------------------------------------------


@pytest.mark.parametrize("tq,tk", [(1, 1), (5, 5), (3, 7)])
def test_naive_masked_attention_matches_explicit_loop(tq, tk):
    B, H, Dh = 2, 2, 8
    q, k, v = torch.randn(B, H, tq, Dh), torch.randn(B, H, tk, Dh), torch.randn(B, H, tk, Dh)
    allowed = torch.rand(B, 1, tq, tk) > 0.4
    allowed[..., 0] = True  # no empty row
    got = naive_masked_attention(q, k, v, allowed)
    want = torch.empty_like(got)
    for b in range(B):
        for h in range(H):
            for i in range(tq):
                ok = [j for j in range(tk) if allowed[b, 0, i, j]]
                s = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(Dh) for j in ok])
                want[b, h, i] = (s.softmax(0)[:, None] * v[b, h, ok]).sum(0)
    assert_close(got, want)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 2, 5, 40])
def test_band_mask_matches_loops(window, causal):
    T = 13
    got = dense_allowed(lambda a, b: sliding_window_allowed(a, b, window, causal), T, None, "cpu")[0, 0]
    assert torch.equal(got, loop_band(T, window, causal))
    # each causal row sees min(i + 1, window) keys: the mask really is a window
    if causal:
        assert got.sum(1).tolist() == [min(i + 1, window) for i in range(T)]


def test_naive_sliding_window_reference():
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    for causal in (True, False):
        assert_close(naive_sliding_window_attention(q, k, v, 3, causal), naive_masked_attention(q, k, v, loop_band(9, 3, causal)))


# --- forward and backward ----------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=SHAPE_IDS)
def test_forward_matches_reference(B, T, D, H, causal, window):
    m = make(D, H, causal=causal, window=window, qkv_bias=True, proj_bias=True)
    x = torch.randn(B, T, D)
    want = reference_module(m, x)
    for backend in ("sdpa", "math", "auto"):
        assert_close(twin(m, backend=backend)(x), want, msg=backend)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("B,T,D,H", [(2, 7, 48, 3), (2, 21, 32, 2)], ids=["T7", "T21"])
def test_backward_matches_reference(B, T, D, H, causal):
    """Gradients of x and of every weight agree with the reference's."""
    m = make(D, H, causal=causal, window=5, qkv_bias=True, proj_bias=True)
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    mixers = {name: twin(m, backend="math" if name == "ref" else name) for name in ("sdpa", "math", "ref")}
    check_backends_match_reference(mixers, reference_module, x0, dy,
                                   expected_params={"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"})


def test_window_changes_the_output():
    """The test above can fail: a window of 3 differs from full attention on a 12-token input."""
    m = make(32, 2, window=3)
    x = torch.randn(1, 12, 32)
    assert max_err(m(x), twin(m, window=12)(x)) > 1e-2
    assert_close(m(x)[:, :3], twin(m, window=12)(x)[:, :3])  # ... but not before the window is full (causal)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_window_at_least_T_equals_attention_exactly(with_mask, causal, backend):
    """window >= T is not an error: it is full attention, bitwise equal to the attention mixer's output."""
    B, T, D, H = 3, 9, 32, 2
    sw = make(D, H, causal=causal, window=T, backend=backend, qkv_bias=True, proj_bias=True)
    att = layers.create_mixer("attention", D, H, causal=causal, backend=backend, qkv_bias=True, proj_bias=True)
    att.load_state_dict(sw.state_dict())  # the same parameter names
    x = torch.randn(B, T, D)
    mask = padding_mask([9, 4, 1], T, "left") if with_mask else None
    for window in (T, T + 1, 10**6):
        assert torch.equal(twin(sw, window=window)(x, mask=mask), att(x, mask=mask))
    assert not torch.equal(twin(sw, window=T - 1)(x, mask=mask), att(x, mask=mask))


@pytest.mark.parametrize("rope", [None, False, True])
def test_rope_default_and_override(rope):
    for causal in (True, False):
        m = make(32, 2, causal=causal, rope=rope)
        assert m.rope == (causal if rope is None else rope)
        assert (m.rotary is not None) == m.rope
        x = torch.randn(2, 9, 32)
        assert_close(m(x), reference_module(m, x))


def test_rope_base_is_used():
    a, b = make(32, 2, rope_base=10000.0), make(32, 2, rope_base=100.0)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 9, 32)
    assert_close(b(x), reference_module(b, x))
    assert max_err(a(x), b(x)) > 1e-3


def test_mask_is_cached_per_length():
    m = make(32, 2, window=3)
    x = torch.randn(2, 9, 32)
    y1 = m(x)
    assert list(m._mask_cache) == [("dense", 9, x.device)]
    cached = m._mask_cache[("dense", 9, x.device)]
    assert torch.equal(m(x), y1) and m._mask_cache[("dense", 9, x.device)] is cached
    m(torch.randn(1, 5, 32))
    assert len(m._mask_cache) == 2
    m(x, mask=torch.ones(2, 9, dtype=torch.bool))  # padded inputs build their own mask
    assert len(m._mask_cache) == 2


# --- decoding: the ring buffer -------------------------------------------------------------------


@pytest.mark.parametrize("max_len", ["none", "exact", "small"])
@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("T", [1, 7, 20])
def test_step_matches_forward(T, window, max_len):
    B, D, H = 2, 48, 3
    m = make(D, H, window=window, qkv_bias=True)
    x = torch.randn(B, T, D)
    cap = {"none": None, "exact": T, "small": 2}[max_len]
    state = m.init_state(B, max_len=cap)
    with torch.no_grad():
        full = m(x)
        y, state = step_through(m, x, state)
    assert state["pos"] == T
    slots = min(window, max(T, cap or 0))  # what was preallocated or needed, never more than the window
    assert state["k"].shape == state["v"].shape == (B, H, slots, D // H)
    assert_close(y, full)


@pytest.mark.parametrize("chunks", [[(0, 1), (1, 20)], [(0, 7), (7, 8), (8, 20)], [(0, 2), (2, 13), (13, 14), (14, 20)],
                                    [(0, 20)]],
                         ids=["1+19", "7+1+12", "2+11+1+6", "20"])
def test_prefill_chunks_then_steps_match_forward(chunks):
    """Prompts shorter and longer than the window, chunks that wrap around the ring buffer."""
    B, T, D, H, W = 2, 20, 32, 2, 5
    m = make(D, H, window=W)
    x = torch.randn(B, T, D)
    with torch.no_grad():
        y, state = prefill_chunks(m, x, chunks, m.init_state(B))
        assert_close(y, m(x))
        # the buffer holds exactly the last W keys, in slots p % W
        k_last = m._project(x, torch.arange(T))[1][:, :, T - W :]
        slots = torch.arange(T - W, T) % W
        assert_close(state["k"][:, :, slots], k_last)
        # and decoding goes on from there
        x_next = torch.randn(B, 1, D)
        y_next, _ = m.step(x_next, state)
        assert_close(y_next, m(torch.cat([x, x_next], 1))[:, -1:])


def test_prefill_gradient_matches_forward():
    m = make(32, 2, window=3)
    x0, dy = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    check_prefill_gradient(m, x0, dy, "qkv.weight")


@pytest.mark.parametrize("T", [1, 7, 33, 2048])
@pytest.mark.parametrize("window", [1, 16, 100])
def test_state_size_is_ring_buffer(T, window):
    m = layers.create_mixer("sliding_window", 64, 4, window=window)
    assert m.state_size(T) == 2 * 64 * min(T, window)
    s = m.init_state(1, max_len=T)
    assert s["k"].numel() + s["v"].numel() == m.state_size(T)
    assert m.init_state(3, dtype=torch.bfloat16)["k"].dtype == torch.bfloat16


# --- padding masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("window", [2, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_equals_running_alone(side, causal, window, backend):
    B, T, D, H = 4, 9, 32, 2
    lengths = [9, 5, 1, 3]
    m = make(D, H, causal=causal, window=window, backend=backend, qkv_bias=True, proj_bias=True)
    mask = padding_mask(lengths, T, side)
    x = torch.randn(B, T, D)
    y = check_padded_equals_alone(m, x, mask)
    assert_close(y, reference_module(m, x, mask))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_padding_gets_no_gradient(causal):
    B, T, D, H = 3, 8, 32, 2
    m = make(D, H, causal=causal, window=3, proj_bias=True)
    mask = padding_mask([8, 3, 5], T, "left")
    x = torch.randn(B, T, D)
    dy = torch.randn(B, T, D)
    check_padding_gets_no_gradient(m, x, mask, dy)


def test_fully_padded_row_is_zero_and_finite():
    m = make(32, 2, window=2, proj_bias=True)
    mask = torch.tensor([[True, True, True, True], [False, False, False, False]])
    check_fully_padded_rows(m, torch.randn(2, 4, 32), mask)


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3), pad_left=st.booleans(), causal=st.booleans(),
       window=st.integers(1, 6), data=st.data())
def test_padding_property(lengths, pad_left, causal, window, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    T = max(lengths) + data.draw(st.integers(0, 2))
    m = make(16, 2, causal=causal, window=window)
    mask = padding_mask(lengths, T, "left" if pad_left else "right")
    check_padded_equals_alone(m, torch.randn(len(lengths), T, 16), mask)


# --- bfloat16 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_bf16_error_ratio(causal):
    """bf16 sdpa and bf16 math vs the float32 reference (same bf16-rounded weights and inputs)."""
    B, T, D, H = 2, 33, 64, 4
    m = make(D, H, causal=causal, window=6, dtype=torch.bfloat16, qkv_bias=True, proj_bias=True)
    ref = twin(m).float()
    x = torch.randn(B, T, D, dtype=torch.bfloat16)
    dy = torch.randn(B, T, D)
    mixers = {backend: twin(m, backend=backend) for backend in ("sdpa", "math")}
    check_bf16_backends(mixers, ref, reference_module, x, dy, fast="sdpa", naive="math")


# --- compile ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_compile_fullgraph_sdpa_path(causal):
    m = make(32, 2, causal=causal, window=3, backend="auto")  # auto is sdpa on CPU
    x = torch.randn(2, 10, 32)
    check_compile_fullgraph(m, x, [None, padding_mask([10, 6], 10, "left")])


# --- FlexAttention ------------------------------------------------------------------------------


def test_auto_is_sdpa_on_cpu_and_flex_refused_there():
    assert resolve_sparse_backend("auto", torch.device("cpu"), 16) == "sdpa"
    assert resolve_sparse_backend("auto", torch.device("cuda"), 16) == "flex"
    assert resolve_sparse_backend("auto", torch.device("cuda"), 24) == "sdpa"  # not a power of two
    m = make(32, 2, window=3, backend="flex")  # constructing is fine (the device is not known yet)
    with pytest.raises(ValueError, match="backend='flex' runs on CUDA only"):
        m(torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        resolve_sparse_backend("flex", torch.device("cuda"), 24)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_flex_block_mask_matches_dense_mask_on_cpu(causal):
    """The BlockMask's mask_mod is the dense mask (checked with FlexAttention's eager CPU forward)."""
    from torch.nn.attention.flex_attention import flex_attention

    B, H, T, Dh, W = 2, 2, 37, 16, 5
    q, k, v = (torch.randn(B, H, T, Dh) for _ in range(3))
    pattern = lambda a, b: sliding_window_allowed(a, b, W, causal)
    mask = padding_mask([37, 20], T, "left")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        for pad in (None, mask):
            got = flex_attention(q, k, v, block_mask=flex_block_mask(pattern, T, pad, "cpu"))
            want = naive_masked_attention(q, k, v, dense_allowed(pattern, T, pad, "cpu"))
            assert_close(got, want)


def _gpu_case(causal, dtype, mask_side):
    dev = torch.device("cuda")
    B, T, D, H = 3, 300, 128, 2
    m = make(D, H, causal=causal, window=70, backend="flex", qkv_bias=True).to(dev, dtype)
    ref = twin(m, backend="math").to(dev, torch.float32)
    x = torch.randn(B, T, D, device=dev, dtype=dtype)
    mask = None if mask_side is None else padding_mask([300, 129, 1], T, mask_side).to(dev)
    return m, ref, x, mask


@pytest.mark.gpu
@pytest.mark.parametrize("mask_side", [None, "left", "right"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_cuda_flex_matches_reference_fp32(causal, mask_side):
    """FlexAttention forward + backward vs the dense float32 math path (same weights), fp32: tol 1e-4 (TF32-free
    Triton kernels, online softmax; observed ~1e-6)."""
    m, ref, x, mask = _gpu_case(causal, torch.float32, mask_side)
    # causal and unpadded: decoding on CUDA (SDPA over the ring buffer) matches too
    check_matches_dense_fp32(m, ref, x, mask, tol=1e-4, decode_prompt=250 if causal and mask is None else None)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_cuda_flex_bf16_error_ratio(causal):
    m, ref, x, mask = _gpu_case(causal, torch.bfloat16, "left")
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    check_bf16_ratio_with_and_without_mask(m, twin(m, backend="math").to(x.device), ref, x, mask)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [0, -3, 2.5, "8", True])  # None: the default window
def test_error_bad_window(window):
    with pytest.raises(ValueError, match=r"window must be an int >= 1"):
        layers.create_mixer("sliding_window", 32, 2, window=window)


def test_error_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of auto, flex, sdpa, math; got 'flash'"):
        layers.create_mixer("sliding_window", 32, 2, backend="flash")


def test_error_unknown_option():
    with pytest.raises(TypeError, match="window_size"):
        layers.create_mixer("sliding_window", 32, 2, window_size=4)


def test_error_decoding_bidirectional_and_bad_step():
    state = check_bidirectional_cannot_decode("sliding_window")
    causal = layers.create_mixer("sliding_window", 32, 2)
    with pytest.raises(ValueError, match=r"x_t must have shape \[batch, 1, 32\]"):
        causal.step(torch.randn(1, 3, 32), state)
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len, 32\]"):
        causal(torch.randn(1, 3, 31))


def test_registry_and_repr():
    assert "sliding_window" in layers.list_mixers()
    m = layers.create_mixer("sliding_window", 32, 2, window=7, backend="math")
    assert isinstance(m, SlidingWindowAttention)
    assert "window=7" in repr(m) and "backend='math'" in repr(m) and "rope=True" in repr(m)


# --- window vs max_seq_len (refused at construction; short inputs stay fine at run time) ----------------------


def test_error_window_larger_than_max_seq_len():
    with pytest.raises(ValueError, match=r"window=65 is larger than max_seq_len=64: every token would see the whole "
                                         r"sequence; use the attention mixer"):
        layers.create_mixer("sliding_window", 32, 2, window=65, max_seq_len=64)
    with pytest.raises(ValueError, match=r"window=300 is larger than max_seq_len=197"):
        layers.create_mixer("sliding_window", 32, 2, causal=False, window=300, max_seq_len=197)
    with pytest.raises(ValueError, match=r"max_seq_len must be an int >= 1"):
        layers.create_mixer("sliding_window", 32, 2, window=4, max_seq_len=0)


def test_window_up_to_max_seq_len_builds_and_short_inputs_run():
    """window <= max_seq_len builds; T < window at run time stays full attention (decoding starts short); the
    default window (None: 256, cut to max_seq_len) always builds."""
    m = make(32, 2, window=64, max_seq_len=64)
    assert m.window == 64 and m.max_seq_len == 64 and m(torch.randn(2, 5, 32)).shape == (2, 5, 32)
    explicit_256 = layers.create_mixer("sliding_window", 32, 2, window=256, max_seq_len=1024)
    assert explicit_256.window == 256
    assert layers.create_mixer("sliding_window", 32, 2, max_seq_len=197).window == 197
    assert layers.create_mixer("sliding_window", 32, 2, max_seq_len=1024).window == 256
    assert layers.create_mixer("sliding_window", 32, 2).window == 256
    with pytest.raises(ValueError, match="window=256 is larger than max_seq_len=197"):
        layers.create_mixer("sliding_window", 32, 2, window=256, max_seq_len=197)
