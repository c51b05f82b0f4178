"""Checks of the Mamba-2 SSD kernels (:mod:`layers.ssd_kernel`) against the float64 quadratic reference, shared by
the GPU tests and a CPU run under Triton's interpreter (``python ssd_kernel_checks.py`` with TRITON_INTERPRET=1,
started by ``test_ssd_kernel.py`` in a subprocess: the variable must be set before triton is imported). The
interpreter computes bfloat16 wrongly (numpy has none), so bfloat16 runs on the GPU only."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from layers.mamba2 import ssd_chunked, ssd_quadratic_ref  # noqa: E402
from layers.ssd_kernel import fused_ssd  # noqa: E402

# float32: exact dots, so a few roundings of the float64 result; lower precisions: at most RATIO x the error of
# the torch chunked path on the same rounded inputs (that path also multiplies in the inputs' dtype)
FLOAT32_TOL = 2e-5
RATIO = 2.0

# (batch, T, heads, headdim, groups, d_state, chunk, initial state, D): one token; T off the chunk; groups
# shared by 2 heads; headdim and d_state off the powers of two; several chunk sizes; mamba2's default shape
CASES = (
    (1, 1, 2, 16, 1, 16, 16, False, True),
    (2, 37, 4, 16, 2, 16, 16, True, True),
    (1, 70, 2, 32, 1, 32, 32, True, False),
    (1, 5, 2, 20, 2, 24, 16, True, True),
    (2, 130, 4, 64, 1, 128, 64, False, True),
)


def inputs(case, dtype, device, seed):
    batch, T, H, P, G, N, _, init, skip = case
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    x = r(batch, T, H, P)
    dt = F.softplus(r(batch, T, H) - 1)
    A = -(torch.rand(H, generator=g) * 4 + 0.1)  # decays from mild to strong within a chunk
    B, C = r(batch, T, G, N), r(batch, T, G, N)
    D = r(H) if skip else None
    S0 = r(batch, H, P, N) if init else None
    cast = lambda t, dt_: None if t is None else t.to(device=device, dtype=dt_)
    return [cast(x, dtype), cast(dt, torch.float32), cast(A, torch.float32), cast(B, dtype), cast(C, dtype),
            cast(D, torch.float32), cast(S0, torch.float32)]


def outputs_and_grads(fn, args, weights):
    """(y, final state, gradients of every given input) of ``sum(w_y * y) + sum(w_S * S)``."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in args]
    y, S = fn(*leaves)
    loss = (y.double() * weights[0]).sum() + (S.double() * weights[1]).sum()
    live = [t for t in leaves if t is not None]
    return [y, S, *torch.autograd.grad(loss, live)]


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.to(got.device)).abs().max() / want.abs().max().clamp(min=1e-12)).item()


def check(device: str, dtype: torch.dtype, case, seed: int = 0, compile_backend: str | None = None) -> None:
    """y, the final state and the gradients of x, dt, A, B, C (and D, the initial state) against the float64
    quadratic reference on the same rounded inputs."""
    chunk = case[6]
    args = inputs(case, dtype, device, seed)
    reference_args = [None if t is None else t.detach().double().cpu() for t in args]
    batch, T, H, P, G, N = case[:6]
    g = torch.Generator().manual_seed(seed + 1)
    weights = (torch.randn(batch, T, H, P, generator=g, dtype=torch.float64).to(device),
               torch.randn(batch, H, P, N, generator=g, dtype=torch.float64).to(device))
    kernels = lambda *a: fused_ssd(*a, chunk_size=chunk)
    if compile_backend is not None:
        kernels = torch.compile(kernels, backend=compile_backend, fullgraph=True)
    got = outputs_and_grads(kernels, args, weights)
    want = outputs_and_grads(ssd_quadratic_ref, reference_args, tuple(w.cpu() for w in weights))
    names = ["y", "final state", "dx", "d dt", "dA", "dB", "dC", "dD", "d initial state"]
    names = names[:7] + [n for n, t in zip(names[7:], args[5:]) if t is not None]
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    if dtype == torch.float32:
        for name, a, w in zip(names, got, want):
            assert error(a, w) <= FLOAT32_TOL, f"{case} float32 {name}: error {error(a, w):.2e} > {FLOAT32_TOL}"
        return
    torch_path = outputs_and_grads(lambda *a: ssd_chunked(*a, chunk_size=chunk), args, weights)
    for name, a, t, w in zip(names, got, torch_path, want):
        ours, theirs = error(a, w), error(t, w)
        assert ours <= RATIO * theirs + 1e-6, f"{case} {dtype} {name}: error {ours:.2e} > {RATIO} x torch path's {theirs:.2e}"


def check_custom_ops(device: str) -> None:
    """``torch.library.opcheck`` on the forward and backward ops, with and without D and an initial state: their
    schemas, autograd registration, and fake kernels whose shapes, dtypes and strides match the real outputs
    (what torch.compile's graphs are built from)."""
    from layers import ssd_kernel

    for case in ((1, 20, 2, 16, 1, 16, 16, True, True), (1, 20, 2, 16, 1, 16, 16, False, False)):  # small: opcheck
        x, dt, A, B, C, D, S0 = inputs(case, torch.float32, device, seed=5)                # runs each op often
        forward_args = (x, dt, A, B, C, D, S0, case[6])
        torch.library.opcheck(ssd_kernel._ssd_forward, forward_args)
        y, final, states, dec = ssd_kernel._ssd_forward(*forward_args)
        torch.library.opcheck(ssd_kernel._ssd_backward, (torch.randn_like(y), torch.randn_like(final), *forward_args[:7],
                                                         states, dec, case[6]))


def check_mixer(device: str, dtype: torch.dtype, ngroups: int, backend: str = "triton") -> None:
    """Mamba2 with ``backend`` (our kernels, or mamba-ssm's) against backend='torch' (same weights): outputs and
    every gradient, on a batch with left padding and on one without a mask (where the conv kernels of
    layers.causal_conv_kernel run too), in float32 (the kernels' tolerance) or in lower precisions at most RATIO x
    the torch path's error plus one rounding of the dtype (both against the float64 torch path). The rounding term
    is there for the small gradients: A_log's has one entry a head, so its error is a few roundings whose size
    varies with the summation order (mamba-ssm's bf16 A_log gradient: 8.0e-3 against the torch path's 2.9e-3)."""
    from layers.mamba2 import Mamba2

    torch.manual_seed(0)
    ref = Mamba2(32, 1, d_state=16, headdim=16, ngroups=ngroups, chunk_size=16, backend="torch").double().to(device)
    x = torch.randn(3, 21, 32, dtype=torch.float64, device=device)
    mask = torch.ones(3, 21, dtype=torch.bool, device=device)
    mask[1, :5] = mask[2, :20] = False

    def run(module, inp, mask):
        inp = inp.detach().clone().requires_grad_()
        y = module(inp, mask=mask)
        grads = torch.autograd.grad((y.double() * w).sum(), [inp, *module.parameters()])
        return [y, *grads]

    w = torch.randn(3, 21, 32, dtype=torch.float64, device=device)
    for masked in (mask, None):
        want = run(ref, x, masked)
        results = {}
        for name in (backend, "torch"):
            module = Mamba2(32, 1, d_state=16, headdim=16, ngroups=ngroups, chunk_size=16, backend=name)
            module = module.to(device, dtype)
            module.load_state_dict(ref.state_dict())
            results[name] = run(module, x.to(dtype), masked)
        for i, (a, t, r) in enumerate(zip(results[backend], results["torch"], want)):
            ours, theirs = error(a, r), error(t, r)
            limit = FLOAT32_TOL if dtype == torch.float32 else RATIO * theirs + torch.finfo(dtype).eps / 2
            assert ours <= limit, (f"mixer {backend} {dtype} ngroups={ngroups} masked={masked is not None} output/grad {i}: "
                                   f"error {ours:.2e} > {limit:.2e}")


if __name__ == "__main__":
    import layers.causal_conv_kernel
    import layers.gated_norm_kernel
    import layers.ssd_kernel

    for i, case in enumerate(CASES):
        check("cpu", torch.float32, case, seed=i)
        check("cpu", torch.float16, case, seed=i)
    check("cpu", torch.float32, CASES[1], seed=7, compile_backend="aot_eager")
    check_custom_ops("cpu")
    # the interpreter's CPU tensors count as the kernels' device
    layers.ssd_kernel.supports = lambda x, chunk_size: True
    layers.causal_conv_kernel.supports = lambda x: True
    layers.gated_norm_kernel.supports = lambda y: True
    for ngroups in (1, 2):
        check_mixer("cpu", torch.float32, ngroups)
    print(f"{2 * len(CASES) + 4} interpreted checks passed")
