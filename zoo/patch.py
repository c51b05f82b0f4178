"""Token reduction on timm models in place: ``patch(timm_vit, name="tome", r=8)``.

Supports timm 1.0.x ``VisionTransformer`` with a CLS token and standard ``Block`` / ``Attention``
(qk-norm, layer scale, stochastic depth, attention-output norm and gate included). The model's
``forward_features`` is replaced by one that runs each block through the method's
:class:`layers.token_reduction.Tokens` record, mirroring :class:`zoo.models.vit.ViTBlock`, so a
patched timm ViT and the zoo ViT converted from it (``zoo.convert.from_timm``) reduce alike.
"""
from __future__ import annotations

import types
from typing import Any

import torch
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from layers.token_reduction import Tokens, create_token_reduction


def _reduced_block(block: Block, x: torch.Tensor, tokens: Tokens, layer: int) -> torch.Tensor:
    """timm's ``Block.forward`` with the attention computed through ``tokens`` and the reduction before the MLP."""
    if not tokens.intercepts(layer):
        return block(x)
    attn = block.attn
    B, N, _ = x.shape
    h = block.norm1(x)
    if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity):
        q, k, v = tokens.project(attn.qkv, h, attn.num_heads, layer)  # may carry log(size) in spare head dims
    else:  # qk-norm acts on plain head dims: the bias stays an additive mask
        q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
    y, cls_attention = tokens.attend(q, k, v, layer, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    y = attn.norm(y.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if attn.gate is not None:
        y = y * attn.gate(h).sigmoid()
    x, h = tokens.reduce_residual(x, block.drop_path1(block.ls1(attn.proj_drop(attn.proj(y)))), block.norm2, layer,
                                  k[..., :attn.head_dim], cls_attention)
    return x + block.drop_path2(block.ls2(block.mlp(h)))


def _forward_features(self: VisionTransformer, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      is_causal: bool = False) -> torch.Tensor:
    """timm's ``forward_features`` with the blocks run under token reduction (which changes the token set,
    so a fixed ``attn_mask`` or causal attention cannot apply)."""
    if attn_mask is not None or is_causal:
        raise ValueError("a token-reduction patched ViT takes no attn_mask / is_causal")
    x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
    x, tokens = self.token_reduction.start(x)
    for layer, block in enumerate(self.blocks):
        x = _reduced_block(block, x, tokens, layer)
    return self.norm(x)


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"patch supports timm VisionTransformer models, got {type(model).__name__}")
    odd = [type(b).__name__ for b in model.blocks if type(b) is not Block or type(b.attn) is not Attention]
    if odd:
        raise TypeError(f"patch supports timm Block / Attention blocks, got {odd[0]}")
    if model.cls_token is None:
        raise ValueError("patch needs a CLS token (class_token=True)")


def patch(model: nn.Module, name: str = "tome", **options: Any) -> nn.Module:
    """Apply token reduction ``name`` (``tome``, ``evit``, ...) with ``options`` to a timm ViT in place and return it.

    The method becomes ``model.token_reduction`` (ToMe and EViT have no parameters, so the state dict is
    unchanged); patching again replaces it. Unsupported model types raise a TypeError naming the type. Models
    with a distillation token (DeiT distilled) or register tokens take ToMe, which keeps them first and alone;
    the other methods protect only the CLS token and refuse them."""
    _check_supported(model)
    model.token_reduction = create_token_reduction({"name": name, **options}, depth=len(model.blocks), dim=model.embed_dim,
                                                   prefix_tokens=model.num_prefix_tokens)
    model.forward_features = types.MethodType(_forward_features, model)
    return model
