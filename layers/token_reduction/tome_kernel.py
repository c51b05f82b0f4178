"""ToMe's matching and merge as two Triton kernels, for inference on CUDA.

The torch path (:func:`layers.token_reduction.tome.bipartite_soft_matching` and
:meth:`~layers.token_reduction.tome.Matching.merge_average`, the reference) takes ~40 launches a layer,
and at a ViT-B/16's batch 256 the eager model is then partly bound by launching them. Here:

* ``_match_kernel``, one program per image: normalises the metric, scores every A token (even positions)
  against every B token (odd) with ``tl.dot`` in the metric's precision and keeps each A token's best partner;
  merges the ``r`` A tokens with the best scores (above the r-th of the sorted scores; ties: the lower index
  first; the ``protected`` leading tokens, CLS and any distillation or register tokens, neither merge nor
  receive); numbers the tokens in order (a survivor's output row is the number of survivors before it, a
  merged A token takes its partner's row: :class:`~layers.token_reduction.tome.Matching`'s rows). It writes,
  per output row, its surviving token, that token's weight and the merged size, and the list of merged tokens
  with their rows and weights (weight: size / merged size of the row).
* ``_merge_kernel``, one program per (image, block of output rows, block of channels): gathers each row's
  survivor, scales it, and adds the merged tokens that land in the block (a small product with their one-hot
  weights), with the residual add before and a LayerNorm after fused in. It reads the tokens once and writes
  the merged ones once, accumulating in float32 (a merge GEMM would multiply mostly zeros).

Under ``TRITON_INTERPRET=1`` (set before triton is imported) both run on CPU tensors in Triton's
interpreter: slow, for tests.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from layers.triton_support import KERNEL_DTYPES, kernels_take, tl, triton

# the matching holds [N/2, D] tiles in one program: beyond this the torch path is used
MAX_TOKENS = 512


def supports(x: torch.Tensor, r: int, update: torch.Tensor | None = None) -> bool:
    """Whether :func:`merge` takes this merge of ``x`` (+ ``update``) [B, N, C]: CUDA, Triton present, 0 < r,
    N <= MAX_TOKENS, a float32 / bfloat16 / float16 dtype, and no gradient to carry (the kernels have no backward;
    training takes the torch path)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (update is not None and update.requires_grad))
    return kernels_take(x) and 0 < r and 2 < x.shape[1] <= MAX_TOKENS and not needs_grad


def fuses_norm(x: torch.Tensor, norm: nn.Module) -> bool:
    """Whether ``norm`` can run inside :func:`merge` on ``x``: an affine LayerNorm over the last dim in x's dtype,
    outside autocast (which would run it in float32), with no gradient to carry to its weights (no backward)."""
    return (isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (x.shape[-1],) and norm.weight is not None
            and norm.bias is not None and norm.weight.dtype == x.dtype and not torch.is_autocast_enabled(x.device.type)
            and not (torch.is_grad_enabled() and (norm.weight.requires_grad or norm.bias.requires_grad)))


if triton is not None:

    @triton.jit
    def _dot(a, b, dtype: tl.constexpr):
        """``a @ b`` (float32 inputs) on tensor cores: in ``dtype`` when it has 16 bits, else as tf32x3 (three
        tf32 products, about float32's accuracy; Triton's exact float32 dot runs on CUDA cores, ~5x slower here)."""
        if dtype == tl.float32:
            return tl.dot(a, b, input_precision="tf32x3")
        return tl.dot(a.to(dtype), b.to(dtype))

    @triton.jit
    def _match_kernel(metric_ptr, size_ptr, rows_ptr, new_size_ptr, kept_ptr, kept_w_ptr, gone_ptr, gone_row_ptr,
                      gone_w_ptr, N, C, r, num_out, protected, s_mb, s_mn, s_mc, s_sb, s_sn,
                      HAS_SIZE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK: tl.constexpr):
        b = tl.program_id(0)
        num_a, num_b = (N + 1) // 2, N // 2
        i = tl.arange(0, BLOCK_A)
        c = tl.arange(0, BLOCK_C)
        is_a, is_b = i < num_a, i < num_b
        base = metric_ptr + b * s_mb
        a = tl.load(base + (2 * i)[:, None] * s_mn + c[None, :] * s_mc, mask=is_a[:, None] & (c < C)[None, :],
                    other=0.0).to(tl.float32)
        a = a / tl.where(is_a, tl.sqrt(tl.sum(a * a, axis=1)), 1.0)[:, None]

        # each A token's best B partner
        best = tl.full([BLOCK_A], float("-inf"), tl.float32)
        partner = tl.zeros([BLOCK_A], tl.int32)
        for j0 in range(0, num_b, CHUNK):
            j = j0 + tl.arange(0, CHUNK)
            bm = tl.load(base + (2 * j + 1)[:, None] * s_mn + c[None, :] * s_mc,
                         mask=(j < num_b)[:, None] & (c < C)[None, :], other=0.0).to(tl.float32)
            bm = bm / tl.where(j < num_b, tl.sqrt(tl.sum(bm * bm, axis=1)), 1.0)[:, None]
            scores = _dot(a, tl.trans(bm), metric_ptr.dtype.element_ty)
            scores = tl.where(((j < num_b) & (2 * j + 1 >= protected))[None, :], scores, float("-inf"))
            chunk_best = tl.max(scores, axis=1)
            chunk_partner = tl.argmax(scores, axis=1, tie_break_left=True) + j0
            better = chunk_best > best
            best = tl.where(better, chunk_best, best)
            partner = tl.where(better, chunk_partner, partner)

        # the r best-matched A tokens merge away (protected tokens and padding rank last; ties: the lower index first)
        best = tl.where((2 * i >= protected) & is_a, best, float("-inf"))
        threshold = tl.sum(tl.where(i == r - 1, tl.sort(best, descending=True), 0.0))  # the r-th best score
        above = best > threshold
        tied = best == threshold
        merged = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= r - tl.sum(above.to(tl.int32))))
        kept_a = is_a & ~merged

        # output rows: survivors in order (B token i sits at position 2i + 1); a merged A token joins its partner's
        # row, read back from the rows written (the same program: a barrier orders the accesses)
        row_b = i + tl.cumsum(kept_a.to(tl.int32), axis=0)
        row_kept_a = row_b - 1
        rows = rows_ptr + b * N
        tl.store(rows + 2 * i + 1, row_b.to(tl.int64), mask=is_b)
        tl.debug_barrier()
        row_merged_a = tl.load(rows + 2 * partner + 1, mask=merged, other=0).to(tl.int32)
        tl.store(rows + 2 * i, tl.where(merged, row_merged_a, row_kept_a).to(tl.int64), mask=is_a)

        # merged sizes (accumulated in kept_w, float32) and weights: size / merged size of the row
        if HAS_SIZE:
            size_a = tl.load(size_ptr + b * s_sb + 2 * i * s_sn, mask=is_a, other=0.0).to(tl.float32)
            size_b = tl.load(size_ptr + b * s_sb + (2 * i + 1) * s_sn, mask=is_b, other=1.0).to(tl.float32)
        else:
            size_a = tl.where(is_a, 1.0, 0.0)
            size_b = tl.full([BLOCK_A], 1.0, tl.float32)
        out = b * num_out
        tl.store(kept_w_ptr + out + row_b, size_b, mask=is_b)
        tl.debug_barrier()
        tl.atomic_add(kept_w_ptr + out + row_merged_a, size_a, mask=merged)
        tl.debug_barrier()
        new_b = tl.load(kept_w_ptr + out + row_b, mask=is_b, other=1.0)
        merged_into = tl.load(kept_w_ptr + out + row_merged_a, mask=merged, other=1.0)
        tl.debug_barrier()
        tl.store(kept_ptr + out + row_kept_a, 2 * i, mask=kept_a)
        tl.store(kept_w_ptr + out + row_kept_a, tl.full([BLOCK_A], 1.0, tl.float32), mask=kept_a)
        tl.store(new_size_ptr + out + row_kept_a, size_a.to(new_size_ptr.dtype.element_ty), mask=kept_a)
        tl.store(kept_ptr + out + row_b, 2 * i + 1, mask=is_b)
        tl.store(kept_w_ptr + out + row_b, size_b / new_b, mask=is_b)
        tl.store(new_size_ptr + out + row_b, new_b.to(new_size_ptr.dtype.element_ty), mask=is_b)
        gone = b * r + tl.cumsum(merged.to(tl.int32), axis=0) - 1
        tl.store(gone_ptr + gone, 2 * i, mask=merged)
        tl.store(gone_row_ptr + gone, row_merged_a, mask=merged)
        tl.store(gone_w_ptr + gone, size_a / merged_into, mask=merged)

    @triton.jit
    def _merge_kernel(x_ptr, update_ptr, out_ptr, normed_ptr, norm_w_ptr, norm_b_ptr, kept_ptr, kept_w_ptr, gone_ptr,
                      gone_row_ptr, gone_w_ptr, C, r, num_out, eps, s_xb, s_xn, s_ub, s_un, s_ob, s_on,
                      HAS_UPDATE: tl.constexpr, NORM: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_R: tl.constexpr):
        b, ob, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        live_o, live_c = o < num_out, c < C
        x = x_ptr + b * s_xb + c[None, :]
        update = update_ptr + b * s_ub + c[None, :]
        src = tl.load(kept_ptr + b * num_out + o, mask=live_o, other=0).to(tl.int64)
        weight = tl.load(kept_w_ptr + b * num_out + o, mask=live_o, other=0.0)
        live = live_o[:, None] & live_c[None, :]
        acc = tl.load(x + src[:, None] * s_xn, mask=live, other=0.0).to(tl.float32)
        if HAS_UPDATE:
            acc += tl.load(update + src[:, None] * s_un, mask=live, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
        # the merged tokens landing in this block of rows, BLOCK_R at a time: [BLOCK_O, BLOCK_R] one-hot weights
        # times their [BLOCK_R, BLOCK_C] features
        for m0 in range(0, r, BLOCK_R):
            m = m0 + tl.arange(0, BLOCK_R)
            row = tl.load(gone_row_ptr + b * r + m, mask=m < r, other=-1)
            here = (row >= ob * BLOCK_O) & (row < ob * BLOCK_O + BLOCK_O)
            token = tl.load(gone_ptr + b * r + m, mask=here, other=0).to(tl.int64)
            here_c = here[:, None] & live_c[None, :]
            xm = tl.load(x + token[:, None] * s_xn, mask=here_c, other=0.0).to(tl.float32)
            if HAS_UPDATE:
                xm += tl.load(update + token[:, None] * s_un, mask=here_c, other=0.0).to(tl.float32)
            join = tl.where(o[:, None] == row[None, :], tl.load(gone_w_ptr + b * r + m, mask=here, other=0.0)[None, :], 0.0)
            acc += _dot(join, xm, x_ptr.dtype.element_ty)
        merged = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * s_ob + o[:, None] * s_on + c[None, :], merged, mask=live)
        if NORM:  # LayerNorm of the stored (rounded) tokens: the whole row is in this program
            h = tl.where(live_c[None, :], merged.to(tl.float32), 0.0)
            mean = tl.sum(h, axis=1) / C
            h = tl.where(live_c[None, :], h - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / C + eps)
            h = h * rstd[:, None] * tl.load(norm_w_ptr + c, mask=live_c, other=0.0).to(tl.float32)[None, :]
            h += tl.load(norm_b_ptr + c, mask=live_c, other=0.0).to(tl.float32)[None, :]
            tl.store(normed_ptr + b * s_ob + o[:, None] * s_on + c[None, :], h.to(normed_ptr.dtype.element_ty), mask=live)


class Merged(NamedTuple):
    """The outcome of :func:`merge`: ``x`` [B, N - r, C] (x's dtype), ``size`` [B, N - r, 1], ``rows`` [B, N] (the
    matching's output row per input token), ``normed`` (the LayerNorm of ``x``, when asked for)."""

    x: torch.Tensor
    size: torch.Tensor
    rows: torch.Tensor
    normed: torch.Tensor | None


def merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor | None, r: int, update: torch.Tensor | None = None,
          norm: nn.LayerNorm | None = None, protected: int = 1) -> Merged:
    """One ToMe step: bipartite soft matching of ``metric`` [B, N, D] merging ``r`` tokens of ``x + update``
    ([B, N, C] each; ``update`` optional) by size-weighted average. ``size`` [B, N, 1] or None (all 1); the new
    sizes come in its dtype (x's without one). ``norm``: a LayerNorm over C whose output on
    the merged tokens is returned too (in x's dtype, from the merged tokens as stored), fused into the same pass.
    ``protected``: the leading tokens that neither merge away nor receive merges (the CLS token, and any
    distillation or register tokens).

    As :meth:`~layers.token_reduction.tome.Matching.merge_average` of ``x + update`` (``rows``: the matching's)."""
    if triton is None:
        raise RuntimeError("tome_kernel.merge needs triton (shipped with torch's CUDA wheels)")
    batch, n, channels = x.shape
    if metric.shape[:2] != (batch, n):
        raise ValueError(f"metric must be [B, N, D] with [B, N] = {[batch, n]}, got {list(metric.shape)}")
    if protected < 1:
        raise ValueError(f"protected must be at least 1 (the CLS token), got {protected}")
    if not 0 < r <= (n - protected) // 2:
        raise ValueError(f"r must be in [1, (N - protected) // 2 = {(n - protected) // 2}], got {r}")
    if size is not None and size.shape != (batch, n, 1):
        raise ValueError(f"size must be [B, N, 1] = {[batch, n, 1]}, got {list(size.shape)}")
    if x.dtype not in KERNEL_DTYPES or metric.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x and metric must be float32, bfloat16 or float16, got {x.dtype} and {metric.dtype}")
    if update is not None and update.shape != x.shape:
        raise ValueError(f"update must have x's shape {list(x.shape)}, got {list(update.shape)}")
    if norm is not None and (norm.normalized_shape != (channels,) or norm.weight is None or norm.bias is None):
        raise ValueError(f"norm must be a LayerNorm over the {channels} channels with weight and bias, got {norm}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    update = update if update is None or update.stride(-1) == 1 else update.contiguous()
    num_out, device = n - r, x.device
    size_dtype = size.dtype if size is not None else x.dtype
    rows = torch.empty(batch, n, device=device, dtype=torch.long)
    new_size = torch.empty(batch, num_out, 1, device=device, dtype=size_dtype)
    kept = torch.empty(batch, num_out, device=device, dtype=torch.int32)
    kept_w = torch.empty(batch, num_out, device=device, dtype=torch.float32)
    gone = torch.empty(batch, r, device=device, dtype=torch.int32)
    gone_row = torch.empty(batch, r, device=device, dtype=torch.int32)
    gone_w = torch.empty(batch, r, device=device, dtype=torch.float32)
    sizes = size if size is not None else new_size  # unread without a size
    block_a = max(16, triton.next_power_of_2((n + 1) // 2))
    _match_kernel[(batch,)](metric, sizes, rows, new_size, kept, kept_w, gone, gone_row, gone_w, n, metric.shape[2], r,
                            num_out, protected, *metric.stride(), sizes.stride(0), sizes.stride(1), HAS_SIZE=size is not None,
                            BLOCK_A=block_a, BLOCK_C=max(16, triton.next_power_of_2(metric.shape[2])), CHUNK=32,
                            num_warps=8 if block_a >= 128 else 4)
    out = torch.empty(batch, num_out, channels, device=device, dtype=x.dtype)
    normed = None if norm is None else torch.empty_like(out)
    # with a norm one program holds whole rows
    block_c = triton.next_power_of_2(channels) if norm is not None else min(128, max(16, triton.next_power_of_2(channels)))
    block_o = 16 if norm is not None else 32
    grid = (batch, triton.cdiv(num_out, block_o), triton.cdiv(channels, block_c))
    upd = update if update is not None else x
    norm_w, norm_b = (x, x) if norm is None else (norm.weight, norm.bias)  # unread without a norm
    _merge_kernel[grid](x, upd, out, normed if normed is not None else out, norm_w, norm_b, kept, kept_w, gone, gone_row,
                        gone_w, channels, r, num_out, 0.0 if norm is None else norm.eps,
                        x.stride(0), x.stride(1), upd.stride(0), upd.stride(1), out.stride(0), out.stride(1),
                        HAS_UPDATE=update is not None, NORM=norm is not None, BLOCK_O=block_o, BLOCK_C=block_c, BLOCK_R=16,
                        num_warps=8)
    return Merged(out, new_size, rows, normed)
