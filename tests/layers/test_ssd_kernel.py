"""The Mamba-2 SSD kernels (layers.ssd_kernel) against the float64 reference: on the CPU under Triton's interpreter
and on CUDA; Mamba2's backend choice, its errors and its fallback."""
from __future__ import annotations

import pytest
import torch

from layers import linear_attention, ssd_kernel
from layers.mamba2 import Mamba2
from ssd_kernel_checks import CASES, check, check_custom_ops, check_mixer
from triton_interpreter import needs_triton, run_interpreted


@needs_triton
def test_kernels_under_the_interpreter_match_the_reference():
    """float32 and float16, forward and every gradient: one token, T off the chunk, shared groups, headdim and
    d_state off the powers of two, three chunk sizes, torch.compile (aot_eager), opcheck on the custom ops, and the
    Mamba2 mixer with and without padding."""
    assert f"{2 * len(CASES) + 4} interpreted checks passed" in run_interpreted("ssd_kernel_checks.py")


def test_auto_runs_the_torch_path_on_cpu():
    torch.manual_seed(0)
    auto = Mamba2(32, 1, d_state=16, headdim=16, chunk_size=16)
    torch_path = Mamba2(32, 1, d_state=16, headdim=16, chunk_size=16, backend="torch")
    torch_path.load_state_dict(auto.state_dict())
    x = torch.randn(2, 9, 32)
    assert auto.backend == "auto" and not ssd_kernel.supports(x, 16)
    torch.testing.assert_close(auto(x), torch_path(x), rtol=0, atol=0)


def test_bad_backends_are_refused():
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton"):
        Mamba2(32, 1, backend="cuda")
    m = Mamba2(32, 1, d_state=16, headdim=16, chunk_size=16, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA"):
        m(torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA"):
        Mamba2(32, 1, d_state=16, headdim=16, chunk_size=8, backend="triton").double()(torch.randn(1, 4, 32).double())


def test_a_failing_kernel_falls_back_once_with_a_warning(monkeypatch):
    """auto: the torch path's result and one warning; triton: the error."""
    torch.manual_seed(0)
    m = Mamba2(32, 1, d_state=16, headdim=16, chunk_size=16)
    x = torch.randn(2, 9, 32)
    want = Mamba2(32, 1, d_state=16, headdim=16, chunk_size=16, backend="torch")
    want.load_state_dict(m.state_dict())
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(linear_attention, "_KERNEL_FAILED", set())
    monkeypatch.setattr(ssd_kernel, "supports", lambda x, chunk_size: True)
    monkeypatch.setattr(ssd_kernel, "fused_ssd", broken)
    with pytest.warns(RuntimeWarning, match="Mamba-2 SSD kernels failed .* out of resources"):
        torch.testing.assert_close(m(x), want(x))
    torch.testing.assert_close(m(x), want(x))  # no second attempt
    assert len(calls) == 1
    m.backend = "triton"
    with pytest.raises(RuntimeError, match="out of resources"):
        m(x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_on_cuda_match_the_reference(dtype):
    for i, case in enumerate(CASES):
        check("cuda", dtype, case, seed=i)
    check("cuda", dtype, (2, 1000, 24, 64, 1, 128, 64, True, True), seed=11)  # lm-125m-mamba2's layer shape


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixer_on_cuda_matches_the_torch_path(dtype):
    for ngroups in (1, 2):
        check_mixer("cuda", dtype, ngroups)


@pytest.mark.gpu
def test_kernels_inside_an_inductor_graph():
    check("cuda", torch.bfloat16, CASES[1], seed=3, compile_backend="inductor")
    check_custom_ops("cuda")
