"""Rotary position embeddings (RoPE, GPT-NeoX half-rotation layout), applied per head."""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotates query and key features by position-dependent angles; the frequencies stay float32."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self._frequencies(), persistent=False)

    def _frequencies(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.base**exponents)

    def _apply(self, fn, recurse=True):
        # ``model.to(bfloat16)`` would round the frequencies; recompute them in float32 on the new device
        super()._apply(fn, recurse)
        self.inv_freq = self._frequencies(self.inv_freq.device)
        return self

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles for integer ``positions`` [T] or [B, T], shaped to broadcast over [B, T, H, Dh/2]."""
        angles = positions.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq
        if angles.dim() == 2:
            angles = angles[None]
        return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x: [B, T, H, Dh] in float32, returning x's dtype."""
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, Dh]; positions: [T] or [B, T] integer positions."""
        return self.rotate(x, *self.cos_sin(positions))
