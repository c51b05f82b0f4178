"""Normalisation layers by name: ``rmsnorm`` (LLaMA-style) and ``layernorm``."""
from __future__ import annotations

from torch import nn

from layers.registry import Registry

NORMS = Registry("norm")
NORMS.register("rmsnorm", nn.RMSNorm)
NORMS.register("layernorm", nn.LayerNorm)

RMSNorm = nn.RMSNorm
LayerNorm = nn.LayerNorm


def create_norm(name: str, dim: int, eps: float = 1e-6) -> nn.Module:
    return NORMS.get(name)(dim, eps=eps)
