"""Load-balancing schemes and the router z-loss.

* ``aux``: Switch Transformer loss ``E * sum_i f_i P_i`` (f_i: fraction of assignments to expert i,
  P_i: mean router probability of expert i); minimal (= 1) when both are uniform.
* ``bias``: DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias added to the scores for
  top-k selection only, nudged after each training forward towards under-loaded experts.
* ``none``: nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from layers.registry import Registry


@dataclass(frozen=True)
class BalanceSpec:
    loss: Callable[[Tensor, Tensor], Tensor] | None  # (probs [N, E], load fractions [E]) -> unweighted loss
    uses_bias: bool = False


def switch_balance_loss(probs: Tensor, load: Tensor) -> Tensor:
    """``E * sum_i f_i P_i``; gradients flow through P only (f comes from a discrete choice)."""
    return probs.shape[-1] * (load * probs.mean(dim=0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)``: keeps logits small for fp stability."""
    return torch.logsumexp(logits, dim=-1).square().mean()


@torch.no_grad()
def update_bias(bias: Tensor, counts: Tensor, rate: float) -> None:
    """``bias += rate * sign(mean load - load)``: raise under-loaded experts, lower over-loaded ones."""
    bias.add_(rate * torch.sign(counts.mean() - counts))


BALANCES = Registry("moe balance")
BALANCES.register("aux", BalanceSpec(switch_balance_loss))
BALANCES.register("bias", BalanceSpec(None, uses_bias=True))
BALANCES.register("none", BalanceSpec(None))
