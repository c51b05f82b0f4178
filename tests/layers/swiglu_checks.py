"""Checks of the fused SwiGLU kernels (:mod:`layers.swiglu`) against a float64 reference, shared by the GPU test
and a CPU run under Triton's interpreter (``python swiglu_checks.py`` with TRITON_INTERPRET=1, started by
``test_swiglu.py`` in a subprocess: the variable must be set before triton is imported). Triton's interpreter
computes bfloat16 wrongly (numpy has none), so bfloat16 runs on the GPU only."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from layers.swiglu import fused_swiglu, naive_swiglu  # noqa: E402

# against float64 on the same (rounded) inputs, relative to the scale: one rounding of the output
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# leading shape, hidden: one row; rows and hidden off the blocks (8 x 512); hidden over one block; 3-D input
CASES = (((1,), 4), ((7,), 3), ((33,), 700), ((2, 5), 1030), ((64,), 512))


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()


def check(device: str, dtype: torch.dtype, lead: tuple[int, ...], hidden: int, seed: int = 0) -> None:
    """Output, input gradient and dtype of the kernels against naive_swiglu in float64; the kernels' error is at
    most the tolerance of one rounding and no worse than 2x the rounded torch path's own."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*lead, 2 * hidden, generator=g) * 3).to(device, dtype)
    dy = torch.randn(*lead, hidden, generator=g).to(device, dtype)
    h64 = h.double().requires_grad_()
    want = naive_swiglu(h64)
    (want_grad,) = torch.autograd.grad(want, h64, dy.double())
    leaf = h.clone().requires_grad_()
    got = fused_swiglu(leaf)
    got.backward(dy)
    assert got.dtype == dtype and got.shape == (*lead, hidden) and leaf.grad.dtype == dtype
    ref = h.clone().requires_grad_()
    rounded = naive_swiglu(ref)
    rounded.backward(dy)
    for name, out, torch_out, exact in (("output", got, rounded, want), ("gradient", leaf.grad, ref.grad, want_grad)):
        err, torch_err = error(out, exact), error(torch_out, exact)
        assert err <= TOL[dtype], f"{name} {dtype} {lead} {hidden}: error {err:.2e} > {TOL[dtype]:.0e}"
        assert err <= 2 * torch_err + TOL[torch.float32], f"{name}: error {err:.2e} vs torch's {torch_err:.2e}"


def run_interpreted() -> None:
    count = 0
    for dtype in (torch.float32, torch.float16):
        for i, (lead, hidden) in enumerate(CASES):
            check("cpu", dtype, lead, hidden, seed=i)
            count += 1
    print(f"{count} interpreted checks passed")


if __name__ == "__main__":
    run_interpreted()
