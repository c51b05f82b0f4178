"""Routers: which experts each token goes to, and with what combine weight.

A router turns fp32 logits [N, E] into a flat list of *assignments* (token, expert, weight).
Token-choice routers (``softmax_topk``, ``sigmoid_topk``, ``switch``) give every token ``top_k``
assignments, token-major; capacity may then drop some of them. ``expert_choice`` gives every
expert exactly ``capacity`` assignments (its best tokens), so load is balanced by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from layers.registry import Registry


@dataclass
class Routing:
    """Assignments of one forward, all 1-D of length A except ``logits``/``probs`` ([N, E])."""

    token: Tensor   # token index of each assignment
    expert: Tensor  # expert index of each assignment
    weight: Tensor  # fp32 combine weight
    rank: Tensor    # position among its expert's assignments, in assignment order
    kept: Tensor    # bool: False where dropped for exceeding the expert's capacity (all True unless ``drops``)
    logits: Tensor  # fp32 router logits (for the z-loss)
    probs: Tensor   # router probabilities, rows summing to 1 (for the balance loss)
    counts: Tensor  # [E] assignments per expert, before drops
    kept_counts: Tensor  # [E] assignments per expert, after drops
    per_token: int | None  # token-choice routers: assignments per token (token-major list); expert choice: None
    drops: bool  # whether capacity may drop assignments (token choice with a capacity); False: ``kept`` is all True


@dataclass(frozen=True)
class RouterSpec:
    """``select(logits, bias, top_k, capacity) -> (token, expert, weight, probs)``."""

    select: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
    expert_choice: bool = False                   # experts pick tokens (capacity is its own, nothing drops)
    default_capacity_factor: float | None = None  # used when MoE(capacity_factor=None)
    top_k: int | None = None                      # the only top_k this router accepts, if fixed


def expert_rank(expert: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """``(rank, counts)``: for each assignment, how many earlier assignments (in list order) went to the same
    expert; and the number of assignments of each expert.

    A stable sort by expert keeps list order inside each expert, so rank = sorted position - group start; the
    group boundaries come from a binary search in the sorted list (no atomics on E counters, no host sync).
    """
    order = torch.argsort(expert, stable=True)
    ordered = expert[order]
    bounds = torch.searchsorted(ordered, torch.arange(num_experts + 1, device=expert.device, dtype=expert.dtype))
    sorted_rank = torch.arange(expert.numel(), device=expert.device) - bounds[ordered]
    return torch.empty_like(expert).scatter_(0, order, sorted_rank), bounds.diff()


def _top_k(scores: Tensor, bias: Tensor | None, k: int) -> Tensor:
    """Indices of the k best experts per token; ``bias`` shifts the choice only, never the weights."""
    keys = scores.detach() if bias is None else scores.detach() + bias
    return keys.topk(k, dim=-1).indices


def _token_major(idx: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n, k = idx.shape
    token = torch.arange(n, device=idx.device).repeat_interleave(k)
    return token, idx.reshape(-1), weight.reshape(-1)


def softmax_topk(logits: Tensor, bias: Tensor | None, top_k: int, capacity: int | None):
    """Mixtral: softmax over all experts, keep the top-k, renormalise their weights to sum to 1."""
    probs = logits.softmax(dim=-1)
    idx = _top_k(probs, bias, top_k)
    weight = probs.gather(-1, idx)
    return (*_token_major(idx, weight / weight.sum(-1, keepdim=True)), probs)


def sigmoid_topk(logits: Tensor, bias: Tensor | None, top_k: int, capacity: int | None):
    """DeepSeek-V3: independent sigmoid scores, top-k, weights renormalised over the chosen k.

    The balance loss sees the scores normalised per token (as DeepSeek-V3's sequence-wise loss).
    """
    scores = logits.sigmoid()
    idx = _top_k(scores, bias, top_k)
    weight = scores.gather(-1, idx)
    probs = scores / scores.sum(-1, keepdim=True)
    return (*_token_major(idx, weight / weight.sum(-1, keepdim=True)), probs)


def switch(logits: Tensor, bias: Tensor | None, top_k: int, capacity: int | None):
    """Switch Transformer: top-1 with the raw softmax probability as weight (so the router gets a gradient)."""
    probs = logits.softmax(dim=-1)
    idx = _top_k(probs, bias, 1)
    return (*_token_major(idx, probs.gather(-1, idx)), probs)


def expert_choice(logits: Tensor, bias: Tensor | None, top_k: int, capacity: int | None):
    """Zhou et al. 2022: each expert takes its ``capacity`` highest-probability tokens.

    A per-expert bias cannot change which tokens an expert ranks highest, so ``bias`` is unused.
    """
    probs = logits.softmax(dim=-1)
    num_tokens, num_experts = probs.shape
    per_expert = min(capacity, num_tokens)
    token = probs.detach().t().topk(per_expert, dim=-1).indices.reshape(-1)
    expert = torch.arange(num_experts, device=logits.device).repeat_interleave(per_expert)
    return token, expert, probs[token, expert], probs


ROUTERS = Registry("moe router")
ROUTERS.register("softmax_topk", RouterSpec(softmax_topk))
ROUTERS.register("sigmoid_topk", RouterSpec(sigmoid_topk))
ROUTERS.register("switch", RouterSpec(switch, default_capacity_factor=1.25, top_k=1))
ROUTERS.register("expert_choice", RouterSpec(expert_choice, expert_choice=True, default_capacity_factor=1.0))
