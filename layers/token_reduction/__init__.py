"""Token reduction for ViTs: fewer (or masked) tokens in later layers for cheaper inference or training.

``TOKEN_REDUCTIONS`` maps names (``tome``, ``evit``, ``dynamicvit``, ``patch_dropout``) to methods;
``create_token_reduction({"name": ..., **options}, depth, dim)`` builds one. See ``base`` for how a
ViT block drives them.
"""
from layers.token_reduction import dynamicvit, evit, patch_dropout, tome  # noqa: F401  (registers the methods)
from layers.token_reduction.base import (TOKEN_REDUCTIONS, TokenReduction, Tokens, create_token_reduction,
                                         get_token_reduction_class, list_token_reductions, masked_softmax,
                                         register_token_reduction)
from layers.token_reduction.dynamicvit import DynamicViT
from layers.token_reduction.evit import EViT, evit_reference
from layers.token_reduction.patch_dropout import PatchDropout
from layers.token_reduction.tome import ToMe, bipartite_soft_matching, naive_merge, tome_schedule

__all__ = [
    "TOKEN_REDUCTIONS", "DynamicViT", "EViT", "PatchDropout", "ToMe", "TokenReduction", "Tokens", "bipartite_soft_matching",
    "create_token_reduction", "evit_reference", "get_token_reduction_class", "list_token_reductions", "masked_softmax",
    "naive_merge", "register_token_reduction", "tome_schedule",
]
