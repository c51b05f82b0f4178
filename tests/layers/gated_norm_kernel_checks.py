"""Checks of the gated RMSNorm kernels (:mod:`layers.gated_norm_kernel`) against :class:`layers.mamba2.GatedRMSNorm`
in float64, shared by the GPU tests and a CPU run under Triton's interpreter (``python gated_norm_kernel_checks.py``
with TRITON_INTERPRET=1, started by ``test_gated_norm_kernel.py`` in a subprocess). The interpreter computes
bfloat16 wrongly (numpy has none), so bfloat16 runs on the GPU only."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from layers.gated_norm_kernel import ROWS_PER_SPAN, gated_rms_norm  # noqa: E402
from layers.mamba2 import GatedRMSNorm  # noqa: E402
from triton_interpreter import check_compiled_like_eager  # noqa: E402

FLOAT32_TOL = 1e-5
RATIO, FLOOR = 2.0, 1e-3

# (leading shape, D, group_size, z strided): one row; rows off the tile and the span; a group size off the powers
# of two; two groups; z a column slice of a wider tensor (as Mamba-2's in-projection output)
CASES = (
    ((1, 1), 16, 16, False),
    ((2, 37), 48, 24, True),
    ((3, ROWS_PER_SPAN + 5), 64, 32, True),
    ((2 * ROWS_PER_SPAN + 3,), 40, 40, False),
)


def inputs(case, device, seed):
    lead, D, _, strided = case
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(*lead, D, generator=g)
    wide = torch.randn(*lead, 2 * D + 3, generator=g)
    z = wide[..., D + 1:2 * D + 1] if strided else wide[..., :D].contiguous()
    w = 1 + 0.5 * torch.randn(D, generator=g)
    dout = torch.randn(*lead, D, generator=g)
    return y.to(device), z.to(device), w.to(device), dout.to(device)


def grads(fn, y, z, w, dout):
    leaves = [t.detach().requires_grad_() for t in (y, z, w)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def reference(group_size):
    """GatedRMSNorm's forward with ``w`` as its weight (gradients reach w)."""
    def fn(y, z, w):
        norm = GatedRMSNorm(w.shape[0], group_size).to(y.device)
        del norm.weight
        norm.weight = w
        return norm(y, z)
    return fn


def max_err(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def check(case, dtype, device):
    """Output and the gradients of y, z and the weight against float64; float32 within FLOAT32_TOL, lower precisions
    within RATIO x the torch module's own error on the same rounded inputs (float32 weight, as in a model)."""
    group_size = case[2]
    y, z, w, dout = inputs(case, device, seed=case[1] + len(case[0]))
    y, z = y.to(dtype), z.to(dtype)
    want = grads(reference(group_size), y.double(), z.double(), w.double(), dout.double())
    got = grads(lambda a, b, c: gated_rms_norm(a, b, c, group_size), y, z, w, dout)
    names = ["out", "dy", "dz", "dweight"]
    assert got[0].shape == y.shape
    if dtype == torch.float32:
        for name, g, r in zip(names, got, want):
            assert max_err(g, r) <= FLOAT32_TOL, (case, name, max_err(g, r))
        return
    torch_path = grads(reference(group_size), y, z, w, dout)
    for name, g, t, r in zip(names, got, torch_path, want):
        assert max_err(g, r) <= RATIO * max_err(t, r) + FLOOR, (case, name, max_err(g, r), max_err(t, r))


def check_custom_ops(device):
    """``torch.library.opcheck`` on the forward and backward ops, with z strided and contiguous."""
    from layers import gated_norm_kernel as K

    for case in (((2, 5), 48, 24, True), ((7,), 16, 16, False)):  # small: opcheck runs each op often
        y, z, w, dout = inputs(case, device, seed=2)
        args = (y.requires_grad_(), z.requires_grad_(), w.requires_grad_(), case[2], 1e-5)
        torch.library.opcheck(K._norm_forward, args)
        _, rstd = K._norm_forward(*args)
        torch.library.opcheck(K._norm_backward, (dout, y.detach(), z.detach(), w.detach(), rstd, case[2]))


def check_compiled(device):
    """Under torch.compile (aot_eager on CPU, inductor on CUDA) the custom ops give the eager kernels' results."""
    case = CASES[2]
    check_compiled_like_eager(grads, lambda a, b, c: gated_rms_norm(a, b, c, case[2]), *inputs(case, device, seed=3),
                              device=device)


if __name__ == "__main__":
    for case in CASES:
        for dtype in (torch.float32, torch.float16):
            check(case, dtype, "cpu")
    check_custom_ops("cpu")
    check_compiled("cpu")
    print(f"{2 * len(CASES) + 2} interpreted checks passed")
