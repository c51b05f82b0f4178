"""The mixture-of-experts feed-forward layer.

``MoE(x)`` returns ``(y, aux)``: y has x's shape; ``aux.loss`` is what to add to the task loss.
The router's logits come from a GEMM in the experts' compute dtype (x's, or the autocast dtype) with float32
output, as HF Mixtral and torchtitan compute them; softmax/sigmoid, top-k and the combine weights are float32.
The combine sums ``weight * expert(x)`` and casts back to x's dtype; shared experts (a dense MLP of width ``shared_experts *
hidden``) are added to every token, including tokens the routed experts dropped.

Capacity: with ``capacity_factor`` c, each expert takes at most ``ceil(c * N * top_k / E)``
assignments of the N tokens; assignments are considered in token order (token 0's k choices, then
token 1's, ...) and the rest are dropped: they contribute exactly 0, so only the residual (and any
shared experts) carry those tokens. ``capacity_factor=None`` is dropless, except for routers that
need a capacity (``switch``: 1.25, ``expert_choice``: 1.0).

``expert_choice`` ranks each expert's tokens across the whole flattened batch, so in a causal LM a token's
routing would depend on later tokens; ``causal=True`` therefore refuses it.

``bias`` balancing updates its buffer inside every training-mode forward (so a recomputed forward
under activation checkpointing updates it twice) and is not synchronised across data-parallel ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.mlp import create_mlp
from layers.moe.balance import BALANCES, update_bias, z_loss
from layers.moe.experts import EXPERTS, IMPLEMENTATIONS, GROUPED_MM, StackedExperts
from layers.moe.routing import ROUTERS, Routing, expert_rank
from layers.registry import Registry


def lookup(registry: Registry, name: str):
    """``registry.get`` whose error also lists every valid name."""
    try:
        return registry.get(name)
    except ValueError as err:
        raise ValueError(f"{err} Valid: {', '.join(registry.names())}") from None


def list_moe_routers() -> list[str]:
    return ROUTERS.names()


def list_moe_balances() -> list[str]:
    return BALANCES.names()


def list_moe_experts() -> list[str]:
    return EXPERTS.names()


def list_moe_implementations() -> list[str]:
    return IMPLEMENTATIONS.names()


@dataclass
class MoEAux:
    """Auxiliary outputs of one forward. ``load`` and ``dropped_fraction`` are detached."""

    loss: Tensor              # balance_loss + z_loss: add this to the task loss
    balance_loss: Tensor      # aux_loss_weight * E * sum_i f_i P_i (0 unless balance="aux")
    z_loss: Tensor            # z_loss * mean(logsumexp(logits)^2)
    load: Tensor              # [E] fraction of the router's assignments per expert (before drops)
    dropped_fraction: Tensor  # fraction of assignments dropped by capacity


class MoE(nn.Module):
    """Routed experts (+ optional always-on shared experts) replacing a transformer block's MLP."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, router: str = "softmax_topk",
                 capacity_factor: float | None = None, shared_experts: int = 0, balance: str = "aux",
                 aux_loss_weight: float = 0.01, z_loss: float = 0.0, jitter: float = 0.0,
                 bias_update_rate: float = 1e-3, expert: str = "swiglu", implementation: str = "auto",
                 causal: bool = False):
        super().__init__()
        self.router_spec = lookup(ROUTERS, router)
        self.balance_spec = lookup(BALANCES, balance)
        self.run_experts = lookup(IMPLEMENTATIONS, implementation)
        expert_spec = lookup(EXPERTS, expert)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if self.router_spec.top_k is not None and top_k != self.router_spec.top_k:
            raise ValueError(f"router {router!r} routes each token to {self.router_spec.top_k} expert(s); got top_k={top_k}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
        if shared_experts < 0:
            raise ValueError(f"shared_experts must be >= 0, got {shared_experts}")
        if causal and self.router_spec.expert_choice:
            raise ValueError(f"router {router!r} cannot be causal: each expert picks its top tokens across the whole "
                             "sequence, so whether an earlier token is routed depends on later tokens (future leakage). "
                             "Use a token-choice router (softmax_topk, sigmoid_topk, switch) for causal models.")
        if implementation == "grouped_mm" and GROUPED_MM is None:
            raise ValueError(f"implementation='grouped_mm' needs torch.nn.functional.grouped_mm or torch._grouped_mm, "
                             f"which torch {torch.__version__} lacks; use implementation='auto' or 'loop'")
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.router_name, self.balance_name, self.implementation = router, balance, implementation
        self.capacity_factor = capacity_factor if capacity_factor is not None else self.router_spec.default_capacity_factor
        self.aux_loss_weight, self.z_loss_weight, self.jitter = aux_loss_weight, z_loss, jitter
        self.bias_update_rate, self.causal = bias_update_rate, causal
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = StackedExperts(num_experts, dim, hidden, expert_spec)
        self.shared = create_mlp(expert, dim, shared_experts * hidden, bias=False) if shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(num_experts) if self.balance_spec.uses_bias else None)

    def _apply(self, fn, recurse=True):
        """Keep the balancing bias in float32 under ``.to(bfloat16)``: 1e-3 steps vanish in bf16."""
        super()._apply(fn, recurse)
        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert may take: ``ceil(capacity_factor * N * top_k / E)``; None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def route(self, x: Tensor) -> Routing:
        """Route the tokens of ``x: [N, dim]`` (logits from a GEMM in x's dtype, everything after in float32)."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        logits = F.linear(x, self.router.weight.to(x.dtype)).float()
        capacity = self.capacity(x.shape[0])
        token, expert, weight, probs = self.router_spec.select(logits, self.expert_bias, self.top_k, capacity)
        rank, counts = expert_rank(expert, self.num_experts)
        drops = capacity is not None and not self.router_spec.expert_choice  # expert choice fills exactly its capacity
        kept = rank < capacity if drops else torch.ones_like(rank, dtype=torch.bool)
        kept_counts = counts.clamp(max=capacity) if drops else counts  # the ranks below capacity stay
        per_token = None if self.router_spec.expert_choice else (self.router_spec.top_k or self.top_k)
        return Routing(token, expert, weight, rank, kept, logits, probs, counts, kept_counts, per_token, drops)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoE expected x with last dimension {self.dim}, got shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.dim)
        device = x.device.type
        # Under autocast, the router and experts' GEMMs run in the autocast dtype (as nn.Linear would); autocast
        # itself stays off here, so the float32 routing math after the logits is not lowered behind our back.
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tokens.dtype
        with torch.autocast(device, enabled=False):
            hidden = tokens.to(compute)
            routing = self.route(hidden)
            y = self.run_experts(self.experts, hidden, routing).to(x.dtype)
        if self.shared is not None:
            y = y + self.shared(tokens)
        return y.reshape(x.shape), self._aux(routing)

    def _aux(self, routing: Routing) -> MoEAux:
        counts = routing.counts.float()
        load = counts / routing.expert.numel()
        zero = routing.logits.new_zeros(())
        balance_fn = self.balance_spec.loss
        balance = self.aux_loss_weight * balance_fn(routing.probs, load) if balance_fn is not None else zero
        router_z = self.z_loss_weight * z_loss(routing.logits) if self.z_loss_weight else zero
        if self.training and self.expert_bias is not None:
            update_bias(self.expert_bias, counts, self.bias_update_rate)
        dropped = 1 - routing.kept.float().mean() if routing.drops else zero
        return MoEAux(balance + router_z, balance, router_z, load.detach(), dropped.detach())

    @property
    def params_per_expert(self) -> int:
        return (self.experts.w_in.numel() + self.experts.w_out.numel()) // self.num_experts

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def active_params(self) -> int:
        """Parameters one token uses: router + shared experts + top_k routed experts (expert_choice: on average)."""
        return self.total_params - (self.num_experts - self.top_k) * self.params_per_expert

    def extra_repr(self) -> str:
        return (f"router={self.router_name!r}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
                f"balance={self.balance_name!r}, implementation={self.implementation!r}")


def count_params(moe: MoE) -> tuple[int, int]:
    """``(total, active)`` parameter counts of an MoE layer."""
    return moe.total_params, moe.active_params
