"""The fused SwiGLU activation (layers.swiglu) against its reference: on the CPU under Triton's interpreter and on
CUDA; the dispatcher's choices and errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers import swiglu as swiglu_module
from layers.mlp import SwiGLU
from layers.swiglu import naive_swiglu, supports, swiglu
from swiglu_checks import CASES, check
from triton_interpreter import needs_triton, run_interpreted


@needs_triton
def test_kernels_under_the_interpreter_match_the_reference():
    """float32 and float16, forward and backward: one row, rows and hidden off the blocks, a 3-D input."""
    assert f"{2 * len(CASES)} interpreted checks passed" in run_interpreted("swiglu_checks.py")


def test_reference_is_silu_gate_times_up():
    h = torch.randn(3, 10, dtype=torch.float64)
    assert torch.equal(naive_swiglu(h), F.silu(h[:, :5]) * h[:, 5:])


def test_cpu_runs_the_reference():
    h = torch.randn(4, 8, requires_grad=True)
    assert not supports(h)
    assert swiglu(h).grad_fn.name() == "MulBackward0"


def test_odd_width_is_refused():
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu(torch.randn(2, 7))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_on_cuda_match_the_reference(dtype):
    for i, (lead, hidden) in enumerate(CASES):
        check("cuda", dtype, lead, hidden, seed=i)
    check("cuda", dtype, (4096,), 2752, seed=9)


@pytest.mark.gpu
def test_mlp_takes_the_kernels_on_cuda_and_matches_the_reference(monkeypatch):
    torch.manual_seed(0)
    mlp = SwiGLU(64, 96).cuda()
    x = torch.randn(2, 9, 64, device="cuda")

    def run():
        y = mlp(x)
        y.square().sum().backward()
        grads = [p.grad.clone() for p in mlp.parameters()]
        mlp.zero_grad()
        return y, grads

    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = mlp.w12(x)
    assert supports(h) and swiglu(h.detach().requires_grad_()).grad_fn.name().endswith("_SwiGLUBackward")
    y, grads = run()
    monkeypatch.setattr(swiglu_module, "supports", lambda t: False)
    y_ref, grads_ref = run()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
