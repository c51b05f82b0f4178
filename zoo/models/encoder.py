"""Bidirectional sequence classifiers over tokens (LRA-style: ListOps), with the mixer swappable by config.

``forward(input_ids, mask=None) -> logits [B, num_classes]``: learned position embeddings, pre-norm
blocks of a bidirectional mixer + GELU MLP, and CLS pooling (the first token) or a masked mean.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import PositiveInt
from torch import nn

import layers
from zoo.models.base import MixerStackConfig, ZooModel, build_mixer
from zoo.registry import register_family, register_size_table


class EncoderConfig(MixerStackConfig):
    vocab_size: PositiveInt = 32
    num_classes: PositiveInt = 10
    dim: PositiveInt = 64
    depth: PositiveInt = 2
    num_heads: PositiveInt = 2
    mlp_ratio: float = 4.0
    max_seq_len: PositiveInt = 512
    pool: Literal["cls", "mean"] = "cls"
    dropout: float = 0.0


class EncoderBlock(nn.Module):
    def __init__(self, config: EncoderConfig, mixer_name: str, mixer_kwargs: dict[str, Any]):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.mixer = build_mixer("encoder", mixer_name, mixer_kwargs, config.dim, config.num_heads, causal=False,
                                 defaults={"max_seq_len": config.max_seq_len})
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = layers.gelu_mlp(config.dim, int(config.dim * config.mlp_ratio))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # mixers that cannot take a padding mask (nystromformer) see the padding, as in LRA's baselines
        mixer_mask = mask if self.mixer.supports_mask else None
        x = x + self.dropout(self.mixer(self.norm1(x), mask=mixer_mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


@register_family("encoder")
class Encoder(ZooModel):
    config_class = EncoderConfig
    mixer_causal = False

    def __init__(self, config: EncoderConfig, name: str | None = None):
        super().__init__(config, name)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.dim)
        self.blocks = nn.ModuleList(EncoderBlock(config, n, kw) for n, kw in config.layer_mixers())
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor of shape [batch, seq_len], got {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"input_ids has length {T} but the model's max_seq_len is {self.config.max_seq_len}")
        x = self.embed(input_ids) + self.pos_embed(torch.arange(T, device=input_ids.device))
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        if self.config.pool == "cls":
            return self.head(x[:, 0])
        weights = torch.ones_like(input_ids, dtype=x.dtype) if mask is None else mask.to(x.dtype)
        pooled = (x * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled)


def create_encoder(name: str, defaults: dict[str, Any], **overrides: Any) -> Encoder:
    from zoo.config import merge_overrides

    return Encoder(EncoderConfig.model_validate(merge_overrides(defaults, overrides, EncoderConfig, where=name)), name=name)


ENCODER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, depth=2, num_heads=2, max_seq_len=512),  # CPU tests and quick runs
    "listops": dict(vocab_size=32, dim=512, depth=4, num_heads=8, max_seq_len=2048),  # LRA's ListOps classifier
}

ENCODER_MIXER_VARIANTS: dict[str, Any] = {
    "linear": "linear",
    "performer": "performer",
    "linformer": {"name": "linformer", "k": 256},
    "nystromformer": "nystromformer",
    "sliding-window": "sliding_window",
    "block-sparse": "block_sparse",
}

register_size_table("encoder", ENCODER_SIZES, ENCODER_MIXER_VARIANTS, create_encoder)
