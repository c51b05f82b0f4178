"""Performer (Choromanski et al. 2021, "Rethinking Attention with Performers"): FAVOR+ attention.

Positive orthogonal random features approximate the softmax kernel ``exp(q . k / sqrt(d))``: with
``x = q d^-1/4`` (keys alike) and ``m = num_features`` rows ``w_r`` of the projection matrix ``W``,

    phi(x)_r = exp(w_r . x - |x|^2 / 2) / sqrt(m),   E[phi(x_q) . phi(x_k)] = exp(x_q . x_k).

``W`` is drawn as blocks of ``d`` orthogonal rows (QR of a Gaussian block), each row rescaled to the
norm of a fresh Gaussian vector (chi-distributed with d degrees of freedom), and kept as the buffer
``projection`` [m, d] (in the state dict; shared by the heads). ``redraw=True`` draws a new one at
every training forward (eval keeps it); ``seed`` (an int) makes the draws reproducible (a private
generator; ``None`` uses torch's global RNG).

Stabilisation (as the paper's code): every exponent has a max subtracted before ``exp``; the
factors cancel between numerator and normaliser (exactly, up to ``eps``). Queries: the max over
their own features (per query). Keys: bidirectional, the max over all real keys' features
(global, per sequence and head); causal, the *running* max ``c_t`` over the real keys up to t, so
decoding never needs future keys. Causally, key s enters with ``exp(e_s - c_s)`` and the state is
rescaled by ``exp(c_{t-1} - c_t) <= 1`` at each token, i.e. a scalar log decay ``c_{t-1} - c_t`` for
:func:`chunk_gla`, which makes key s weigh ``exp(e_s - c_t)`` at query t: the same features as
the explicit form :func:`naive_performer_attention`. The maxima are detached (no gradient).
Decoding state: the ``linear`` mixer's ``S`` and ``z`` plus ``"c": [B, H]`` (-inf before any key).
"""
from __future__ import annotations

import math

import torch

from layers.kernel_attention import KernelAttentionMixer
from layers.mixer import State, register_mixer


def orthogonal_gaussian_features(num_features: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[num_features, dim] float32: blocks of ``dim`` orthogonal rows (QR of Gaussian blocks, drawn on
    the CPU in float64, then moved to the default device), rows rescaled by chi(dim)-distributed
    norms (norms of fresh Gaussian vectors)."""
    blocks = []
    for _ in range(-(-num_features // dim)):
        g = torch.randn(dim, dim, generator=generator, dtype=torch.float64, device="cpu")
        q, _ = torch.linalg.qr(g)
        blocks.append(q.T)  # rows orthonormal
    w = torch.cat(blocks, dim=0)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64, device="cpu").norm(dim=1)
    return (norms[:, None] * w).to(device=torch.get_default_device(), dtype=torch.float32)


def _exponents(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """w_r . x' - |x'|^2 / 2 for x' = x d^-1/4, in float32 (float64 stays): x [..., d] -> [..., m]."""
    dt = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dt) * x.shape[-1] ** -0.25
    return x @ projection.to(dt).T - (x * x).sum(-1, keepdim=True) / 2


def naive_performer_attention(q, k, v, projection, causal=True, mask=None, eps=1e-6):
    """The explicit quadratic form with the random features of ``projection`` [m, d]:
    A_ij = sum_r exp(e^q_ir - max_r e^q_ir + e^k_jr - c_i) / m over allowed j (j <= i when causal;
    ``mask`` [B, T] drops padded keys), c_i the max of e^k over the allowed real keys (all of them
    bidirectionally, j <= i causally); o = A v / (A 1 + eps).

    q, k, v [B, H, T, d]; float32 inside (float64 stays); returns o in q's dtype."""
    B, H, T, d = q.shape
    m = projection.shape[0]
    eq, ek = _exponents(q, projection), _exponents(k, projection)
    dt = eq.dtype
    eq = eq - eq.amax(-1, keepdim=True).detach()
    kmax = ek.amax(-1).detach()  # [B, H, T]
    if mask is not None:
        kmax = kmax.masked_fill(~mask[:, None, :], -math.inf)
    c = kmax.cummax(dim=-1).values if causal else kmax.amax(-1, keepdim=True).expand(B, H, T)
    c = torch.where(torch.isfinite(c), c, torch.zeros((), dtype=dt))
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(B, 1, T, T)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    logits = eq[:, :, :, None, :] + ek[:, :, None, :, :] - c[:, :, :, None, None]  # [B, H, Tq, Tk, m]
    logits = logits.masked_fill(~allowed[..., None], -math.inf)
    A = logits.exp().sum(-1) / m
    o = (A @ v.to(dt)) / (A.sum(-1, keepdim=True) + eps)
    return o.to(q.dtype)


@register_mixer("performer")
class Performer(KernelAttentionMixer):
    """FAVOR+ attention with ``num_features`` positive orthogonal random features per head (see the
    module docstring); causal (chunked, with decoding) or bidirectional. ``qk_norm=True``: per-head RMSNorm on
    q and k before the random features (see ``KernelAttentionMixer``)."""

    def __init__(self, dim: int, num_heads: int, causal: bool = True, num_features: int = 64, redraw: bool = False,
                 seed: int | None = None, eps: float = 1e-6, chunk_size: int = 64,
                 state_dtype: torch.dtype = torch.float32, qkv_bias: bool = False, proj_bias: bool = False,
                 qk_norm: bool = False):
        super().__init__(dim, num_heads, causal)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not isinstance(redraw, bool):
            raise ValueError(f"redraw must be a bool, got {redraw!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self._setup(eps, chunk_size, state_dtype, qkv_bias, proj_bias, qk_norm)
        self.num_features = self.feature_dim = num_features
        self.redraw = redraw
        self.seed = seed
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.register_buffer("projection", orthogonal_gaussian_features(num_features, self.head_dim, self._generator))

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw a new projection matrix in place (the next draw of the module's generator)."""
        w = orthogonal_gaussian_features(self.num_features, self.head_dim, self._generator)
        self.projection.copy_(w)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.redraw and self.training:
            self.redraw_features()
        return super().forward(x, mask)

    def _feature_maps(self, q, k, mask, positions, state):
        sd = self.state_dtype
        eq, ek = _exponents(q, self.projection).to(sd), _exponents(k, self.projection).to(sd)
        inv = self.num_features ** -0.5
        fq = (eq - eq.amax(-1, keepdim=True).detach()).exp() * inv
        kmax = ek.amax(-1).detach()  # [B, H, T]
        if mask is not None:
            kmax = kmax.masked_fill(~mask[:, None, :], -math.inf)
            ek = ek.masked_fill(~mask[:, None, :, None], -math.inf)  # padded keys: exp(-inf) = 0
        zero = torch.zeros((), dtype=sd, device=q.device)
        if not self.causal:
            c = kmax.amax(-1, keepdim=True)
            c = torch.where(torch.isfinite(c), c, zero)
            return fq, (ek - c[..., None]).exp() * inv, None, {}
        B, H, T = kmax.shape
        c_prev = kmax.new_full((B, H, 1), -math.inf) if state is None else state["c"].to(sd)[..., None]
        c = torch.cat([c_prev, kmax], dim=-1).cummax(dim=-1).values  # [B, H, T + 1]; c[..., t + 1] = c_t
        before, now = c[..., :-1], c[..., 1:]
        now_safe = torch.where(torch.isfinite(now), now, zero)
        log_g = torch.where(torch.isfinite(before), before - now_safe, zero)  # 0 on padded tokens and before any key
        fk = (ek - now_safe[..., None]).exp() * inv
        return fq, fk, log_g[..., None], {"c": c[..., -1]}

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        """The family's state plus ``"c": [B, H]`` (the running key max, -inf before any key)."""
        state = super().init_state(batch_size, device, dtype, max_len)
        state["c"] = torch.full((batch_size, self.num_heads), -math.inf, device=state["S"].device, dtype=self.state_dtype)
        return state

    def state_size(self, seq_len: int) -> int:
        """H * m * Dh (S) + H * m (z) + H (the running key max c)."""
        return super().state_size(seq_len) + self.num_heads

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_features={self.num_features}, redraw={self.redraw}, seed={self.seed}"
