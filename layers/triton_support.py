"""Optional Triton for the fused kernels of ``layers/`` (MoE permutation, SwiGLU, ToMe merging, Mamba-2's SSD,
short conv and gated RMSNorm).

Triton ships with torch's Linux CUDA wheels; without it every kernel's torch reference runs. Under
``TRITON_INTERPRET=1`` (set before triton is first imported) the kernels run on CPU tensors in Triton's
interpreter, which the tests use.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernels_take(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``: Triton present, a CUDA tensor, a float32 / bfloat16 / float16 dtype."""
    return triton is not None and x.is_cuda and x.dtype in KERNEL_DTYPES
