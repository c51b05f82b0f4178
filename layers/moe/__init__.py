"""Mixture-of-experts feed-forward layer: routers, balancing schemes, stacked experts, grouped GEMM."""
from layers.moe.balance import BALANCES, switch_balance_loss, z_loss
from layers.moe.experts import EXPERTS, GROUPED_MM, IMPLEMENTATIONS, StackedExperts, grouped_mm_unsupported
from layers.moe.moe import (MoE, MoEAux, count_params, list_moe_balances, list_moe_experts, list_moe_implementations,
                            list_moe_routers)
from layers.moe.routing import ROUTERS, Routing, RouterSpec, expert_rank

__all__ = [
    "BALANCES", "EXPERTS", "GROUPED_MM", "IMPLEMENTATIONS", "MoE", "MoEAux", "ROUTERS", "RouterSpec", "Routing",
    "StackedExperts", "count_params", "expert_rank", "grouped_mm_unsupported", "list_moe_balances", "list_moe_experts",
    "list_moe_implementations", "list_moe_routers", "switch_balance_loss", "z_loss",
]
