"""Triton kernels for the token-choice permutation of :mod:`layers.moe.experts` (CUDA; the torch ops in
:class:`~layers.moe.experts.Dispatch` and :class:`~layers.moe.experts.Combine` are their reference).

Both directions of the permutation are row gathers with a short sum: one token's k expert outputs are k
rows of the expert buffer. The torch path materialises the [N, k, dim] gathers and runs the weighted sum as a
batched GEMM that cuBLAS executes as a gemv; here each output row is read and written once:

* :func:`gather_sum`: ``y[n] = sum_j w[n, j] * src[index[n, j]]`` (float32 accumulation; ``w`` optional; an
  index equal to ``len(src)`` reads a zero row). The combine's forward, the dispatch's forward (k = 1, the
  padding rows of the buffer reading zeros) and backward (unweighted).
* :func:`combine_backward`: the combine's gradients in one pass over the rows: ``grad_out[index[n, j]] =
  w[n, j] * grad[n]`` and ``grad_w[n, j] = <out[index[n, j]], grad[n]>``.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) they run on CPU tensors in Triton's interpreter,
for tests.
"""
from __future__ import annotations

import torch

from layers.triton_support import kernels_take, tl, triton

BLOCK_ROWS = 16


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels take ``x`` (the tokens or the expert buffer): CUDA, Triton present, a float32 /
    bfloat16 / float16 dtype."""
    return kernels_take(x)


if triton is not None:

    @triton.jit
    def _gather_sum_kernel(src_ptr, index_ptr, weight_ptr, out_ptr, num_rows, num_src, dim, k,
                           HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        live_n, live_d = n < num_rows, d < dim
        acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for j in range(k):
            row = tl.load(index_ptr + n * k + j, mask=live_n, other=num_src)
            rows = tl.load(src_ptr + row[:, None].to(tl.int64) * dim + d[None, :],
                           mask=((row < num_src) & live_n)[:, None] & live_d[None, :], other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                rows *= tl.load(weight_ptr + n * k + j, mask=live_n, other=0.0).to(tl.float32)[:, None]
            acc += rows
        tl.store(out_ptr + n[:, None].to(tl.int64) * dim + d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=live_n[:, None] & live_d[None, :])

    @triton.jit
    def _combine_backward_kernel(grad_ptr, out_ptr, index_ptr, weight_ptr, grad_out_ptr, grad_weight_ptr, num_rows,
                                 dim, k, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live_n = n < num_rows
        slot = tl.arange(0, BLOCK_K)
        dots = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            live = live_n[:, None] & (d < dim)[None, :]
            g = tl.load(grad_ptr + n[:, None].to(tl.int64) * dim + d[None, :], mask=live, other=0.0).to(tl.float32)
            for j in range(k):
                row = tl.load(index_ptr + n * k + j, mask=live_n, other=0).to(tl.int64)
                w = tl.load(weight_ptr + n * k + j, mask=live_n, other=0.0).to(tl.float32)
                o = tl.load(out_ptr + row[:, None] * dim + d[None, :], mask=live, other=0.0).to(tl.float32)
                dots += tl.where(slot[None, :] == j, tl.sum(o * g, axis=1)[:, None], 0.0)
                tl.store(grad_out_ptr + row[:, None] * dim + d[None, :],
                         (w[:, None] * g).to(grad_out_ptr.dtype.element_ty), mask=live)
        tl.store(grad_weight_ptr + n[:, None] * k + slot[None, :], dots.to(grad_weight_ptr.dtype.element_ty),
                 mask=live_n[:, None] & (slot < k)[None, :])


def _block_d(dim: int) -> int:
    return min(256, max(16, triton.next_power_of_2(dim)))


def gather_sum(src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y[n] = sum_j weight[n, j] * src[index[n, j]]`` for src [R, dim], index [N, k] (``R``: a zero row) and
    weight [N, k] (None: 1), accumulated in float32; y [N, dim] in ``out_dtype`` (default src's)."""
    num_rows, k = index.shape
    out = torch.empty(num_rows, src.shape[1], device=src.device, dtype=out_dtype or src.dtype)
    if num_rows == 0:
        return out
    src, index = src.contiguous(), index.contiguous()
    weight = weight.contiguous() if weight is not None else index  # unread without a weight
    block_d = _block_d(src.shape[1])
    grid = (triton.cdiv(num_rows, BLOCK_ROWS), triton.cdiv(src.shape[1], block_d))
    _gather_sum_kernel[grid](src, index, weight, out, num_rows, src.shape[0], src.shape[1], k,
                             HAS_WEIGHT=weight is not index, BLOCK_N=BLOCK_ROWS, BLOCK_D=block_d, num_warps=4)
    return out


def combine_backward(grad: torch.Tensor, out: torch.Tensor, index: torch.Tensor,
                     weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``y = gather_sum(out, index, weight)`` when the indexed rows are distinct (or, where they
    repeat, carry weight 0 and a zero row of ``out``): ``(grad_out [R, dim] in out's dtype, zero in rows no index
    names; grad_weight [N, k] in weight's dtype)``."""
    num_rows, k = index.shape
    grad_out = torch.zeros_like(out)
    grad_weight = torch.empty(num_rows, k, device=out.device, dtype=weight.dtype)
    if num_rows == 0:
        return grad_out, grad_weight
    grad, out, index, weight = grad.contiguous(), out.contiguous(), index.contiguous(), weight.contiguous()
    _combine_backward_kernel[(triton.cdiv(num_rows, BLOCK_ROWS),)](
        grad, out, index, weight, grad_out, grad_weight, num_rows, out.shape[1], k, BLOCK_N=BLOCK_ROWS,
        BLOCK_D=_block_d(out.shape[1]), BLOCK_K=max(2, triton.next_power_of_2(k)), num_warps=4)
    return grad_out, grad_weight
