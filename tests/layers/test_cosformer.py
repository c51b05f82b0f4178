"""The ``cosformer`` mixer and its reference ``naive_cosformer_attention``.

Tolerances (max absolute error scaled by ``max(1, max|expected|)``, see ``mixer_checks.py``):
* float32: 1e-5 against the explicit quadratic form (observed ~1e-7).
* bfloat16: the shared ratio rule (``check_bf16_chunked_vs_naive``): the kernel core runs in float32,
  so the error comes from the bf16 projections.
"""
from __future__ import annotations

import math

import pytest
import torch

import layers
import layers.cosformer  # noqa: F401  (registers "cosformer" until layers/__init__.py imports it)
from layers.cosformer import CosFormer, cos_features, naive_cosformer_attention
from mixer_checks import ref_qk_norm
from mixer_checks import (assert_close, check_backward_with_left_padding, check_bf16_mixer_vs_naive,
                          check_compile_fullgraph, check_fully_padded_rows, check_input_errors,
                          check_padding_equals_alone_and_reference, check_prefill_gradient, check_prefill_then_steps,
                          check_state_dtype_option, init_params, linear, padding_mask, per_sequence, shape_ids,
                          state_checker)

MAX_LEN = 80


def reference_module(m: CosFormer, x, mask=None, dtype=torch.float32):
    """What ``m(x, mask)`` must compute, one sequence at a time (weights cast to ``dtype``, the quadratic
    form in float32); M is max_seq_len or, without it, the sequence's own length."""
    H, Dh = m.num_heads, m.head_dim

    def one(xb):
        n = len(xb)
        q, k, v = linear(m.qkv, xb, dtype).view(n, 3, H, Dh).permute(1, 2, 0, 3)[:, None].unbind(0)  # [1, H, n, Dh]
        q, k = ref_qk_norm(m, q, k)
        M = m.max_seq_len if m.max_seq_len is not None else n
        o = naive_cosformer_attention(q, k, v, M, causal=m.causal, eps=m.eps)
        return linear(m.proj, o[0].transpose(0, 1).reshape(n, H * Dh), dtype)

    return per_sequence(x, mask, one, dtype)


def make_mixer(dim, num_heads, dtype=torch.float32, **kwargs) -> CosFormer:
    kwargs.setdefault("chunk_size", 16)
    if kwargs.get("causal", True):
        kwargs.setdefault("max_seq_len", MAX_LEN)
    m = layers.create_mixer("cosformer", dim, num_heads, **kwargs)
    return init_params(m, lambda p: 1.0 / math.sqrt(p.shape[-1])).to(dtype)


# --- the reference --------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_naive_matches_loop(causal):
    B, H, T, d, M = 1, 2, 6, 3, 7.0
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[True, False, True, True, False, True]])
    got = naive_cosformer_attention(q, k, v, M, causal=causal, mask=mask, eps=1e-3)
    for h in range(H):
        for i in range(T):
            js = [j for j in range(T) if mask[0, j] and (not causal or j <= i)]
            w = torch.stack([q[0, h, i].clamp(min=0) @ k[0, h, j].clamp(min=0) * math.cos(math.pi / 2 * (i - j) / M)
                             for j in js])
            assert_close(got[0, h, i], (w[:, None] * v[0, h, js]).sum(0) / (w.sum() + 1e-3))


def test_cos_sin_decomposition():
    """[cos, sin] features reproduce relu(q).relu(k) cos(pi/2 (i - j) / M)."""
    T, M = 9, 11.0
    q, k = torch.randn(1, 1, T, 4, dtype=torch.float64), torch.randn(1, 1, T, 4, dtype=torch.float64)
    pos = torch.arange(T)[None]
    got = cos_features(q, pos, M) @ cos_features(k, pos, M).transpose(-1, -2)
    i = torch.arange(T, dtype=torch.float64)
    want = (q.clamp(min=0) @ k.clamp(min=0).transpose(-1, -2)) * torch.cos(math.pi / 2 * (i[:, None] - i) / M)
    assert_close(got, want)


# --- the mixer vs the reference -------------------------------------------------------------------

SHAPES = [(1, 1, 32, 2), (2, 7, 48, 3), (2, 33, 64, 4), (1, 70, 32, 1)]


@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=shape_ids(SHAPES))
@pytest.mark.parametrize("causal,max_seq_len", [(True, MAX_LEN), (True, 70), (False, None), (False, MAX_LEN)],
                         ids=["causal", "causal-tight", "bidir", "bidir-fixed-M"])
def test_forward_matches_reference(B, T, D, H, causal, max_seq_len):
    m = make_mixer(D, H, causal=causal, max_seq_len=max_seq_len, qkv_bias=True, proj_bias=True)
    x = torch.randn(B, T, D)
    assert_close(m(x), reference_module(m, x))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_backward_matches_reference(causal):
    """Gradients of x and of every weight agree with the reference's (padding mask on)."""
    m = make_mixer(32, 2, causal=causal, qkv_bias=True, proj_bias=True)
    check_backward_with_left_padding(m, reference_module, 5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_padding_mask_equals_running_alone(side, causal):
    """Bidirectionally M is each sequence's own length, so padding changes nothing either."""
    m = make_mixer(32, 2, causal=causal, qkv_bias=True)
    # if causal: the final states of a masked prefill are each sequence's own
    check_padding_equals_alone_and_reference(m, reference_module, side, ("S", "z") if causal else None)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_fully_padded_rows(causal):
    m = make_mixer(32, 2, causal=causal)
    check_fully_padded_rows(m, torch.randn(2, 9, 32), padding_mask([9, 0], 9, "right"))


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [0, 1, 16, 23])
def test_prefill_then_steps_matches_forward(prompt):
    B, T, D, H = 2, 30, 32, 2
    m = make_mixer(D, H, max_seq_len=T)  # decoding right up to the limit
    check_states = state_checker({"S", "z", "pos"})
    state = check_prefill_then_steps(m, x := torch.randn(B, T, D), prompt, check_states=check_states)
    assert state["pos"].tolist() == [T] * B
    with pytest.raises(ValueError, match="max_seq_len=30"):
        m.step(x[:, :1], state)


def test_prefill_gradient_matches_forward():
    m = make_mixer(32, 2)
    x0, dy = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    check_prefill_gradient(m, x0, dy, "qkv.weight")


@pytest.mark.parametrize("D,H", [(32, 2), (64, 4), (48, 1)])
def test_state_size(D, H):
    m = layers.create_mixer("cosformer", D, H, max_seq_len=128)
    Dh = D // H
    assert m.state_size(1) == m.state_size(128) == H * 2 * Dh * (Dh + 1)
    s = m.init_state(3)
    assert sum(s[k][0].numel() for k in s if k != "pos") == m.state_size(10)
    assert s["S"].dtype == torch.float32


def test_state_dtype_option():
    m = make_mixer(32, 2, state_dtype=torch.float64)
    check_state_dtype_option(m, ("S", "z"))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_compile_fullgraph(causal):
    m = make_mixer(16, 2, causal=causal, chunk_size=8)
    x = torch.randn(2, 19, 16)
    check_compile_fullgraph(m, x, [None, padding_mask([19, 6], 19, "left")])


# --- bfloat16 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_bf16_error_ratio(causal):
    check_bf16_mixer_vs_naive(make_mixer, reference_module, "qkv.weight", causal=causal, qkv_bias=True)


# --- errors ---------------------------------------------------------------------------------------


def test_error_causal_needs_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len is required for causal=True"):
        layers.create_mixer("cosformer", 32, 2)
    layers.create_mixer("cosformer", 32, 2, causal=False)  # bidirectional: M is the sequence length


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_error_longer_than_max_seq_len(causal):
    m = layers.create_mixer("cosformer", 32, 2, causal=causal, max_seq_len=8)
    m(torch.randn(1, 8, 32))
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_seq_len=8"):
        m(torch.randn(1, 9, 32))
    if causal:
        _, state = m.prefill(torch.randn(1, 5, 32), m.init_state(1))
        with pytest.raises(ValueError, match="max_seq_len=8"):
            m.prefill(torch.randn(1, 4, 32), state)


@pytest.mark.parametrize("kw,match", [
    ({"max_seq_len": 0}, "max_seq_len"), ({"max_seq_len": 8.0}, "max_seq_len"), ({"max_seq_len": True}, "max_seq_len"),
    ({"eps": -1.0}, "eps"), ({"chunk_size": 24}, "chunk_size"), ({"state_dtype": torch.int32}, "state_dtype"),
])
def test_error_bad_options(kw, match):
    kw.setdefault("max_seq_len", 16)
    with pytest.raises(ValueError, match=match):
        layers.create_mixer("cosformer", 32, 2, **kw)


def test_error_unknown_argument():
    with pytest.raises(TypeError, match="unknown argument 'max_len'"):
        layers.create_mixer("cosformer", 32, 2, max_len=16)


def test_error_decoding_a_bidirectional_mixer():
    bidir = layers.create_mixer("cosformer", 32, 2, causal=False)
    with pytest.raises(ValueError, match="causal"):
        bidir.init_state(1)
    state = layers.create_mixer("cosformer", 32, 2, max_seq_len=16).init_state(1)
    with pytest.raises(ValueError, match="causal"):
        bidir.step(torch.randn(1, 1, 32), state)
    with pytest.raises(ValueError, match="causal"):
        bidir.prefill(torch.randn(1, 3, 32), state)


def test_error_inputs():
    check_input_errors(layers.create_mixer("cosformer", 32, 2, max_seq_len=16))


def test_repr_and_registry():
    assert "cosformer" in layers.list_mixers()
    r = repr(layers.create_mixer("cosformer", 32, 2, max_seq_len=64))
    assert "max_seq_len=64" in r and "feature_dim=32" in r
