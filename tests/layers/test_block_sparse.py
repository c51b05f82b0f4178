"""Block-sparse (BigBird / Longformer) attention: the pattern against a loop-built one (padded to whole
blocks, then cropped), the SDPA / math / FlexAttention paths and KV-cache decoding against an
independent per-sequence reference.

Tolerances (max absolute error scaled by ``max(1, max|expected|)``, as in test_attention): float32
``FP32_TOL`` = 1e-5 (observed ~1e-7); bfloat16 ``BF16_TOL`` = 3e-2 against the float32 reference on
the same bf16-rounded weights and inputs, and the fast path's error at most 2x (+ ``BF16_RATIO_EPS``)
the bf16 math path's. The tolerance helpers and the checks shared with the other mixers' tests are in
``mixer_checks.py``.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layers
import layers.block_sparse  # noqa: F401  (registers "block_sparse")
from layers.block_sparse import BlockSparseAttention, naive_block_sparse_attention
from layers.sparse_attention import dense_allowed, flex_block_mask, hash_u32, naive_masked_attention, random_block
from mixer_checks import (assert_close, check_backends_match_reference, check_bf16_backends,
                          check_bf16_ratio_with_and_without_mask, check_bidirectional_cannot_decode,
                          check_compile_fullgraph, check_fully_padded_rows, check_matches_dense_fp32,
                          check_padded_equals_alone, check_padding_gets_no_gradient, check_prefill_gradient,
                          init_params, masked_attention_heads, max_err, padding_mask, prefill_chunks,
                          reference_softmax_module, shape_ids, step_through, twin_mixer)

# --- an independent reference --------------------------------------------------------------------


def py_hash_u32(x: int) -> int:
    """The 32-bit mixing hash, in plain Python integers (pins the random pattern's definition)."""
    x &= 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


def py_random_block(seed: int, qb: int, r: int, choices: int) -> int:
    return py_hash_u32(py_hash_u32(py_hash_u32(seed) ^ qb) ^ r) % choices


def loop_pattern(n: int, bs: int, wb: int, g: int, r: int, seed: int, causal: bool) -> torch.Tensor:
    """The token mask of a length-n sequence: block pattern by loops over a sequence padded to whole blocks, cropped."""
    nb = -(-n // bs)
    blocks = [[False] * nb for _ in range(nb)]
    for qb in range(nb):
        for kb in range(nb):
            window = (0 <= qb - kb <= wb) if causal else abs(qb - kb) <= wb
            blocks[qb][kb] = window or kb < g or qb < g
        for i in range(r):
            blocks[qb][py_random_block(seed, qb, i, qb + 1 if causal else nb)] = True
    tp = nb * bs  # padded length
    tok = [[blocks[i // bs][j // bs] and (not causal or j <= i) for j in range(tp)] for i in range(tp)]
    return torch.tensor(tok)[:n, :n]


def pattern_of(m: BlockSparseAttention, n: int) -> torch.Tensor:
    return loop_pattern(n, m.block_size, m.window_blocks, m.global_blocks, m.random_blocks, m.seed, m.causal)


def reference_module(m: BlockSparseAttention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """What ``m(x, mask)`` must compute, in float32, one sequence at a time (padding removed)."""
    attend = lambda q, k, v: masked_attention_heads(q, k, v, pattern_of(m, len(q)))
    return reference_softmax_module(m, x, mask, attend)


OPTIONS = ("block_size", "window_blocks", "global_blocks", "random_blocks", "seed")


def make(dim, heads, causal=True, backend="sdpa", dtype=torch.float32, **kw) -> BlockSparseAttention:
    kw.setdefault("block_size", 4)
    m = layers.create_mixer("block_sparse", dim, heads, causal=causal, backend=backend, **kw)
    return init_params(m, 1.5 / math.sqrt(dim)).to(dtype)


def twin(m, **overrides):
    return twin_mixer(m, "block_sparse", OPTIONS, **overrides)


# block_size 4: T = 1, 7 (partial block), 16 (whole blocks), 33 (9 blocks, partial last)
SHAPES = [(1, 1, 32, 2), (2, 7, 48, 3), (2, 16, 32, 1), (3, 33, 64, 4)]
SHAPE_IDS = shape_ids(SHAPES)
PATTERNS = [dict(), dict(window_blocks=0, global_blocks=0, random_blocks=2),
            dict(window_blocks=2, global_blocks=2, random_blocks=0)]
PATTERN_IDS = ["default", "random-only", "no-random"]


# --- the pattern -----------------------------------------------------------------------------------


def test_hash_and_random_blocks():
    """The seeded hash: deterministic, equal to its plain-Python definition, in range, seed-dependent, spread out."""
    qb = torch.arange(4000)
    for seed in (0, 1, 12345):
        got = random_block(seed, qb, 1, 8)
        assert got.tolist() == [py_random_block(seed, i, 1, 8) for i in range(4000)]
        assert torch.equal(got, random_block(seed, qb, 1, 8))
        counts = torch.bincount(got, minlength=8)
        assert counts.min() > 350 and counts.max() < 650, counts  # ~500 each
    assert not torch.equal(random_block(0, qb, 0, 8), random_block(1, qb, 0, 8))
    assert not torch.equal(random_block(0, qb, 0, 8), random_block(0, qb, 1, 8))
    causal = random_block(3, qb, 0, qb + 1)
    assert torch.all((causal >= 0) & (causal <= qb))
    assert hash_u32(torch.tensor([2**40 + 5])).item() == py_hash_u32(5)  # only the low 32 bits count


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("T,bs", [(1, 4), (7, 4), (16, 4), (33, 4), (50, 7), (20, 64)])
@pytest.mark.parametrize("opts", PATTERNS, ids=PATTERN_IDS)
def test_pattern_matches_loops(opts, T, bs, causal):
    m = layers.create_mixer("block_sparse", 32, 2, causal=causal, block_size=bs, seed=5, **opts)
    got = m.allowed_mask(T)[0, 0]
    assert torch.equal(got, pattern_of(m, T))
    q, k, v = (torch.randn(1, 2, T, 8) for _ in range(3))
    assert_close(naive_block_sparse_attention(q, k, v, causal=causal, **{o: getattr(m, o) for o in OPTIONS}),
                 naive_masked_attention(q, k, v, got))
    assert got.diagonal().all() and (not causal or not got.triu(1).any())


def test_pattern_structure_bidirectional():
    """Default BigBird pattern on 16 blocks of 8: global row and column, a 3-block band, 1 random block a row."""
    m = layers.create_mixer("block_sparse", 32, 2, causal=False, block_size=8)
    T, bs = 128, 8
    a = m.allowed_mask(T)[0, 0]
    blocks = a.view(16, bs, 16, bs)[:, 0, :, 0]
    assert torch.equal(a, blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1))  # constant on blocks
    assert blocks[0].all() and blocks[:, 0].all()  # global
    for qb in range(1, 16):
        band = {kb for kb in range(16) if abs(qb - kb) <= 1}
        seen = set(blocks[qb].nonzero().flatten().tolist())
        assert band | {0} <= seen and len(seen - band - {0}) <= 1  # plus at most one random block
    assert 0.1 < a.float().mean() < 0.35  # sparse
    # the random blocks are really drawn: some row has a block outside band and global
    assert any(len(set(blocks[qb].nonzero().flatten().tolist()) - {qb - 1, qb, qb + 1, 0}) for qb in range(1, 16))


def test_pattern_is_deterministic_and_seeded():
    a = layers.create_mixer("block_sparse", 32, 2, block_size=4, seed=0, window_blocks=0, global_blocks=0, random_blocks=2)
    b = layers.create_mixer("block_sparse", 32, 2, block_size=4, seed=0, window_blocks=0, global_blocks=0, random_blocks=2)
    c = layers.create_mixer("block_sparse", 32, 2, block_size=4, seed=1, window_blocks=0, global_blocks=0, random_blocks=2)
    assert torch.equal(a.allowed_mask(200), b.allowed_mask(200))
    assert not torch.equal(a.allowed_mask(200), c.allowed_mask(200))
    x = torch.randn(2, 50, 32)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_causal_pattern_does_not_depend_on_length(causal):
    """Causal: the pattern of a prefix is the prefix of the pattern (so decoding can apply it).
    Bidirectional random blocks are drawn among the sequence's blocks, so there it may differ."""
    m = layers.create_mixer("block_sparse", 32, 2, causal=causal, block_size=4, random_blocks=2, seed=3)
    long, short = m.allowed_mask(97)[0, 0], m.allowed_mask(41)[0, 0]
    assert torch.equal(long[:41, :41], short) == causal


# --- forward and backward ----------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("opts", PATTERNS, ids=PATTERN_IDS)
def test_forward_matches_reference(opts, B, T, D, H, causal):
    m = make(D, H, causal=causal, qkv_bias=True, proj_bias=True, **opts)
    x = torch.randn(B, T, D)
    want = reference_module(m, x)
    for backend in ("sdpa", "math", "auto"):
        assert_close(twin(m, backend=backend)(x), want, msg=backend)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("T", [7, 30])
def test_backward_matches_reference(T, causal):
    B, D, H = 2, 48, 3
    m = make(D, H, causal=causal, qkv_bias=True, proj_bias=True, random_blocks=2)
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    mixers = {name: twin(m, backend="math" if name == "ref" else name) for name in ("sdpa", "math", "ref")}
    check_backends_match_reference(mixers, reference_module, x0, dy,
                                   expected_params={"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"})


def test_sparsity_changes_the_output():
    """The forward test can fail: a sparse pattern differs from full attention."""
    m = make(32, 2, causal=False, window_blocks=0, global_blocks=0, random_blocks=0)
    x = torch.randn(1, 24, 32)
    full = twin(m, window_blocks=100)
    assert max_err(m(x), full(x)) > 1e-2


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_full_pattern_equals_attention(causal):
    """A pattern that covers everything (window over all blocks) is plain attention."""
    m = make(32, 2, causal=causal, window_blocks=100, qkv_bias=True)
    att = layers.create_mixer("attention", 32, 2, causal=causal, qkv_bias=True)
    att.load_state_dict(m.state_dict())
    x = torch.randn(2, 19, 32)
    mask = padding_mask([19, 6], 19, "left")
    assert_close(m(x), att(x))
    assert_close(m(x, mask=mask), att(x, mask=mask))


# --- decoding: the full KV cache ----------------------------------------------------------------


@pytest.mark.parametrize("max_len", ["none", "exact", "small"])
@pytest.mark.parametrize("T", [1, 7, 23])
@pytest.mark.parametrize("opts", PATTERNS, ids=PATTERN_IDS)
def test_step_matches_forward(opts, T, max_len):
    B, D, H = 2, 48, 3
    m = make(D, H, qkv_bias=True, block_size=3, **{k: v for k, v in opts.items()})
    x = torch.randn(B, T, D)
    state = m.init_state(B, max_len={"none": None, "exact": T, "small": 2}[max_len])
    with torch.no_grad():
        full = m(x)
        y, state = step_through(m, x, state)
    assert state["pos"] == T and state["k"].shape[2] >= T
    assert_close(y, full)


@pytest.mark.parametrize("chunks", [[(0, 1), (1, 21)], [(0, 9), (9, 10), (10, 21)], [(0, 21)]], ids=["1+20", "9+1+11", "21"])
def test_prefill_chunks_then_steps_match_forward(chunks):
    B, T, D, H = 2, 21, 32, 2
    m = make(D, H, block_size=4, random_blocks=2)
    x = torch.randn(B, T, D)
    with torch.no_grad():
        y, _ = prefill_chunks(m, x, chunks, m.init_state(B))
        assert_close(y, m(x))


def test_prefill_gradient_matches_forward():
    m = make(32, 2)
    x0, dy = torch.randn(2, 10, 32), torch.randn(2, 10, 32)
    check_prefill_gradient(m, x0, dy, "qkv.weight")


@pytest.mark.parametrize("T", [1, 33, 2048])
def test_state_size_is_full_kv_cache(T):
    m = layers.create_mixer("block_sparse", 64, 4)
    assert m.state_size(T) == 2 * 64 * T
    s = m.init_state(1, max_len=T)
    assert s["k"].numel() + s["v"].numel() == m.state_size(T)


# --- padding masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_equals_running_alone(side, causal, backend):
    B, T, D, H = 4, 19, 32, 2
    lengths = [19, 10, 1, 6]
    m = make(D, H, causal=causal, backend=backend, block_size=3, random_blocks=2, qkv_bias=True, proj_bias=True)
    mask = padding_mask(lengths, T, side)
    x = torch.randn(B, T, D)
    y = check_padded_equals_alone(m, x, mask)
    assert_close(y, reference_module(m, x, mask))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_padding_gets_no_gradient(causal):
    B, T, D, H = 3, 14, 32, 2
    m = make(D, H, causal=causal, proj_bias=True)
    mask = padding_mask([14, 3, 9], T, "left")
    x = torch.randn(B, T, D)
    dy = torch.randn(B, T, D)
    check_padding_gets_no_gradient(m, x, mask, dy)


def test_fully_padded_row_is_zero_and_finite():
    for causal in (True, False):
        m = make(32, 2, causal=causal, proj_bias=True)
        mask = torch.tensor([[True] * 6, [False] * 6])
        check_fully_padded_rows(m, torch.randn(2, 6, 32), mask)


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(1, 14), min_size=1, max_size=3), pad_left=st.booleans(), causal=st.booleans(),
       block_size=st.integers(1, 5), data=st.data())
def test_padding_property(lengths, pad_left, causal, block_size, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    T = max(lengths) + data.draw(st.integers(0, 2))
    m = make(16, 2, causal=causal, block_size=block_size, random_blocks=2, seed=data.draw(st.integers(0, 100)))
    mask = padding_mask(lengths, T, "left" if pad_left else "right")
    check_padded_equals_alone(m, torch.randn(len(lengths), T, 16), mask)


# --- bfloat16 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_bf16_error_ratio(causal):
    B, T, D, H = 2, 33, 64, 4
    m = make(D, H, causal=causal, dtype=torch.bfloat16, qkv_bias=True, proj_bias=True)
    ref = twin(m).float()
    x = torch.randn(B, T, D, dtype=torch.bfloat16)
    dy = torch.randn(B, T, D)
    mixers = {backend: twin(m, backend=backend) for backend in ("sdpa", "math")}
    check_bf16_backends(mixers, ref, reference_module, x, dy, fast="sdpa", naive="math")


# --- compile ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_compile_fullgraph_sdpa_path(causal):
    m = make(32, 2, causal=causal, backend="auto", random_blocks=2)
    x = torch.randn(2, 18, 32)
    check_compile_fullgraph(m, x, [None, padding_mask([18, 7], 18, "right")])


# --- FlexAttention ------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_flex_block_mask_matches_dense_mask_on_cpu(causal):
    """The BlockMask's mask_mod (incl. per-sequence block counts) equals the dense mask (eager CPU flex forward)."""
    from torch.nn.attention.flex_attention import flex_attention

    m = layers.create_mixer("block_sparse", 32, 2, causal=causal, block_size=8, random_blocks=2, seed=7)
    B, H, T, Dh = 2, 2, 45, 16
    q, k, v = (torch.randn(B, H, T, Dh) for _ in range(3))
    mask = padding_mask([45, 21], T, "left")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        for pad in (None, mask):
            extra = m.pattern_extra(T, pad)
            got = flex_attention(q, k, v, block_mask=flex_block_mask(m.pattern, T, pad, "cpu", **extra))
            want = naive_masked_attention(q, k, v, dense_allowed(m.pattern, T, pad, "cpu", **extra))
            assert_close(got, want)


def test_flex_refused_on_cpu():
    m = make(32, 2, backend="flex")
    with pytest.raises(ValueError, match="backend='flex' runs on CUDA only"):
        m(torch.randn(1, 5, 32))


def _gpu_case(causal, dtype):
    dev = torch.device("cuda")
    B, T, D, H = 3, 520, 128, 2
    m = make(D, H, causal=causal, backend="flex", block_size=64, random_blocks=2, qkv_bias=True).to(dev, dtype)
    ref = twin(m, backend="math").to(dev, torch.float32)
    x = torch.randn(B, T, D, device=dev, dtype=dtype)
    mask = padding_mask([520, 200, 1], T, "left").to(dev)
    return m, ref, x, mask


@pytest.mark.gpu
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_cuda_flex_matches_reference_fp32(causal, use_mask):
    """FlexAttention forward + backward vs the dense float32 math path (same weights): tol 1e-4."""
    m, ref, x, mask = _gpu_case(causal, torch.float32)
    mask = mask if use_mask else None
    check_matches_dense_fp32(m, ref, x, mask, tol=1e-4, decode_prompt=480 if causal and mask is None else None,
                             max_len=520)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_cuda_flex_bf16_error_ratio(causal):
    m, ref, x, mask = _gpu_case(causal, torch.bfloat16)
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    check_bf16_ratio_with_and_without_mask(m, twin(m, backend="math").to(x.device), ref, x, mask)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("option,value,minimum", [
    ("block_size", 0, 1), ("block_size", -4, 1), ("block_size", 2.0, 1), ("random_blocks", -1, 0),
    ("window_blocks", -1, 0), ("global_blocks", -2, 0), ("seed", -1, 0), ("random_blocks", True, 0),
])
def test_error_bad_options(option, value, minimum):
    with pytest.raises(ValueError, match=rf"{option} must be an int >= {minimum}"):
        layers.create_mixer("block_sparse", 32, 2, **{option: value})


def test_error_unknown_backend_and_option():
    with pytest.raises(ValueError, match="backend must be one of auto, flex, sdpa, math"):
        layers.create_mixer("block_sparse", 32, 2, backend="xformers")
    with pytest.raises(TypeError, match="num_random_blocks"):
        layers.create_mixer("block_sparse", 32, 2, num_random_blocks=1)


def test_error_decoding_bidirectional_and_bad_step():
    state = check_bidirectional_cannot_decode("block_sparse")
    causal = layers.create_mixer("block_sparse", 32, 2)
    with pytest.raises(ValueError, match=r"x_t must have shape \[batch, 1, 32\]"):
        causal.step(torch.randn(1, 2, 32), state)


def test_registry_and_repr():
    assert "block_sparse" in layers.list_mixers()
    m = layers.create_mixer("block_sparse", 32, 2, causal=False, block_size=16, seed=3)
    assert isinstance(m, BlockSparseAttention) and m.rope is False
    r = repr(m)
    assert "block_size=16" in r and "seed=3" in r and "random_blocks=1" in r and "causal=False" in r


# --- block_size vs max_seq_len ----------------------------------------------------------------------------


def test_error_block_size_larger_than_max_seq_len():
    with pytest.raises(ValueError, match=r"block_size=128 is larger than max_seq_len=100: every token would see the "
                                         r"whole sequence; use the attention mixer"):
        layers.create_mixer("block_sparse", 32, 2, block_size=128, max_seq_len=100)
    with pytest.raises(ValueError, match=r"max_seq_len must be an int >= 1"):
        layers.create_mixer("block_sparse", 32, 2, max_seq_len=-1)
    m = make(32, 2, block_size=4, max_seq_len=4)
    assert m.max_seq_len == 4 and m(torch.randn(1, 3, 32)).shape == (1, 3, 32)
    # the default block size (64) is cut to a shorter max_seq_len
    assert layers.create_mixer("block_sparse", 32, 2, max_seq_len=16).block_size == 16
    assert layers.create_mixer("block_sparse", 32, 2, max_seq_len=1024).block_size == 64
