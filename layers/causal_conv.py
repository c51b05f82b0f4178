"""Short causal depthwise convolution with a decoding cache, and padding packing (Mamba, Mamba-2).

A depthwise ``nn.Conv1d`` of kernel K over ``[B, C, T]`` is made causal by prepending the K-1
inputs that came before (the *cache*: zeros at the start of a sequence). The same call serves a
whole prompt and a single decoding step, and returns the new cache: the last K-1 inputs.

Padding masks are handled by *packing*: each sequence's real tokens are moved to the front (a
stable gather), so padding always trails. The conv then never sees padding between real tokens,
a sequence's cache is its last K-1 real inputs (gathered at its length), and a recurrence whose
padded steps are the identity ends on the state of the last real token.

Under torch.compile the conv is written as K shifted multiply-adds, which inductor fuses into one pointwise
kernel (and its backward into a few): on an H200 at [2, 1792, 16384] bf16, fwd+bwd took 0.74 ms against
2.52 ms for the compiled ``F.conv1d`` (cuDNN's depthwise kernels). Eagerly the K separate passes are slower
(3.85 ms), so eager calls keep ``F.conv1d``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  cache: torch.Tensor | None = None, lengths: torch.Tensor | None = None):
    """Causal depthwise conv: ``y_t = bias + sum_i weight[:, 0, i] * x_{t - K + 1 + i}``.

    x [B, C, T]; weight [C, 1, K] (a depthwise ``nn.Conv1d`` weight); cache [B, C, K-1] the inputs
    before x (None: zeros); lengths [B] (optional) the number of real tokens of each sequence when
    padding trails. Returns ``(y [B, C, T] before any activation, new cache [B, C, K-1])``: the
    last K-1 inputs (with lengths: the last K-1 up to each sequence's end, cache included).
    """
    B, C, _ = x.shape
    K = weight.shape[-1]
    cache = x.new_zeros(B, C, K - 1) if cache is None else cache.to(x.dtype)
    xp = torch.cat([cache, x], dim=-1)  # [B, C, K-1+T]
    y = shifted_conv1d(xp, weight, bias) if torch.compiler.is_compiling() else F.conv1d(xp, weight, bias, groups=C)
    if lengths is None:
        return y, xp[..., xp.shape[-1] - (K - 1):]
    idx = lengths[:, None] + torch.arange(K - 1, device=x.device)  # positions len .. len+K-2 of xp
    return y, xp.gather(-1, idx[:, None, :].expand(-1, C, -1))


def shifted_conv1d(xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv1d(xp, weight, bias, groups=C)`` (no padding) as a sum of K shifted, per-channel scaled views, in
    xp's dtype: the weights are cast to it, as autocast casts a conv's weights (a float32 weight times bfloat16
    activations would otherwise promote everything after the conv to float32)."""
    K = weight.shape[-1]
    T = xp.shape[-1] - K + 1
    weight = weight.to(xp.dtype)
    y = sum(weight[:, :, k] * xp[..., k:k + T] for k in range(K))
    return y if bias is None else y + bias.to(xp.dtype)[:, None]


def pack_real_tokens(x: torch.Tensor, mask: torch.Tensor):
    """Move each sequence's real tokens (``mask`` [B, T] True) to the front, keeping their order.

    Returns ``(x_packed [B, T, D], perm [B, T], lengths [B], packed_mask [B, T])``; padded
    positions of ``x_packed`` are zeroed.
    """
    T = x.shape[1]
    perm = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    lengths = mask.sum(dim=1)
    packed_mask = torch.arange(T, device=x.device) < lengths[:, None]
    x = x.gather(1, perm[..., None].expand(-1, -1, x.shape[-1])) * packed_mask[..., None].to(x.dtype)
    return x, perm, lengths, packed_mask


def unpack_real_tokens(y: torch.Tensor, perm: torch.Tensor, packed_mask: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_real_tokens` for outputs ``y`` [B, T, D]: zeros at padded positions."""
    y = y * packed_mask[..., None].to(y.dtype)
    return torch.zeros_like(y).scatter(1, perm[..., None].expand(-1, -1, y.shape[-1]), y)
