"""The ``linformer`` mixer (bidirectional only) against ``naive_linformer``, run one sequence at a time.

Tolerances (see ``mixer_checks``): float32 1e-5 scaled by max(1, max|expected|); bfloat16 ``BF16_TOL`` with
the 2x-naive-error ratio rule (``check_bf16_chunked_vs_naive``). Padding masks are exact (each real token is
projected with the E/F column of its rank among its sequence's real tokens), so masked outputs and gradients
equal those of running each sequence alone, whatever the padding side.
"""
from __future__ import annotations

import math

import pytest
import torch

import layers
import layers.linformer  # noqa: F401  (registers "linformer" until layers/__init__.py imports it)
from layers.linformer import Linformer, naive_linformer
from mixer_checks import ref_qk_norm
from mixer_checks import (assert_close, check_bf16_chunked_vs_naive, check_compile_fullgraph, check_fully_padded_rows,
                          check_mixer_matches_reference_grads, check_padded_equals_alone,
                          check_padding_gets_no_gradient, init_params, linear, padding_mask, per_sequence, shape_ids)


def reference_linformer_module(m: Linformer, x, mask=None, dtype=torch.float32):
    """What ``m(x, mask)`` must compute: each sequence alone (its n real tokens, E/F columns 0..n-1), with the
    weights cast to ``dtype`` and ``naive_linformer`` (float32) inside. Differentiable w.r.t. x and the weights."""
    H, Dh = m.num_heads, m.head_dim

    def one(xb):
        n = len(xb)
        q, k, v = (t.transpose(0, 1)[None] for t in linear(m.qkv, xb, dtype).view(n, 3, H, Dh).unbind(1))
        q, k = ref_qk_norm(m, q, k)
        o = naive_linformer(q, k, v, m.E.to(dtype), m.value_projection.to(dtype))
        return linear(m.proj, o[0].transpose(0, 1).reshape(n, H * Dh), dtype)

    return per_sequence(x, mask, one, dtype)


def make_mixer(dim, num_heads, dtype=torch.float32, **kwargs) -> Linformer:
    kwargs.setdefault("max_seq_len", 40)
    kwargs.setdefault("k", 8)
    m = layers.create_mixer("linformer", dim, num_heads, causal=False, **kwargs)
    return init_params(m, lambda p: 1.0 / math.sqrt(p.shape[-1])).to(dtype)


def test_naive_linformer_matches_loop():
    B, H, T, Dh, kp = 1, 2, 5, 3, 4
    q, k, v = torch.randn(B, H, T, Dh), torch.randn(B, H, T, Dh), torch.randn(B, H, T, Dh)
    E, F_ = torch.randn(kp, 9), torch.randn(kp, 9)
    got = naive_linformer(q, k, v, E, F_)
    for h in range(H):
        kproj = [sum(E[r, t] * k[0, h, t] for t in range(T)) for r in range(kp)]
        vproj = [sum(F_[r, t] * v[0, h, t] for t in range(T)) for r in range(kp)]
        for i in range(T):
            w = torch.stack([q[0, h, i] @ kproj[r] / math.sqrt(Dh) for r in range(kp)]).softmax(0)
            assert_close(got[0, h, i], sum(w[r] * vproj[r] for r in range(kp)))


SHAPES = [(1, 1, 32, 2), (2, 7, 48, 3), (2, 33, 64, 4), (1, 40, 32, 1)]


@pytest.mark.parametrize("B,T,D,H", SHAPES, ids=shape_ids(SHAPES))
@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("share_kv", [False, True])
def test_forward_matches_reference(B, T, D, H, k, share_kv):
    """Projected length shorter and longer than T; T < max_seq_len (first T columns) and T == max_seq_len."""
    m = make_mixer(D, H, k=k, share_kv=share_kv, qkv_bias=True, proj_bias=True)
    x = torch.randn(B, T, D)
    assert_close(m(x), reference_linformer_module(m, x))


@pytest.mark.parametrize("share_kv", [False, True])
def test_backward_matches_reference(share_kv):
    """Gradients of x and of every weight (E, F included) agree with the reference's (padding mask on)."""
    B, T, D, H = 3, 37, 32, 2
    m = make_mixer(D, H, share_kv=share_kv, qkv_bias=True, proj_bias=True)
    mask = padding_mask([37, 20, 5], T, "left")
    x0, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    grads = check_mixer_matches_reference_grads(m, reference_linformer_module, x0, dy, mask)
    assert set(grads) == {"x", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "E"} | (set() if share_kv else {"F"})


def test_share_kv_uses_one_projection():
    m = make_mixer(32, 2, share_kv=True)
    assert m.F is None and m.value_projection is m.E
    assert {n for n, _ in m.named_parameters()} == {"qkv.weight", "proj.weight", "E"}
    assert make_mixer(32, 2).E.shape == make_mixer(32, 2).F.shape == (8, 40)


def test_shorter_sequence_uses_first_columns():
    """Columns past T do not matter: changing them leaves a length-T output unchanged."""
    m = make_mixer(32, 2)
    x = torch.randn(2, 11, 32)
    y = m(x)
    with torch.no_grad():
        m.E[:, 11:] = torch.randn_like(m.E[:, 11:])
        m.F[:, 11:] = torch.randn_like(m.F[:, 11:])
    assert torch.equal(m(x), y)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_equals_running_alone(side):
    B, T, D, H = 4, 21, 32, 2
    m = make_mixer(D, H, qkv_bias=True)
    mask = padding_mask([21, 9, 1, 14], T, side)
    x, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    y = check_padded_equals_alone(m, x, mask)
    assert_close(y, reference_linformer_module(m, x, mask))
    check_padding_gets_no_gradient(m, x, mask, dy)


def test_fully_padded_rows():
    m = make_mixer(32, 2, qkv_bias=True)
    check_fully_padded_rows(m, torch.randn(3, 9, 32), padding_mask([9, 0, 4], 9, "left"))


def test_compile_fullgraph():
    m = make_mixer(16, 2)
    x = torch.randn(2, 19, 16)
    check_compile_fullgraph(m, x, [None, padding_mask([19, 6], 19, "left")])


def test_bf16_error_ratio():
    B, T, D, H = 2, 40, 64, 2
    m = make_mixer(D, H, dtype=torch.bfloat16, k=16, qkv_bias=True)
    x = torch.randn(B, T, D, dtype=torch.bfloat16)
    dy = torch.randn(B, T, D)
    ref_m = make_mixer(D, H, k=16, qkv_bias=True)  # the helper loads m's bf16 weights into it
    check_bf16_chunked_vs_naive(m, ref_m, reference_linformer_module, x, dy, "E")


# --- errors ---------------------------------------------------------------------------------------


def test_error_causal():
    assert Linformer.supports_causal is False and Linformer.supports_bidirectional and Linformer.supports_mask
    with pytest.raises(ValueError, match=r"Linformer does not support causal=True \(it is bidirectional only\)"):
        layers.create_mixer("linformer", 32, 2, max_seq_len=16)  # create_mixer's default is causal=True
    with pytest.raises(ValueError, match="does not support causal=True"):
        Linformer(32, 2, causal=True, max_seq_len=16)


def test_error_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len"):
        layers.create_mixer("linformer", 32, 2, causal=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        Linformer(32, 2)
    for bad in (0, -3, 4.0, True):
        with pytest.raises(ValueError, match="max_seq_len must be an int >= 1"):
            Linformer(32, 2, max_seq_len=bad)
    m = make_mixer(32, 2, max_seq_len=10)
    m(torch.randn(1, 10, 32))
    with pytest.raises(ValueError, match="sequence length 11 exceeds max_seq_len=10"):
        m(torch.randn(1, 11, 32))


def test_error_bad_options():
    for bad in (0, -1, 2.5, None, True):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            Linformer(32, 2, max_seq_len=16, k=bad)
    with pytest.raises(ValueError, match="share_kv must be a bool"):
        Linformer(32, 2, max_seq_len=16, share_kv=1)
    with pytest.raises(TypeError, match="unknown argument 'seq_len'"):
        layers.create_mixer("linformer", 32, 2, causal=False, seq_len=16)


def test_error_inputs_and_decoding():
    m = make_mixer(32, 2)
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len, 32\]"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        m(torch.randn(2, 5, 32), mask=torch.ones(2, 5))
    with pytest.raises(NotImplementedError, match="no incremental decoding"):
        m.init_state(1)


def test_repr_and_registry():
    assert "linformer" in layers.list_mixers()
    r = repr(make_mixer(32, 2, share_kv=True))
    assert "causal=False" in r and "k=8" in r and "max_seq_len=40" in r and "share_kv=True" in r
