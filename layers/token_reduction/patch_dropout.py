"""Patch dropout: train on a random subset of the patch tokens (Liu et al. 2022, "PatchDropout";
FLIP). The CLS token is always kept; in eval mode the layer is the identity."""
from __future__ import annotations

import torch

from layers.token_reduction.base import TokenReduction, Tokens, check_fraction, register_token_reduction


@register_token_reduction("patch_dropout")
class PatchDropout(TokenReduction):
    """Keep a random ``keep_rate`` fraction (at least one) of the patch tokens per sample, in order, while training."""

    def __init__(self, keep_rate: float = 0.5):
        super().__init__()
        self.keep_rate = check_fraction("keep_rate", keep_rate)

    def prepare(self, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        if not self.training or self.keep_rate == 1.0:
            return x
        n = x.shape[1] - 1
        keep = max(1, int(self.keep_rate * n))
        chosen = torch.rand(x.shape[0], n, device=x.device).argsort(dim=-1)[:, :keep].sort(dim=-1).values + 1
        return tokens.select(x, torch.cat([torch.zeros_like(chosen[:, :1]), chosen], dim=1))

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}"
