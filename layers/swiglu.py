"""The SwiGLU activation ``silu(gate) * up`` of a fused ``[..., 2 * hidden]`` projection, in one pass each way.

Eager torch runs it as a strided SiLU, a product, and in the backward three more elementwise kernels and a
concatenation of the two gradient halves; it also keeps ``silu(gate)`` alive for the backward. On CUDA
:func:`swiglu` runs one Triton kernel forward (read ``h`` once, write the product) and one backward (read ``h``
and the output's gradient, write ``h``'s gradient in place of the concatenation), computing in float32 and
saving only ``h``. :func:`naive_swiglu` is the reference; it also runs on CPU, without Triton, and under
``torch.compile`` (whose generated kernel fuses it the same way).

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors, for tests (:mod:`layers.triton_support`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from layers.triton_support import kernels_take, tl, triton

BLOCK_ROWS, BLOCK_COLS = 8, 512


def naive_swiglu(h: Tensor) -> Tensor:
    """``silu(gate) * up`` with ``gate, up = h.chunk(2, dim=-1)``."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def supports(h: Tensor) -> bool:
    """Whether :func:`swiglu` runs the kernels on ``h``: Triton present, a CUDA tensor, a float dtype."""
    return kernels_take(h)


if triton is not None:

    @triton.jit
    def _swiglu_forward_kernel(h_ptr, y_ptr, rows, hidden, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        live = (m < rows)[:, None] & (c < hidden)[None, :]
        gate_at = h_ptr + m[:, None].to(tl.int64) * (2 * hidden) + c[None, :]
        gate = tl.load(gate_at, mask=live, other=0.0).to(tl.float32)
        up = tl.load(gate_at + hidden, mask=live, other=0.0).to(tl.float32)
        y = gate * tl.sigmoid(gate) * up
        tl.store(y_ptr + m[:, None].to(tl.int64) * hidden + c[None, :], y.to(y_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _swiglu_backward_kernel(h_ptr, dy_ptr, dh_ptr, rows, hidden, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        live = (m < rows)[:, None] & (c < hidden)[None, :]
        row = m[:, None].to(tl.int64)
        gate = tl.load(h_ptr + row * (2 * hidden) + c[None, :], mask=live, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * (2 * hidden) + hidden + c[None, :], mask=live, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * hidden + c[None, :], mask=live, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))  # d silu(g) / dg = sig * (1 + g * (1 - sig))
        out = dh_ptr.dtype.element_ty
        tl.store(dh_ptr + row * (2 * hidden) + c[None, :], d_gate.to(out), mask=live)
        tl.store(dh_ptr + row * (2 * hidden) + hidden + c[None, :], (dy * silu).to(out), mask=live)


def _grid(rows: int, hidden: int) -> tuple[int, int]:
    return triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(hidden, BLOCK_COLS)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        h = h.contiguous()
        hidden = h.shape[-1] // 2
        y = torch.empty(*h.shape[:-1], hidden, device=h.device, dtype=h.dtype)
        rows = y.numel() // max(hidden, 1)
        if y.numel():
            _swiglu_forward_kernel[_grid(rows, hidden)](h, y, rows, hidden, BLOCK_M=BLOCK_ROWS, BLOCK_H=BLOCK_COLS)
        ctx.save_for_backward(h)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        dy = dy.contiguous()
        dh = torch.empty_like(h)
        hidden = h.shape[-1] // 2
        rows = dy.numel() // max(hidden, 1)
        if dh.numel():
            _swiglu_backward_kernel[_grid(rows, hidden)](h, dy, dh, rows, hidden, BLOCK_M=BLOCK_ROWS, BLOCK_H=BLOCK_COLS)
        return dh


def fused_swiglu(h: Tensor) -> Tensor:
    """:func:`naive_swiglu` by the Triton kernels (any device Triton addresses: CUDA, or CPU in the interpreter)."""
    return _SwiGLU.apply(h)


def swiglu(h: Tensor) -> Tensor:
    """``silu(gate) * up`` of ``h = [gate, up]`` along the last dimension (even): :func:`fused_swiglu` where
    :func:`supports` holds (not while torch.compile traces), else :func:`naive_swiglu`."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension (gate and up halves), got shape {tuple(h.shape)}")
    if supports(h) and not torch.compiler.is_compiling():
        return fused_swiglu(h)
    return naive_swiglu(h)
