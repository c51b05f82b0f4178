"""Softmax attention: the baseline mixer, with SDPA, xformers and plain-math backends.

``naive_attention`` is the obviously-correct reference every backend is tested against.
Decoding keeps a KV cache (preallocated when ``max_len`` is given to ``init_state``).
"""
from __future__ import annotations

import importlib.util
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from layers.mixer import Mixer, State, register_mixer
from layers.rotary import RotaryEmbedding


def naive_attention(q, k, v, allowed: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v in float32. q: [B, H, Tq, D]; k, v: [B, H, Tk, D].

    ``allowed`` is a bool mask broadcastable to [B, H, Tq, Tk]; ``causal`` aligns the last query
    with the last key (so a query block at the end of a cache sees the whole prefix).
    """
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        tq, tk = q.shape[-2], k.shape[-2]
        causal_mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        scores = scores.masked_fill(~causal_mask, float("-inf"))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def sdpa_attention(q, k, v, allowed: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    tq, tk = q.shape[-2], k.shape[-2]
    if causal and allowed is None and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if causal:
        causal_mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        allowed = causal_mask if allowed is None else allowed & causal_mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


# Decoding calls SDPA with a new key length at every step. cuDNN's attention builds an execution
# plan per shape, which costs milliseconds per call there, so decoding leaves it out.
DECODING_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

XFORMERS_AVAILABLE = importlib.util.find_spec("xformers") is not None


def xformers_available() -> bool:
    return XFORMERS_AVAILABLE


def xformers_attention(q, k, v, allowed: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    import xformers.ops as xops

    tq, tk = q.shape[-2], k.shape[-2]
    bias = None
    if allowed is not None or (causal and tq != tk):
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq) if causal else True
        allowed = mask if allowed is None else allowed & mask
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        bias = bias.expand(q.shape[0], q.shape[1], tq, tk)
    elif causal:
        bias = xops.LowerTriangularMask()
    # xformers takes [B, T, H, D]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


ATTENTION_BACKENDS: dict[str, Callable] = {
    "sdpa": sdpa_attention,
    "math": naive_attention,
    "xformers": xformers_attention,
}


def resolve_backend(backend: str, device: torch.device) -> Callable:
    """``auto`` picks xformers only when it is installed and the tensors are on CUDA, else SDPA.

    A pure lookup (the installation check ran at import), so ``torch.compile`` traces through it.
    """
    if backend == "auto":
        backend = "xformers" if device.type == "cuda" and XFORMERS_AVAILABLE else "sdpa"
    return ATTENTION_BACKENDS[backend]


class SoftmaxProjections(Mixer):
    """The qkv and output projections, with optional rotary embeddings, of every softmax-attention mixer
    (``attention``, ``sliding_window``, ``block_sparse``), so their state dicts load into each other.

    ``rope=None`` means: rotary embeddings when causal (LMs), none when bidirectional (ViTs carry
    learned position embeddings). ``qk_norm=True`` adds a per-head RMSNorm on q and on k (``q_norm``,
    ``k_norm``, weights of size head_dim; see ``Mixer._setup_qk_norm``) before the rotary embedding, so the
    forward pass, ``prefill``/``step`` and the KV cache all hold the normalised keys.
    """

    def __init__(self, dim: int, num_heads: int, causal: bool, qkv_bias: bool, proj_bias: bool, rope: bool | None,
                 rope_base: float, qk_norm: bool = False):
        super().__init__(dim, num_heads, causal)
        self._setup_qk_norm(qk_norm, self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = causal if rope is None else rope
        self.rotary = RotaryEmbedding(self.head_dim, base=rope_base) if self.rope else None

    def _project(self, x: torch.Tensor, positions: torch.Tensor | None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(dim=2)
        q, k = self._normalize_qk(q, k)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(positions)
            q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, Dh]

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, H, T, Dh = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * Dh))


@register_mixer("attention")
class Attention(SoftmaxProjections):
    """Multi-head softmax attention with optional rotary embeddings (see ``SoftmaxProjections``).

    Bias flags default to the LLaMA layout; ViTs pass the timm one. ``qk_norm=True``: per-head RMSNorm on q
    and k (OLMo-2 / ViT-22B; off by default, which adds no parameters).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        causal: bool = True,
        backend: str = "auto",
        qkv_bias: bool = False,
        proj_bias: bool = False,
        rope: bool | None = None,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
    ):
        super().__init__(dim, num_heads, causal, qkv_bias, proj_bias, rope, rope_base, qk_norm)
        if backend not in ("auto", *ATTENTION_BACKENDS):
            raise ValueError(f"backend must be one of auto, {', '.join(ATTENTION_BACKENDS)}; got {backend!r}")
        if backend == "xformers" and not xformers_available():
            raise ValueError("backend='xformers' was requested but xformers is not installed (pip install 'effzoo[xformers]')")
        self.backend = backend

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        T = x.shape[1]
        allowed = None
        if mask is None:
            positions = torch.arange(T, device=x.device)
        else:
            # Real tokens are numbered from 0 whatever the padding side, so each sequence in a
            # padded batch is treated as if it ran alone. Every query may see itself, which keeps
            # fully padded rows finite; those rows are zeroed below.
            positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
            eye = torch.eye(T, dtype=torch.bool, device=x.device)
            allowed = (mask[:, None, None, :] | eye)
        q, k, v = self._project(x, positions)
        y = resolve_backend(self.backend, x.device)(q, k, v, allowed=allowed, causal=self.causal)
        y = self._merge(y)
        return y if mask is None else y * mask[..., None].to(y.dtype)

    # --- incremental decoding: a KV cache -------------------------------------------------

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        if not self.causal:
            raise ValueError("incremental decoding needs a causal mixer (this one was built with causal=False)")
        dtype = dtype or self.qkv.weight.dtype
        shape = (batch_size, self.num_heads, max_len or 0, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype), "v": torch.zeros(shape, device=device, dtype=dtype), "pos": 0}

    def prefill(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if not self.causal:
            raise ValueError("incremental decoding needs a causal mixer (this one was built with causal=False)")
        self.check_input(x)
        start, T = state["pos"], x.shape[1]
        q, k, v = self._project(x, torch.arange(start, start + T, device=x.device))
        end = start + T
        if end > state["k"].shape[2]:  # grow the cache when it was not preallocated large enough
            extra = end - state["k"].shape[2]
            pad = lambda c: torch.cat([c, c.new_zeros(c.shape[0], c.shape[1], extra, c.shape[3])], dim=2)
            state["k"], state["v"] = pad(state["k"]), pad(state["v"])
        state["k"][:, :, start:end] = k.to(state["k"].dtype)
        state["v"][:, :, start:end] = v.to(state["v"].dtype)
        state["pos"] = end
        keys, values = state["k"][:, :, :end].to(q.dtype), state["v"][:, :, :end].to(q.dtype)
        with sdpa_kernel(DECODING_SDPA_BACKENDS):
            y = resolve_backend(self.backend, x.device)(q, keys, values, causal=T > 1)
        return self._merge(y), state

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if x_t.dim() != 3 or x_t.shape[1] != 1:
            raise ValueError(f"x_t must have shape [batch, 1, {self.dim}], got {tuple(x_t.shape)}")
        return self.prefill(x_t, state)

    def state_size(self, seq_len: int) -> int:
        return 2 * self.dim * seq_len

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}, rope={self.rope}"
