"""Checks of the MoE permutation kernels (:mod:`layers.moe.kernels`) against torch ops, shared by the GPU test and
a CPU run under Triton's interpreter (``python moe_kernel_checks.py`` with TRITON_INTERPRET=1, started by
``test_moe_kernels.py`` in a subprocess: the variable must be set before triton is imported). Triton's interpreter
computes bfloat16 wrongly (numpy has none), so bfloat16 runs on the GPU only."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from layers.moe import kernels  # noqa: E402
from layers.moe.experts import Combine  # noqa: E402

# against float32 references on the same (rounded) inputs, relative to the scale
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool((got.float() - want.float()).abs().max() <= TOL[dtype] * want.float().abs().max().clamp(min=1e-6))


def check_gather_sum(device: str, dtype: torch.dtype, num_src: int, num_rows: int, k: int, dim: int, seed: int = 0) -> None:
    """Weighted and unweighted sums of k gathered rows, indices equal to num_src reading zeros."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(num_src, dim, generator=g).to(device, dtype)
    index = torch.randint(0, num_src + 1, (num_rows, k), generator=g).to(device)
    weight = torch.rand(num_rows, k, generator=g).to(device)
    padded = torch.cat([src.float(), src.new_zeros(1, dim).float()])
    for w in (weight, None):
        want = (padded[index] * (w[..., None] if w is not None else 1.0)).sum(1)
        got = kernels.gather_sum(src, index, w)
        assert got.dtype == dtype and got.shape == (num_rows, dim)
        assert close(got, want, dtype), (got.float() - want).abs().max()
    assert kernels.gather_sum(src, index[:0]).shape == (0, dim)


def check_combine_backward(device: str, dtype: torch.dtype, num_rows: int, k: int, dim: int, seed: int = 0) -> None:
    """The kernel's gradients equal autograd's through the torch combine (a bmm over gathered rows): each token's
    k slots distinct buffer rows, a few dropped (weight 0, the shared zero last row), some buffer rows unused."""
    g = torch.Generator().manual_seed(seed)
    extra = 5
    slots = torch.randperm(num_rows * k + extra, generator=g)[: num_rows * k].view(num_rows, k)
    weight = torch.rand(num_rows, k, generator=g)
    dropped = torch.rand(num_rows, k, generator=g) < 0.2
    slots[dropped], weight[dropped] = num_rows * k + extra, 0.0  # the zero row past the others
    out = torch.randn(num_rows * k + extra + 1, dim, generator=g)
    out[-1] = 0
    grad = torch.randn(num_rows, dim, generator=g)
    out, weight, slots, grad = out.to(device, dtype), weight.to(device), slots.to(device), grad.to(device, dtype)
    ref_out, ref_weight = out.float().clone().requires_grad_(), weight.clone().requires_grad_()
    torch.autograd.backward(torch.bmm(ref_weight.unsqueeze(1), ref_out[slots]).squeeze(1), grad.float())
    grad_out, grad_weight = kernels.combine_backward(grad, out, slots, weight)
    assert grad_out.dtype == dtype and grad_weight.dtype == torch.float32
    assert close(grad_out, ref_out.grad, dtype) and close(grad_weight, ref_weight.grad, dtype)
    unused = torch.ones(out.shape[0], dtype=torch.bool, device=device)
    unused[slots.flatten()] = False
    assert (grad_out[unused] == 0).all()
    if not kernels.supports(out):  # the interpreter run also checks the autograd function's kernel path by hand
        return
    leaf_out, leaf_weight = out.clone().requires_grad_(), weight.clone().requires_grad_()
    y = Combine.apply(leaf_out, leaf_weight, slots)
    y.backward(grad)
    assert close(y, torch.bmm(weight.unsqueeze(1), out.float()[slots]).squeeze(1), dtype)
    assert close(leaf_out.grad, ref_out.grad, dtype) and close(leaf_weight.grad, ref_weight.grad, dtype)


CASES = [(37, 21, 2, 96), (8, 5, 1, 16), (90, 12, 6, 260)]  # (num_src, num_rows, k, dim): dim over one block


def run_interpreted() -> None:
    for dtype in (torch.float32, torch.float16):
        for i, (num_src, num_rows, k, dim) in enumerate(CASES):
            check_gather_sum("cpu", dtype, num_src, num_rows, k, dim, seed=i)
            check_combine_backward("cpu", dtype, num_rows, k, dim, seed=i)
    print(f"{4 * len(CASES)} interpreted checks passed")


if __name__ == "__main__":
    run_interpreted()
