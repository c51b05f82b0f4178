"""Shared pieces of the sparse softmax-attention mixers (``sliding_window``, ``block_sparse``).

A sparse pattern is written once, as an *elementwise* predicate on integer query/key positions
(``sliding_window_allowed``, ``block_sparse_allowed``). The same predicate

* builds a dense boolean mask ``[T, T]`` (or ``[B, T, T]`` with padding) by broadcasting
  position tensors, for SDPA and for the reference, and
* is the ``mask_mod`` of a FlexAttention ``BlockMask`` on CUDA, where whole blocks the
  predicate rules out are skipped.

``naive_masked_attention(q, k, v, allowed)`` is the obviously-correct dense reference: an explicit
``softmax(q k^T / sqrt(d) masked by allowed) v`` in float32.

Padding (``mask: [B, T] bool``, True = real token) follows the ``attention`` mixer: real tokens are
renumbered ``0, 1, ...`` from the first real one (``padded_positions``) and the pattern is applied
to those positions, so every sequence of a padded batch attends exactly as if it ran alone;
padded keys are never attended to; every query may see itself (keeps fully padded rows finite);
padded outputs are zeroed by the mixer.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from layers.attention import SoftmaxProjections, naive_attention, sdpa_attention
from layers.mixer import State

SPARSE_BACKENDS = ("auto", "flex", "sdpa", "math")

_U32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B


def naive_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), keys where ``allowed``) v, in float32, returned in q's dtype.

    q: [B, H, Tq, D]; k, v: [B, H, Tk, D]; ``allowed``: bool, broadcastable to [B, H, Tq, Tk];
    every query row must allow at least one key.
    """
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


# --- options --------------------------------------------------------------------------------------


def check_int_option(name: str, value, minimum: int) -> int:
    """``value`` must be a (non-bool) int >= minimum, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def local_span(name: str, value: int | None, default: int, max_seq_len: int | None) -> int:
    """A window or block size: ``value`` (None: ``default``, cut to ``max_seq_len``) as an int >= 1. One larger
    than a given ``max_seq_len`` is refused, naming ``name``: every token would see the whole sequence."""
    if value is None:
        value = default if max_seq_len is None else min(default, max_seq_len)
    value = check_int_option(name, value, 1)
    if max_seq_len is not None and value > max_seq_len:
        raise ValueError(f"{name}={value} is larger than max_seq_len={max_seq_len}: every token would see the whole "
                         f"sequence; use the attention mixer (or a {name} <= max_seq_len)")
    return value


def check_backend(backend: str) -> str:
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(SPARSE_BACKENDS)}; got {backend!r}")
    if backend == "flex" and not flex_available():
        raise ValueError("backend='flex' needs torch.nn.attention.flex_attention (PyTorch >= 2.5), which is not importable")
    return backend


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch >= 2.6 is required
        return False
    return True


FLEX_AVAILABLE = flex_available()


def flex_supports_head_dim(head_dim: int) -> bool:
    """FlexAttention's Triton kernels want a power-of-two head dim of at least 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def resolve_sparse_backend(backend: str, device: torch.device, head_dim: int) -> str:
    """``auto``: FlexAttention on CUDA (when importable and the head dim suits it), else SDPA.

    ``flex`` off CUDA is refused: FlexAttention has no backward on CPU (and its eager CPU forward
    materializes the full score matrix), so training there must use ``sdpa``.
    """
    if backend == "auto":
        return "flex" if device.type == "cuda" and FLEX_AVAILABLE and flex_supports_head_dim(head_dim) else "sdpa"
    if backend == "flex":
        if device.type != "cuda":
            raise ValueError(
                f"backend='flex' runs on CUDA only (FlexAttention has no backward on {device.type}); "
                "use backend='sdpa' or 'auto' for these tensors"
            )
        if not flex_supports_head_dim(head_dim):
            raise ValueError(f"backend='flex' needs a power-of-two head_dim >= 16, got {head_dim}; use backend='sdpa'")
    return backend


# --- positions and patterns -------------------------------------------------------------------------


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] positions numbering the real tokens 0, 1, ... (padded ones get a neighbour's number)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def sliding_window_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    """Elementwise: may the query at ``q_pos`` see the key at ``k_pos``?

    causal: the ``window`` latest tokens including itself (``0 <= q - k < window``);
    bidirectional: ``|q - k| < window``.
    """
    d = q_pos - k_pos
    if causal:
        return (d >= 0) & (d < window)
    return d.abs() < window


def hash_u32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing hash (int64 arithmetic, values kept below 2**32, so no overflow)."""
    x = x & _U32
    x = (((x >> 16) ^ x) * _HASH_MUL) & _U32
    x = (((x >> 16) ^ x) * _HASH_MUL) & _U32
    return (x >> 16) ^ x


def random_block(seed: int, q_block: torch.Tensor, r: int, num_choices: torch.Tensor | int) -> torch.Tensor:
    """The ``r``-th random key block of query block ``q_block``: uniform-ish in ``[0, num_choices)``.

    A pure function of ``(seed, q_block, r, num_choices)``: the pattern is the same in every forward
    call, on every device, in every backend, for any sequence length (causal: ``num_choices`` is
    ``q_block + 1``, so a block's random keys never depend on how long the sequence is).
    """
    h = hash_u32(hash_u32(hash_u32(seed) ^ q_block) ^ r)
    return torch.remainder(h, num_choices)


def block_sparse_allowed(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    block_size: int,
    window_blocks: int,
    global_blocks: int,
    random_blocks: int,
    seed: int,
    causal: bool,
    num_blocks: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Elementwise BigBird / Longformer pattern on token positions (blocks are ``pos // block_size``).

    A query in block ``qb`` sees a key in block ``kb`` when
    * window: ``|qb - kb| <= window_blocks`` (causal: ``0 <= qb - kb <= window_blocks``), or
    * global: ``kb < global_blocks`` or ``qb < global_blocks`` (global blocks see everything), or
    * random: ``kb`` is one of the ``random_blocks`` blocks ``random_block(seed, qb, r, n)`` with
      ``n = qb + 1`` when causal and ``n = num_blocks`` (blocks in the sequence) when bidirectional;
      a random block may coincide with a window or global one (then the query sees fewer blocks);
    and, when causal, ``k_pos <= q_pos`` (token-level causality inside the diagonal block).
    A last block shorter than ``block_size`` is a padded block whose padding is never attended to.
    """
    qb, kb = q_pos // block_size, k_pos // block_size
    if causal:
        allowed = (qb >= kb) & (qb - kb <= window_blocks)
    else:
        allowed = (qb - kb).abs() <= window_blocks
    if global_blocks:
        allowed = allowed | (kb < global_blocks) | (qb < global_blocks)
    if random_blocks:
        if causal:
            choices = qb + 1
        else:
            if num_blocks is None:
                raise ValueError("a bidirectional pattern with random blocks needs num_blocks")
            choices = num_blocks
        for r in range(random_blocks):
            allowed = allowed | (kb == random_block(seed, qb, r, choices))
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    return allowed


def dense_allowed(
    pattern: Callable[..., torch.Tensor], T: int, mask: torch.Tensor | None, device, **extra
) -> torch.Tensor:
    """The dense bool mask of ``pattern`` for a length-``T`` self-attention: [1, 1, T, T] or [B, 1, T, T].

    ``pattern(q_pos, k_pos, **extra)`` is elementwise; per-batch ``extra`` tensors (shape [B]) are
    broadcast over [B, T, T]. With a padding mask, positions are renumbered per sequence, padded
    keys are dropped and the diagonal is always allowed.
    """
    if mask is None:
        pos = torch.arange(T, device=device)
        return pattern(pos[:, None], pos[None, :], **extra)[None, None]
    pos = padded_positions(mask)
    extra = {k: (v[:, None, None] if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
    allowed = pattern(pos[:, :, None], pos[:, None, :], **extra) & mask[:, None, :]
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)
    return allowed[:, None]


# --- attention cores ---------------------------------------------------------------------------------


def flex_block_mask(pattern: Callable[..., torch.Tensor], T: int, mask: torch.Tensor | None, device, **extra):
    """The FlexAttention ``BlockMask`` of ``pattern`` (same semantics as ``dense_allowed``). On CUDA, outside a
    compiled caller, its construction is compiled: evaluated eagerly, ``mask_mod`` runs over all B x T x T pairs
    (12.5 ms a layer at B = 32, T = 2001 on an H100, against 0.4 ms compiled), and a padding mask needs a new
    block mask every call. (On CPU, where FlexAttention serves only the tests, it stays eager.)"""
    from torch.nn.attention.flex_attention import create_block_mask

    compile_it = torch.device(device).type == "cuda" and not torch.compiler.is_compiling()
    build = functools.partial(create_block_mask, device=device, _compile=compile_it)

    # indices arrive as int32 in the compiled kernel: widen them so the pattern's int64 arithmetic
    # (the random-block hash) is the same as in the dense mask
    if mask is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return pattern(q_idx.to(torch.int64), kv_idx.to(torch.int64), **extra)

        return build(mask_mod, None, None, T, T)

    pos = padded_positions(mask)

    def mask_mod(b, h, q_idx, kv_idx):
        kw = {k: (v[b] if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
        return (pattern(pos[b, q_idx], pos[b, kv_idx], **kw) & mask[b, kv_idx]) | (q_idx == kv_idx)

    return build(mask_mod, mask.shape[0], None, T, T)


_COMPILED_FLEX = None
# One compiled FlexAttention serves every sparse mixer; dynamo specializes it per sequence length,
# dtype, mask_mod code and pattern class/flags, which can exceed its default of 8 versions per
# function (then it silently runs the unfused eager path). Allow more while calling it.
FLEX_RECOMPILE_LIMIT = 64


def flex_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention, compiled once per process (eager flex materializes the scores); inlined when
    the caller is itself being compiled."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    config = torch._dynamo.config
    limit = max(getattr(config, "recompile_limit", 8), FLEX_RECOMPILE_LIMIT)
    with config.patch(recompile_limit=limit) if hasattr(config, "recompile_limit") else config.patch(cache_size_limit=limit):
        return _COMPILED_FLEX(q, k, v, block_mask=block_mask)


def dense_attention(backend: str, q, k, v, allowed: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
    """SDPA (``sdpa``) or the float32 reference (``math``) with an optional bool mask."""
    if backend == "math":
        return naive_attention(q, k, v, allowed=allowed, causal=causal)
    return sdpa_attention(q, k, v, allowed=allowed, causal=causal)


# --- the shared mixer body ------------------------------------------------------------------------------


class SparseSoftmaxAttention(SoftmaxProjections):
    """Softmax attention restricted by an elementwise position pattern (subclasses give ``pattern``).

    Parameters mirror the ``attention`` mixer (``qkv``, ``proj``, rotary embeddings), so the state
    dict of one loads into the other. ``backend``: ``auto`` (FlexAttention on CUDA, SDPA with a
    boolean mask elsewhere), ``flex`` (CUDA only), ``sdpa``, or ``math`` (the float32 reference).
    Dense masks / block masks of unpadded inputs are cached per (T, device) (at most 8 entries;
    a dense mask takes T*T bytes). Decoding always uses SDPA (``math`` for ``backend="math"``). ``qk_norm``: as
    ``attention``'s (per-head RMSNorm on q and k before the rotary embedding).
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
        self.backend = check_backend(backend)
        self._mask_cache: dict = {}

    # subclasses: the pattern and the per-call arguments it needs
    def pattern(self, q_pos: torch.Tensor, k_pos: torch.Tensor, **extra) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pattern_extra(self, T: int, mask: torch.Tensor | None) -> dict:
        return {}

    def is_full(self, T: int) -> bool:
        """True when the pattern allows every (causal) pair for length T: then this is plain attention."""
        return False

    def allowed_mask(self, T: int, mask: torch.Tensor | None = None, device=None) -> torch.Tensor:
        """The dense bool mask this mixer applies: [1, 1, T, T], or [B, 1, T, T] with a padding mask."""
        return dense_allowed(self.pattern, T, mask, device, **self.pattern_extra(T, mask))

    def _cached(self, key, build):
        if torch.compiler.is_compiling():  # no side effects while tracing; the graph holds the mask
            return build()
        if key not in self._mask_cache:
            if len(self._mask_cache) >= 8:
                self._mask_cache.clear()
            self._mask_cache[key] = build()
        return self._mask_cache[key]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        T, device = x.shape[1], x.device
        positions = torch.arange(T, device=device) if mask is None else padded_positions(mask)
        q, k, v = self._project(x, positions)
        backend = resolve_sparse_backend(self.backend, device, self.head_dim)
        if self.is_full(T):
            # exactly the ``attention`` mixer's computation (same kernels, same mask)
            allowed = None if mask is None else (mask[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=device))
            y = dense_attention("math" if backend == "math" else "sdpa", q, k, v, allowed, causal=self.causal)
        elif backend == "flex":
            extra = self.pattern_extra(T, mask)
            build = lambda: flex_block_mask(self.pattern, T, mask, device, **extra)
            block_mask = build() if mask is not None else self._cached(("flex", T, device), build)
            y = flex_attention_call(q, k, v, block_mask)
        else:
            build = lambda: self.allowed_mask(T, mask, device)
            allowed = build() if mask is not None else self._cached(("dense", T, device), build)
            y = dense_attention(backend, q, k, v, allowed)
        y = self._merge(y)
        return y if mask is None else y * mask[..., None].to(y.dtype)

    # --- decoding helpers ---------------------------------------------------------------------------

    def _check_decoding(self) -> None:
        if not self.causal:
            raise ValueError("incremental decoding needs a causal mixer (this one was built with causal=False)")

    def _attend_cache(self, q, q_pos, keys, values, k_pos, k_valid) -> torch.Tensor:
        """Queries at absolute positions ``q_pos`` [Tq] against cached keys at ``k_pos`` [Tk]."""
        allowed = self.pattern(q_pos[:, None], k_pos[None, :]) & k_valid[None, :]  # decoding is causal: no extras
        backend = "math" if self.backend == "math" else "sdpa"
        return dense_attention(backend, q, keys.to(q.dtype), values.to(q.dtype), allowed[None, None])

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if x_t.dim() != 3 or x_t.shape[1] != 1:
            raise ValueError(f"x_t must have shape [batch, 1, {self.dim}], got {tuple(x_t.shape)}")
        return self.prefill(x_t, state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}, rope={self.rope}"


__all__ = [
    "SPARSE_BACKENDS", "SparseSoftmaxAttention", "block_sparse_allowed", "check_backend", "check_int_option",
    "dense_allowed", "dense_attention", "flex_attention_call", "flex_available", "flex_block_mask", "hash_u32",
    "naive_masked_attention", "padded_positions", "random_block", "resolve_sparse_backend", "sliding_window_allowed",
]
