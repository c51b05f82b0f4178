"""EViT: attentive token keeping and inattentive token fusion (Liang et al., ICLR 2022).

At chosen layers, after the attention, the patch tokens are ranked by the attention the CLS token
pays them (averaged over heads). The top ``ceil(keep_rate * n)`` stay; the rest are fused into one
token, their sum weighted by that attention (the paper's x_fused = sum_i a_i x_i), appended last.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from layers.token_reduction.base import TokenReduction, Tokens, check_fraction, gather_tokens, register_token_reduction


def default_evit_layers(depth: int) -> list[int]:
    """EViT's layers 3, 6, 9 of 12 (0-based), scaled to ``depth``: a quarter, half and three quarters in."""
    return sorted({depth * i // 4 for i in (1, 2, 3)} - {0})


def reduction_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """The sorted layers a staged method reduces at: ``layers``, or :func:`default_evit_layers`; ValueError naming
    ``layers`` when one lies outside the model's depth."""
    chosen = default_evit_layers(depth) if layers is None else sorted(set(layers))
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad:
        raise ValueError(f"layers must lie in [0, {depth}), got {bad}")
    return chosen


def evit_reference(x: torch.Tensor, cls_attention: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Per-sample loop reference: CLS, the kept tokens in their order, then the fused token."""
    out = []
    for xb, ab in zip(x, cls_attention):
        n = len(xb) - 1
        keep = math.ceil(keep_rate * n)
        ranked = sorted(range(1, n + 1), key=lambda i: ab[i].item(), reverse=True)
        kept, rest = sorted(ranked[:keep]), ranked[keep:]
        rows = [xb[0]] + [xb[i] for i in kept]
        if rest:
            rows.append(sum(ab[i] * xb[i] for i in rest))
        out.append(torch.stack(rows))
    return torch.stack(out)


@register_token_reduction("evit")
class EViT(TokenReduction):
    """Keep the ``keep_rate`` most CLS-attended patch tokens at ``layers`` (default: a quarter, half and
    three quarters of the depth) and fuse the others into one token."""

    needs_cls_attention = True

    def __init__(self, depth: int, keep_rate: float = 0.7, layers: Sequence[int] | None = None, track_source: bool = False):
        super().__init__()
        self.keep_rate = check_fraction("keep_rate", keep_rate)
        self.layers = reduction_layers(layers, depth)
        self.track_source = track_source

    def reduces_at(self, layer: int) -> bool:
        return self.keep_rate < 1.0 and layer in self.layers

    def reduce(self, x: torch.Tensor, tokens: Tokens, layer: int, key_mean: torch.Tensor | None,
               cls_attention: torch.Tensor) -> torch.Tensor:
        n = x.shape[1] - 1
        keep = math.ceil(self.keep_rate * n)
        if keep == n:
            return x
        attention = cls_attention[:, 1:]
        ranked = attention.argsort(dim=-1, descending=True) + 1  # token positions, most attended first
        cls = torch.zeros_like(ranked[:, :1])
        kept = torch.cat([cls, ranked[:, :keep].sort(dim=-1).values], dim=1)
        rest = ranked[:, keep:]
        weights = cls_attention.gather(1, rest)[..., None]  # [B, n - keep, 1]
        fused = (gather_tokens(x, rest) * weights).sum(dim=1, keepdim=True)
        if tokens.source is not None:
            fused_source = gather_tokens(tokens.source, rest).sum(dim=1, keepdim=True)
        x = torch.cat([tokens.select(x, kept), fused], dim=1)
        if tokens.source is not None:
            tokens.source = torch.cat([tokens.source, fused_source], dim=1)
        return x

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, layers={self.layers}"
