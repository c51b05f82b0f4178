"""Weight conversion from other libraries into zoo models (nothing is downloaded)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from zoo.models.vit import ViT, ViTConfig

# timm parameter name fragment -> zoo fragment; everything else is named alike
_TIMM_TO_ZOO = {".attn.": ".mixer."}


def _rename_timm(key: str) -> str:
    for old, new in _TIMM_TO_ZOO.items():
        key = key.replace(old, new)
    return key


def _vit_config_from_timm(model: nn.Module) -> dict[str, Any]:
    """Read the architecture off a timm ``VisionTransformer`` and refuse variants we don't mirror."""
    unsupported = {
        "reg_token": getattr(model, "reg_token", None) is not None,
        "no class token": getattr(model, "cls_token", None) is None,
        "no_embed_class": bool(getattr(model, "no_embed_class", False)),
        "layer scale": any(not isinstance(b.ls1, nn.Identity) for b in model.blocks),
        "qk_norm": any(not isinstance(b.attn.q_norm, nn.Identity) for b in model.blocks),
        "pre-norm": not isinstance(model.norm_pre, nn.Identity),
        "fc_norm": not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity),
    }
    found = [k for k, v in unsupported.items() if v]
    if found:
        raise ValueError(f"from_timm supports the plain vit_*_patch16_224 layout; this model has: {', '.join(found)}")
    block = model.blocks[0]
    img_size = model.patch_embed.img_size
    return dict(
        img_size=img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        in_chans=model.patch_embed.proj.in_channels,
        num_classes=model.num_classes,
        dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None,
        global_pool=model.global_pool,
        norm_eps=model.norm.eps,
    )


def from_timm(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], num_heads: int | None = None) -> ViT:
    """Build a zoo ViT with the weights (and so the logits) of a timm ``vit_*_patch16_224``.

    Pass the timm model, or its state dict plus ``num_heads`` (a state dict does not record it).
    """
    if isinstance(model_or_state_dict, nn.Module):
        config = _vit_config_from_timm(model_or_state_dict)
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = dict(model_or_state_dict)
        if num_heads is None:
            raise ValueError("from_timm(state_dict) needs num_heads: a timm state dict does not record it")
        config = _vit_config_from_state_dict(state, num_heads)
    else:
        raise TypeError(f"from_timm takes a timm model or a state dict, got {type(model_or_state_dict).__name__}")
    vit = ViT(ViTConfig(**config), name="vit-from-timm")
    converted = {_rename_timm(k): v for k, v in state.items()}
    expected = vit.state_dict()
    wrong_shape = [k for k, v in converted.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong_shape:  # load_state_dict would raise a RuntimeError even with strict=False
        raise ValueError(f"timm weights do not fit: shape mismatch for {wrong_shape[:5]}")
    missing, unexpected = vit.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"timm weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return vit


def _vit_config_from_state_dict(state: Mapping[str, torch.Tensor], num_heads: int) -> dict[str, Any]:
    required = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not a timm ViT state dict: missing {missing}")
    unsupported = {
        "reg_token": "reg_token" in state,
        "no class token": "cls_token" not in state,
        "layer scale": any(".ls1." in k or ".ls2." in k for k in state),
        "qk_norm": any(".attn.q_norm." in k or ".attn.k_norm." in k for k in state),
        "pre-norm": any(k.startswith("norm_pre.") for k in state),
        "fc_norm": any(k.startswith("fc_norm.") for k in state),
    }
    found = [k for k, v in unsupported.items() if v]
    if found:
        raise ValueError(f"from_timm supports the plain vit_*_patch16_224 layout; this state dict has: {', '.join(found)}")
    dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
    num_patches = state["pos_embed"].shape[1] - 1
    grid = int(round(num_patches**0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    head = state.get("head.weight")
    return dict(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, dim=dim, depth=depth, num_heads=num_heads,
        num_classes=head.shape[0] if head is not None else 0,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
    )
