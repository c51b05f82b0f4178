"""S4D, the diagonal state-space layer (Gu et al. 2022, "On the Parameterization and Initialization of
Diagonal State Space Models"), as the paper's standalone layer: an SSM per channel, a skip D, then
an activation and an output projection (no input projection, as in S4D).

Each of the ``dim`` channels is a diagonal linear system with M modes, discretised by zero-order hold
with a per-channel step dt = exp(log_dt) (B is fixed to 1 and folded into C):

    Abar = exp(dt A),   Bbar = (Abar - 1) / A
    h_t = Abar * h_{t-1} + Bbar * u_t                    (elementwise over the M modes)
    y_t = s * Re(sum_n C_n h_t[n]) + D u_t

``mode="complex"`` (S4D-Lin): M = d_state / 2 complex modes A_n = -0.5 + i pi n, each standing for a
conjugate pair, hence s = 2 (a real system of d_state states). ``mode="real"`` (S4D-Real): M = d_state
real modes A_n = -(n + 1), s = 1. Either way the decoding state holds d_state floats per channel.

Unrolled, y = K * u + D u is a causal convolution with the kernel (a Vandermonde product)

    K_l = s * Re(sum_n C_n Bbar_n Abar_n^l),   l = 0 .. T-1,

applied by FFT of size 2T (no wrap-around). Training and prefill use the convolution, ``step`` the
recurrence; the kernel, the FFT and the state are float32 (complex64) whatever the input dtype, and
the SSM output is cast back to x's dtype before the activation and the output projection.

Bidirectional (``causal=False``, S4's trick): a second C gives a second kernel, applied to the
reversed sequence; y = K_fwd * u + rev(K_bwd * rev(u)) + D u. No decoding.

Padding masks: padded inputs are zeroed and padded outputs too. The convolution only depends on
the distance t - s, and zeros contribute nothing, so with left or right padding (real tokens
contiguous) every real token sees exactly its sequence alone. A masked ``prefill`` also returns each
sequence's own final state (trailing padding must not decay it: see ``S4D.prefill``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from layers.linear_attention import positions_from_mask
from layers.mixer import Mixer, State, register_mixer

ACTIVATIONS = {"gelu": F.gelu, "identity": lambda y: y}


def s4d_lin_init(dim: int, d_state: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S4D-Lin: d_state / 2 complex modes A_n = -0.5 + i pi n (the real and imaginary parts, [dim, M])."""
    if d_state % 2:
        raise ValueError(f"d_state must be even with mode='complex' (d_state / 2 conjugate pairs), got {d_state}")
    n = torch.arange(d_state // 2, dtype=torch.float32)
    return torch.full((dim, d_state // 2), -0.5), (math.pi * n).expand(dim, -1).clone()


def s4d_real_init(dim: int, d_state: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S4D-Real: d_state real modes A_n = -(n + 1) (no imaginary part)."""
    n = torch.arange(d_state, dtype=torch.float32)
    return (-(n + 1)).expand(dim, -1).clone(), None


MODES = {"complex": s4d_lin_init, "real": s4d_real_init}


def causal_fft_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{s<=t} k_{t-s} u_s along the last dim, by FFT of size 2T (so nothing wraps around).
    u [..., T], k broadcastable to it."""
    T = u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=2 * T) * torch.fft.rfft(k, n=2 * T), n=2 * T)[..., :T]


def roll_rows(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate each sequence of x [B, T, ...] along time by shifts [B]: out[b, t] = x[b, (t - shifts[b]) mod T]."""
    B, T = x.shape[:2]
    idx = (torch.arange(T, device=x.device) - shifts[:, None]) % T
    return x.gather(1, idx.view(B, T, *([1] * (x.dim() - 2))).expand_as(x))


def trailing_padding(mask: torch.Tensor) -> torch.Tensor:
    """[B] number of padded positions after each sequence's last real token (T for a fully padded row)."""
    return (mask.flip(1).long().cumsum(1) == 0).sum(1)


def discretize(log_dt: torch.Tensor, A: torch.Tensor):
    """Zero-order hold: (dt A [H, M], Abar = exp(dt A), Bbar = (Abar - 1) / A), all float32 / complex64."""
    dtA = log_dt.float().exp()[:, None] * A
    Abar = dtA.exp()
    return dtA, Abar, (Abar - 1) / A


def vandermonde(dtA: torch.Tensor, T: int) -> torch.Tensor:
    """Abar^l = exp(l dt A) for l = 0 .. T-1: [H, M, T]. With l = i S + j (S = ceil(sqrt(T))), as the products
    exp(i S dt A) exp(j dt A): 2 sqrt(T) complex exps per (h, m) instead of T, the kernel's most expensive op on
    CPU (an lm-tiny s4d step at T = 1024 spent a third of its time in them). Exact up to float32 rounding of the
    same size as the direct form's (its angles l Im(dt A) round alike)."""
    S = math.isqrt(max(T - 1, 0)) + 1
    steps = lambda n, stride: torch.arange(0, n * stride, stride, device=dtA.device, dtype=torch.float32)
    outer, inner = (dtA[..., None] * steps(-(-T // S), S)).exp(), (dtA[..., None] * steps(S, 1)).exp()
    return (outer[..., :, None] * inner[..., None, :]).flatten(-2)[..., :T]


def naive_s4d(u: torch.Tensor, log_dt: torch.Tensor, A: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
              scale: float = 2.0, initial_state: torch.Tensor | None = None):
    """The recurrence one token at a time (the reference).

    u [B, T, H]; log_dt [H]; A, C [H, M] (complex, or real with ``scale=1``); D [H] or None;
    initial_state [B, H, M] or None (zeros). Computed in float32 / complex64 (float64 stays float64).
    Returns (y [B, T, H] in u's floating dtype promoted to float32, final state [B, H, M])."""
    rdt = torch.promote_types(u.dtype, torch.float32)
    cdt = torch.promote_types(torch.promote_types(A.dtype, C.dtype), rdt)
    A, C = A.to(cdt), C.to(cdt)
    dt = log_dt.to(rdt).exp()[:, None]
    Abar = torch.exp(dt * A)
    Bbar = (Abar - 1) / A
    h = torch.zeros(u.shape[0], *A.shape, dtype=cdt, device=u.device) if initial_state is None else initial_state.to(cdt)
    ys = []
    for t in range(u.shape[1]):
        u_t = u[:, t].to(rdt)
        h = Abar * h + Bbar * u_t[..., None]
        y = scale * torch.real((C * h).sum(-1))
        ys.append(y if D is None else y + D.to(rdt) * u_t)
    y = torch.stack(ys, 1) if ys else u.new_zeros(u.shape, dtype=rdt)
    return y, h


@register_mixer("s4d")
class S4D(Mixer):
    """S4D standalone layer (see the module docstring): y = out_proj(activation(SSM(x))).

    Options: ``d_state`` (64; even for ``mode="complex"``), ``mode`` ("complex" = S4D-Lin, "real" =
    S4D-Real), ``dt_min`` / ``dt_max`` (log-uniform init range of dt, 1e-3 / 1e-1), ``activation``
    ("gelu" or "identity"), ``glu`` (the output projection goes to 2 * dim followed by a GLU, as S4's
    ``output_linear``; default False: a plain Linear), ``proj_bias``. ``num_heads`` is unused (every
    channel is its own SSM). Parameters: ``log_dt`` [dim], ``log_A_real`` [dim, M] (A's real part is
    -exp(log_A_real) < 0), ``A_imag`` [dim, M] (complex mode only), ``C`` [directions, dim, M(, 2)]
    (real and imaginary parts in complex mode), ``D`` [dim], ``out_proj``.

    Decoding state (causal only): ``{"h": [B, dim, M]}``, complex64 in complex mode, float32 in real mode.
    """

    def __init__(self, dim: int, num_heads: int, causal: bool = True, d_state: int = 64, mode: str = "complex",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, activation: str = "gelu", glu: bool = False,
                 proj_bias: bool = True):
        super().__init__(dim, num_heads, causal)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid ones: {', '.join(MODES)}")
        if not isinstance(d_state, int) or isinstance(d_state, bool) or d_state <= 0:
            raise ValueError(f"d_state must be a positive int, got {d_state!r}")
        if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float)) and 0 < dt_min <= dt_max):
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid ones: {', '.join(ACTIVATIONS)}")
        self.d_state, self.mode, self.activation, self.glu = d_state, mode, activation, bool(glu)
        A_real, A_imag = MODES[mode](dim, d_state)
        self.is_complex = A_imag is not None
        self.scale = 2.0 if self.is_complex else 1.0  # a complex mode stands for a conjugate pair
        directions = 1 if causal else 2
        log_dt = torch.rand(dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(-A_real))
        self.A_imag = None if A_imag is None else nn.Parameter(A_imag)
        c_shape = (directions, *A_real.shape, 2) if self.is_complex else (directions, *A_real.shape)
        self.C = nn.Parameter(torch.randn(c_shape) * (0.5 ** 0.5 if self.is_complex else 1.0))
        self.D = nn.Parameter(torch.randn(dim))
        self.out_proj = nn.Linear(dim, 2 * dim if self.glu else dim, bias=proj_bias)

    # --- the SSM's parameters, float32 / complex64 ---

    def ssm_A(self) -> torch.Tensor:
        """A [dim, M]: complex64 (-exp(log_A_real) + i A_imag) or float32 (-exp(log_A_real))."""
        A_real = -self.log_A_real.float().exp()
        return A_real if self.A_imag is None else torch.complex(A_real, self.A_imag.float())

    def ssm_C(self) -> torch.Tensor:
        """C [directions, dim, M], complex64 or float32."""
        C = self.C.float()
        return torch.complex(C[..., 0], C[..., 1]) if self.is_complex else C

    def kernel(self, T: int) -> torch.Tensor:
        """K [directions, dim, T] float32: K_l = s * Re(sum_n C_n Bbar_n Abar_n^l)."""
        with torch.autocast(self.D.device.type, enabled=False):  # a real-mode einsum would run in bf16
            dtA, _, Bbar = discretize(self.log_dt, self.ssm_A())
            CB = self.ssm_C() * Bbar
            return self.scale * torch.real(torch.einsum("dhm,hmt->dht", CB, vandermonde(dtA, T)))

    # --- the layer ---

    def _output(self, y: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """y [B, T, dim] float32 (the SSM's output) -> out_proj(activation(y)), padded outputs zeroed."""
        y = self.out_proj(ACTIVATIONS[self.activation](y.to(x.dtype)))
        y = F.glu(y, dim=-1) if self.glu else y
        return y if mask is None else y * mask[..., None].to(y.dtype)

    def _inputs(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """u [B, T, dim] float32, zero at padded positions."""
        u = x.float()
        return u if mask is None else u * mask[..., None]

    def _convolve(self, u: torch.Tensor) -> torch.Tensor:
        """y = K * u + D u (plus the reversed kernel's pass when bidirectional); u, y [B, T, dim] float32."""
        K = self.kernel(u.shape[1])
        u_ = u.transpose(1, 2)  # [B, dim, T]
        y = causal_fft_conv(u_, K[0])
        if not self.causal:
            y = y + causal_fft_conv(u_.flip(-1), K[1]).flip(-1)
        return y.transpose(1, 2) + self.D.float() * u

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        return self._output(self._convolve(self._inputs(x, mask)), x, mask)

    # --- decoding ---

    def _check_causal(self) -> None:
        if not self.causal:
            raise ValueError("incremental decoding needs a causal mixer (this one was built with causal=False)")

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        """``{"h": zeros [B, dim, M]}`` (complex64 or float32 whatever ``dtype``; ``max_len`` is not needed)."""
        self._check_causal()
        device = device if device is not None else self.D.device
        return {"h": torch.zeros(batch_size, *self.log_A_real.shape, device=device,
                                 dtype=torch.complex64 if self.is_complex else torch.float32)}

    def prefill(self, x: torch.Tensor, state: State, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """Consume a prompt with the convolution; returns ``(y, final state)``.

        On top of the convolution, the initial state h0 reaches the real token of rank r (its index
        among the real tokens) as Abar^(r+1) h0. The final state of a sequence of n real tokens is

            h = Abar^n h0 + sum_s Abar^(n-1-r_s) Bbar u_s,

        computed by rotating each row so its last real token is at T - 1 (then the exponent is
        T - 1 - t for every row): trailing padding neither writes to nor decays the state.
        Masks must be left or right padding (each row's real tokens contiguous)."""
        self._check_causal()
        self.check_input(x, mask)
        B, T, _ = x.shape
        u = self._inputs(x, mask)
        dtA, Abar, Bbar = discretize(self.log_dt, self.ssm_A())
        V = vandermonde(dtA, T)  # [dim, M, T]
        C, h0 = self.ssm_C()[0], state["h"]
        rank = positions_from_mask(mask, T, x.device).expand(B, T)
        n = torch.full((B,), T, device=x.device) if mask is None else mask.sum(1)
        u_end = u if mask is None else roll_rows(u, trailing_padding(mask))
        with torch.autocast(x.device.type, enabled=False):
            # [B, T, dim]: what h0 adds to the output of the real token of rank t, s Re(C Abar^(t+1) h0)
            from_h0 = self.scale * torch.real(torch.einsum("hm,hmt,bhm->bth", C, V * Abar[..., None], h0))
            Abar_n = (n[:, None, None] * dtA).exp()
            h = Abar_n * h0 + Bbar * torch.einsum("bth,hmt->bhm", u_end.to(V.dtype), V.flip(-1))
        y = self._convolve(u) + from_h0.gather(1, rank[..., None].expand(B, T, self.dim))
        return self._output(y, x, mask), {"h": h}

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token x_t [B, 1, dim] through the recurrence h = Abar h + Bbar u, y = s Re(C h) + D u."""
        self._check_causal()
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 3 or x_t.shape[1] != 1:
            raise ValueError(f"x_t must have shape [batch, 1, {self.dim}], got {tuple(getattr(x_t, 'shape', ()))}")
        self.check_input(x_t)
        u = x_t[:, 0].float()
        _, Abar, Bbar = discretize(self.log_dt, self.ssm_A())
        h = Abar * state["h"] + Bbar * u[..., None]
        y = self.scale * torch.real((self.ssm_C()[0] * h).sum(-1)) + self.D.float() * u
        return self._output(y[:, None], x_t, None), {"h": h}

    def state_size(self, seq_len: int) -> int:
        """dim * d_state floats (M complex modes count 2 floats each), whatever ``seq_len``."""
        return self.dim * self.d_state

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, d_state={self.d_state}, mode={self.mode!r}, activation={self.activation!r}, "
                f"glu={self.glu}")
