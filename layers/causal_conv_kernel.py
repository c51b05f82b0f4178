"""Causal depthwise conv + SiLU over channel-last ``[B, T, C]`` as Triton kernels, forward and backward (Mamba-2's
short conv from a zero cache; the reference is :func:`layers.causal_conv.causal_conv1d`, then SiLU).

    pre_t = bias + sum_k w[:, k] x_{t - K + 1 + k}    (x_s = 0 for s < 0),    y_t = silu(pre_t)

Why: under torch.compile the conv and its SiLU ran as five inductor kernels, among them a transposed padded copy
of the input, about 1.1 ms of a 5.65 ms Mamba-2 layer fwd+bwd at [2, 16384, 1792] on an H200. Here the layer's
[B, T, C] activations are read in their own layout, with no transpose, and the output is written once.

Forward: one program per (block of T rows, block of channels, batch) reads its rows and the K - 1 rows before
them. Backward, with ``dpre = dy * silu'(pre)`` and ``pre`` recomputed from x:

    dx_t = sum_k w[:, k] dpre_{t + K - 1 - k}    (rows past T: 0)
    dw[:, k] = sum_t dpre_t x_{t - K + 1 + k},   dbias = sum_t dpre_t

in two kernels: the first writes dpre (float32) and each tile's partial sums of dw and dbias, which torch sums
(no atomics: the result does not depend on the schedule); the second reads the K shifted rows of dpre for dx.
(One kernel that recomputed ``pre`` on the K row shifts dx needs was 1.2-4.6x slower on an H200.)
Accumulation is float32 throughout, with the weights read as they are stored (float32 parameters stay float32).
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors, for tests.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from layers.triton_support import kernels_take, tl, triton


class Tile(NamedTuple):
    rows: int  # BT: rows of T a program covers
    channels: int  # BC
    warps: int


# Each kernel's fastest tile of those timed alone on an H200 at [2, 16384, 1792] bf16 (64 x 128 on 4 warps for all
# three: 0.105 / 0.416 / 0.115 ms). Small tiles on few warps win: 64 x 128 needs 255 registers and spills.
FORWARD_TILE = Tile(16, 128, 1)  # 0.087 ms
DPRE_TILE = Tile(16, 64, 1)  # 0.241 ms with the partial sums of dw and dbias
DX_TILE = Tile(32, 128, 2)  # 0.109 ms


def supports(x: Tensor) -> bool:
    """Whether the kernels take ``x``: Triton present, CUDA, a float32 / bfloat16 / float16 dtype."""
    return kernels_take(x)


if triton is not None:

    @triton.jit
    def _pre_activation(x_ptr, w_ptr, bias_ptr, b, rows, c, T, C, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BT: tl.constexpr, BC: tl.constexpr):
        """``pre`` at ``rows`` (BT of them, any: inputs outside [0, T) read as zeros) for the BC channels ``c``:
        [BT, BC] float32."""
        live_c = c < C
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + c, mask=live_c, other=0.0).to(tl.float32)[None, :]
        for k in tl.static_range(K):
            src = rows - (K - 1) + k
            live = ((src >= 0) & (src < T))[:, None] & live_c[None, :]
            xv = tl.load(x_ptr + (b * T + src).to(tl.int64)[:, None] * C + c[None, :], mask=live, other=0.0)
            acc += xv.to(tl.float32) * tl.load(w_ptr + c * K + k, mask=live_c, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, T, C, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        b = tl.program_id(2)
        pre = _pre_activation(x_ptr, w_ptr, bias_ptr, b, t, c, T, C, K, HAS_BIAS, BT, BC)
        y = pre * tl.sigmoid(pre) if SILU else pre
        tl.store(y_ptr + (b * T + t).to(tl.int64)[:, None] * C + c[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(t < T)[:, None] & (c < C)[None, :])

    @triton.jit
    def _dpre_kernel(x_ptr, w_ptr, bias_ptr, dy_ptr, dpre_ptr, dw_part_ptr, dbias_part_ptr, T, C,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        """dpre on this tile's rows (float32), and the tile's partial sums of dw and dbias."""
        pid_t = tl.program_id(0)
        t = pid_t * BT + tl.arange(0, BT)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        b = tl.program_id(2)
        live_c = c < C
        live = (t < T)[:, None] & live_c[None, :]
        at = (b * T + t).to(tl.int64)[:, None] * C + c[None, :]
        dpre = tl.load(dy_ptr + at, mask=live, other=0.0).to(tl.float32)
        if SILU:
            pre = _pre_activation(x_ptr, w_ptr, bias_ptr, b, t, c, T, C, K, HAS_BIAS, BT, BC)
            s = tl.sigmoid(pre)
            dpre = dpre * s * (1.0 + pre * (1.0 - s))
        tl.store(dpre_ptr + at, dpre, mask=live)
        part = b * tl.num_programs(0) + pid_t
        for k in tl.static_range(K):
            src = t - (K - 1) + k
            xv = tl.load(x_ptr + (b * T + src).to(tl.int64)[:, None] * C + c[None, :],
                         mask=((src >= 0) & (src < T))[:, None] & live_c[None, :], other=0.0)
            tl.store(dw_part_ptr + (part * K + k) * C + c, tl.sum(dpre * xv.to(tl.float32), 0), mask=live_c)
        if HAS_BIAS:
            tl.store(dbias_part_ptr + part * C + c, tl.sum(dpre, 0), mask=live_c)

    @triton.jit
    def _dx_kernel(dpre_ptr, w_ptr, dx_ptr, T, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        """dx_t = sum_j w[:, K - 1 - j] dpre_{t + j}."""
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        b = tl.program_id(2)
        live_c = c < C
        dx = tl.zeros([BT, BC], dtype=tl.float32)
        for j in tl.static_range(K):
            rows = t + j
            dpre = tl.load(dpre_ptr + (b * T + rows).to(tl.int64)[:, None] * C + c[None, :],
                           mask=(rows < T)[:, None] & live_c[None, :], other=0.0)
            dx += dpre * tl.load(w_ptr + c * K + (K - 1 - j), mask=live_c, other=0.0).to(tl.float32)[None, :]
        tl.store(dx_ptr + (b * T + t).to(tl.int64)[:, None] * C + c[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=(t < T)[:, None] & live_c[None, :])


def _grid(x: Tensor, tile: Tile):
    batch, T, C = x.shape
    return (triton.cdiv(T, tile.rows), triton.cdiv(C, tile.channels), batch)


@torch.library.custom_op("effzoo::conv1d_silu_forward", mutates_args=())
def _conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    T, C = x.shape[1], x.shape[2]
    y = torch.empty_like(x)
    t = FORWARD_TILE
    _forward_kernel[_grid(x, t)](x, weight, weight if bias is None else bias, y, T, C, K=weight.shape[-1],
                                 HAS_BIAS=bias is not None, SILU=silu, BT=t.rows, BC=t.channels, num_warps=t.warps)
    return y


@_conv_forward.register_fake
def _(x, weight, bias, silu):
    return torch.empty_like(x)


@torch.library.custom_op("effzoo::conv1d_silu_backward", mutates_args=())
def _conv_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                   silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of x, the weight and the bias (empty without a bias)."""
    T, C = x.shape[1], x.shape[2]
    K = weight.shape[-1]
    t = DPRE_TILE
    grid = _grid(x, t)
    parts = grid[0] * grid[2]
    dpre = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    dw_parts = torch.empty(parts, K, C, device=x.device, dtype=torch.float32)
    dbias_parts = torch.empty(parts, C, device=x.device, dtype=torch.float32) if bias is not None else dw_parts
    _dpre_kernel[grid](x, weight, weight if bias is None else bias, dy, dpre, dw_parts, dbias_parts, T, C, K=K,
                       HAS_BIAS=bias is not None, SILU=silu, BT=t.rows, BC=t.channels, num_warps=t.warps)
    dx = torch.empty_like(x)
    t = DX_TILE
    _dx_kernel[_grid(x, t)](dpre, weight, dx, T, C, K=K, BT=t.rows, BC=t.channels, num_warps=t.warps)
    dw = dw_parts.sum(0).t().contiguous().reshape(weight.shape).to(weight.dtype)
    dbias = x.new_empty(0) if bias is None else dbias_parts.sum(0).to(bias.dtype)
    return dx, dw, dbias


@_conv_backward.register_fake
def _(dy, x, weight, bias, silu):
    return torch.empty_like(x), torch.empty_like(weight), x.new_empty(0) if bias is None else torch.empty_like(bias)


def _save_inputs(ctx, inputs, output):
    x, weight, bias, ctx.silu = inputs
    ctx.save_for_backward(x, weight, bias)


def _backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    dx, dw, dbias = _conv_backward(dy.to(x.dtype).contiguous(), x, weight, bias, ctx.silu)
    return dx, dw, None if bias is None else dbias, None


_conv_forward.register_autograd(_backward, setup_context=_save_inputs)


def conv1d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, silu: bool = True) -> Tensor:
    """``silu(causal_conv1d(x^T, weight, bias)[0])^T`` from a zero cache, on channel-last x [B, T, C]; weight
    [C, 1, K] (a depthwise ``nn.Conv1d``'s), bias [C] or None; ``silu=False`` returns the conv alone. y [B, T, C]
    in x's dtype. Runs wherever Triton does (CUDA, or CPU tensors under the interpreter): callers check
    :func:`supports`."""
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[0] != x.shape[-1] or weight.shape[1] != 1:
        raise ValueError(f"conv1d_silu takes x [B, T, C] and a depthwise weight [C, 1, K]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"conv1d_silu's bias must be [C] = [{x.shape[-1]}]; got {tuple(bias.shape)}")
    return _conv_forward(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), silu)
