"""Decoder-only language models: pre-norm blocks of ``mixer`` + MLP, with a per-layer mixer spec.

``mixer`` is a name, a mapping ``{name: ..., **kwargs}``, or a list of those repeated over depth
(``["gla", "gla", "gla", "attention"]``), so hybrids are one config line. ``block="mamba"`` drops
the MLP (Mamba's layout: norm, mixer, residual); ``mlp="rwkv6_channel_mix"`` is RWKV's token-shifted
MLP (it keeps the last token as decoding state); ``moe`` puts mixture-of-experts MLPs in the blocks.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import PositiveInt, field_validator, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

import layers
from layers.rwkv6 import RWKV6ChannelMix
from zoo.decoding import GraphedDecoder
from zoo.models.base import MixerStackConfig, MoEConfig, ZooModel, build_mixer, build_mlp
from zoo.registry import Variant, register_family, register_size_table

# hidden width of each MLP kind, as a multiple of dim (rounded up to 64)
MLP_WIDTH = {"swiglu": 8 / 3, "gelu": 4.0, "rwkv6_channel_mix": 3.5}
DENSE_MLPS = {  # (dim, hidden, relative depth of the layer) -> the block's MLP
    "swiglu": lambda dim, hidden, depth: layers.create_mlp("swiglu", dim, hidden),
    "gelu": lambda dim, hidden, depth: layers.create_mlp("gelu", dim, hidden),
    "rwkv6_channel_mix": lambda dim, hidden, depth: RWKV6ChannelMix(dim, hidden, init_depth=depth),
}

class LMConfig(MixerStackConfig):
    vocab_size: PositiveInt = 256
    dim: PositiveInt = 192
    depth: PositiveInt = 4
    num_heads: PositiveInt = 3
    block: Literal["transformer", "mamba"] = "transformer"
    mlp: Literal["swiglu", "gelu", "rwkv6_channel_mix"] = "swiglu"
    mlp_hidden: PositiveInt | None = None  # default: MLP_WIDTH[mlp] * dim, rounded up to 64
    moe: MoEConfig | None = None
    grad_checkpointing: bool = False  # recompute each block in backward: long contexts in less memory
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    max_seq_len: PositiveInt = 2048
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    @model_validator(mode="after")
    def _check_block(self) -> "LMConfig":
        if self.block == "mamba" and self.moe is not None:
            raise ValueError("moe needs MLPs to replace, but block='mamba' has none: use block='transformer'")
        if self.moe is not None and self.mlp == "rwkv6_channel_mix":
            raise ValueError("moe experts are SwiGLU or GELU MLPs: use mlp='swiglu' or 'gelu' with moe")
        return self

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {v}")
        return v

    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 64 * math.ceil(MLP_WIDTH[self.mlp] * self.dim / 64)


class LMBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))`` unless ``block='mamba'``.

    Decoding state: ``{"mixer": ...}``, plus ``"mlp"`` for an MLP that keeps state (RWKV's channel mix)."""

    def __init__(self, config: LMConfig, layer: int, mixer_name: str, mixer_kwargs: dict[str, Any]):
        super().__init__()
        self.norm1 = layers.create_norm(config.norm, config.dim)
        depth = layer / max(config.depth - 1, 1)  # RWKV's initialisation depends on the layer's relative depth
        defaults = {"max_seq_len": config.max_seq_len, "init_depth": depth}  # max_seq_len: cosformer, hyena's filter
        self.mixer = build_mixer("lm", mixer_name, mixer_kwargs, config.dim, config.num_heads, causal=True, defaults=defaults)
        self.norm2, self.mlp = None, None
        if config.block == "transformer":
            self.norm2 = layers.create_norm(config.norm, config.dim)
            dense = DENSE_MLPS[config.mlp](config.dim, config.hidden_dim(), depth)
            self.mlp = build_mlp(config.moe, layer, dense, config.dim, config.hidden_dim(), config.mlp, causal=True)
        self.stateful_mlp = hasattr(self.mlp, "init_state")  # an MLP with decoding state (RWKV's token shift)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.norm1(x), mask=mask))
        if self.mlp is None:
            return x
        h = self.norm2(x)
        return x + self.dropout(self.mlp(h, mask) if self.stateful_mlp else self.mlp(h))

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> dict:
        state = {"mixer": self.mixer.init_state(batch_size, device=device, dtype=dtype, max_len=max_len)}
        if self.stateful_mlp:
            state["mlp"] = self.mlp.init_state(batch_size, device=device)
        return state

    def decode(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Advance the decoding state: ``step`` for one token, ``prefill`` for a prompt."""
        one = x.shape[1] == 1
        y, mixer_state = (self.mixer.step if one else self.mixer.prefill)(self.norm1(x), state["mixer"])
        x, new_state = x + y, {"mixer": mixer_state}
        if self.mlp is None:
            return x, new_state
        h = self.norm2(x)
        if self.stateful_mlp:
            y, new_state["mlp"] = (self.mlp.step if one else self.mlp.prefill)(h, state["mlp"])
        else:
            y = self.mlp(h)
        return x + y, new_state


@register_family("lm")
class LM(ZooModel):
    """A decoder-only LM. ``forward(input_ids, mask=None) -> logits [B, T, vocab]``."""

    config_class = LMConfig
    mixer_causal = True

    def __init__(self, config: LMConfig, name: str | None = None):
        super().__init__(config, name)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(LMBlock(config, i, n, kw) for i, (n, kw) in enumerate(config.layer_mixers()))
        self.norm = layers.create_norm(config.norm, config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual output projections by depth so the residual stream stays O(1)
        for name, p in self.named_parameters():
            if name.endswith(("mixer.proj.weight", "mixer.out_proj.weight", "mlp.w3.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, std=config.init_std / math.sqrt(2 * config.depth))

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's init of linear and embedding layers; parameters marked ``_no_reinit`` (Mamba's dt bias) keep theirs."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
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
        recompute = self.config.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, mask, use_reentrant=False) if recompute else block(x, mask=mask)
        return self.head(self.norm(x))

    # --- incremental decoding ----------------------------------------------------------------

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> list[dict]:
        device = device or self.embed.weight.device
        return [b.init_state(batch_size, device=device, dtype=dtype, max_len=max_len) for b in self.blocks]

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
                 generator: torch.Generator | None = None, cuda_graph: bool = False, compile: bool = False) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``idx`` through the mixers' ``step`` path; ``temperature=0`` is greedy.
        ``cuda_graph=True`` replays each step as a captured CUDA graph (``zoo.decoding``): CUDA only, and
        only for models whose decoding state has a fixed size (no attention KV cache); ``compile=True`` (with
        ``cuda_graph``) captures the torch.compile'd step, fewer and fused kernels."""
        self._check_ids(idx, offset=max_new_tokens)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if compile and not cuda_graph:
            raise ValueError("compile=True compiles the captured decoding step: it needs cuda_graph=True")
        if cuda_graph and idx.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model and idx on a CUDA device, got {idx.device.type}")
        states = self.init_state(idx.shape[0], device=idx.device, max_len=idx.shape[1] + max_new_tokens)
        logits, states = self.prefill(idx, states)
        decoder = GraphedDecoder(self, states, compile=compile) if cuda_graph and max_new_tokens else None
        out = [idx]
        for _ in range(max_new_tokens):
            next_id = sample_next(logits[:, -1], temperature, top_k, generator)
            out.append(next_id)
            if decoder is not None:
                logits = decoder.step(next_id)[:, None]
            else:
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
    # the state-space issue's mixers; Mamba's layout has no MLPs and twice the layers (as mamba-130m for GPT-2 small)
    "s4d": "s4d",
    "hyena": "hyena",
    "rwkv6": Variant({"mixer": "rwkv6", "mlp": "rwkv6_channel_mix"}),
    "mamba": Variant(lambda size: {"mixer": "mamba", "block": "mamba", "depth": 2 * size["depth"]}),
    "mamba2": Variant(lambda size: {"mixer": "mamba2", "block": "mamba", "depth": 2 * size["depth"]}),
    "mamba2-hybrid": ["mamba2", "mamba2", "mamba2", "attention"],  # Jamba-style: 3 Mamba-2 layers then attention, with MLPs
    # mixture-of-experts MLPs: Mixtral (8 experts, top-2) and fine-grained DeepSeek-V3 style routing
    "moe": Variant({"moe": {"num_experts": 8, "top_k": 2}}),
    "moe-fine": Variant({"moe": {"num_experts": 64, "top_k": 6, "shared_experts": 2, "granularity": 8,
                                 "router": "sigmoid_topk", "balance": "bias"}}),
}


register_size_table("lm", LM_SIZES, LM_MIXER_VARIANTS, create_lm)
