"""Block-sparse softmax attention: the BigBird / Longformer pattern of window, global and random blocks.

Tokens are grouped in blocks of ``block_size`` (block of a token = position // block_size). A query
block attends to the ``window_blocks`` neighbouring blocks on each side (and its own), to the first
``global_blocks`` blocks (which themselves attend to everything), and to ``random_blocks`` random
blocks drawn by a seeded hash (``layers.sparse_attention.random_block``): the pattern is fixed by
``seed`` and identical between forward calls, backends, devices and the reference. Causal mode keeps
only blocks at or before the query's block, with token-level causality inside; its random blocks are
drawn from blocks ``0..qb`` so they never depend on the sequence length (decoding sees the same
pattern as the forward pass). Bidirectional random blocks are drawn from the blocks of the (real part
of the) sequence. A sequence that is not a multiple of ``block_size`` is treated as padded to one:
the partial last block's padding is simply never attended to.

Paths: FlexAttention ``BlockMask`` on CUDA (``backend="auto"|"flex"``; whole 128x128 tiles outside
the pattern are skipped), SDPA with a boolean mask (``"sdpa"``), the float32 reference (``"math"``,
``naive_block_sparse_attention``). Decoding keeps the full KV cache (the pattern reaches back to the
global blocks and to random blocks anywhere before): ``state_size(T) = 2 * dim * T``.
"""
from __future__ import annotations

import torch

from layers.mixer import State, register_mixer
from layers.sparse_attention import (SparseSoftmaxAttention, block_sparse_allowed, check_int_option, local_span,
                                     naive_masked_attention)


def naive_block_sparse_attention(q, k, v, *, block_size: int, window_blocks: int, global_blocks: int, random_blocks: int,
                                 seed: int, causal: bool) -> torch.Tensor:
    """The reference: dense float32 attention with the explicit block pattern. q, k, v: [B, H, T, D]."""
    T = q.shape[-2]
    pos = torch.arange(T, device=q.device)
    allowed = block_sparse_allowed(pos[:, None], pos[None, :], block_size=block_size, window_blocks=window_blocks,
                                   global_blocks=global_blocks, random_blocks=random_blocks, seed=seed, causal=causal,
                                   num_blocks=-(-T // block_size))
    return naive_masked_attention(q, k, v, allowed)


DEFAULT_BLOCK_SIZE = 64

@register_mixer("block_sparse")
class BlockSparseAttention(SparseSoftmaxAttention):
    """BigBird-style block-sparse attention, causal or bidirectional, with rotary embeddings as in ``attention``.

    Options: ``block_size`` (>= 1; None: ``DEFAULT_BLOCK_SIZE`` = 64, cut to ``max_seq_len``), ``window_blocks``
    (>= 0, default 1 on each side),
    ``global_blocks`` (>= 0, default 1), ``random_blocks`` (>= 0, default 1 per query block), ``seed``
    (int, default 0), ``backend`` (auto | flex | sdpa | math), ``qkv_bias``, ``proj_bias``, ``rope``
    (None: on when causal), ``rope_base``, ``max_seq_len`` (optional, passed by LM / ViT / encoder models: a
    ``block_size`` larger than it is refused, naming ``block_size``), ``qk_norm`` (per-head RMSNorm on q and k,
    as ``attention``'s).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        causal: bool = True,
        block_size: int | None = None,
        window_blocks: int = 1,
        global_blocks: int = 1,
        random_blocks: int = 1,
        seed: int = 0,
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
        options = {
            "block_size": local_span("block_size", block_size, DEFAULT_BLOCK_SIZE, max_seq_len),
            "window_blocks": check_int_option("window_blocks", window_blocks, 0),
            "global_blocks": check_int_option("global_blocks", global_blocks, 0),
            "random_blocks": check_int_option("random_blocks", random_blocks, 0),
            "seed": check_int_option("seed", seed, 0),
        }
        super().__init__(dim, num_heads, causal, backend=backend, qkv_bias=qkv_bias, proj_bias=proj_bias, rope=rope,
                         rope_base=rope_base, qk_norm=qk_norm)
        self.block_size, self.window_blocks = options["block_size"], options["window_blocks"]
        self.global_blocks, self.random_blocks, self.seed = options["global_blocks"], options["random_blocks"], options["seed"]
        self.max_seq_len = max_seq_len

    def pattern(self, q_pos: torch.Tensor, k_pos: torch.Tensor, num_blocks=None) -> torch.Tensor:
        return block_sparse_allowed(q_pos, k_pos, block_size=self.block_size, window_blocks=self.window_blocks,
                                    global_blocks=self.global_blocks, random_blocks=self.random_blocks, seed=self.seed,
                                    causal=self.causal, num_blocks=num_blocks)

    def pattern_extra(self, T: int, mask: torch.Tensor | None) -> dict:
        if self.causal or not self.random_blocks:
            return {}
        if mask is None:
            return {"num_blocks": max(1, -(-T // self.block_size))}
        # each sequence draws its random blocks among its own blocks, as if it ran alone
        return {"num_blocks": ((mask.sum(dim=1) + self.block_size - 1) // self.block_size).clamp(min=1)}

    # --- decoding: the full KV cache, the pattern applied to each new query ------------------------

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        self._check_decoding()
        dtype = dtype or self.qkv.weight.dtype
        shape = (batch_size, self.num_heads, max_len or 0, self.head_dim)
        zeros = lambda: torch.zeros(shape, device=device, dtype=dtype)
        return {"k": zeros(), "v": zeros(), "pos": 0}

    def prefill(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        self._check_decoding()
        self.check_input(x)
        start, T = state["pos"], x.shape[1]
        end, device = start + T, x.device
        q, k, v = self._project(x, torch.arange(start, end, device=device))
        if end > state["k"].shape[2]:  # grow the cache when it was not preallocated large enough
            extra = end - state["k"].shape[2]
            grow = lambda c: torch.cat([c, c.new_zeros(c.shape[0], c.shape[1], extra, c.shape[3])], dim=2)
            state["k"], state["v"] = grow(state["k"]), grow(state["v"])
        keys = torch.cat([state["k"][:, :, :start].to(k.dtype), k], dim=2)
        values = torch.cat([state["v"][:, :, :start].to(v.dtype), v], dim=2)
        state["k"][:, :, start:end] = k.to(state["k"].dtype)
        state["v"][:, :, start:end] = v.to(state["v"].dtype)
        state["pos"] = end
        k_pos = torch.arange(end, device=device)
        y = self._attend_cache(q, k_pos[start:], keys, values, k_pos, torch.ones(end, dtype=torch.bool, device=device))
        return self._merge(y), state

    def state_size(self, seq_len: int) -> int:
        return 2 * self.dim * seq_len

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, block_size={self.block_size}, window_blocks={self.window_blocks}, "
                f"global_blocks={self.global_blocks}, random_blocks={self.random_blocks}, seed={self.seed}")
