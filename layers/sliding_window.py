"""Sliding-window softmax attention (Longformer / Mistral style local attention).

Each query sees the keys within ``window`` positions: causal, the ``window`` latest tokens
including itself (``0 <= i - j < window``); bidirectional, ``|i - j| < window``. A window at least
as long as the sequence is plain full attention, and is computed exactly as the ``attention`` mixer
computes it (same kernels, bitwise equal outputs with the same weights): short inputs are normal at
run time (decoding starts short). ``window <= 0`` (or a non-int window) is an error, and so is an
explicit ``window`` larger than a given ``max_seq_len`` (every token would see the whole sequence).

Paths (``naive_masked_attention`` in ``layers.sparse_attention`` is the reference):
* training / forward: FlexAttention with a cached ``BlockMask`` on CUDA (``backend="auto"`` or
  ``"flex"``), SDPA with a cached boolean [T, T] mask elsewhere (``"sdpa"``), the float32
  reference (``"math"``);
* decoding: a ring-buffer KV cache of ``min(window, tokens seen)`` slots (``prefill`` consumes a
  prompt in parallel and leaves the last ``window`` keys/values in it; ``step`` adds one token).
"""
from __future__ import annotations

import torch

from layers.mixer import State, register_mixer
from layers.sparse_attention import (SparseSoftmaxAttention, check_int_option, local_span, naive_masked_attention,
                                     sliding_window_allowed)


def naive_sliding_window_attention(q, k, v, window: int, causal: bool) -> torch.Tensor:
    """The reference: dense float32 attention with the explicit band mask. q, k, v: [B, H, T, D]."""
    pos = torch.arange(q.shape[-2], device=q.device)
    return naive_masked_attention(q, k, v, sliding_window_allowed(pos[:, None], pos[None, :], window, causal))


DEFAULT_WINDOW = 256


@register_mixer("sliding_window")
class SlidingWindowAttention(SparseSoftmaxAttention):
    """Softmax attention over a local window, with rotary embeddings as in ``attention``.

    Options: ``window`` (int >= 1; None: ``DEFAULT_WINDOW`` = 256, cut to ``max_seq_len``; a window >= T is full
    attention), ``max_seq_len`` (optional, the longest sequence the model will see, as LM / ViT / encoder models
    pass it: a ``window`` larger than it is refused, naming ``window``), ``backend``
    (auto | flex | sdpa | math), ``qkv_bias``, ``proj_bias``, ``rope`` (None: on when causal),
    ``rope_base``, ``qk_norm`` (per-head RMSNorm on q and k, as ``attention``'s).
    ``state_size(T) = 2 * dim * min(T, window)`` (the ring-buffer KV cache).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        causal: bool = True,
        window: int | None = None,
        backend: str = "auto",
        qkv_bias: bool = False,
        proj_bias: bool = False,
        rope: bool | None = None,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        max_seq_len: int | None = None,
    ):
        if max_seq_len is not None:
            max_seq_len = check_int_option("max_seq_len", max_seq_len, 1)
        window = local_span("window", window, DEFAULT_WINDOW, max_seq_len)
        super().__init__(dim, num_heads, causal, backend=backend, qkv_bias=qkv_bias, proj_bias=proj_bias, rope=rope,
                         rope_base=rope_base, qk_norm=qk_norm)
        self.window = window
        self.max_seq_len = max_seq_len

    def pattern(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return sliding_window_allowed(q_pos, k_pos, self.window, self.causal)

    def is_full(self, T: int) -> bool:
        return self.window >= T

    # --- decoding: a ring buffer ------------------------------------------------------------------

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        """``k``/``v``: [B, H, slots, Dh] with ``min(window, max_len)`` slots (grown up to ``window`` as
        needed); the token at absolute position ``p`` lives in slot ``p % window``."""
        self._check_decoding()
        dtype = dtype or self.qkv.weight.dtype
        slots = min(self.window, max_len or 0)
        shape = (batch_size, self.num_heads, slots, self.head_dim)
        zeros = lambda: torch.zeros(shape, device=device, dtype=dtype)
        return {"k": zeros(), "v": zeros(), "pos": 0}

    def prefill(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        self._check_decoding()
        self.check_input(x)
        W, start, T = self.window, state["pos"], x.shape[1]
        end, device = start + T, x.device
        q, k, v = self._project(x, torch.arange(start, end, device=device))
        # the cached tokens: slot s holds the latest position p < start with p % W == s (if any)
        slots = state["k"].shape[2]
        s = torch.arange(slots, device=device)
        cache_pos = (start - 1) - torch.remainder(start - 1 - s, W)
        new_pos = torch.arange(start, end, device=device)
        keys = torch.cat([state["k"].to(k.dtype), k], dim=2)
        values = torch.cat([state["v"].to(v.dtype), v], dim=2)
        k_pos = torch.cat([cache_pos, new_pos])
        k_valid = torch.cat([cache_pos >= 0, torch.ones(T, dtype=torch.bool, device=device)])
        y = self._attend_cache(q, new_pos, keys, values, k_pos, k_valid)
        # write the last min(T, W) new tokens into their slots, growing the buffer up to W slots
        need = min(W, end)
        if slots < need:
            grow = lambda c: torch.cat([c, c.new_zeros(c.shape[0], c.shape[1], need - slots, c.shape[3])], dim=2)
            state["k"], state["v"] = grow(state["k"]), grow(state["v"])
        n = min(T, W)
        idx = torch.remainder(torch.arange(end - n, end, device=device), W)
        state["k"] = state["k"].index_copy(2, idx, k[:, :, T - n :].to(state["k"].dtype))
        state["v"] = state["v"].index_copy(2, idx, v[:, :, T - n :].to(state["v"].dtype))
        state["pos"] = end
        return self._merge(y), state

    def state_size(self, seq_len: int) -> int:
        return 2 * self.dim * min(seq_len, self.window)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"
