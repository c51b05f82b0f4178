"""The MoE permutation kernels (layers.moe.kernels) against torch ops: on the CPU under Triton's interpreter and
on CUDA, and the MoE layer taking them against its torch path."""
from __future__ import annotations

import pytest
import torch

from layers.moe import MoE, kernels
from moe_kernel_checks import CASES, check_combine_backward, check_gather_sum
from triton_interpreter import needs_triton, run_interpreted


@needs_triton
def test_kernels_under_the_interpreter_match_torch():
    """float32 and float16: weighted / unweighted gathered sums with zero rows, the combine's two gradients with
    dropped assignments and unused buffer rows, dims over one block."""
    assert "12 interpreted checks passed" in run_interpreted("moe_kernel_checks.py")


def test_cpu_tensors_take_the_torch_path():
    assert not kernels.supports(torch.randn(4, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_on_cuda_match_torch(dtype):
    for i, (num_src, num_rows, k, dim) in enumerate(CASES):
        check_gather_sum("cuda", dtype, num_src, num_rows, k, dim, seed=i)
        check_combine_backward("cuda", dtype, num_rows, k, dim, seed=i)
    check_gather_sum("cuda", dtype, 4096, 2048, 2, 1024, seed=7)
    check_combine_backward("cuda", dtype, 2048, 6, 1024, seed=8)


@pytest.mark.gpu
@pytest.mark.parametrize("top_k", [1, 2, 6])
def test_moe_layer_with_kernels_matches_its_torch_path(monkeypatch, top_k):
    """bf16 grouped_mm MoE with capacity drops: the kernels give the torch path's output and gradients (bf16
    error: both round the same expert outputs, the kernels sum them in float32)."""
    torch.manual_seed(0)
    moe = MoE(256, 512, 16, top_k=top_k, implementation="grouped_mm", capacity_factor=1.0).cuda().to(torch.bfloat16)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)

    def run():
        xr = x.clone().requires_grad_()
        y = moe(xr)[0]
        y.float().pow(2).mean().backward()
        grads = [xr.grad] + [p.grad.clone() for p in moe.parameters()]
        moe.zero_grad()
        return y, grads

    y, grads = run()
    monkeypatch.setattr(kernels, "supports", lambda t: False)
    y_ref, grads_ref = run()
    scale = y_ref.float().abs().max()
    assert (y.float() - y_ref.float()).abs().max() <= 2e-2 * scale
    for g, g_ref in zip(grads, grads_ref):  # top-1's router gradient is rounding noise (~1e-11): an absolute floor
        assert (g.float() - g_ref.float()).abs().max() <= 3e-2 * g_ref.float().abs().max() + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_layer_never_waits_for_the_gpu(capacity_factor):
    """The grouped_mm layer's forward and backward issue no host-device synchronisation (one per layer made an
    MoE LM's training step host-bound: a copy of the buffer's row count to the GPU waited for the stream)."""
    moe = MoE(256, 512, 16, top_k=2, implementation="grouped_mm", capacity_factor=capacity_factor).cuda().to(torch.bfloat16)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, aux = moe(x)  # first call: grouped_mm's one-off support probe and the kernels' first launches may sync
    (out.float().square().mean() + aux.loss).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, aux = moe(x)
        (out.float().square().mean() + aux.loss).backward()
        with pytest.raises(RuntimeError, match="synchroniz"):
            out.sum().item()  # the mode does catch a synchronisation
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and torch.isfinite(x.grad).all() and moe.experts.w_in.grad.abs().sum() > 0
