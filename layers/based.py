"""Based linear attention (``based``), causal only.

Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
tradeoff". Queries and keys are projected to a small ``feature_dim`` d' per head (default 16) and
mapped through the 2nd-order Taylor expansion of exp (as in Zoology's ``TaylorExp``):

    phi(x) = concat(1, x / d'^(1/4), flatten(x (x) x) / (sqrt(2) sqrt(d')))      [1 + d' + d'^2 features]

so that ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q . k / sqrt(d')`` (always >= 1/2).
Values keep ``head_dim = dim // num_heads``. The output is normalised by the running feature sum:

    o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps),   S_t = sum_{s<=t} phi(k_s)^T v_s,   z_t = sum_{s<=t} phi(k_s)

computed with the shared chunked core ``layers.linear_attention.chunk_gla`` (no decay, scale 1)
and decoded with its recurrent step ``recurrent_step``. Numerator and normaliser come out of one
core call on values extended by a ones column, ``v' = [v, 1]`` (whose state is ``[S, z]``), so in
bfloat16 both use the same rounded scores and the output stays a convex combination of values
(this halved the bf16 gradient error against computing z separately in float32). Decoding state ``{"S": [B, H, Df, Dv], "z": [B, H, Df]}`` in
``state_dtype`` (plus the position counter ``"pos"``), Df = 1 + d' + d'^2: the full outer product
is kept (as the paper's state-size accounting), so ``state_size`` is H * Df * (Dv + 1).

Only the linear-attention mixer is here. The Based *architecture* interleaves these layers with
small sliding-window softmax attention layers (window 64) and short gated convolutions; that
pairing is done by model configs (a per-layer mixer list, e.g. ``["based", {"name":
"sliding_window", "window": 64}, ...]``), not inside this mixer.

Padding masks: padded tokens get all-zero features (including the constant 1) and zero values,
so they neither write to ``S`` nor to ``z``; their outputs are zero. No fla kernel is wired in
(fla's ``based`` ops fix their own feature map and normalisation), so this is the torch path on
every device.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from layers.linear_attention import GatedLinearMixer, check_chunk_size, check_state_dtype
from layers.mixer import State, register_mixer


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``[..., d] -> [..., 1 + d + d^2]``: concat(1, x / d^(1/4), flatten(x (x) x) / (sqrt(2) sqrt(d)))."""
    d = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / (math.sqrt(2.0) * math.sqrt(d))
    return torch.cat([torch.ones_like(x[..., :1]), x / math.sqrt(math.sqrt(d)), x2], dim=-1)


def naive_based(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """The explicit quadratic form: A_ij = 1 + s_ij + s_ij^2 / 2 with s = q k^T / sqrt(d'), kept for
    j <= i (and, with ``mask`` [B, T], for real keys j only); o = A v / (sum_j A_ij + eps).

    q, k [B, H, T, d'] (the raw projections, no feature map); v [B, H, T, Dv]. Computed in float32
    (float64 stays); returned in q's dtype."""
    dt = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(dt) @ k.to(dt).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    A = 1 + s + s * s / 2
    T = q.shape[2]
    A = A.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), 0)
    if mask is not None:
        A = A.masked_fill(~mask[:, None, None, :], 0)
    o = (A @ v.to(dt)) / (A.sum(-1, keepdim=True) + eps)
    return o.to(q.dtype)


@register_mixer("based")
class Based(GatedLinearMixer):
    """Based linear attention (Taylor feature map), causal only; see the module docstring.

    ``qkv`` projects ``dim -> 2 * H * feature_dim + dim`` (q, k per head to ``feature_dim``, then v
    to ``head_dim`` per head); ``proj`` maps ``dim -> dim``. Torch path only (no ``backend``).
    ``qk_norm=True``: per-head RMSNorm (weights of size ``feature_dim``) on the projected q and k, before the
    Taylor feature map.
    """

    supports_bidirectional = False

    def __init__(self, dim: int, num_heads: int, causal: bool = True, feature_dim: int = 16, chunk_size: int = 64,
                 state_dtype: torch.dtype = torch.float32, eps: float = 1e-6, qkv_bias: bool = False,
                 proj_bias: bool = False, qk_norm: bool = False):
        super().__init__(dim, num_heads, causal)
        if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim <= 0:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self._setup_core("torch", check_chunk_size(chunk_size), check_state_dtype(state_dtype))
        self.feature_dim = feature_dim
        self.eps = float(eps)
        self.head_k_dim = 1 + feature_dim + feature_dim * feature_dim  # Df, the expanded feature size
        self.head_v_dim = self.head_dim
        self.scale = 1.0  # the feature map carries the 1/sqrt(d') scaling; the normalisation cancels any other
        self.qkv = nn.Linear(dim, 2 * num_heads * feature_dim + dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self._setup_qk_norm(qk_norm, feature_dim)

    def _features(self, x, positions):
        B, T, _ = x.shape
        H, d = self.num_heads, self.feature_dim
        q, k, v = self.qkv(x).split([H * d, H * d, self.dim], dim=-1)
        q, k = self._normalize_qk(q.view(B, T, H, d), k.view(B, T, H, d))  # qk_norm: before the feature map
        q, k = taylor_feature_map(q), taylor_feature_map(k)
        return q, k, v.view(B, T, H, self.head_dim), None

    def _output(self, o, x):
        return self.proj(o.reshape(*o.shape[:2], self.dim))

    def _core(self, q, k, v, log_g, state, decoding):
        """The core on values extended by a ones column, v' = [v, 1]: its last output column is the
        normaliser phi(q_t) . z_t, computed from the same (rounded) scores as the numerator, so in bf16
        the two roundings largely cancel. The extended state S' = [S, z] is split into "S" and "z"."""
        ones = torch.ones_like(v[..., :1])
        if state is not None:
            state = {"S": torch.cat([state["S"], state["z"][..., None].to(state["S"].dtype)], dim=-1)}
        # padded tokens have all-zero features, so their ones column writes nothing either
        o, new_state = super()._core(q, k, torch.cat([v, ones], dim=-1), log_g, state, decoding)
        o = o.to(self.state_dtype)
        o = (o[..., :-1] / (o[..., -1:] + self.eps)).to(q.dtype)
        S = new_state["S"]
        return o, {"S": S[..., :-1].contiguous(), "z": S[..., -1].contiguous()}

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        """``{"S": [B, H, Df, Dv], "z": [B, H, Df]}`` zeros in state_dtype, plus ``"pos"`` [B] int64."""
        state = super().init_state(batch_size, device, dtype, max_len)
        state["z"] = torch.zeros(batch_size, self.num_heads, self.head_k_dim, device=state["S"].device,
                                 dtype=self.state_dtype)
        return state

    def state_size(self, seq_len: int) -> int:
        """H * Df * Dv (S) + H * Df (z), Df = 1 + d' + d'^2; independent of ``seq_len``."""
        return self.num_heads * self.head_k_dim * (self.head_v_dim + 1)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, causal={self.causal}, feature_dim={self.feature_dim}, "
                f"chunk_size={self.chunk_size}, eps={self.eps}, state_dtype={self.state_dtype}"
                + (", qk_norm=True" if self.qk_norm else ""))
