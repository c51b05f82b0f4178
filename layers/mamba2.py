"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality"), the mixer with mamba-ssm's parameter names, causal only.

    z, xBC, dt = in_proj(h)          (z: d_inner, xBC: d_inner + 2 * ngroups * d_state, dt: nheads)
    x, B, C = silu(conv1d(xBC))      (causal depthwise conv, kernel d_conv)
    dt = softplus(dt + dt_bias),     A = -exp(A_log)                   (one scalar each per head)
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t^T B_t,   y_t = h_t C_t + D x_t    (per head: h [headdim, d_state])
    out = out_proj(RMSNorm(y * silu(z)))      (the norm over groups of d_inner / ngroups channels)

Heads have ``headdim`` channels (nheads = d_inner / headdim); the ``ngroups`` groups of B and C
are shared by nheads / ngroups consecutive heads.

SSD: with a scalar decay per head and token this is gated linear attention with q = C, k = B,
v = dt x, log decay dt A and scale 1. The chunked training path (:func:`ssd_chunked`) is the chunked
GLA computed per group of heads sharing B and C (C B^T once per group, the heads' state GEMMs side by
side), with its inter-chunk scan (:func:`layers.linear_attention.chunk_states`; state [d_state, headdim]
there, transposed to mamba-ssm's [headdim, d_state] here). Its matmuls run in the activations' dtype,
dt, the decays and the state in float32 (float64 for float64 inputs). In float32 its gradient of the log decays
(so of A and dt) carries the rounding of terms that cancel exactly (the exp(b_i - b_i) = 1
diagonal): an absolute error of about 1e-7 times their size. References, in float32 (float64
stays): :func:`ssd_quadratic_ref` (the explicit masked "attention" form with L = exp(segsum(dt A)))
and :func:`ssd_recurrent_ref` (token by token).

float32 parameters (``A_log``, ``D``, ``dt_bias``), ``_no_reinit`` on ``dt_bias`` and padding
masks: as :mod:`layers.mamba`.

``backend``: ``auto`` runs the chunked SSD as Triton kernels (:mod:`layers.ssd_kernel`, forward and backward)
where they run (CUDA, float32 / bfloat16 / float16, chunks of >= 16 tokens), falling back to
:func:`ssd_chunked` with a warning if they fail at call time; ``triton`` requires them (errors propagate);
``torch`` always runs :func:`ssd_chunked`; ``mamba_ssm`` runs mamba-ssm's Triton SSD
(``mamba_chunk_scan_combined``, CUDA, when mamba-ssm is installed: a peer to compare against; ``auto`` keeps ours,
which took 0.54x its fwd+bwd time at lm-125m-mamba2's training shape on an H200,
``docs/benchmarks/ssd_mamba_ssm_gpu.md``). Decoding steps always run :func:`ssd_step`. The same choice applies
to the short conv and its SiLU from a zero cache without padding (training; :mod:`layers.causal_conv_kernel`)
and, in eager forward and prefill calls, to the gated RMSNorm (:mod:`layers.gated_norm_kernel`).
On an H200 the layer's fwd+bwd at [2, 16384, 768] (bf16 autocast) took 6.3 ms with the SSD kernels against
8.5 ms on the torch path, both compiled, and 10.4 against 26.5 ms eagerly; the conv kernels then brought it from
5.5 to 5.1 ms compiled, and their per-kernel tiles to 4.8 ms (``docs/benchmarks/ssd_kernels_gpu.md``).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from layers import causal_conv_kernel, gated_norm_kernel, ssd_kernel
from layers.causal_conv import causal_conv1d
from layers.linear_attention import check_chunk_size, chunk_states, try_kernel
from layers.mamba import SelectiveSSMMixer, check_dt_range, check_positive_int, dt_bias_init, expanded_width
from layers.mixer import State, register_mixer

SSD_BACKENDS = ("auto", "torch", "triton", "mamba_ssm")
MAMBA_SSM_MODULE = "mamba_ssm.ops.triton.ssd_combined"

# Layout (mamba-ssm's): x [B, T, H, P]; dt [B, T, H] (after softplus); A [H]; B, C [B, T, G, N]; D [H];
# state [B, H, P, N].


def _per_head(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """[B, T, G, N] -> [B, T, H, N]: head h uses group h // (H / G)."""
    return t.repeat_interleave(nheads // t.shape[2], dim=2)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (so the forms can be compared in float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _skip(y, x, D):
    return y if D is None else y + x.to(y.dtype) * D.to(y.dtype)[:, None]


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., T] -> [..., T, T] with out[i, j] = a_{j+1} + ... + a_i for j <= i (0 on the diagonal)
    and -inf above it: a masked cumulative sum, so no differences of large sums."""
    T = a.shape[-1]
    lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    terms = a[..., :, None].expand(*a.shape, T).masked_fill(~lower.tril(-1), 0)  # terms[k, j] = a_k for k > j
    return terms.cumsum(dim=-2).masked_fill(~lower, float("-inf"))


def ssd_quadratic_ref(x, dt, A, B, C, D=None, initial_state=None):
    """The SSD "attention" form, in float32 (float64 stays):  Y = (C B^T * L) (dt X) + D X  with
    L = exp(segsum(dt A)) per head, plus the initial state's contribution exp(cumsum(dt A)_i) C_i h0.
    Returns ``(y [B, T, H, P] in x.dtype, final state [B, H, P, N] float32 (float64 stays))``."""
    H, ct = x.shape[2], _compute_dtype(x)
    Bh, Ch = _per_head(B, H).to(ct), _per_head(C, H).to(ct)
    xdt = x.to(ct) * dt.to(ct)[..., None]
    dtA = (dt.to(ct) * A.to(ct)).transpose(1, 2)  # [B, H, T]
    L = segsum(dtA).exp()  # [B, H, T, T]
    y = torch.einsum("bihn,bjhn,bhij,bjhp->bihp", Ch, Bh, L, xdt)
    to_end = L[..., -1, :]  # exp(dtA_{j+1} + ... + dtA_{T-1}) [B, H, T]
    h = torch.einsum("bhj,bjhn,bjhp->bhpn", to_end, Bh, xdt)
    if initial_state is not None:
        h0 = initial_state.to(ct)
        from_start = dtA.cumsum(-1).exp()  # [B, H, T]
        y = y + torch.einsum("bihn,bhpn,bhi->bihp", Ch, h0, from_start)
        h = h + from_start[..., -1, None, None] * h0
    return _skip(y, x, D).to(x.dtype), h


def ssd_recurrent_ref(x, dt, A, B, C, D=None, initial_state=None):
    """The SSM one token at a time, in float32 (float64 stays): h_t = exp(dt_t A) h_{t-1} + dt_t x_t^T B_t,
    y_t = h_t C_t + D x_t. Same arguments and outputs as :func:`ssd_quadratic_ref`."""
    batch, T, H, P = x.shape
    ct = _compute_dtype(x)
    Bh, Ch = _per_head(B, H).to(ct), _per_head(C, H).to(ct)
    xdt = x.to(ct) * dt.to(ct)[..., None]
    decay = torch.exp(dt.to(ct) * A.to(ct))  # [B, T, H]
    h = x.new_zeros(batch, H, P, B.shape[-1], dtype=ct) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(T):
        h = decay[:, t, :, None, None] * h + xdt[:, t, :, :, None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))
    return _skip(torch.stack(ys, dim=1), x, D).to(x.dtype), h


def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64):
    """The chunked SSD, grouped as Mamba-2's: within a chunk of L tokens, y = (C B^T * L_h) (dt x) (L_h the
    per-head decay mask) plus the chunk's entering state read by C; the states pass between chunks by the
    chunked GLA's scan (:func:`layers.linear_attention.chunk_states`). The heads of a group share B and C, so
    C B^T is computed once per group (with ngroups = 1, once for all heads), and the per-head state GEMMs run as
    one GEMM per group with the heads side by side. Matmuls in the activations' dtype, dt, decays and states in
    float32 (float64 for float64 inputs). Same arguments and outputs as :func:`ssd_quadratic_ref`; T need not
    be a multiple of ``chunk_size`` (a power of two)."""
    check_chunk_size(chunk_size)
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    ct, dtype = _compute_dtype(x), x.dtype
    L = min(chunk_size, 1 << max(T - 1, 0).bit_length())
    nc = -(-T // L)
    pad = nc * L - T
    v = x.to(ct) * dt.to(ct)[..., None]  # [b, T, H, P]
    a = dt.to(ct) * A.to(ct)  # [b, T, H]: log decays
    if pad:  # zero inputs and decays leave the state untouched
        v, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (v, B, C))
        a = F.pad(a, (0, 0, 0, pad))
    by_group = lambda t: t.reshape(batch, nc, L, G, -1).transpose(2, 3)  # [b, T, G, *] -> [b, nc, G, L, *]
    Bg, Cg = by_group(B.to(dtype)), by_group(C.to(dtype))
    cs = a.reshape(batch, nc, L, G, H // G).permute(0, 1, 3, 4, 2).cumsum(-1)  # [b, nc, G, H/G, L]
    v = v.reshape(batch, nc, L, G, H // G, P).permute(0, 1, 3, 4, 2, 5)  # [b, nc, G, H/G, L, P]

    # within chunks: (C B^T, once per group) * each head's decay mask, then times the head's values
    tril = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    decay = (cs[..., :, None] - cs[..., None, :]).masked_fill(~tril, float("-inf")).exp()
    scores = ((Cg @ Bg.transpose(-1, -2))[:, :, :, None].to(ct) * decay).to(dtype)
    o = scores @ v.to(dtype)  # [b, nc, G, H/G, L, P]

    # each chunk's contribution to the state, B^T (values decayed to the chunk's end), the group's heads side by side
    heads_last = lambda t: t.transpose(3, 4).flatten(-2)  # [b, nc, G, H/G, L, P] -> [b, nc, G, L, H/G * P]
    v_to_end = (v * (cs[..., -1:] - cs).exp()[..., None]).to(dtype)
    kv = (Bg.transpose(-1, -2) @ heads_last(v_to_end)).unflatten(-1, (H // G, P))  # [b, nc, G, N, H/G, P]
    kv = kv.permute(0, 2, 4, 1, 3, 5).reshape(batch, H, nc, N, P).to(ct)
    chunk_decay = cs[..., -1].permute(0, 2, 3, 1).reshape(batch, H, nc, 1, 1)
    S0 = None if initial_state is None else initial_state.to(ct).transpose(-1, -2)  # [b, H, N, P]
    states, S = chunk_states(kv, chunk_decay, S0)  # the states entering each chunk, [b, H, nc, N, P]

    # the entering state read by C, decayed to each position
    states = states.reshape(batch, G, H // G, nc, N, P).permute(0, 3, 1, 4, 2, 5).flatten(-2).to(dtype)
    o_inter = (Cg @ states).unflatten(-1, (H // G, P)).transpose(3, 4)  # [b, nc, G, H/G, L, P]
    o = o.to(ct) + o_inter.to(ct) * cs.exp()[..., None]
    y = o.permute(0, 1, 4, 2, 3, 5).reshape(batch, nc * L, H, P)[:, :T]
    return _skip(y, x, D).to(x.dtype), S.transpose(-1, -2)


def ssd_step(x, dt, A, B, C, D=None, initial_state=None):
    """One decoding step (T = 1) of :func:`ssd_recurrent_ref`, in float32 (float64 stays), initial_state
    required; same arguments and outputs as :func:`ssd_chunked`. Written as broadcasts over a [B, G, H/G,
    P, N] view of the state (no per-head copies of B and C): under torch.compile (``GraphedDecoder(compile=
    True)``) the update, the readout and the copy into the state buffer fuse into one kernel, where
    batched GEMMs would stay separate launches (a decoding step is launch-bound: ~2-3 us a kernel)."""
    H, G, ct = x.shape[2], B.shape[2], _compute_dtype(x)
    x0, dt0 = x[:, 0].to(ct), dt[:, 0].to(ct)  # [B, H, P], [B, H]
    grouped = lambda t: t.unflatten(1, (G, H // G))  # [B, H, ...] -> [B, G, H/G, ...]
    per_group = lambda t: t[:, 0].to(ct)[:, :, None, None, :]  # [B, 1, G, N] -> [B, G, 1, 1, N]
    decay = grouped(torch.exp(dt0 * A.to(ct)))[..., None, None]
    h = grouped(initial_state.to(ct)) * decay + grouped(x0 * dt0[..., None])[..., None] * per_group(B)
    y = _skip((h * per_group(C)).sum(-1).flatten(1, 2), x0, D)  # [B, H, P]
    return y[:, None].to(x.dtype), h.flatten(1, 2)


def mamba_ssm_unavailable() -> str | None:
    """Why mamba-ssm's Triton SSD cannot be imported here, or None when it can."""
    try:
        importlib.import_module(MAMBA_SSM_MODULE)
    except Exception as e:  # noqa: BLE001 - mamba_ssm's package __init__ also imports its CUDA extensions
        return f"{type(e).__name__}: {e}"
    return None


def ssd_mamba_ssm(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64):
    """:func:`ssd_chunked` (same arguments and outputs) through mamba-ssm's ``mamba_chunk_scan_combined``: dt is
    already positive here, so no dt bias or softplus is passed on."""
    combined = importlib.import_module(MAMBA_SSM_MODULE).mamba_chunk_scan_combined
    return combined(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, return_final_states=True)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight over groups of ``group_size`` channels, in float32 (mamba-ssm's
    ``RMSNormGated`` with norm_before_gate=False): the gate acts before the normalisation."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = (y * F.silu(z.float())).unflatten(-1, (-1, self.group_size))  # float32 by type promotion
        g = F.rms_norm(g, (self.group_size,), eps=self.eps).flatten(-2)
        return (g * self.weight.float()).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"


@register_mixer("mamba2")
class Mamba2(SelectiveSSMMixer):
    """The Mamba-2 mixer (see the module docstring), causal only.

    Options (mamba-ssm's defaults except ``chunk_size``): ``d_state`` 128, ``d_conv`` 4, ``expand`` 2,
    ``headdim`` 64 (nheads = d_inner / headdim: the number of SSM heads comes from ``headdim``;
    ``num_heads`` is only validated by the Mixer interface), ``ngroups`` 1 (must divide nheads),
    ``A_init_range`` (1, 16) (A = -U(A_init_range) per head), ``dt_min`` 1e-3, ``dt_max`` 0.1,
    ``dt_init_floor`` 1e-4, ``conv_bias`` True, ``bias`` False (in_proj and out_proj),
    ``norm_eps`` 1e-5, ``chunk_size`` 64 (a power of two; mamba-ssm: 256), ``backend`` ``auto`` (see the module
    docstring).

    Decoding state ``{"conv": [B, d_inner + 2 * ngroups * d_state, d_conv - 1] (the last conv inputs,
    in ``dtype`` or the weights' dtype), "ssm": [B, nheads, headdim, d_state] float32, "pos": [B] int64}``.
    """

    fp32_params = ("A_log", "D", "dt_bias")

    def __init__(self, dim: int, num_heads: int, causal: bool = True, d_state: int = 128, d_conv: int = 4,
                 expand: float = 2, headdim: int = 64, ngroups: int = 1, A_init_range: tuple[float, float] = (1, 16),
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, norm_eps: float = 1e-5, chunk_size: int = 64, backend: str = "auto"):
        super().__init__(dim, num_heads, causal)
        if backend not in SSD_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(SSD_BACKENDS)}; got {backend!r}")
        if backend == "triton" and ssd_kernel.triton is None:
            raise ValueError("backend='triton' needs Triton (it comes with torch's Linux CUDA wheels), which is not "
                             "importable here; use backend='auto' or 'torch'")
        if backend == "mamba_ssm" and (why := mamba_ssm_unavailable()) is not None:
            raise ValueError(f"backend='mamba_ssm' needs mamba-ssm's Triton SSD ({MAMBA_SSM_MODULE}), which does not "
                             f"import here ({why}); use backend='auto', 'triton' or 'torch'")
        self.backend = backend
        self.d_state = check_positive_int("d_state", d_state)
        self.d_conv = check_positive_int("d_conv", d_conv)
        self.d_inner = expanded_width(dim, expand)
        self.headdim = check_positive_int("headdim", headdim)
        if self.d_inner % headdim:
            raise ValueError(f"headdim ({headdim}) must divide d_inner = expand * dim ({self.d_inner})")
        self.nheads = self.d_inner // headdim
        self.ngroups = check_positive_int("ngroups", ngroups)
        if self.nheads % ngroups:
            raise ValueError(f"ngroups ({ngroups}) must divide the number of heads nheads = d_inner / headdim ({self.nheads})")
        if not (len(A_init_range) == 2 and 0 < A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"A_init_range must be (low, high) with 0 < low <= high, got {A_init_range!r}")
        check_dt_range(dt_min, dt_max, dt_init_floor)
        self.A_init_range, self.dt_min, self.dt_max, self.dt_init_floor = tuple(A_init_range), dt_min, dt_max, dt_init_floor
        self.chunk_size = check_chunk_size(chunk_size)
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(dim, self.d_inner + self.conv_dim + self.nheads, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.dt_bias._no_reinit = True
        self.dt_bias._no_weight_decay = True
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.D._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // ngroups, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba-ssm's initialisation: PyTorch defaults for the projections and the conv,
        softplus(dt_bias) log-uniform in [dt_min, dt_max], A_log = log U(A_init_range), D = 1,
        norm weight 1."""
        for layer in (self.in_proj, self.conv1d, self.out_proj):
            layer.reset_parameters()
        with torch.no_grad():
            self.dt_bias.copy_(dt_bias_init(self.nheads, self.dt_min, self.dt_max, self.dt_init_floor))
            self.A_log.copy_(torch.empty(self.nheads).uniform_(*self.A_init_range).log())
            self.D.fill_(1.0)
            self.norm.weight.fill_(1.0)

    def _mix(self, x, mask, lengths, state, decoding):
        batch, T, _ = x.shape
        G, N = self.ngroups, self.d_state
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        xBC, conv_state = self._conv(xBC, None if state is None else state["conv"], lengths)
        xs, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        dt = F.softplus(dt + self.dt_bias.float())  # [B, T, H], float32 by type promotion
        if mask is not None:
            dt = dt * mask[..., None]  # padded steps neither decay nor write to the state
        A = -torch.exp(self.A_log.float())
        args = (xs.reshape(batch, T, self.nheads, self.headdim), dt, A, B.reshape(batch, T, G, N),
                C.reshape(batch, T, G, N), self.D, None if state is None else state["ssm"])
        y, h = ssd_step(*args) if decoding else self._chunked(*args)
        y = y.reshape(batch, T, self.d_inner)
        y = self.norm(y, z) if decoding else self._gated_norm(y, z)
        return self.out_proj(y), {"conv": conv_state, "ssm": h}

    def _conv(self, xBC, cache, lengths):
        """``silu(causal conv)`` of xBC [B, T, conv_dim] and the new conv cache. From a zero cache with no padding
        (training, an unmasked prompt) the Triton kernels of :mod:`layers.causal_conv_kernel` run it where they can
        (not with ``backend='torch'``; a failing kernel falls back as the SSD's do); otherwise
        :func:`causal_conv1d`."""
        K = self.d_conv
        if cache is None and lengths is None and self.backend != "torch" and causal_conv_kernel.supports(xBC):
            T = xBC.shape[1]
            tail = xBC[:, T - (K - 1):] if T >= K - 1 else F.pad(xBC, (0, 0, K - 1 - T, 0))
            y = self._run_kernels("the causal conv kernels", xBC.dtype,
                                  lambda: causal_conv_kernel.conv1d_silu(xBC, self.conv1d.weight, self.conv1d.bias))
            if y is not None:
                return y, tail.transpose(1, 2)
        y, cache = causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, cache, lengths)
        return F.silu(y).transpose(1, 2), cache

    def _chunked(self, *args):
        """The chunked SSD through our kernels, mamba-ssm's or the torch path (``backend``)."""
        x = args[0]
        if self.backend == "mamba_ssm":
            if x.device.type != "cuda":
                raise ValueError(f"backend='mamba_ssm' needs CUDA tensors (mamba-ssm's kernels are CUDA only); got a "
                                 f"tensor on {x.device.type}; use backend='auto' or 'torch'")
            return ssd_mamba_ssm(*args, chunk_size=self.chunk_size)
        kernels = self.backend != "torch" and ssd_kernel.supports(x, self.chunk_size)
        if self.backend == "triton" and not kernels:
            raise ValueError(f"backend='triton' needs a CUDA float32/bfloat16/float16 input and chunk_size >= 16; "
                             f"got a {x.dtype} tensor on {x.device.type} with chunk_size={self.chunk_size}")
        if kernels:
            out = self._run_kernels("the Mamba-2 SSD kernels", x.dtype,
                                    lambda: ssd_kernel.fused_ssd(*args, chunk_size=self.chunk_size))
            if out is not None:
                return out
        return ssd_chunked(*args, chunk_size=self.chunk_size)

    def _gated_norm(self, y, z):
        """``self.norm(y, z)`` of a forward or prefill: in eager calls through the kernels of
        :mod:`layers.gated_norm_kernel` where they run (not with ``backend='torch'``). Under torch.compile inductor
        fuses the torch form with its neighbours, which beats the kernels: on an H200 the compiled layer took 5.04 ms
        without them and 5.59 ms with them, the eager layer 6.96 ms without and 5.73 ms with them."""
        norm = self.norm
        if self.backend != "torch" and not torch.compiler.is_compiling() and gated_norm_kernel.supports(y):
            out = self._run_kernels("the gated RMSNorm kernels", y.dtype,
                                    lambda: gated_norm_kernel.gated_rms_norm(y, z, norm.weight, norm.group_size, norm.eps))
            if out is not None:
                return out
        return norm(y, z)

    def _run_kernels(self, name: str, dtype: torch.dtype, run):
        """``run()``: directly under torch.compile (one custom op in the graph, no Python fallback to trace);
        otherwise through :func:`try_kernel` (``auto``: a failure warns once and returns None for the torch path)."""
        if torch.compiler.is_compiling():
            return run()
        return try_kernel(name, dtype, self.backend == "triton", run)

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        """``{"conv": zeros [B, conv_dim, d_conv - 1] (``dtype`` or the conv weight's), "ssm": zeros
        [B, nheads, headdim, d_state] float32, "pos": zeros [B] int64}``; ``max_len`` is not needed."""
        device = self.A_log.device if device is None else device
        return {"conv": torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device,
                                    dtype=dtype or self.conv1d.weight.dtype),
                "ssm": torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                   dtype=torch.float32),
                "pos": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def state_size(self, seq_len: int) -> int:
        """conv_dim * (d_conv - 1) conv inputs plus nheads * headdim * d_state SSM state (constant in
        seq_len; the position counter is not counted)."""
        return self.conv_dim * (self.d_conv - 1) + self.nheads * self.headdim * self.d_state

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"headdim={self.headdim}, nheads={self.nheads}, ngroups={self.ngroups}, chunk_size={self.chunk_size}, "
                f"backend={self.backend!r}")
