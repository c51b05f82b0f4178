"""Vision Transformers laid out like timm's ``VisionTransformer`` (so timm weights convert by name),
with the token mixer swappable through ``mixer=`` (bidirectional mixers only) and optional token
reduction (ToMe, EViT, DynamicViT, patch dropout) through ``token_reduction=``."""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import PositiveInt, model_validator
from torch import nn

import layers
from layers.token_reduction import Tokens, TokenReduction, create_token_reduction, get_token_reduction_class
from zoo.models.base import MixerStackConfig, MoEConfig, ZooModel, build_mixer, build_mlp
from zoo.registry import Variant, register_family, register_size_table


class ViTConfig(MixerStackConfig):
    img_size: PositiveInt = 224
    patch_size: PositiveInt = 16
    in_chans: PositiveInt = 3
    num_classes: int = 1000
    dim: PositiveInt = 192
    depth: PositiveInt = 12
    num_heads: PositiveInt = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    global_pool: Literal["token", "avg"] = "token"
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    norm_eps: float = 1e-6
    moe: MoEConfig | None = None  # V-MoE: GELU experts in place of the MLP of every ``moe.every``-th block
    # a spec {name: tome | evit | dynamicvit | patch_dropout, **options} (layers.token_reduction)
    token_reduction: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_patches(self) -> "ViTConfig":
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be divisible by patch_size ({self.patch_size})")
        return self

    @model_validator(mode="after")
    def _check_token_reduction(self) -> "ViTConfig":
        spec = self.token_reduction
        if spec is None:
            return self
        if "name" not in spec:
            raise ValueError(f"token_reduction needs a 'name' key, got {spec}")
        get_token_reduction_class(spec["name"])  # an unknown name lists close matches
        others = sorted({name for name, _ in self.layer_mixers()} - {"attention"})
        if others:
            raise ValueError(f"token_reduction needs the 'attention' mixer in every layer (it reads the keys and "
                             f"reweights the softmax); got mixer {', '.join(others)}")
        return self


class ViTBlock(nn.Module):
    def __init__(self, config: ViTConfig, layer: int, mixer_name: str, mixer_kwargs: dict[str, Any], drop_path: float):
        super().__init__()
        # timm's biased projections, and the token count for fixed-length mixers (linformer)
        num_tokens = (config.img_size // config.patch_size) ** 2 + 1
        defaults = {"qkv_bias": config.qkv_bias, "proj_bias": True, "max_seq_len": num_tokens}
        self.norm1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mixer = build_mixer("vit", mixer_name, mixer_kwargs, config.dim, config.num_heads, causal=False, defaults=defaults)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        hidden = int(config.dim * config.mlp_ratio)
        self.mlp = build_mlp(config.moe, layer, layers.gelu_mlp(config.dim, hidden, bias=True), config.dim, hidden, "gelu",
                             causal=False)
        self.drop_path = layers.DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer = layer
        if config.token_reduction is not None and getattr(self.mixer, "rotary", None) is not None:
            raise ValueError("token_reduction cannot be combined with rotary embeddings (rope=True): merged tokens have no position")

    def forward(self, x: torch.Tensor, tokens: Tokens | None = None) -> torch.Tensor:
        """``tokens``: the forward's token-reduction record; when it intercepts this layer the attention runs
        through it (proportional attention, masking, CLS attention) and the tokens are reduced before the MLP."""
        if tokens is None or not tokens.intercepts(self.layer):
            x = x + self.drop_path(self.mixer(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        q, k, v = tokens.project(self.mixer.qkv, self.norm1(x), self.mixer.num_heads, self.layer)
        y, cls_attention = tokens.attend(q, k, v, self.layer)
        x, h = tokens.reduce_residual(x, self.drop_path(self.mixer._merge(y)), self.norm2, self.layer,
                                      k[..., :self.mixer.head_dim], cls_attention)
        return x + self.drop_path(self.mlp(h))


@register_family("vit")
class ViT(ZooModel):
    """``forward(images [B, C, H, W]) -> logits``; ``forward_features`` gives the normed tokens (CLS first)."""

    config_class = ViTConfig
    mixer_causal = False

    def __init__(self, config: ViTConfig, name: str | None = None):
        super().__init__(config, name)
        self.patch_embed = layers.PatchEmbed(config.img_size, config.patch_size, config.in_chans, config.dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, config.dim))
        self.pos_drop = nn.Dropout(config.dropout)
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]  # stochastic depth grows linearly
        self.blocks = nn.ModuleList(ViTBlock(config, i, n, kw, r) for i, ((n, kw), r) in enumerate(zip(config.layer_mixers(), rates)))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.token_reduction: TokenReduction | None = None
        if config.token_reduction is not None:
            self.token_reduction = create_token_reduction(config.token_reduction, depth=config.depth, dim=config.dim)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        c, s = self.config.in_chans, self.config.img_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (c, s, s):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must have shape [batch, {c}, {s}, {s}], got {shape}")
        x = self.patch_embed(images, leading_slots=1)
        x[:, 0] = self.cls_token[:, 0]  # row 0 came out of the patch GEMM as an empty slot
        x = self.pos_drop(x + self.pos_embed)
        tokens = None
        if self.token_reduction is not None:
            x, tokens = self.token_reduction.start(x)
        for block in self.blocks:
            x = block(x, tokens)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features[:, 0] if self.config.global_pool == "token" else features[:, 1:].mean(dim=1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """While DynamicViT trains, its keep-ratio loss (the tasks add it to the loss and log it)."""
        loss = self.token_reduction.aux_loss() if self.token_reduction is not None else None
        return {} if loss is None else {"keep_ratio_loss": loss}


def create_vit(name: str, defaults: dict[str, Any], **overrides: Any) -> ViT:
    """The one builder behind every ViT entrypoint."""
    from zoo.config import merge_overrides

    return ViT(ViTConfig.model_validate(merge_overrides(defaults, overrides, ViTConfig, where=name)), name=name)


def vit_num_patches(size: dict[str, Any]) -> int:
    """Patch count of a size table entry (missing image or patch size: the config defaults)."""
    fields = ViTConfig.model_fields
    img, patch = size.get("img_size", fields["img_size"].default), size.get("patch_size", fields["patch_size"].default)
    return (img // patch) ** 2


VIT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(img_size=32, patch_size=4, num_classes=10, dim=128, depth=4, num_heads=4),  # CPU-sized, 64 patches
    "ti16": dict(dim=192, depth=12, num_heads=3),  # timm vit_tiny_patch16_224
    "s16": dict(dim=384, depth=12, num_heads=6),  # timm vit_small_patch16_224
    "b16": dict(dim=768, depth=12, num_heads=12),  # timm vit_base_patch16_224
    "l16": dict(dim=1024, depth=24, num_heads=16),  # timm vit_large_patch16_224
}

# vit-<size>-<variant>: the attention-mixers issue's mixers that can mix bidirectionally
VIT_MIXER_VARIANTS: dict[str, Any] = {
    "linear": "linear",
    # EfficientViT (Cai et al. 2023): ReLU linear attention
    "relu-linear": {"name": "linear", "feature_map": "relu"},
    # windows sized to the patch grid (the mixers' defaults, 256 tokens and blocks of 64, span a whole ViT
    # sequence): a quarter of the patches (49 of 196 at /16, 16 of 64 for tiny); blocks of an eighth
    "sliding-window": Variant(lambda size: {"mixer": {"name": "sliding_window", "window": vit_num_patches(size) // 4}}),
    "block-sparse": Variant(lambda size: {"mixer": {"name": "block_sparse", "block_size": vit_num_patches(size) // 8}}),
    "nystromformer": {"name": "nystromformer", "num_landmarks": 32},
    "linformer": {"name": "linformer", "k": 64},
    "performer": "performer",
    "cosformer": "cosformer",
    # the state-space issue's mixers: S4D mixes both ways itself; Mamba-2 through the Vision-Mamba wrapper
    "s4d": "s4d",
    "mamba2": {"name": "bidirectional", "inner": {"name": "mamba2"}},
    # V-MoE (Riquelme et al. 2021): 8 GELU experts in every other block, top-2 or expert choice
    "moe": Variant({"moe": {"num_experts": 8, "top_k": 2, "every": 2}}),
    "moe-ec": Variant({"moe": {"num_experts": 8, "top_k": 2, "every": 2, "router": "expert_choice"}}),
    # token reduction: ToMe merging the largest constant r that never needs clipping, patches // (depth + 1)
    # (15 for B/16, 7 for L/16: the paper's 16 and 8 get clipped at the last layer); EViT keeping 0.7 of the
    # tokens at a quarter, half and three quarters of the depth (layers 3, 6, 9 of 12)
    "tome": Variant(lambda size: {"token_reduction": {"name": "tome", "r": max(1, vit_num_patches(size) // (size["depth"] + 1))}}),
    "evit": Variant({"token_reduction": {"name": "evit", "keep_rate": 0.7}}),
}


register_size_table("vit", VIT_SIZES, VIT_MIXER_VARIANTS, create_vit)
