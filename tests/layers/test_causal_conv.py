"""The causal depthwise conv (``layers.causal_conv``) against a tap-by-tap loop over a left-padded input, its
compiled form (K shifted multiply-adds) against the eager ``F.conv1d``, and the padding packing round trip.

Tolerances: float64 1e-12 (the same sums in another order); float32 1e-5.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.causal_conv import causal_conv1d, pack_real_tokens, shifted_conv1d, unpack_real_tokens


def naive_causal_conv1d(x, weight, bias, cache):
    """y_t = bias + sum_i w_i x_{t - K + 1 + i}, one output step at a time over [cache, x]."""
    K, T = weight.shape[-1], x.shape[-1]
    xp = torch.cat([cache, x], dim=-1)
    steps = [(xp[..., t:t + K] * weight[:, 0]).sum(-1) + (0 if bias is None else bias) for t in range(T)]
    return torch.stack(steps, dim=-1)


def inputs(batch, C, T, K, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    return r(batch, C, T), r(C, 1, K), r(C), r(batch, C, K - 1)


def grads(out, tensors, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.autograd.grad(out, tensors, torch.randn(out.shape, generator=g, dtype=out.dtype))


@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("with_cache", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_tap_by_tap_loop(T, with_cache, with_bias):
    x, w, b, cache = inputs(2, 5, T, 4)
    b = b if with_bias else None
    cache_arg = cache if with_cache else None
    y, new_cache = causal_conv1d(x, w, b, cache_arg)
    want = naive_causal_conv1d(x, w, b, cache if with_cache else torch.zeros_like(cache))
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    full = torch.cat([cache if with_cache else torch.zeros_like(cache), x], dim=-1)
    torch.testing.assert_close(new_cache, full[..., -3:], rtol=0, atol=0)
    leaves = [t for t in (x, w, b, cache_arg) if t is not None]
    for got, exp in zip(grads(y, leaves), grads(want, leaves)):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)


def test_cache_at_lengths_is_each_sequences_last_inputs():
    x, w, b, cache = inputs(3, 4, 6, 3)
    lengths = torch.tensor([6, 1, 4])
    _, new_cache = causal_conv1d(x, w, b, cache, lengths)
    full = torch.cat([cache, x], dim=-1)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(new_cache[i], full[i, :, n:n + 2], rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_shifted_form_equals_conv1d(dtype, tol, with_bias):
    x, w, b, _ = inputs(2, 6, 13, 4, dtype)
    b = b if with_bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    got, want = shifted_conv1d(x, w, b), F.conv1d(x, w, b, groups=6)
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    for g_got, g_want in zip(grads(got, leaves), grads(want, leaves)):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=tol)


def test_compiled_call_takes_the_shifted_form_and_matches_eager():
    torch._dynamo.reset()
    x, w, b, cache = inputs(2, 6, 11, 4, torch.float32)
    compiled = torch.compile(causal_conv1d, fullgraph=True, backend="aot_eager")
    (y_c, cache_c), (y_e, cache_e) = compiled(x, w, b, cache), causal_conv1d(x, w, b, cache)
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=1e-5)
    torch.testing.assert_close(cache_c, cache_e, rtol=0, atol=0)
    for g_c, g_e in zip(grads(y_c, [x, w, b, cache]), grads(y_e, [x, w, b, cache])):
        torch.testing.assert_close(g_c, g_e, rtol=0, atol=1e-5)
    traced = []

    def record(gm, example_inputs):
        traced.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(causal_conv1d, fullgraph=True, backend=record)(x, w, b, cache)
    assert traced and not {F.conv1d, torch.conv1d} & set(traced)


def test_shifted_form_keeps_the_activations_dtype_with_float32_weights():
    x, w, b, _ = inputs(1, 4, 9, 3, torch.float32)
    y = shifted_conv1d(x.detach().bfloat16(), w, b)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.conv1d(x.bfloat16().float(), w.bfloat16().float(), b.bfloat16().float(), groups=4),
                               rtol=2e-2, atol=2e-2)


def test_pack_then_unpack_restores_real_tokens_and_zeros_padding():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, False, True, True, False], [False, False, True, False, True]])
    packed, perm, lengths, packed_mask = pack_real_tokens(x, mask)
    assert lengths.tolist() == [3, 2]
    torch.testing.assert_close(packed[0, :3], x[0, [0, 2, 3]])
    torch.testing.assert_close(packed[1, :2], x[1, [2, 4]])
    assert not packed[~packed_mask].any()
    restored = unpack_real_tokens(packed, perm, packed_mask)
    torch.testing.assert_close(restored, x * mask[..., None])
