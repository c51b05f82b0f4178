"""Gated Linear Attention (Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), causal only, laid out as fla's ``GatedLinearAttention`` layer.

    q, k = x W_Q, x W_K  (width expand_k * dim = 0.5 dim),   v = x W_V  (expand_v * dim = dim)
    log_g = logsigmoid(W_2 W_1 x + b) / gate_logit_normalizer     (low-rank W_1: dim -> 16, per key dim)
    S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t   (scale = head_k_dim ** -0.5)
    y = proj( RMSNorm_h(o) * swish(x W_G) )

``gate_logit_normalizer`` (16) keeps the decays weak (exp(log_g) >= exp(-|logit|/16)): the
state remembers over long ranges at initialisation. ``clamp_min`` optionally bounds log_g from
below (fla's option). Parameter names follow fla's layer (``q_proj``, ``k_proj``, ``v_proj``,
``g_proj``, ``gk_proj`` = ``Sequential(Linear(dim, rank, bias=False), Linear(rank, key_dim))``),
except the output projection, ``proj`` (fla: ``o_proj``).

Tensor layout of :func:`naive_gla`: ``[B, H, T, D]`` as in :mod:`layers.linear_attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.linear_attention import GatedLinearMixer, call_fla
from layers.mixer import register_mixer
from layers.retnet import _expanded, head_norm


def naive_gla(q, k, v, log_g, scale=None, initial_state=None):
    """The explicit quadratic form of gated linear attention:

        o_i = scale * ( sum_{j<=i} sum_d q_i[d] k_j[d] exp(b_i[d] - b_j[d]) v_j + (q_i * exp(b_i)) S0 )

    with b the inclusive cumulative sum of log_g over time. q, k, log_g [B, H, T, Dk]; v [B, H, T, Dv];
    initial_state [B, H, Dk, Dv] or None. Materialises [B, H, T, T, Dk]: for tests only. float32
    (float64 stays); returns o in q.dtype."""
    dt = torch.promote_types(q.dtype, torch.float32)
    T = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b = log_g.to(dt).expand(q.shape).cumsum(dim=2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[..., None]  # [T, T, 1]
    decay = (b[:, :, :, None, :] - b[:, :, None, :, :]).masked_fill(~causal, float("-inf")).exp()  # [B, H, T, T, Dk]
    A = (q.to(dt)[:, :, :, None, :] * k.to(dt)[:, :, None, :, :] * decay).sum(-1)
    o = A @ v.to(dt)
    if initial_state is not None:
        o = o + (q.to(dt) * b.exp()) @ initial_state.to(dt)
    return (o * scale).to(q.dtype)


@register_mixer("gla")
class GatedLinearAttention(GatedLinearMixer):
    """Gated Linear Attention, causal only; see the module docstring.

    Decoding state ``{"S": [B, H, Dk, Dv] in state_dtype, "pos": [B] int64}``. fla (``backend``):
    ``chunk_gla`` for forward and prefill, ``fused_recurrent_gla`` for decoding (``gk`` = log_g,
    float32). With ``backend='auto'`` an fla failure at call time (e.g. an unsupported GPU /
    Triton combination) is warned about once and the torch path is used instead. ``qk_norm=True``: per-head
    RMSNorm (weights of size head_k_dim) on q and k right after their projections (before the decay).
    """

    def __init__(self, dim: int, num_heads: int, causal: bool = True, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, clamp_min: float | None = None,
                 use_output_gate: bool = True, norm_eps: float = 1e-5, chunk_size: int = 64,
                 state_dtype: torch.dtype = torch.float32, backend: str = "auto", qkv_bias: bool = False,
                 proj_bias: bool = False, qk_norm: bool = False):
        super().__init__(dim, num_heads, causal)
        key_dim, value_dim = _expanded(dim, expand_k, "expand_k", num_heads), _expanded(dim, expand_v, "expand_v", num_heads)
        if not isinstance(gate_low_rank_dim, int) or isinstance(gate_low_rank_dim, bool) or gate_low_rank_dim <= 0:
            raise ValueError(f"gate_low_rank_dim must be a positive int, got {gate_low_rank_dim!r}")
        if not isinstance(gate_logit_normalizer, (int, float)) or gate_logit_normalizer <= 0:
            raise ValueError(f"gate_logit_normalizer must be a positive number, got {gate_logit_normalizer!r}")
        if clamp_min is not None and not (isinstance(clamp_min, (int, float)) and clamp_min < 0):
            raise ValueError(f"clamp_min must be None or a negative number (a log decay), got {clamp_min!r}")
        self._setup_core(backend, chunk_size, state_dtype)
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.scale = self.head_k_dim ** -0.5
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.clamp_min = clamp_min
        self.use_output_gate = bool(use_output_gate)
        self.q_proj = nn.Linear(dim, key_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, key_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, value_dim, bias=qkv_bias)
        self.gk_proj = nn.Sequential(nn.Linear(dim, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, key_dim))
        if self.use_output_gate:
            self.g_proj = nn.Linear(dim, value_dim, bias=False)
        self.g_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps)
        self.proj = nn.Linear(value_dim, dim, bias=proj_bias)
        self._setup_qk_norm(qk_norm, self.head_k_dim)

    def log_gate(self, x: torch.Tensor) -> torch.Tensor:
        """log_g = logsigmoid(gk_proj(x)) / gate_logit_normalizer (clamped below at clamp_min), float32 [B, T, H, Dk]."""
        B, T, _ = x.shape
        g = F.logsigmoid(self.gk_proj(x).float()) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            g = g.clamp_min(self.clamp_min)
        return g.view(B, T, self.num_heads, self.head_k_dim)

    def _features(self, x, positions):
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, self.head_k_dim)
        k = self.k_proj(x).view(B, T, H, self.head_k_dim)
        v = self.v_proj(x).view(B, T, H, self.head_v_dim)
        q, k = self._normalize_qk(q, k)
        return q, k, v, self.log_gate(x)

    def _output(self, o, x):
        B, T = o.shape[:2]
        o = head_norm(o, self.g_norm).reshape(B, T, self.value_dim)
        if self.use_output_gate:
            o = o * F.silu(self.g_proj(x).float())
        return self.proj(o.to(x.dtype))

    def _fla_chunk(self, q, k, v, log_g, S0):
        return call_fla("fla.ops.gla.chunk_gla", q, k, v, log_g.contiguous(), scale=self.scale, initial_state=S0,
                        output_final_state=True)

    def _fla_step(self, q, k, v, log_g, S0):
        return call_fla("fla.ops.gla.fused_recurrent_gla", q, k, v, gk=log_g.contiguous(), scale=self.scale,
                        initial_state=S0, output_final_state=True)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, gate_logit_normalizer={self.gate_logit_normalizer}, "
                f"clamp_min={self.clamp_min}, use_output_gate={self.use_output_gate}")
