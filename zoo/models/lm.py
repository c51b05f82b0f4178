"""Decoder-only language models: pre-norm blocks of ``mixer`` + MLP, with a per-layer mixer spec.

``mixer`` is a name, a mapping ``{name: ..., **kwargs}``, or a list of those repeated over depth
(``["gla", "gla", "gla", "attention"]``), so hybrids are one config line.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import PositiveInt, field_validator
from torch import nn

import layers
from zoo.models.base import MixerStackConfig, ZooModel, build_mixer
from zoo.registry import register_family, register_size_table

class LMConfig(MixerStackConfig):
    vocab_size: PositiveInt = 256
    dim: PositiveInt = 192
    depth: PositiveInt = 4
    num_heads: PositiveInt = 3
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    mlp_hidden: PositiveInt | None = None  # default: 8/3 * dim for SwiGLU, 4 * dim for GELU, rounded up to 64
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    max_seq_len: PositiveInt = 2048
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {v}")
        return v

    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        hidden = 8 * self.dim / 3 if self.mlp == "swiglu" else 4 * self.dim
        return 64 * math.ceil(hidden / 64)


class LMBlock(nn.Module):
    def __init__(self, config: LMConfig, mixer_name: str, mixer_kwargs: dict[str, Any]):
        super().__init__()
        self.norm1 = layers.create_norm(config.norm, config.dim)
        self.mixer = build_mixer("lm", mixer_name, mixer_kwargs, config.dim, config.num_heads, causal=True,
                                 defaults={"max_seq_len": config.max_seq_len})  # fixed-length mixers (cosformer)
        self.norm2 = layers.create_norm(config.norm, config.dim)
        self.mlp = layers.create_mlp(config.mlp, config.dim, config.hidden_dim())
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.norm1(x), mask=mask))
        return x + self.dropout(self.mlp(self.norm2(x)))

    def decode(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Advance the mixer's decoding state: ``step`` for one token, ``prefill`` for a prompt."""
        advance = self.mixer.step if x.shape[1] == 1 else self.mixer.prefill
        y, state = advance(self.norm1(x), state)
        x = x + y
        return x + self.mlp(self.norm2(x)), state


@register_family("lm")
class LM(ZooModel):
    """A decoder-only LM. ``forward(input_ids, mask=None) -> logits [B, T, vocab]``."""

    config_class = LMConfig
    mixer_causal = True

    def __init__(self, config: LMConfig, name: str | None = None):
        super().__init__(config, name)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(LMBlock(config, n, kw) for n, kw in config.layer_mixers())
        self.norm = layers.create_norm(config.norm, config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual output projections by depth so the residual stream stays O(1)
        for name, p in self.named_parameters():
            if name.endswith(("mixer.proj.weight", "mlp.w3.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, std=config.init_std / math.sqrt(2 * config.depth))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.init_std)

    def _check_ids(self, input_ids: torch.Tensor, offset: int = 0) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor of shape [batch, seq_len], got {shape}")
        if offset + input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"input_ids has length {offset + input_ids.shape[1]} but the model's max_seq_len is {self.config.max_seq_len}"
            )

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_ids(input_ids)
        x = self.drop(self.embed(input_ids))
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.head(self.norm(x))

    # --- incremental decoding ----------------------------------------------------------------

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> list[dict]:
        device = device or self.embed.weight.device
        return [b.mixer.init_state(batch_size, device=device, dtype=dtype, max_len=max_len) for b in self.blocks]

    def prefill(self, input_ids: torch.Tensor, states: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        """Run tokens through every layer's decoding state; returns logits [B, T, vocab] and the new states."""
        x = self.embed(input_ids)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block.decode(x, state)
            new_states.append(state)
        return self.head(self.norm(x)), new_states

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``idx`` through the mixers' ``step`` path; ``temperature=0`` is greedy."""
        self._check_ids(idx, offset=max_new_tokens)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        states = self.init_state(idx.shape[0], device=idx.device, max_len=idx.shape[1] + max_new_tokens)
        logits, states = self.prefill(idx, states)
        out = [idx]
        for _ in range(max_new_tokens):
            next_id = sample_next(logits[:, -1], temperature, top_k, generator)
            out.append(next_id)
            logits, states = self.prefill(next_id, states)
        return torch.cat(out, dim=1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """One token per row from ``logits [B, V]``: greedy at temperature 0, else softmax sampling with optional top-k."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def create_lm(name: str, defaults: dict[str, Any], **overrides: Any) -> LM:
    """The one builder behind every LM entrypoint: defaults, then overrides, validated."""
    from zoo.config import merge_overrides

    return LM(LMConfig.model_validate(merge_overrides(defaults, overrides, LMConfig, where=name)), name=name)


LM_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=192, depth=4, num_heads=3, max_seq_len=1024),  # ~1.8M params: CPU tests, synthetic tasks
    "small": dict(vocab_size=50304, dim=384, depth=6, num_heads=6),  # ~30M (GPT-2 vocabulary)
    "125m": dict(vocab_size=50304, dim=768, depth=12, num_heads=12),  # GPT-2 small shape
    "350m": dict(vocab_size=50304, dim=1024, depth=24, num_heads=16),  # GPT-2 medium shape
    "1b": dict(vocab_size=50304, dim=2048, depth=24, num_heads=16),  # head dim 128
}

# lm-<size>-<variant>: the attention-mixers issue's causal mixers, and hybrids as per-layer lists
LM_MIXER_VARIANTS: dict[str, Any] = {
    "linear": "linear",
    "retnet": "retnet",
    "gla": "gla",
    "based": [{"name": "based"}, {"name": "sliding_window", "window": 64}],  # Based: Taylor linear attention + small windows
    "deltanet": "deltanet",
    "gated-deltanet": "gated_deltanet",
    "performer": "performer",
    "cosformer": "cosformer",
    "sliding-window": "sliding_window",
    "block-sparse": "block_sparse",
    "gla-hybrid": ["gla", "gla", "gla", "attention"],  # 3 GLA layers then 1 attention layer, repeated
}


register_size_table("lm", LM_SIZES, LM_MIXER_VARIANTS, create_lm)
