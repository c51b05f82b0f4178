"""Stacked expert MLPs and the ways to run them over routed tokens.

Expert weights are stored stacked, ``w_in: [E, dim, width * hidden]`` and ``w_out: [E, hidden, dim]``
(``x @ W`` layout), each initialised like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)).

Implementations (each returns the sum over assignments of ``weight * expert(x[token])``: in float32, except
grouped_mm with token-choice routing, which combines in x's dtype with float32 accumulation):

* ``loop``: the per-expert reference (as HF Mixtral): gather an expert's tokens, run it, index_add back.
  One host sync per expert.
* ``grouped_mm``: sort assignments by expert into one buffer and run one grouped GEMM per weight
  (``F.grouped_mm``, else ``torch._grouped_mm``). No host sync of our own (CUDA's fast bf16 kernel
  on sm90+ needs none; torch's fallback for other dtypes/devices copies the offsets to the host).
  With token-choice routing (k assignments per token) the permutation into the buffer and the weighted
  combine are custom autograd functions whose backward passes gather instead of scatter-adding.
* ``auto``: ``grouped_mm`` where it runs (see :func:`grouped_mm_unsupported`), else ``loop``.

grouped_mm constraints (checked in torch 2.14 source and by experiment on CPU): offsets are int32
cumulative row counts; dtypes float32/bfloat16/float16 (bfloat16 only for CUDA's fused kernel, others
run torch's per-group loop); every row stride must be a multiple of 16 bytes, so ``dim`` and ``hidden``
must be multiples of 16 / element_size; CUDA's kernel also wants each group's row count to be a
multiple of 16 bytes along the contraction of the weight-gradient GEMM. We pad every group to a
multiple of ``GROUP_ALIGN`` rows (and at least one block, so no expert ever has an empty group) and let
the last group run to the end of the buffer, so every output row is defined.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.moe import kernels
from layers.moe.routing import Routing
from layers.registry import Registry
from layers.swiglu import swiglu

GROUPED_MM: Callable | None = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUP_ALIGN = 16  # rows per padded group block: 16 bytes of any dtype down to fp8


@dataclass(frozen=True)
class ExpertSpec:
    width: int                        # in-projection width, in multiples of hidden
    activation: Callable[[Tensor], Tensor]


EXPERTS = Registry("moe expert")
EXPERTS.register("swiglu", ExpertSpec(2, swiglu))  # same gate/up split as layers.mlp.SwiGLU
EXPERTS.register("gelu", ExpertSpec(1, F.gelu))


class StackedExperts(nn.Module):
    """E bias-free MLPs ``act(x @ w_in[e]) @ w_out[e]`` kept as two stacked parameters."""

    def __init__(self, num_experts: int, dim: int, hidden: int, spec: ExpertSpec):
        super().__init__()
        self.num_experts, self.dim, self.hidden, self.spec = num_experts, dim, hidden, spec
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, spec.width * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))

    def expert(self, x: Tensor, e: int) -> Tensor:
        """Expert e on rows ``x``, its weights cast to x's dtype (bf16 under autocast)."""
        return self.spec.activation(x @ self.w_in[e].to(x.dtype)) @ self.w_out[e].to(x.dtype)

    def grouped(self, x: Tensor, offs: Tensor) -> Tensor:
        """Rows ``offs[e-1]:offs[e]`` of ``x`` go through expert e (weights cast to x's dtype)."""
        hidden = GROUPED_MM(x, self.w_in.to(x.dtype), offs=offs)
        return GROUPED_MM(self.spec.activation(hidden), self.w_out.to(x.dtype), offs=offs)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}"


@functools.lru_cache(maxsize=None)
def _grouped_mm_runs(device: str, dtype: torch.dtype) -> bool:
    """Try a tiny aligned grouped GEMM once per (device, dtype): support varies across torch builds."""
    try:
        a = torch.zeros(GROUP_ALIGN, GROUP_ALIGN, dtype=dtype, device=device)
        b = torch.zeros(1, GROUP_ALIGN, GROUP_ALIGN, dtype=dtype, device=device)
        GROUPED_MM(a, b, offs=torch.tensor([GROUP_ALIGN], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def grouped_mm_unsupported(x: Tensor, experts: StackedExperts) -> str | None:
    """Why ``grouped_mm`` cannot run this input, or None when it can."""
    if GROUPED_MM is None:
        return f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
    if x.dtype not in GROUPED_MM_DTYPES:
        return f"it takes float32, bfloat16 or float16 inputs (got {x.dtype})"
    row_bytes = {name: size * x.element_size() for name, size in
                 (("dim", experts.dim), ("hidden", experts.hidden), ("w_in width", experts.w_in.shape[-1]))}
    misaligned = [name for name, nbytes in row_bytes.items() if nbytes % 16]
    if misaligned:
        return f"{', '.join(misaligned)} must be a multiple of {16 // x.element_size()} for {x.dtype} (16-byte rows)"
    if not _grouped_mm_runs(str(x.device), x.dtype):
        return f"grouped_mm does not run on {x.device} with {x.dtype} in torch {torch.__version__}"
    return None


def run_loop(experts: StackedExperts, x: Tensor, routing: Routing) -> Tensor:
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(experts.num_experts):
        sel = torch.nonzero((routing.expert == e) & routing.kept).squeeze(-1)
        if sel.numel() == 0:
            continue
        token = routing.token[sel]
        y.index_add_(0, token, experts.expert(x[token], e).float() * routing.weight[sel, None])
    return y


class Dispatch(torch.autograd.Function):
    """``buffer[r] = x[source[r]]`` (``source == N``: a zero row). Token-choice routing only: each token's
    assignments sit in the buffer rows ``slots[n]`` (``[N, k]``), so the backward sums those k rows by a gather
    instead of autograd's accumulating scatter (a sort, or atomics). A dropped assignment's slot is the shared
    zero row, whose gradient is exactly 0 (see :class:`Combine`), so it adds nothing. (``F.embedding_bag`` would
    skip the [N, k, dim] copy but is 1.9-2.5x slower on an H200.) On CUDA both directions are Triton row gathers
    (:mod:`layers.moe.kernels`: no padded copy of x, no [N, k, dim] intermediate)."""

    @staticmethod
    def forward(ctx, x: Tensor, source: Tensor, slots: Tensor) -> Tensor:
        ctx.save_for_backward(slots)
        if kernels.supports(x):
            return kernels.gather_sum(x, source[:, None])
        return F.pad(x, (0, 0, 0, 1)).index_select(0, source)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (slots,) = ctx.saved_tensors
        if kernels.supports(grad):
            return kernels.gather_sum(grad, slots), None, None
        return grad[slots].sum(1), None, None


class Combine(torch.autograd.Function):
    """``y[n] = sum_j weight[n, j] * out[slots[n, j]]``: a batched GEMM in ``out``'s dtype with float32
    accumulation (the weights rounded to that dtype, as HF Mixtral and torchtitan combine). The kept slots are
    distinct rows of ``out``, so the backward writes ``out``'s gradient with a plain row copy (``index_copy_``,
    ~30% faster than an indexed assignment on an H200); dropped assignments have weight 0 and share one zero
    row, whose gradient is then exactly 0. On CUDA: Triton kernels (:mod:`layers.moe.kernels`), the weighted sum
    in float32 from float32 weights, and both gradients in one pass over the rows."""

    @staticmethod
    def forward(ctx, out: Tensor, weight: Tensor, slots: Tensor) -> Tensor:
        ctx.save_for_backward(out, weight, slots)
        if kernels.supports(out):
            return kernels.gather_sum(out, slots, weight)
        return torch.bmm(weight.to(out.dtype).unsqueeze(1), out[slots]).squeeze(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out, weight, slots = ctx.saved_tensors
        if kernels.supports(out):
            grad_out, grad_weight = kernels.combine_backward(grad, out, slots, weight)
            return grad_out, grad_weight, None
        grad_out = grad_weight = None
        if ctx.needs_input_grad[0]:
            rows = (weight.to(out.dtype).unsqueeze(-1) * grad.unsqueeze(1)).flatten(0, 1)
            grad_out = out.new_zeros(out.shape).index_copy_(0, slots.reshape(-1), rows)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.bmm(out[slots], grad.unsqueeze(-1)).squeeze(-1).to(weight.dtype)
        return grad_out, grad_weight, None


def run_grouped(experts: StackedExperts, x: Tensor, routing: Routing) -> Tensor:
    reason = grouped_mm_unsupported(x, experts)
    if reason is not None:
        raise ValueError(f"implementation='grouped_mm' cannot run here: {reason}. "
                         "Use implementation='auto' (falls back to the loop) or 'loop'.")
    num_tokens, num_experts, align = x.shape[0], experts.num_experts, GROUP_ALIGN
    expert, kept, drops = routing.expert, routing.kept, routing.drops
    # Group e holds its kept assignments (rank order), padded to >= 1 whole block of `align` rows.
    padded = (routing.kept_counts + align - 1).div(align, rounding_mode="floor").clamp(min=1) * align
    group_end = padded.cumsum(0)
    # Static bound on the buffer (no host sync): sum(padded) <= A + E * align, plus one row for drops.
    rows = math.ceil((expert.numel() + num_experts * align + 1) / align) * align
    # The last group runs to the end. (Neither a tensor built from a Python list nor an indexed assignment of the
    # Python int: both copy from the host, which waits for the stream.)
    offs = torch.cat([group_end[:-1], group_end.new_full((1,), rows)]).to(torch.int32)
    position = (group_end - padded)[expert] + routing.rank
    # Dropped assignments read the last row, which only ever holds zeros: a bias-free MLP maps it to 0.
    if drops:
        position = torch.where(kept, position, rows - 1)
    source = torch.full((rows,), num_tokens, dtype=torch.long, device=x.device)
    source = source.scatter(0, position, torch.where(kept, routing.token, num_tokens) if drops else routing.token)
    if routing.per_token is None:  # expert choice: a token has any number of assignments
        out = experts.grouped(F.pad(x, (0, 0, 0, 1))[source], offs)  # row num_tokens of the padded x is zero
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return y.index_add_(0, routing.token, out[position].float() * routing.weight[:, None])
    slots = position.view(num_tokens, -1)  # token-major: [N, k]
    weight = routing.weight.view(num_tokens, -1)
    out = experts.grouped(Dispatch.apply(x, source, slots), offs)
    return Combine.apply(out, weight * kept.view(num_tokens, -1) if drops else weight, slots)


def run_auto(experts: StackedExperts, x: Tensor, routing: Routing) -> Tensor:
    run = run_grouped if grouped_mm_unsupported(x, experts) is None else run_loop
    return run(experts, x, routing)


IMPLEMENTATIONS = Registry("moe implementation")
IMPLEMENTATIONS.register("auto", run_auto)
IMPLEMENTATIONS.register("grouped_mm", run_grouped)
IMPLEMENTATIONS.register("loop", run_loop)
