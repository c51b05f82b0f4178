"""DynamicViT: learned token sparsification (Rao et al., NeurIPS 2021).

At chosen layers a small predictor scores every live patch token from its own features (local) and
the mean of the live tokens (global). Stage ``s`` targets keeping ``keep_rate ** (s + 1)`` of the
original patches.

* Training: hard keep/drop decisions come from a straight-through Gumbel-softmax; dropped tokens are
  not removed but masked out of every later attention (so the batch keeps its shape and the
  decisions stay differentiable), and the keep-ratio loss, ``weight * mean_s mean_b (kept_fraction -
  target_s)^2``, is exposed through :meth:`DynamicViT.aux_loss`.
* Inference: the top-scoring tokens (the target count) are kept and the others removed.

The predictor starts untrained (random scores): inference still runs and keeps the right number of
tokens, it just picks them badly until the predictor is trained.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from layers.token_reduction.base import TokenReduction, Tokens, check_fraction, register_token_reduction
from layers.token_reduction.evit import reduction_layers


class ScorePredictor(nn.Module):
    """log p(keep), log p(drop) per token from [local features, policy-weighted mean of global features]."""

    def __init__(self, dim: int):
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                  nn.Linear(dim // 4, 2))

    def forward(self, x: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """x [B, n, C] patch tokens, live [B, n] (1 = live) -> log-probabilities [B, n, 2] (keep, drop)."""
        h = self.embed(x)
        half = h.shape[-1] // 2
        local, glob = h[..., :half], h[..., half:]
        w = live[..., None]
        glob = (glob * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1e-6)
        return self.head(torch.cat([local, glob.expand(-1, x.shape[1], -1)], dim=-1)).log_softmax(dim=-1)


@register_token_reduction("dynamicvit")
class DynamicViT(TokenReduction):
    """Learned keep/drop decisions at ``layers`` (default: a quarter, half and three quarters of the depth,
    after the attention); ``keep_rate`` per stage (cumulative), ``weight`` of the keep-ratio loss."""

    def __init__(self, depth: int, dim: int, keep_rate: float = 0.7, layers: Sequence[int] | None = None,
                 weight: float = 2.0, tau: float = 1.0):
        super().__init__()
        self.keep_rate = check_fraction("keep_rate", keep_rate)
        self.layers = reduction_layers(layers, depth)
        self.weight, self.tau = weight, tau
        self.predictors = nn.ModuleList(ScorePredictor(dim) for _ in self.layers)
        self.stage_losses: list[torch.Tensor] = []

    def target(self, stage: int) -> float:
        return self.keep_rate ** (stage + 1)

    def prepare(self, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        self.stage_losses = []
        if self.training:
            tokens.keep = x.new_ones(x.shape[:2])
        return x

    def reduces_at(self, layer: int) -> bool:
        return self.keep_rate < 1.0 and layer in self.layers

    def reduce(self, x: torch.Tensor, tokens: Tokens, layer: int, key_mean: torch.Tensor | None,
               cls_attention: torch.Tensor | None) -> torch.Tensor:
        stage = self.layers.index(layer)
        patches = x[:, 1:]
        if self.training:
            live = tokens.keep[:, 1:]
            log_probs = self.predictors[stage](patches, live)
            decision = F.gumbel_softmax(log_probs, tau=self.tau, hard=True)[..., 0] * live
            tokens.keep = torch.cat([tokens.keep[:, :1], decision], dim=1)
            self.stage_losses.append(((decision.mean(dim=1) - self.target(stage)) ** 2).mean())
            return x
        log_probs = self.predictors[stage](patches, patches.new_ones(patches.shape[:2]))
        num_original = tokens.num_tokens - 1
        keep = min(patches.shape[1], max(1, int(num_original * self.target(stage))))
        best = log_probs[..., 0].topk(keep, dim=-1).indices.sort(dim=-1).values + 1
        return tokens.select(x, torch.cat([torch.zeros_like(best[:, :1]), best], dim=1))

    def aux_loss(self) -> torch.Tensor | None:
        """The keep-ratio loss of the last training forward (None after an eval forward)."""
        if not self.stage_losses:
            return None
        return self.weight * torch.stack(self.stage_losses).mean()

    def kept_fraction(self) -> torch.Tensor | None:
        """Fraction of patch tokens live after the last training forward (detached), for logging."""
        keep = self.last_tokens.keep if self.last_tokens is not None else None
        return None if keep is None else keep[:, 1:].mean().detach()

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, layers={self.layers}, weight={self.weight}"
