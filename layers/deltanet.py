"""DeltaNet: linear attention with the delta rule (Schlag et al. 2021; Yang et al. 2024).

Convention (used by every function here): row vectors and a state ``S`` of shape ``[Dk, Dv]``
per head. Keys ``k_t`` are unit vectors (the mixer L2-normalises q and k, as DeltaNet does) and
``beta_t`` in (0, 1) is a per-head write strength. One step of the delta rule is

    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        = S_{t-1} + k_t u_t^T,    u_t = beta_t (v_t - S_{t-1}^T k_t)        ("new value")
    o_t = scale * S_t^T q_t       (the row vector q_t^T S_t)

i.e. the state first forgets what it stored under the key ``k_t`` (a rank-one projection),
then writes ``v_t`` there. The gated variant (``layers/gated_deltanet.py``) multiplies
``S_{t-1}`` by ``alpha_t = exp(g_t)`` first; every function below takes an optional log-decay
``g`` so both share one chunked implementation. ``scale`` defaults to ``Dk ** -0.5`` (as fla).

Tensor layout of the ops: q, k ``[B, H, T, Dk]``; v ``[B, H, T, Dv]``; beta, g ``[B, H, T]``;
state ``[B, H, Dk, Dv]``. (fla's kernels take ``[B, T, H, D]``; the mixer transposes.)

Chunked form (the WY / UT-transform representation of Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length"). Within a chunk of C tokens starting
from the state S0, with G_r the cumulative log decay inside the chunk (0 without gating):

    A = strict_tril(diag(beta) (K K^T * exp(G_r - G_j)))       # [C, C]
    T = (I + A)^{-1} diag(beta)                                  # unit lower-triangular solve
    W = T (exp(G) * K),  U = T V
    U_new = U - W S0                                             # the u_t of the whole chunk
    O = (exp(G) * Q) S0 + tril(Q K^T * exp(G_r - G_j)) U_new     # (Q already scaled)
    S = exp(G_C) S0 + (exp(G_C - G) * K)^T U_new

Everything is batched over all chunks at once: the states entering the chunks follow an affine
recursion over chunks, solved by a parallel prefix scan (:func:`affine_scan`). Decays are only ever exponentiated as differences ``G_r - G_j <= 0``
(masked to -inf above the diagonal before ``exp``), so strong decays cannot overflow.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from layers.linear_attention import FLA_AVAILABLE, check_backend
from layers.mixer import Mixer, State, register_mixer

_FLA_CHUNK_DTYPES = (torch.float16, torch.bfloat16)  # fla's chunk kernels assert q.dtype != float32


# --- the reference: a token-by-token recurrence ---------------------------------------------------


def naive_recurrent_delta_rule(q, k, v, beta, initial_state=None, scale=None):
    """The delta rule one token at a time, in float32 (float64 for float64 inputs; see the module docstring).

    q, k: [B, H, T, Dk] (k should be L2-normalised); v: [B, H, T, Dv]; beta: [B, H, T];
    initial_state: [B, H, Dk, Dv] or None (zeros). Returns ``(o [B, H, T, Dv] in q.dtype,
    final_state [B, H, Dk, Dv] float32/float64)``.
    """
    B, H, T, Dk = q.shape
    out_dtype = q.dtype
    scale = Dk ** -0.5 if scale is None else scale
    ct = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    q, k, v, beta = q.to(ct) * scale, k.to(ct), v.to(ct), beta.to(ct)
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state.to(ct)
    eye = torch.eye(Dk, dtype=ct, device=q.device)
    outs = []
    for t in range(T):
        k_t, v_t, b_t = k[:, :, t], v[:, :, t], beta[:, :, t, None, None]
        # S <- (I - beta k k^T) S + beta k v^T
        S = (eye - b_t * k_t[..., :, None] * k_t[..., None, :]) @ S + b_t * k_t[..., :, None] * v_t[..., None, :]
        outs.append((q[:, :, t, None, :] @ S)[:, :, 0])  # o_t = q_t^T S_t
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1])
    return o.to(out_dtype), S


# --- the chunked parallel form -------------------------------------------------------------------


def chunk_gated_delta_core(q, k, v, beta, g=None, initial_state=None, scale=None, chunk_size=64,
                           state_dtype=torch.float32):
    """The (gated) delta rule in chunks of ``chunk_size`` via the WY representation.

    Shapes as :func:`naive_recurrent_delta_rule`; ``g`` ([B, H, T] log decays, <= 0) or None.
    Matmuls run in the input dtype (operands cast down, results back up, as autocast does);
    elementwise math, decays and the triangular solve in float32 (at least); the state is
    carried in ``state_dtype``. T need not be a multiple of the chunk size.
    Returns ``(o [B, H, T, Dv] in q.dtype, final_state [B, H, Dk, Dv] in state_dtype)``.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    dt = q.dtype
    ct = torch.promote_types(dt, torch.float32)  # elementwise math, decays and the solve run in ct

    def mm(a, b):  # a matmul in the input dtype (bf16 tensor cores), its result back in ct
        return (a.to(dt) @ b.to(dt)).to(ct)

    scale = Dk ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, Dk, Dv, dtype=state_dtype) if initial_state is None else initial_state.to(state_dtype)
    if T == 0:
        return v.new_zeros(B, H, 0, Dv), S

    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:  # padded steps have beta = 0 and g = 0: they leave the state unchanged
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, pad))
        g = None if g is None else F.pad(g, (0, pad))
    N = (T + pad) // C
    # Upcast once, so gradients from the several uses of q, k, v add up in ct and round once.
    q = (q.to(ct) * scale).reshape(B, H, N, C, Dk)
    k = k.to(ct).reshape(B, H, N, C, Dk)
    v = v.to(ct).reshape(B, H, N, C, Dv)
    beta = beta.to(ct).reshape(B, H, N, C)

    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = incl.tril(-1)
    # The C x C score matrices are formed in ct (fla's kernels accumulate them in fp32 too):
    # rounding them to bf16 costs gradient accuracy in beta and the decays. They are C x C x Dk
    # per chunk, a small share of the work.
    kk = k @ k.transpose(-1, -2)  # [B, H, N, C, C]
    qk = q @ k.transpose(-1, -2)
    if g is not None:
        g = g.to(ct).reshape(B, H, N, C)
        # seg[r, j] = g_{j+1} + ... + g_r (r >= j) as a masked cumsum, not as a difference of
        # cumulative sums (which loses the small differences of huge sums to cancellation).
        seg = g[..., :, None].expand(B, H, N, C, C).masked_fill(~strict, 0.0).cumsum(-2)
        decay = seg.masked_fill(~incl, float("-inf")).exp()               # exp(G_r - G_j) <= 1, 0 above the diagonal
        kk, qk = kk * decay, qk * decay
        G = g.cumsum(-1)                                                  # within-chunk cumulative log decay
        gamma = G.exp()                                                   # exp(G_r) <= 1
        k_tail = decay[..., -1, :]                                        # exp(G_C - G_j) <= 1
        chunk_decay = G[..., -1].exp().to(state_dtype)                    # [B, H, N]
    a = (beta[..., :, None] * kk).masked_fill(~strict, 0.0)
    eye = torch.eye(C, dtype=ct, device=q.device)
    rhs = torch.cat([k * (beta if g is None else beta * gamma)[..., None], v * beta[..., None]], dim=-1)
    wu = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    w, u = wu[..., :Dk], wu[..., Dk:]
    p = qk.masked_fill(~incl, 0.0)                                        # intra-chunk "attention"
    if g is not None:
        k = k * k_tail[..., None]
    # The state entering each chunk follows the affine recursion S_{n+1} = M_n S_n + K_n^T U_n with
    # M_n = exp(G_C) I - K_n^T W_n (K decayed to the chunk's end): solved for every chunk at once.
    kT = k.transpose(-1, -2)
    eye_k = torch.eye(Dk, dtype=ct, device=q.device)
    M = (eye_k if g is None else chunk_decay.to(ct)[..., None, None] * eye_k) - mm(kT, w)
    states, S = affine_scan(M, mm(kT, u), S, mm)
    qw = torch.cat([q, w], dim=-2)                                        # [B, H, N, 2C, Dk]: [Q; W] S in one matmul
    o_inter, ws = mm(qw, states).split([C, C], dim=-2)
    if g is not None:
        o_inter = o_inter * gamma[..., None]  # (exp(G) Q) S0, scaled after the matmul: exact decay grads
    o = (o_inter + mm(p, u - ws)).reshape(B, H, N * C, Dv)[:, :, :T].to(dt)
    return o, S.to(state_dtype)


def affine_scan(M: torch.Tensor, X: torch.Tensor, S0: torch.Tensor, mm) -> tuple[torch.Tensor, torch.Tensor]:
    """All states of S_{n+1} = M_n S_n + X_n from S_0 = S0, in parallel over n: returns
    ([S_0, ..., S_{N-1}], S_N). M [B, H, N, Dk, Dk]; X [B, H, N, Dk, Dv]; S0 [B, H, Dk, Dv].

    Recursive pairing: steps (2i, 2i+1) compose into one affine map (M_2i+1 M_2i, M_2i+1 X_2i +
    X_2i+1), a half-length scan of the composed maps gives every odd state, and each even state is
    one step past its odd predecessor. ceil(log2 N) levels of halving size (O(N) work and memory)
    replace a loop of N small steps, which left a GPU idle between kernel launches. ``mm`` is the
    matmul (operands in the input dtype).
    """
    N, Dk = M.shape[2], M.shape[-1]
    if N == 1:
        return S0[:, :, None].to(X.dtype), mm(M[:, :, 0], S0) + X[:, :, 0]
    if N % 2:  # pad with an identity step
        eye = torch.eye(Dk, dtype=M.dtype, device=M.device).expand_as(M[:, :, :1])
        M, X = torch.cat([M, eye], dim=2), F.pad(X, (0, 0, 0, 0, 0, 1))
    M_even, M_odd, X_even, X_odd = M[:, :, 0::2], M[:, :, 1::2], X[:, :, 0::2], X[:, :, 1::2]
    composed = mm(M_odd, torch.cat([M_even, X_even], dim=-1))  # [M_odd M_even | M_odd X_even]
    pair_states, final = affine_scan(composed[..., :Dk], composed[..., Dk:] + X_odd, S0, mm)  # S_0, S_2, ...
    odd_states = mm(M_even, pair_states) + X_even  # S_1, S_3, ...
    states = torch.stack([pair_states.to(odd_states.dtype), odd_states], dim=3).flatten(2, 3)[:, :, :N]
    return states, final


def chunk_delta_rule(q, k, v, beta, initial_state=None, scale=None, chunk_size=64, state_dtype=torch.float32):
    """The delta rule in parallel over chunks (WY representation); same outputs as
    :func:`naive_recurrent_delta_rule`: ``(o, final_state)``."""
    return chunk_gated_delta_core(q, k, v, beta, None, initial_state, scale, chunk_size, state_dtype)


def recurrent_gated_delta_step(q, k, v, beta, g, S, scale):
    """One step for every head: q, k [B, H, Dk]; v [B, H, Dv]; beta, g [B, H] or g None;
    S [B, H, Dk, Dv]. Computes in S's dtype; returns ``(o [B, H, Dv], S)``."""
    q, k, v, beta = q.to(S.dtype) * scale, k.to(S.dtype), v.to(S.dtype), beta.to(S.dtype)
    if g is not None:
        S = S * g.to(S.dtype).exp()[..., None, None]
    u = beta[..., None] * (v - (k[..., None, :] @ S)[..., 0, :])
    S = S + k[..., :, None] * u[..., None, :]
    return (q[..., None, :] @ S)[..., 0, :], S


# --- fla dispatch ----------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def fla_gated_backward_refused() -> bool:
    """Whether fla refuses the backward of ``chunk_gated_delta_rule`` on this machine: fla 0.6 raises at backward
    time on Hopper GPUs with Triton >= 3.4, < 3.7.1 (its gated ``chunk_bwd_dqkwg`` computes wrong results there,
    fla issue #640) unless its TileLang backend (tilelang and a usable nvcc) takes the call. Read from fla's own
    flags; a constant to torch.compile."""
    try:
        from fla.backends import TileLangBackend
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:  # another fla release: its flags moved, so assume it runs its own backward
        return False
    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return False
    return not (TileLangBackend.is_available() and TileLangBackend().is_enabled())


def fla_delta_rule(q, k, v, beta, g=None, initial_state=None, scale=None, recurrent=False):
    """fla-core kernels on [B, T, H, D] tensors (q, k already L2-normalised); ``g`` None selects
    the plain delta rule. The chunked kernels (``chunk_delta_rule`` / ``chunk_gated_delta_rule``)
    for fp16/bf16 (they assert q.dtype != float32); the fused recurrent ones
    (``fused_recurrent_delta_rule`` / ``fused_recurrent_gated_delta_rule``) with ``recurrent``
    (decoding) or other dtypes. fla's fused recurrent gated kernel has no backward, so that
    combination refuses to run when gradients are needed. Returns ``(o [B, T, H, Dv],
    final_state [B, H, Dk, Dv] float32)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kw = dict(scale=scale, initial_state=initial_state, output_final_state=True)
    chunked = q.dtype in _FLA_CHUNK_DTYPES and not recurrent
    if g is None:
        from fla.ops.delta_rule import chunk_delta_rule as fla_chunk, fused_recurrent_delta_rule as fla_rec

        return (fla_chunk if chunked else fla_rec)(q, k, v, beta.to(q.dtype), **kw)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_g
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_rec_g

    g = g.float()
    if chunked:
        return fla_chunk_g(q, k, v, g, beta.to(q.dtype), **kw)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta)):
        raise ValueError(f"backend='fla' runs the gated delta rule on {q.dtype} only through fla's fused recurrent "
                         "kernel, which has no backward; use bfloat16/float16 inputs or backend='torch'")
    return fla_rec_g(q, k, v, g=g, beta=beta.to(q.dtype), **kw)


# --- the mixer --------------------------------------------------------------------------------------


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim, in float32 (fla's l2norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class DeltaRuleMixer(Mixer):
    """Shared body of ``deltanet`` and ``gated_deltanet`` (causal only).

    x -> q, k, v (one fused ``qkv`` projection) -> short causal depthwise conv (its last
    ``conv_size - 1`` inputs are part of the decoding state) -> SiLU -> L2-norm q, k ->
    delta rule with beta = sigmoid(b_proj x) (and, gated, the log decay g) -> per-head RMSNorm
    (times SiLU(g_proj x) with ``use_gate``) -> ``proj``.

    Padding masks: the batch is packed so that each sequence's real tokens come first (a
    gather; left, right or any padding), padded steps get beta = 0 and g = 0 and zero conv
    inputs, so they neither write to the state nor reach the conv, and the result is scattered
    back with zeros at padded positions. ``prefill(x, state, mask)`` also returns per-sequence
    final states (conv cache included) equal to running each sequence alone.

    ``qk_norm=True`` (off by default) applies a per-head RMSNorm with learnable weights (``q_norm``, ``k_norm``,
    size head_k_dim) to q and k after the short conv and SiLU, before the L2 norm. The L2 norm already bounds q
    and k (keys must be unit vectors for the delta rule), and it is scale-invariant, so here ``qk_norm`` amounts
    to a learnable per-dimension gain inside the L2 norm, ``l2norm(w * q)`` (up to eps; exactly the plain
    mixer at the initial w = 1); the option is accepted for a uniform interface across the attention-like mixers.
    """

    supports_bidirectional = False
    gated = False

    def __init__(self, dim: int, num_heads: int, causal: bool = True, backend: str = "auto", chunk_size: int = 64,
                 use_short_conv: bool = True, conv_size: int = 4, conv_bias: bool = False, use_gate: bool = False,
                 expand_v: int = 1, state_dtype: torch.dtype = torch.float32, norm_eps: float = 1e-5,
                 qkv_bias: bool = False, proj_bias: bool = False, qk_norm: bool = False):
        super().__init__(dim, num_heads, causal)
        check_backend(backend)
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if not isinstance(conv_size, int) or isinstance(conv_size, bool) or conv_size <= 0:
            raise ValueError(f"conv_size must be a positive int, got {conv_size!r}")
        if not isinstance(expand_v, int) or isinstance(expand_v, bool) or expand_v <= 0:
            raise ValueError(f"expand_v must be a positive int, got {expand_v!r}")
        if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise ValueError(f"state_dtype must be a floating-point torch.dtype, got {state_dtype!r}")
        self.backend = backend
        self.chunk_size = chunk_size
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_gate = use_gate
        self.expand_v = expand_v
        self.state_dtype = state_dtype
        self.head_k_dim = self.head_dim
        self.head_v_dim = self.head_dim * expand_v
        self.key_dim = dim
        self.value_dim = dim * expand_v
        conv_dim = 2 * self.key_dim + self.value_dim
        self.qkv = nn.Linear(dim, conv_dim, bias=qkv_bias)
        self.b_proj = nn.Linear(dim, num_heads, bias=False)
        if use_short_conv:
            self.conv = nn.Conv1d(conv_dim, conv_dim, conv_size, groups=conv_dim, bias=conv_bias)
        if use_gate:
            self.g_proj = nn.Linear(dim, self.value_dim, bias=False)
        self.o_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps)
        self.proj = nn.Linear(self.value_dim, dim, bias=proj_bias)
        self._setup_qk_norm(qk_norm, self.head_k_dim)

    # -- hooks for the gated variant --
    def log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-head log decay g [B, T, H] (float32), or None for the plain delta rule."""
        return None

    # -- backend resolution (a pure lookup, so torch.compile traces through it) --
    def _use_fla(self, x: torch.Tensor, decoding: bool = False) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "auto":
            # fla's chunk kernels need fp16/bf16; a single decoding step uses the fused recurrent one
            dtypes = _FLA_CHUNK_DTYPES + ((torch.float32,) if decoding else ())
            return FLA_AVAILABLE and x.device.type == "cuda" and x.dtype in dtypes
        if not FLA_AVAILABLE:
            raise ValueError("backend='fla' needs flash-linear-attention (fla) installed and EFFZOO_NO_FLA unset")
        if x.device.type != "cuda":
            raise ValueError(f"backend='fla' needs CUDA tensors, got a tensor on {x.device.type}; use backend='auto' or 'torch'")
        return True

    def _fla_runs(self, q: torch.Tensor, gated: bool, grad: bool, decoding: bool) -> bool:
        """Whether this call goes to fla. A decoding step that needs gradients runs the (differentiable) torch
        recurrence. A gated call that needs gradients where fla refuses its backward
        (:func:`fla_gated_backward_refused`) runs the torch path under ``backend='auto'`` and is refused up front,
        before any forward work, under ``backend='fla'``."""
        if not self._use_fla(q, decoding) or (decoding and grad):
            return False
        if grad and gated and fla_gated_backward_refused():
            if self.backend == "fla":
                raise ValueError("backend='fla': fla refuses the gated delta rule's backward on this GPU (Hopper with "
                                 "Triton >= 3.4, < 3.7.1, fla issue #640); install tilelang (fla then runs that backward "
                                 "through it) or Triton >= 3.7.1, or use backend='auto' or 'torch'")
            return False
        return True

    def _core(self, q, k, v, beta, g, S, decoding: bool):
        """q, k [B, T, H, Dk]; v [B, T, H, Dv]; beta, g [B, T, H]. Returns (o [B, T, H, Dv], S)."""
        scale = self.head_k_dim ** -0.5
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, beta, g))
        if self._fla_runs(q, g is not None, grad, decoding):
            o, S_new = fla_delta_rule(q, k, v, beta, g, initial_state=S, scale=scale, recurrent=decoding)
            return o.to(q.dtype), S_new.to(self.state_dtype)
        if decoding:
            o, S_new = recurrent_gated_delta_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], None if g is None else g[:, 0],
                                                  S.to(self.state_dtype), scale)
            return o[:, None].to(q.dtype), S_new
        tr = lambda t: t.transpose(1, 2)
        o, S_new = chunk_gated_delta_core(tr(q), tr(k), tr(v), tr(beta), None if g is None else tr(g), S, scale,
                                          self.chunk_size, self.state_dtype)
        return tr(o), S_new

    def _mix(self, x: torch.Tensor, mask: torch.Tensor | None, state: State | None, decoding: bool = False):
        B, T, _ = x.shape
        H, Dk, Dv = self.num_heads, self.head_k_dim, self.head_v_dim
        perm = None
        if mask is not None:
            # pack each sequence's real tokens first (stable), so padding trails every sequence
            perm = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
            lengths = mask.sum(dim=1)
            x = x.gather(1, perm[..., None].expand(-1, -1, x.shape[-1]))
            mask = torch.arange(T, device=x.device)[None] < lengths[:, None]
            m = mask[..., None].to(x.dtype)
        qkv = self.qkv(x)
        if mask is not None:
            qkv = qkv * m
        new_state: State = {}
        if self.use_short_conv:
            K = self.conv_size
            cache = qkv.new_zeros(B, K - 1, qkv.shape[-1]) if state is None else state["conv"].to(qkv.dtype)
            xp = torch.cat([cache, qkv], dim=1)  # [B, K-1+T, C]
            qkv = F.conv1d(xp.transpose(1, 2), self.conv.weight, self.conv.bias, groups=qkv.shape[-1]).transpose(1, 2)
            if state is not None:
                if mask is None:
                    new_state["conv"] = xp[:, xp.shape[1] - (K - 1):]
                else:  # the last K-1 inputs of each sequence: positions lengths .. lengths+K-2 of xp
                    idx = lengths[:, None] + torch.arange(K - 1, device=x.device)[None]
                    new_state["conv"] = xp.gather(1, idx[..., None].expand(-1, -1, xp.shape[-1]))
        qkv = F.silu(qkv)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q, k = self._normalize_qk(q.reshape(B, T, H, Dk), k.reshape(B, T, H, Dk))  # qk_norm: a learnable gain
        q, k = l2norm(q), l2norm(k)
        v = v.reshape(B, T, H, Dv)
        beta = torch.sigmoid(self.b_proj(x))
        g = self.log_decay(x)
        if mask is not None:
            beta = beta * m
            g = None if g is None else g * m
        S = None if state is None else state["S"]
        o, S = self._core(q, k, v, beta, g, S, decoding)
        new_state["S"] = S
        o = self.o_norm(o)
        if self.use_gate:
            o = o * F.silu(self.g_proj(x)).reshape(B, T, H, Dv)
        y = self.proj(o.reshape(B, T, H * Dv))
        if perm is not None:
            y = torch.zeros_like(y).scatter(1, perm[..., None].expand(-1, -1, y.shape[-1]), y * m)
        return y, new_state

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        return self._mix(x, mask, None)[0]

    # --- incremental decoding ---------------------------------------------------------------------

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        """``{"S": [B, H, Dk, Dv] in state_dtype, "conv": [B, conv_size - 1, 2*dim + value_dim]}``
        (the conv cache, in ``dtype`` or the weights' dtype, only with ``use_short_conv``)."""
        state = {"S": torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device,
                                  dtype=self.state_dtype)}
        if self.use_short_conv:
            state["conv"] = torch.zeros(batch_size, self.conv_size - 1, self.qkv.out_features, device=device,
                                        dtype=dtype or self.qkv.weight.dtype)
        return state

    def prefill(self, x: torch.Tensor, state: State, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """Consume a prompt with the chunked form; returns ``(y, final state)``. With a padding
        ``mask`` each sequence's final state is that of its real tokens alone."""
        self.check_input(x, mask)
        return self._mix(x, mask, state)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if x_t.dim() != 3 or x_t.shape[1] != 1:
            raise ValueError(f"x_t must have shape [batch, 1, {self.dim}], got {tuple(x_t.shape)}")
        self.check_input(x_t)
        return self._mix(x_t, None, state, decoding=True)

    def state_size(self, seq_len: int) -> int:
        """H*Dk*Dv for the delta-rule state, plus (conv_size-1) * (2*dim + value_dim) for the conv cache."""
        size = self.num_heads * self.head_k_dim * self.head_v_dim
        if self.use_short_conv:
            size += (self.conv_size - 1) * self.qkv.out_features
        return size

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, backend={self.backend!r}, chunk_size={self.chunk_size}, "
                f"use_short_conv={self.use_short_conv}, conv_size={self.conv_size}, use_gate={self.use_gate}, "
                f"expand_v={self.expand_v}")


@register_mixer("deltanet")
class DeltaNet(DeltaRuleMixer):
    """DeltaNet (Yang et al. 2024) as in fla's ``DeltaNet`` layer: short conv (``use_short_conv``,
    kernel ``conv_size`` = 4), SiLU, L2-normalised q/k, beta = sigmoid(W_beta x) per head,
    per-head output RMSNorm, optional SiLU output gate (``use_gate``, default off). Causal only."""
