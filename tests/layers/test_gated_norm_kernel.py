"""The gated RMSNorm kernels (layers.gated_norm_kernel) against the float64 reference: on the CPU under
Triton's interpreter and on CUDA; their bad-input errors."""
from __future__ import annotations

import pytest
import torch

from gated_norm_kernel_checks import CASES, check, check_compiled, check_custom_ops
from layers import gated_norm_kernel
from triton_interpreter import needs_triton, run_interpreted


@needs_triton
def test_kernels_under_the_interpreter_match_the_reference():
    """float32 and float16, output and every gradient: one row, rows off the tile and the span, a group size off
    the powers of two, two groups, a strided z; opcheck on the custom ops; torch.compile (aot_eager, fullgraph)."""
    assert f"{2 * len(CASES) + 2} interpreted checks passed" in run_interpreted("gated_norm_kernel_checks.py")


def test_cpu_tensors_are_not_taken_and_bad_shapes_are_refused():
    assert not gated_norm_kernel.supports(torch.randn(2, 8))
    with pytest.raises(ValueError, match="group_size"):
        gated_norm_kernel.gated_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), 3)
    with pytest.raises(ValueError, match="one shape"):
        gated_norm_kernel.gated_rms_norm(torch.randn(2, 8), torch.randn(2, 6), torch.ones(8), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_on_cuda_match_the_reference(dtype):
    for case in CASES:
        check(case, dtype, "cuda")


@pytest.mark.gpu
def test_kernels_inside_an_inductor_graph():
    check_compiled("cuda")
    check_custom_ops("cuda")
