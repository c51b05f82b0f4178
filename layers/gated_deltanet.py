"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule").

Same conventions as :mod:`layers.deltanet` (row vectors, state ``S: [Dk, Dv]`` per head)::

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   alpha_t = exp(g_t)
    o_t = scale * S_t^T q_t

with the Mamba2-style per-head log decay ``g_t = -exp(A_log) * softplus(W_a x_t + dt_bias) <= 0``.
The chunked form is the delta-rule WY form with the decays folded in in log space
(:func:`layers.deltanet.chunk_gated_delta_core`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from layers.deltanet import DeltaRuleMixer, chunk_gated_delta_core, recurrent_gated_delta_step
from layers.mixer import register_mixer


def naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=None, scale=None):
    """The gated delta rule one token at a time, in float32 (float64 for float64 inputs).

    q, k: [B, H, T, Dk] (k should be L2-normalised); v: [B, H, T, Dv]; beta, g: [B, H, T]
    (g is the log decay); initial_state: [B, H, Dk, Dv] or None. Returns ``(o [B, H, T, Dv] in
    q.dtype, final_state [B, H, Dk, Dv] float32/float64)``.
    """
    B, H, T, Dk = q.shape
    out_dtype = q.dtype
    scale = Dk ** -0.5 if scale is None else scale
    ct = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    q, k, v, beta, g = q.to(ct) * scale, k.to(ct), v.to(ct), beta.to(ct), g.to(ct)
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state.to(ct)
    eye = torch.eye(Dk, dtype=ct, device=q.device)
    outs = []
    for t in range(T):
        k_t, v_t, b_t, a_t = k[:, :, t], v[:, :, t], beta[:, :, t, None, None], g[:, :, t, None, None].exp()
        # S <- alpha (I - beta k k^T) S + beta k v^T
        S = a_t * (eye - b_t * k_t[..., :, None] * k_t[..., None, :]) @ S + b_t * k_t[..., :, None] * v_t[..., None, :]
        outs.append((q[:, :, t, None, :] @ S)[:, :, 0])
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1])
    return o.to(out_dtype), S


def chunk_gated_delta_rule(q, k, v, beta, g, initial_state=None, scale=None, chunk_size=64, state_dtype=torch.float32):
    """Chunked gated delta rule (WY form, decays in log space); same outputs as
    :func:`naive_recurrent_gated_delta_rule`: ``(o, final_state)``."""
    return chunk_gated_delta_core(q, k, v, beta, g, initial_state, scale, chunk_size, state_dtype)


def recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=None, scale=None, state_dtype=torch.float32):
    """The decoding recurrence (the mixer's ``step``) run over T tokens; for tests."""
    B, H, T, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, Dk, v.shape[-1], dtype=state_dtype) if initial_state is None else initial_state.to(state_dtype)
    outs = []
    for t in range(T):
        o, S = recurrent_gated_delta_step(q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], g[:, :, t], S, scale)
        outs.append(o.to(q.dtype))
    return torch.stack(outs, dim=2), S


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaRuleMixer):
    """Gated DeltaNet as in fla's ``GatedDeltaNet`` layer: the DeltaNet layout (short conv, SiLU,
    L2-normalised q/k, beta = sigmoid(b_proj x)) plus the per-head decay
    ``g = -exp(A_log) * softplus(a_proj x + dt_bias)`` and the SiLU output gate
    (``use_gate=True``: ``RMSNorm(o) * silu(g_proj x)``). Causal only.

    ``A_log`` is initialised as log U(A_init_range) and ``dt_bias`` as softplus^{-1} of a
    log-uniform dt in [dt_min, dt_max] (Mamba2 / fla). fla's default ``expand_v`` is 2. ``qk_norm``: as
    DeltaNet's (a learnable per-dimension gain inside the L2 norm; see ``DeltaRuleMixer``).
    """

    gated = True

    def __init__(self, dim: int, num_heads: int, causal: bool = True, backend: str = "auto", chunk_size: int = 64,
                 use_short_conv: bool = True, conv_size: int = 4, conv_bias: bool = False, use_gate: bool = True,
                 expand_v: int = 1, state_dtype: torch.dtype = torch.float32, norm_eps: float = 1e-5,
                 qkv_bias: bool = False, proj_bias: bool = False, A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, qk_norm: bool = False):
        super().__init__(dim, num_heads, causal, backend=backend, chunk_size=chunk_size, use_short_conv=use_short_conv,
                         conv_size=conv_size, conv_bias=conv_bias, use_gate=use_gate, expand_v=expand_v,
                         state_dtype=state_dtype, norm_eps=norm_eps, qkv_bias=qkv_bias, proj_bias=proj_bias,
                         qk_norm=qk_norm)
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min/dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min!r}, {dt_max!r}")
        self.a_proj = nn.Linear(dim, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(lo, hi).log())
        dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^{-1}(dt)
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """g = -exp(A_log) * softplus(a_proj x + dt_bias): [B, T, H], float32, <= 0."""
        return -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
