"""Mamba-2's gated RMSNorm as Triton kernels, forward and backward (the reference is
:class:`layers.mamba2.GatedRMSNorm`):

    g = y * silu(z),    out = g / sqrt(mean_group(g^2) + eps) * weight       (float32 inside, out in y's dtype)

over groups of ``group_size`` channels of rows [..., D]. Why: eagerly, the norm, its gate and their gradients run
as several torch kernels each way; here each direction is one kernel that reads its inputs once. On an H200 the
eager Mamba-2 layer's fwd+bwd at [2, 16384, 768] (bf16 autocast) took 5.73 ms with them against 6.96 ms without. Under torch.compile
inductor's fused kernels are faster (0.56 against 0.79 ms fwd+bwd for the norm alone; 5.04 against 5.59 ms for
the layer, where inductor also fuses the norm with its neighbours), so :class:`layers.mamba2.Mamba2` calls these
in eager calls only. z may be a strided view (the in-projection output's columns): its rows are read in place.

Forward: one program per (block of rows, group) stores ``out`` and each row's 1 / rms (float32, kept for the
backward). Backward, with ``g_hat = g * rstd`` and ``dg_hat = dout * weight``:

    dg = rstd * (dg_hat - g_hat * mean_group(dg_hat * g_hat)),   dy = dg * silu(z),
    dz = dg * y * silu'(z),   dweight = sum_rows dout * g_hat

one program per (span of rows, group) walks its rows in blocks, writes dy and dz, and stores its partial sum of
dweight (float32), which torch sums (no atomics). Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from layers.triton_support import kernels_take, tl, triton

ROWS_PER_BLOCK = 4  # rows of one tile
ROWS_PER_SPAN = 64  # rows one backward program walks (its dweight partial covers them)


def supports(y: Tensor) -> bool:
    """Whether the kernels take ``y``: Triton present, CUDA, a float32 / bfloat16 / float16 dtype."""
    return kernels_take(y)


if triton is not None:

    @triton.jit
    def _gate(y_ptr, z_ptr, r, col, R, D, GS, z_row_stride, BR: tl.constexpr, BG: tl.constexpr, group):
        """y, z (float32) and g = y * silu(z) on rows ``r`` and the group's columns; zeros outside."""
        live = (r < R)[:, None] & (col < GS)[None, :]
        cols = group * GS + col
        y = tl.load(y_ptr + r.to(tl.int64)[:, None] * D + cols[None, :], mask=live, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + r.to(tl.int64)[:, None] * z_row_stride + cols[None, :], mask=live, other=0.0)
        z = z.to(tl.float32)
        return y, z, y * z * tl.sigmoid(z), live

    @triton.jit
    def _forward_kernel(y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, R, D, GS, G, z_row_stride, eps,
                        BR: tl.constexpr, BG: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        group = tl.program_id(1)
        col = tl.arange(0, BG)
        _, _, g, live = _gate(y_ptr, z_ptr, r, col, R, D, GS, z_row_stride, BR, BG, group)
        rstd = 1.0 / tl.sqrt(tl.sum(g * g, 1) / GS + eps)
        w = tl.load(w_ptr + group * GS + col, mask=col < GS, other=0.0).to(tl.float32)
        out = g * rstd[:, None] * w[None, :]
        tl.store(out_ptr + r.to(tl.int64)[:, None] * D + (group * GS + col)[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=live)
        tl.store(rstd_ptr + r * G + group, rstd, mask=r < R)

    @triton.jit
    def _backward_kernel(y_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, dw_part_ptr, R, D, GS, G,
                         z_row_stride, SPAN: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
        span, group = tl.program_id(0), tl.program_id(1)
        col = tl.arange(0, BG)
        cols = group * GS + col
        w = tl.load(w_ptr + cols, mask=col < GS, other=0.0).to(tl.float32)
        dw = tl.zeros([BG], dtype=tl.float32)
        for start in range(0, SPAN, BR):
            r = span * SPAN + start + tl.arange(0, BR)
            y, z, g, live = _gate(y_ptr, z_ptr, r, col, R, D, GS, z_row_stride, BR, BG, group)
            rstd = tl.load(rstd_ptr + r * G + group, mask=r < R, other=0.0)
            at = r.to(tl.int64)[:, None] * D + cols[None, :]
            dout = tl.load(dout_ptr + at, mask=live, other=0.0).to(tl.float32)
            g_hat = g * rstd[:, None]
            dg_hat = dout * w[None, :]
            dg = rstd[:, None] * (dg_hat - g_hat * (tl.sum(dg_hat * g_hat, 1) / GS)[:, None])
            s = tl.sigmoid(z)
            tl.store(dy_ptr + at, (dg * z * s).to(dy_ptr.dtype.element_ty), mask=live)
            tl.store(dz_ptr + at, (dg * y * s * (1.0 + z * (1.0 - s))).to(dz_ptr.dtype.element_ty), mask=live)
            dw += tl.sum(dout * g_hat, 0)
        tl.store(dw_part_ptr + span * D + cols, dw, mask=col < GS)


def _rows(y: Tensor, z: Tensor, group_size: int):
    """(rows, D, groups, z's row stride, the group's power-of-two block)."""
    D = y.shape[-1]
    return y.numel() // D, D, D // group_size, z.stride(-2), triton.next_power_of_2(group_size)


def _warps(block: int) -> int:
    return 8 if block * ROWS_PER_BLOCK >= 4096 else 4


@torch.library.custom_op("effzoo::gated_rms_norm_forward", mutates_args=())
def _norm_forward(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float) -> tuple[Tensor, Tensor]:
    """out (y's dtype, y's shape, contiguous) and every row's 1 / rms per group, [rows, groups] float32."""
    R, D, G, z_stride, block = _rows(y, z, group_size)
    out = y.new_empty(y.shape)
    rstd = torch.empty(R, G, device=y.device, dtype=torch.float32)
    _forward_kernel[(triton.cdiv(R, ROWS_PER_BLOCK), G)](y, z, weight, out, rstd, R, D, group_size, G, z_stride, eps,
                                                        BR=ROWS_PER_BLOCK, BG=block, num_warps=_warps(block))
    return out, rstd


@_norm_forward.register_fake
def _(y, z, weight, group_size, eps):
    D = y.shape[-1]
    return y.new_empty(y.shape), y.new_empty(y.numel() // D, D // group_size, dtype=torch.float32)


@torch.library.custom_op("effzoo::gated_rms_norm_backward", mutates_args=())
def _norm_backward(dout: Tensor, y: Tensor, z: Tensor, weight: Tensor, rstd: Tensor,
                   group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of y, z (contiguous, in their dtypes) and the weight."""
    R, D, G, z_stride, block = _rows(y, z, group_size)
    spans = triton.cdiv(R, ROWS_PER_SPAN)
    dy, dz = y.new_empty(y.shape), z.new_empty(z.shape)
    dw_parts = torch.empty(spans, D, device=y.device, dtype=torch.float32)
    _backward_kernel[(spans, G)](y, z, weight, rstd, dout, dy, dz, dw_parts, R, D, group_size, G, z_stride,
                                 SPAN=ROWS_PER_SPAN, BR=ROWS_PER_BLOCK, BG=block, num_warps=_warps(block))
    return dy, dz, dw_parts.sum(0).to(weight.dtype)


@_norm_backward.register_fake
def _(dout, y, z, weight, rstd, group_size):
    return y.new_empty(y.shape), z.new_empty(z.shape), torch.empty_like(weight)


def _save_inputs(ctx, inputs, output):
    y, z, weight, ctx.group_size, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(y, z, weight, output[1])


def _backward(ctx, dout, _drstd):
    y, z, weight, rstd = ctx.saved_tensors
    dy, dz, dw = _norm_backward(dout.to(y.dtype).contiguous(), y, z, weight, rstd, ctx.group_size)
    return dy, dz, dw, None, None


_norm_forward.register_autograd(_backward, setup_context=_save_inputs)


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float = 1e-5) -> Tensor:
    """:class:`layers.mamba2.GatedRMSNorm`'s forward through the kernels: y, z [..., D] (z's last dim
    contiguous; its rows may be strided), weight [D], D a multiple of ``group_size``. Runs wherever Triton does
    (CUDA, or CPU tensors under the interpreter): callers check :func:`supports`."""
    D = y.shape[-1]
    if z.shape != y.shape or weight.shape != (D,) or D % group_size:
        raise ValueError(f"gated_rms_norm takes y and z of one shape [..., D], weight [D] and D a multiple of "
                         f"group_size; got y {tuple(y.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)}, "
                         f"group_size {group_size}")
    y = y.contiguous()
    flat_rows = z.dim() < 2 or all(z.stride(i) == z.stride(i + 1) * z.shape[i + 1] for i in range(z.dim() - 2))
    if z.stride(-1) != 1 or not flat_rows:
        z = z.contiguous()
    return _norm_forward(y, z, weight.contiguous(), group_size, eps)[0]
