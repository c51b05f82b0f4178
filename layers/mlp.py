"""Feed-forward blocks: SwiGLU (LLaMA) and the GELU MLP of ViT/GPT-2 (timm's ``Mlp``, so timm weights load by name)."""
from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

from layers.registry import Registry
from layers.swiglu import swiglu


class SwiGLU(nn.Module):
    """``w3(silu(x W_gate) * (x W_up))`` with the gate and up projections fused into one matmul and the
    activation in one kernel each way on CUDA (:func:`layers.swiglu.swiglu`)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(swiglu(self.w12(x)))


def gelu_mlp(dim: int, hidden_dim: int, bias: bool = True) -> nn.Module:
    return Mlp(dim, hidden_dim, bias=bias, act_layer=nn.GELU)


MLPS = Registry("mlp")
MLPS.register("swiglu", SwiGLU)
MLPS.register("gelu", gelu_mlp)


def create_mlp(name: str, dim: int, hidden_dim: int, bias: bool = False) -> nn.Module:
    return MLPS.get(name)(dim, hidden_dim, bias=bias)
