"""Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"): bidirectional only.

Keys and values are projected along the sequence axis to ``k`` rows by learned matrices E, F of shape
``[k, max_seq_len]`` (shared by all heads, the paper's "headwise" sharing; ``share_kv=True`` uses one
matrix for both, the paper's "key-value" sharing):

    out = softmax(q (E_T k)^T / sqrt(Dh)) (F_T v),   E_T = E[:, :T], F_T = F[:, :T]

so a sequence shorter than ``max_seq_len`` uses the first T columns of E/F; a longer one is an error.
There is no causal form (each projected key mixes every position), so ``causal=True`` is refused.

Padding masks are exact: padded keys/values are zeroed before the projection, and real token j is
projected with column ``E[:, r_j]`` where ``r_j`` is its rank among the real tokens of its sequence (0 for
the first real token), so each sequence's real outputs equal those of running it alone, with left or
right padding. (With plain positional columns, left padding would shift the columns the real tokens
use, making the outputs depend on the padding length.) Padded outputs are zero.

``naive_linformer`` is the reference: the explicit float32 computation with the same parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from layers.mixer import Mixer, register_mixer
from layers.sparse_attention import check_int_option


def naive_linformer(q, k, v, E: torch.Tensor, F_: torch.Tensor) -> torch.Tensor:
    """The reference in float32. q, k, v: [B, H, T, Dh]; E, F_: [kp, >= T] (the first T columns are used).

    K' = E_T k, V' = F_T v ([B, H, kp, Dh]); out = softmax(q K'^T / sqrt(Dh)) V'.
    """
    T = q.shape[-2]
    E_T, F_T = E[:, :T].float(), F_[:, :T].float()
    kp = torch.einsum("rt,bhtd->bhrd", E_T, k.float())
    vp = torch.einsum("rt,bhtd->bhrd", F_T, v.float())
    scores = q.float() @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (scores.softmax(dim=-1) @ vp).to(q.dtype)


@register_mixer("linformer")
class Linformer(Mixer):
    """Linformer self-attention (bidirectional only).

    Options: ``k`` (projected length, int >= 1, default 256), ``max_seq_len`` (required int >= 1: the
    number of columns of E/F and the longest accepted sequence), ``share_kv`` (one projection for keys
    and values), ``qkv_bias``, ``proj_bias``, ``qk_norm`` (per-head RMSNorm on q and k before the sequence
    projection). E and F are initialised uniform(+-1/sqrt(k)) as in the
    reference implementations. No incremental decoding.
    """

    supports_causal = False
    supports_bidirectional = True
    supports_mask = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        causal: bool = False,
        k: int = 256,
        max_seq_len: int | None = None,
        share_kv: bool = False,
        qkv_bias: bool = False,
        proj_bias: bool = False,
        qk_norm: bool = False,
    ):
        super().__init__(dim, num_heads, causal)
        if max_seq_len is None:
            raise ValueError("linformer needs max_seq_len (the length of its learned sequence projections E/F)")
        self.max_seq_len = check_int_option("max_seq_len", max_seq_len, 1)
        self.k = check_int_option("k", k, 1)
        if not isinstance(share_kv, bool):
            raise ValueError(f"share_kv must be a bool, got {share_kv!r}")
        self.share_kv = share_kv
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self._setup_qk_norm(qk_norm, self.head_dim)
        bound = 1.0 / math.sqrt(self.k)
        self.E = nn.Parameter(torch.empty(self.k, self.max_seq_len).uniform_(-bound, bound))
        self.F = None if share_kv else nn.Parameter(torch.empty(self.k, self.max_seq_len).uniform_(-bound, bound))

    @property
    def value_projection(self) -> torch.Tensor:
        return self.E if self.F is None else self.F

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        B, T, _ = x.shape
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.max_seq_len} of this linformer")
        H, Dh = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, Dh]
        q, k = self._normalize_qk(q, k)
        E, Fv = self.E.to(x.dtype), self.value_projection.to(x.dtype)
        if mask is None:
            kp = torch.einsum("rt,bhtd->bhrd", E[:, :T], k)
            vp = torch.einsum("rt,bhtd->bhrd", Fv[:, :T], v)
        else:
            # real token j uses column rank_j; padded tokens are zeroed (their column is irrelevant)
            rank = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
            m = mask.to(x.dtype)[:, None, :, None]
            kp = torch.einsum("rbt,bhtd->bhrd", E[:, rank], k * m)
            vp = torch.einsum("rbt,bhtd->bhrd", Fv[:, rank], v * m)
        y = F.scaled_dot_product_attention(q, kp, vp)
        y = self.proj(y.transpose(1, 2).reshape(B, T, H * Dh))
        return y if mask is None else y * mask[..., None].to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, max_seq_len={self.max_seq_len}, share_kv={self.share_kv}"
