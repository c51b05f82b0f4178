"""RetNet's multi-scale retention (Sun et al. 2023, "Retentive Network"), causal only.

Per head h a fixed decay ``gamma_h = 1 - 2 ** (-5 - h)`` (h = 0 .. H-1: the paper's choice,
also torchscale's and fla's ``chunk_retention``; head 0 keeps ~97% of its state per token, the
last heads nearly all of it). Retention is gated linear attention with the constant log gate
``log(gamma_h)``:

    S_t = gamma_h S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t       (scale = head_k_dim ** -0.5)

and the layer is  Y = proj( GroupNorm_h(retention(X W_Q, X W_K, X W_V)) * swish(X W_G) ), with
rotary embeddings on q and k (``rope=True``; the paper's xPos is RoPE plus a decay that the
retention decay already provides, so we use RoPE, as fla does). The group norm normalises each
head's output on its own: ``norm="rmsnorm"`` (default, as torchscale and fla implement it) or
``"layernorm"`` (the paper's GroupNorm, mean and variance per head). The paper's extra
score normalisations of the parallel form (dividing by sqrt of decay sums and by
max(|row sum|, 1)) are scale factors per head and token that the group norm removes (up to its
eps), so they are omitted, as in fla. Value and gate widths are ``expand_v * dim`` (2, the paper's
choice), queries and keys ``expand_k * dim`` (1).

Tensor layout of :func:`naive_retention`: ``[B, H, T, D]`` as in :mod:`layers.linear_attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.linear_attention import GatedLinearMixer, call_fla
from layers.mixer import register_mixer
from layers.rotary import RotaryEmbedding

NORMS = ("rmsnorm", "layernorm")


def retention_log_decay(num_heads: int, device=None) -> torch.Tensor:
    """``log(1 - 2 ** (-5 - h))`` for h = 0 .. num_heads-1, float32 [H]."""
    h = torch.arange(num_heads, device=device, dtype=torch.float32)
    return torch.log1p(-torch.exp2(-5.0 - h))


def naive_retention(q, k, v, log_gamma, scale=None, initial_state=None):
    """The parallel (quadratic) form of retention: o = ((scale * Q K^T) * D) V + (Q * gamma^(i+1)) S0
    with D_ij = gamma^(i-j) for j <= i, else 0. q, k [B, H, T, Dk]; v [B, H, T, Dv]; log_gamma [H];
    initial_state [B, H, Dk, Dv] or None. float32 (float64 stays); returns o in q.dtype."""
    dt = torch.promote_types(q.dtype, torch.float32)
    T = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    i = torch.arange(T, device=q.device, dtype=dt)
    rel = (i[:, None] - i[None, :])  # i - j
    decay = (log_gamma.to(dt)[:, None, None] * rel.clamp(min=0)).exp() * (rel >= 0)  # [H, T, T]
    o = ((q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale * decay) @ v.to(dt)
    if initial_state is not None:
        q_dec = q.to(dt) * (log_gamma.to(dt)[:, None, None] * (i[:, None] + 1)).exp()  # gamma^(i+1)
        o = o + scale * q_dec @ initial_state.to(dt)
    return o.to(q.dtype)


def head_norm(o: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Normalise each head's output ``o [B, T, H, Dv]`` in float32 with ``norm``'s parameters."""
    w = None if norm.weight is None else norm.weight.float()
    if isinstance(norm, nn.LayerNorm):
        b = None if norm.bias is None else norm.bias.float()
        return F.layer_norm(o.float(), norm.normalized_shape, w, b, norm.eps)
    return F.rms_norm(o.float(), norm.normalized_shape, w, norm.eps)


@register_mixer("retnet")
class MultiScaleRetention(GatedLinearMixer):
    """Multi-scale retention (RetNet), causal only; see the module docstring.

    Decoding state ``{"S": [B, H, Dk, Dv] in state_dtype, "pos": [B] int64}`` (``pos`` feeds the
    rotary embeddings). fla (``backend``): ``chunk_retention`` for forward and prefill and
    ``fused_recurrent_retention`` for decoding (both fix gamma to this same 1 - 2^(-5-h)); with a
    padding mask, ``chunk_gla`` with the decay broadcast per key dimension and 0 at padded
    positions (``chunk_retention``'s fixed decay would also decay the state over right padding).
    ``qk_norm=True``: per-head RMSNorm (weights of size head_k_dim) on q and k before the rotary embedding.
    """

    def __init__(self, dim: int, num_heads: int, causal: bool = True, expand_k: float = 1.0, expand_v: float = 2.0,
                 rope: bool = True, rope_base: float = 10000.0, norm: str = "rmsnorm", norm_eps: float = 1e-5,
                 chunk_size: int = 64, state_dtype: torch.dtype = torch.float32, backend: str = "auto",
                 qkv_bias: bool = False, proj_bias: bool = False, qk_norm: bool = False):
        super().__init__(dim, num_heads, causal)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
        key_dim, value_dim = _expanded(dim, expand_k, "expand_k", num_heads), _expanded(dim, expand_v, "expand_v", num_heads)
        self._setup_core(backend, chunk_size, state_dtype)
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.scale = self.head_k_dim ** -0.5
        self.rope, self.norm = bool(rope), norm
        self.uses_positions = self.rope
        self.q_proj = nn.Linear(dim, key_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, key_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, value_dim, bias=qkv_bias)
        self.g_proj = nn.Linear(dim, value_dim, bias=False)
        self.g_norm = (nn.RMSNorm if norm == "rmsnorm" else nn.LayerNorm)(self.head_v_dim, eps=norm_eps)
        self.proj = nn.Linear(value_dim, dim, bias=proj_bias)
        self.rotary = RotaryEmbedding(self.head_k_dim, base=rope_base) if self.rope else None
        self._setup_qk_norm(qk_norm, self.head_k_dim)
        # the fixed per-head decays, made once (decoding runs this mixer one token at a time)
        self.register_buffer("log_decay", retention_log_decay(num_heads), persistent=False)

    def _apply(self, fn, recurse=True):
        """Keep ``log_decay`` in float32 under ``.to(bfloat16)``: log(1 - 2^-10) needs float32's precision."""
        super()._apply(fn, recurse)
        if self.log_decay.dtype != torch.float32:
            self.log_decay = retention_log_decay(self.num_heads, self.log_decay.device)
        return self

    def _features(self, x, positions):
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, self.head_k_dim)
        k = self.k_proj(x).view(B, T, H, self.head_k_dim)
        v = self.v_proj(x).view(B, T, H, self.head_v_dim)
        q, k = self._normalize_qk(q, k)  # qk_norm: before the rotary embedding
        if self.rotary is not None:  # q and k rotated as one tensor: half the kernels of a decoding step's rotation
            cos, sin = self.rotary.cos_sin(positions)
            q, k = self.rotary.rotate(torch.cat([q, k], dim=2), cos, sin).split(H, dim=2)
        return q, k, v, self.log_decay

    def _output(self, o, x):
        B, T = o.shape[:2]
        o = head_norm(o, self.g_norm).reshape(B, T, self.value_dim)
        return self.proj((o * F.silu(self.g_proj(x).float())).to(x.dtype))

    def _fla_chunk(self, q, k, v, log_g, S0):
        kw = dict(scale=self.scale, initial_state=S0, output_final_state=True)
        if log_g.dim() == 1:
            return call_fla("fla.ops.retention.chunk_retention", q, k, v, **kw)
        # A padding mask made the gates per token ([B, T, H, 1], 0 at padded positions). fla's
        # chunk_simple_gla(g=...) would take them as they are, but its backward refuses Hopper GPUs
        # with Triton 3.4 - 3.7.0 (at backward time, past our fallback), so use chunk_gla's kernels.
        g = log_g.float().expand(*q.shape).contiguous()
        return call_fla("fla.ops.gla.chunk_gla", q, k, v, g, **kw)

    def _fla_step(self, q, k, v, log_g, S0):
        return call_fla("fla.ops.retention.fused_recurrent_retention", q, k, v, scale=self.scale, initial_state=S0,
                        output_final_state=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rope={self.rope}, norm={self.norm!r}"


def _expanded(dim: int, expand: float, name: str, num_heads: int) -> int:
    if not isinstance(expand, (int, float)) or isinstance(expand, bool) or expand <= 0:
        raise ValueError(f"{name} must be a positive number, got {expand!r}")
    width = int(dim * expand)
    if width <= 0 or width % num_heads or width != dim * expand:
        raise ValueError(f"{name}={expand} gives a width of {dim * expand} for dim={dim}, which must be a positive "
                         f"integer divisible by num_heads ({num_heads})")
    return width
