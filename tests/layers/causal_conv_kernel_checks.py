"""Checks of the causal conv + SiLU kernels (:mod:`layers.causal_conv_kernel`) against the float64 reference
(:func:`layers.causal_conv.causal_conv1d` then SiLU), shared by the GPU tests and a CPU run under Triton's
interpreter (``python causal_conv_kernel_checks.py`` with TRITON_INTERPRET=1, started by
``test_causal_conv_kernel.py`` in a subprocess: the variable must be set before triton is imported). The
interpreter computes bfloat16 wrongly (numpy has none), so bfloat16 runs on the GPU only."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from layers.causal_conv import causal_conv1d  # noqa: E402
from layers.causal_conv_kernel import DPRE_TILE, FORWARD_TILE, DX_TILE, conv1d_silu  # noqa: E402
from triton_interpreter import check_compiled_like_eager  # noqa: E402

BLOCK_T = max(t.rows for t in (FORWARD_TILE, DPRE_TILE, DX_TILE))  # shapes off every kernel's tiles
BLOCK_C = max(t.channels for t in (FORWARD_TILE, DPRE_TILE, DX_TILE))

# float32: a few roundings of the float64 result (sums of K products); lower precisions: RATIO x the error of the
# torch path (F.conv1d and SiLU in the inputs' dtype) on the same rounded inputs, plus a small floor
FLOAT32_TOL = 1e-5
RATIO, FLOOR = 2.0, 1e-3

# (batch, T, channels, K, bias, silu): one token; T shorter than K; T and C off the blocks; several blocks of
# both; K = 2 and 4; no bias; the conv alone
CASES = (
    (1, 1, 8, 4, True, True),
    (2, 3, 20, 4, True, True),
    (2, BLOCK_T + 7, BLOCK_C + 5, 4, True, True),
    (1, 2 * BLOCK_T + 1, 2 * BLOCK_C, 2, False, True),
    (3, 50, 33, 4, True, False),
)


def inputs(case, device, seed):
    batch, T, C, K, bias, _ = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, C, generator=g)
    w = torch.randn(C, 1, K, generator=g) / K ** 0.5
    b = torch.randn(C, generator=g) if bias else None
    dy = torch.randn(batch, T, C, generator=g)
    return [t if t is None else t.to(device) for t in (x, w, b, dy)]


def reference(x, w, b, silu):
    """The torch path: the conv of :mod:`layers.causal_conv` on [B, C, T], then SiLU, back to [B, T, C]."""
    y = causal_conv1d(x.transpose(1, 2), w, b)[0]
    return (F.silu(y) if silu else y).transpose(1, 2)


def grads(fn, x, w, b, dy):
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    xl, wl, bl = leaves[0], leaves[1], leaves[2] if b is not None else None
    y = fn(xl, wl, bl)
    y.backward(dy.to(y.dtype))
    return [y.detach().double()] + [t.grad.double() for t in leaves]


def max_err(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def check(case, dtype, device):
    """Forward and every gradient of the kernels against float64; in float32 within FLOAT32_TOL, else within RATIO
    times the torch path's own error in ``dtype`` (x and dy rounded to it, float32 weights as in a model)."""
    silu = case[-1]
    x, w, b, dy = inputs(case, device, seed=case[1] * 7 + case[2])
    x = x.to(dtype)
    want = grads(lambda *a: reference(*a, silu), x.double(), w.double(), None if b is None else b.double(), dy.double())
    got = grads(lambda xl, wl, bl: conv1d_silu(xl, wl, bl, silu), x, w, b, dy)
    names = ["y", "dx", "dw", "dbias"]
    if dtype == torch.float32:
        for name, g, r in zip(names, got, want):
            assert max_err(g, r) <= FLOAT32_TOL, (case, name, max_err(g, r))
        return
    torch_path = grads(lambda xl, wl, bl: reference(xl, wl.to(dtype), None if bl is None else bl.to(dtype), silu),
                       x, w, b, dy)
    for name, g, t, r in zip(names, got, torch_path, want):
        assert max_err(g, r) <= RATIO * max_err(t, r) + FLOOR, (case, name, max_err(g, r), max_err(t, r))


def check_custom_ops(device):
    """``torch.library.opcheck`` on the forward and backward ops, with and without a bias: their schemas, autograd
    registration, and fake kernels whose shapes, dtypes and strides match the real outputs (what torch.compile's
    graphs are built from)."""
    from layers import causal_conv_kernel

    for case in ((1, 9, 20, 4, True, True), (1, 9, 20, 4, False, True)):  # small: opcheck runs each op often
        x, w, b, dy = inputs(case, device, seed=11)
        torch.library.opcheck(causal_conv_kernel._conv_forward, (x.requires_grad_(), w.requires_grad_(),
                                                                 None if b is None else b.requires_grad_(), True))
        torch.library.opcheck(causal_conv_kernel._conv_backward, (dy, x.detach(), w.detach(),
                                                                  None if b is None else b.detach(), True))


def check_compiled(device):
    """Under torch.compile (aot_eager on CPU, inductor on CUDA) the custom ops give the eager kernels' results."""
    check_compiled_like_eager(grads, lambda xl, wl, bl: conv1d_silu(xl, wl, bl), *inputs(CASES[2], device, seed=3),
                              device=device)


if __name__ == "__main__":
    for case in CASES:
        for dtype in (torch.float32, torch.float16):
            check(case, dtype, "cpu")
    check_compiled("cpu")
    check_custom_ops("cpu")
    print(f"{2 * len(CASES) + 2} interpreted checks passed")
