"""The causal conv + SiLU kernels (layers.causal_conv_kernel) against the float64 reference: on the CPU under
Triton's interpreter and on CUDA; their bad-input errors."""
from __future__ import annotations

import pytest
import torch

from causal_conv_kernel_checks import CASES, check, check_compiled, check_custom_ops
from layers import causal_conv_kernel
from triton_interpreter import needs_triton, run_interpreted


@needs_triton
def test_kernels_under_the_interpreter_match_the_reference():
    """float32 and float16, forward and every gradient: one token, T shorter than K, T and C off the blocks, K = 2,
    no bias, the conv without SiLU, torch.compile (aot_eager, fullgraph), and opcheck on the custom ops."""
    assert f"{2 * len(CASES) + 2} interpreted checks passed" in run_interpreted("causal_conv_kernel_checks.py")


def test_cpu_tensors_are_not_taken_and_bad_shapes_are_refused():
    assert not causal_conv_kernel.supports(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="depthwise weight"):
        causal_conv_kernel.conv1d_silu(torch.randn(1, 4, 8), torch.randn(6, 1, 4))
    with pytest.raises(ValueError, match="x \\[B, T, C\\]"):
        causal_conv_kernel.conv1d_silu(torch.randn(4, 8), torch.randn(8, 1, 4))
    with pytest.raises(ValueError, match="bias must be \\[C\\] = \\[8\\]"):
        causal_conv_kernel.conv1d_silu(torch.randn(1, 4, 8), torch.randn(8, 1, 4), torch.randn(6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_on_cuda_match_the_reference(dtype):
    for case in CASES:
        check(case, dtype, "cuda")


@pytest.mark.gpu
def test_kernels_inside_an_inductor_graph():
    check_compiled("cuda")
    check_custom_ops("cuda")
