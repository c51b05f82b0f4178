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
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / (head_dim + 2)))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, Dh]; positions: [T] or [B, T] integer positions."""
        angles = positions.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq  # [(B,) T, Dh/2]
        if angles.dim() == 2:
            angles = angles[None]
        cos = angles.cos()[:, :, None, :]
        sin = angles.sin()[:, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotated.to(x.dtype)
