"""Rotary position embeddings (RoPE, GPT-NeoX half-rotation layout), applied per head."""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotates the first ``rotary_dim`` features of each head by position-dependent angles."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.base = head_dim, base

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """Computed in float32 on each call (not a buffer, so ``model.to(bfloat16)`` cannot round it)."""
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.base**exponents)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, Dh]; positions: [T] or [B, T] integer positions."""
        angles = positions.to(x.device, torch.float32)[..., None] * self.inv_freq(x.device)  # [(B,) T, Dh/2]
        if angles.dim() == 2:
            angles = angles[None]
        cos = angles.cos()[:, :, None, :]
        sin = angles.sin()[:, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotated.to(x.dtype)
