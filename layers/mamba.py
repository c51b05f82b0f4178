"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"), the
block's mixer with mamba-ssm's parameter names, causal only.

    x, z = in_proj(h)                                    (dim -> 2 * d_inner, d_inner = expand * dim)
    u = silu(conv1d(x))                                  (causal depthwise conv, kernel d_conv)
    dt_r, B, C = x_proj(u)                               (d_inner -> dt_rank + 2 * d_state)
    delta = softplus(dt_proj(dt_r))                      (dt_rank -> d_inner; the bias is delta's offset)
    h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t     (per channel d: h [d_state], A = -exp(A_log) [d_inner, d_state])
    y_t = h_t . C_t + D * u_t
    out = out_proj(y * silu(z))

The selective scan (``selective_scan_chunked``) is a chunked parallel scan in plain PyTorch: inside
chunks of ``chunk_size`` tokens a Hillis-Steele scan (log2(chunk_size) batched steps) combines
tokens with the decays ``exp(s_t - s_tau)``, ``s`` the cumulative log decay inside the chunk, so only
differences ``<= 0`` are exponentiated (strong decays cannot overflow); a loop over the chunks
carries the state. Like mamba-ssm's reference it materialises [B, d_inner, T, d_state] float32
tensors (about 2 per scan level are kept for the backward). :func:`selective_scan_ref` is the
token-by-token reference (as mamba-ssm's). The scan runs in float32 whatever the activations'
dtype (only elementwise ops: autocast does not lower it).

On CPU the chunked scan is memory-bound: its log2(chunk_size) levels each write several full
[B, d_inner, T, d_state] tensors. ``selective_scan_sequential`` walks the tokens one at a time instead, on
[B, d_inner, d_state] slices that stay in cache, with a hand-written backward (one reverse walk, then the
gradients as batched matmuls): 7-17x faster than the chunked scan fwd+bwd on two cores, from Zoology's MQAR
size (B = 64, T = 64, d_inner 128) to T = 2048 (``scripts/bench_mamba_cpu.py``). Each of its steps costs a
few kernel calls, so it loses where a step's state is small: ``scan="auto"`` (the default) takes it for eager
CPU calls whose state, batch x d_inner x d_state, exceeds ``SEQUENTIAL_MIN_STATE``, and the chunked scan
otherwise: on GPUs, under torch.compile (whose graph would unroll the walk) and for small states.

No kernel backend: mamba-ssm's selective scan (``selective_scan_fn``) and the causal-conv1d package are CUDA
extensions, published here only as source distributions that must be compiled against the installed torch; the
GPU machines these layers were tested on could not build them within a run, so an untested ``backend`` is not
offered. (Mamba-2's SSD has our Triton kernels and mamba-ssm's Triton path: :mod:`layers.mamba2`.)

float32 parameters: ``A_log``, ``D`` and ``dt_proj.bias`` stay float32 when the module is cast to
half precision (``.to(torch.bfloat16)``, ``.half()``): ``_apply`` keeps them float32 (and moves
them to the new device), as mamba-ssm keeps them in float32 for stability. ``dt_proj.bias`` is
marked ``_no_reinit = True``: generic re-initialisation loops must skip it (its inverse-softplus
init sets the timescales); ``reset_parameters()`` re-creates every initialisation.

Padding masks: real tokens are packed to the front (see :mod:`layers.causal_conv`); padded steps
get delta = 0 (no decay, no input) and zero conv inputs, so each sequence's outputs and final
states are its own; padded outputs are zero.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from layers.causal_conv import causal_conv1d, pack_real_tokens, unpack_real_tokens
from layers.linear_attention import check_chunk_size
from layers.mixer import Mixer, State, register_mixer


# --- option checks and initialisation shared with Mamba-2 ------------------------------------------


def check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def expanded_width(dim: int, expand) -> int:
    """d_inner = int(expand * dim), which must be positive."""
    if not isinstance(expand, (int, float)) or isinstance(expand, bool) or int(expand * dim) <= 0:
        raise ValueError(f"expand must be a positive number with int(expand * dim) > 0, got {expand!r}")
    return int(expand * dim)


def check_dt_range(dt_min, dt_max, dt_init_floor) -> None:
    if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float)) and 0 < dt_min <= dt_max):
        raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
    if not (isinstance(dt_init_floor, (int, float)) and dt_init_floor >= 0):
        raise ValueError(f"dt_init_floor must be a non-negative number, got {dt_init_floor!r}")


def dt_bias_init(n: int, dt_min: float, dt_max: float, dt_init_floor: float = 1e-4, device=None) -> torch.Tensor:
    """A bias b [n] (float32) with softplus(b) log-uniform in [dt_min, dt_max] (floored at
    dt_init_floor): b = dt + log(1 - exp(-dt)), the inverse of softplus."""
    log_dt = torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class SelectiveSSMMixer(Mixer):
    """Shared body of ``mamba`` and ``mamba2`` (causal only).

    Subclasses list their float32 parameters in ``fp32_params`` and implement
    ``_mix(x, mask, lengths, state, decoding) -> (y, new_state)`` on inputs whose padding trails
    (``mask`` the packed mask, ``lengths`` the real tokens per sequence, both None without padding).
    """

    supports_bidirectional = False
    fp32_params: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        """Module casts (``.to``, ``.half()``, ...): the ``fp32_params`` follow the device but never
        become float16/bfloat16 (they are restored, unrounded, in float32)."""
        before = [(p, p.data) for p in map(self.get_parameter, self.fp32_params)]
        super()._apply(fn, recurse)
        for p, old in before:
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = old.to(device=p.device, dtype=torch.float32)
                if p.grad is not None:
                    p.grad = p.grad.float()
        return self

    def _mix(self, x, mask, lengths, state, decoding):  # pragma: no cover - abstract
        raise NotImplementedError

    def _run(self, x: torch.Tensor, mask: torch.Tensor | None, state: State | None, decoding: bool = False):
        """Pack the padding (if any), mix, unpack; advance the state's "pos" by the real tokens seen."""
        if mask is None:
            y, new_state = self._mix(x, None, None, state, decoding)
            lengths = x.shape[1]
        else:
            x, perm, lengths, packed = pack_real_tokens(x, mask)
            y, new_state = self._mix(x, packed, lengths, state, decoding)
            y = unpack_real_tokens(y, perm, packed)
        if state is not None:
            new_state["pos"] = state["pos"] + lengths
        return y, new_state

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        return self._run(x, mask, None)[0]

    def prefill(self, x: torch.Tensor, state: State, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """Consume a prompt with the chunked scan; returns ``(y, final state)``. With a padding
        ``mask`` each sequence's final states are those of its real tokens alone."""
        self.check_input(x, mask)
        return self._run(x, mask, state)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 3 or x_t.shape[1] != 1:
            raise ValueError(f"x_t must have shape [batch, 1, {self.dim}], got {tuple(getattr(x_t, 'shape', ()))}")
        self.check_input(x_t)
        return self._run(x_t, None, state, decoding=True)


# --- the selective scan ----------------------------------------------------------------------------
# Layout (mamba-ssm's): u, delta, z [B, D, T]; A [D, N]; B, C [B, N, T]; D [D]; state [B, D, N].


def _prepare_delta(u, delta, delta_bias, delta_softplus):
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return u, F.softplus(delta) if delta_softplus else delta


def _finish(y, u, D, z, dtype):
    """y + D u, gated by silu(z), in ``dtype`` (u, z, y [B, D, T] or [B, D] with D [D])."""
    if D is not None:
        y = y + u * D.float().view(-1, *([1] * (u.dim() - 2)))
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """The selective scan one token at a time, in float32 (the reference)::

        delta <- softplus(delta + delta_bias)   (each optional)
        h_t = exp(delta_t A) * h_{t-1} + (delta_t u_t) B_t,   y_t = h_t C_t + D u_t,   y <- y * silu(z)

    Returns ``(y [B, D, T] in u.dtype, final state [B, D, N] float32)``.
    """
    dtype = u.dtype
    u, delta = _prepare_delta(u, delta, delta_bias, delta_softplus)
    A, B, C = A.float(), B.float(), C.float()
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state.float()
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[..., t, None] * A) * h + (delta[..., t] * u[..., t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return _finish(torch.stack(ys, dim=-1), u, D, z, dtype), h


def selective_state_update(state, x, dt, A, B, C, D=None, z=None):
    """One decoding step: state [B, D, N]; x, dt (after softplus), z [B, D]; B, C [B, N].
    Returns ``(y [B, D] in x.dtype, new state float32)``."""
    h = torch.exp(dt.float()[..., None] * A.float()) * state.float() + (dt.float() * x.float())[..., None] * B.float()[:, None]
    return _finish((h * C.float()[:, None]).sum(-1), x.float(), D, z, x.dtype), h


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           initial_state=None, chunk_size=64):
    """The chunked parallel form of :func:`selective_scan_ref` (same arguments and outputs).

    T need not be a multiple of ``chunk_size`` (a power of two): padded steps have zero log
    decay and zero input, which leave the state untouched.
    """
    check_chunk_size(chunk_size)
    dtype = u.dtype
    u, delta = _prepare_delta(u, delta, delta_bias, delta_softplus)
    batch, d, T = u.shape
    L = min(chunk_size, 1 << max(T - 1, 0).bit_length())
    n_chunks = -(-T // L)
    pad = n_chunks * L - T
    chunks = lambda t: F.pad(t, (0, 0, 0, pad)).reshape(t.shape[0], t.shape[1], n_chunks, L, t.shape[-1])
    # per (channel, state): log decays and inputs, [B, D, n_chunks, L, N]
    s = chunks(delta[..., None] * A.float()[:, None, :]).cumsum(dim=-2)
    h = chunks((delta * u)[..., None] * B.float().transpose(1, 2)[:, None])
    k = 1
    while k < L:  # h_t <- h_t + exp(s_t - s_{t-k}) h_{t-k}: h_t then sums the last 2k tokens of its chunk
        h = torch.cat([h[..., :k, :], h[..., k:, :] + (s[..., k:, :] - s[..., :-k, :]).exp() * h[..., :-k, :]], dim=-2)
        k *= 2
    # the state entering each chunk
    H = u.new_zeros(batch, d, A.shape[1]) if initial_state is None else initial_state.float()
    starts = []
    # unbind, not indexing: the backward of one index op per chunk would allocate a full-size gradient each
    for chunk_decay, chunk_end in zip(s[..., -1, :].exp().unbind(2), h[..., -1, :].unbind(2)):  # [B, D, N] each
        starts.append(H)
        H = chunk_decay * H + chunk_end
    h = h + s.exp() * torch.stack(starts, dim=2)[..., None, :]
    y = (h * chunks(C.float().transpose(1, 2)[:, None])).sum(-1).reshape(batch, d, n_chunks * L)[..., :T]
    return _finish(y, u, D, z, dtype), H


class _SequentialScan(torch.autograd.Function):
    """h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t and y_t = h_t C_t, float32, all inputs prepared (delta after
    its bias and softplus). Time-major inside ([T, B, ...] slices are contiguous); the states of every step are
    kept for the backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        with torch.autocast(u.device.type, enabled=False):  # the batched matmuls stay float32
            T, (batch, d), N = u.shape[-1], h0.shape[:2], A.shape[1]
            dts = delta.permute(2, 0, 1).contiguous()  # [T, B, D]
            xs = (delta * u).permute(2, 0, 1).contiguous()
            Bs, Cs = B.permute(2, 0, 1).contiguous(), C.permute(2, 0, 1).contiguous()  # [T, B, N]
            hs = u.new_empty(T, batch, d, N)
            h = h0
            for t in range(T):
                h = torch.addcmul(torch.exp(dts[t, ..., None] * A) * h, xs[t, ..., None], Bs[t, :, None], out=hs[t])
            y = torch.bmm(hs.view(T * batch, d, N), Cs.view(T * batch, N, 1)).view(T, batch, d)
        ctx.save_for_backward(u, A, h0, dts, xs, Bs, Cs, hs)
        return y.permute(1, 2, 0), hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dfinal):
        u, A, h0, dts, xs, Bs, Cs, hs = ctx.saved_tensors
        T, batch, d, N = hs.shape
        with torch.autocast(u.device.type, enabled=False):
            dys = dy.permute(2, 0, 1).contiguous()
            dh, dlog = torch.empty_like(hs), torch.empty_like(hs)  # dL/dh_t and dL/d(delta_t A)
            g = torch.zeros_like(h0) if dfinal is None else dfinal
            for t in range(T - 1, -1, -1):
                g = torch.addcmul(g, dys[t, ..., None], Cs[t, :, None], out=dh[t])
                g = g * torch.exp(dts[t, ..., None] * A)  # what reaches h_{t-1}
                torch.mul(g, hs[t - 1] if t else h0, out=dlog[t])
            rows = lambda t: t.view(T * batch, *t.shape[2:])
            dx = torch.bmm(rows(dh), rows(Bs)[..., None]).view(T, batch, d)  # dL/d(delta_t u_t)
            ddelta = (dlog * A).sum(-1) + dx * u.permute(2, 0, 1)
            dA = (dlog * dts[..., None]).sum((0, 1))
            dB = torch.bmm(rows(xs)[:, None], rows(dh)).view(T, batch, N)
            dC = torch.bmm(rows(dys)[:, None], rows(hs)).view(T, batch, N)
        back = lambda t: t.permute(1, 2, 0)
        return back(dx * dts), back(ddelta), dA, back(dB), back(dC), g


def selective_scan_sequential(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              initial_state=None):
    """:func:`selective_scan_ref`'s recurrence one token at a time with a hand-written backward (same arguments
    and outputs): the fast scan on CPU (see the module docstring). Not twice differentiable."""
    dtype = u.dtype
    u, delta = _prepare_delta(u, delta, delta_bias, delta_softplus)
    h0 = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state.float()
    y, h = _SequentialScan.apply(u, delta, A.float(), B.float(), C.float(), h0)
    return _finish(y, u, D, z, dtype), h


SCANS = ("auto", "chunked", "sequential")
# The break-even state size on CPU (two cores, fwd+bwd at T = 64 and 1024): the scans tie at batch 1, d_inner 64,
# d_state 16; at d_inner 32 the chunked scan is 2.3x faster, at d_inner 128 the sequential one 2.9x.
SEQUENTIAL_MIN_STATE = 1024


# --- the mixer ---------------------------------------------------------------------------------------


@register_mixer("mamba")
class Mamba(SelectiveSSMMixer):
    """The Mamba block's mixer (see the module docstring), causal only.

    Options (mamba-ssm's defaults): ``d_state`` 16, ``d_conv`` 4, ``expand`` 2, ``dt_rank`` "auto"
    (= ceil(dim / 16)), ``dt_min`` 1e-3, ``dt_max`` 0.1, ``dt_init_floor`` 1e-4, ``dt_scale`` 1
    (dt_proj.weight ~ U(+-dt_scale / sqrt(dt_rank))), ``conv_bias`` True, ``bias`` False (in_proj
    and out_proj), ``chunk_size`` 64 (the chunked scan's chunks), ``scan`` "auto" ("chunked" or
    "sequential"; auto: sequential for eager CPU calls with large enough states, else chunked; see the module
    docstring). ``num_heads`` is only validated by the Mixer interface: Mamba has no heads.

    Decoding state ``{"conv": [B, d_inner, d_conv - 1] (the last conv inputs, in ``dtype`` or the
    weights' dtype), "ssm": [B, d_inner, d_state] float32, "pos": [B] int64 (real tokens seen)}``.
    """

    fp32_params = ("A_log", "D", "dt_proj.bias")

    def __init__(self, dim: int, num_heads: int, causal: bool = True, d_state: int = 16, d_conv: int = 4,
                 expand: float = 2, dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, conv_bias: bool = True, bias: bool = False,
                 chunk_size: int = 64, scan: str = "auto"):
        super().__init__(dim, num_heads, causal)
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {', '.join(SCANS)}; got {scan!r}")
        self.scan = scan
        self.d_state = check_positive_int("d_state", d_state)
        self.d_conv = check_positive_int("d_conv", d_conv)
        self.d_inner = expanded_width(dim, expand)
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else check_positive_int("dt_rank (or 'auto')", dt_rank)
        check_dt_range(dt_min, dt_max, dt_init_floor)
        if not (isinstance(dt_scale, (int, float)) and dt_scale > 0):
            raise ValueError(f"dt_scale must be a positive number, got {dt_scale!r}")
        self.dt_min, self.dt_max, self.dt_init_floor, self.dt_scale = dt_min, dt_max, dt_init_floor, dt_scale
        self.chunk_size = check_chunk_size(chunk_size)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.dt_proj.bias._no_reinit = True
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba-ssm's initialisation: PyTorch defaults for the projections and the conv,
        dt_proj.weight ~ U(+-dt_scale / sqrt(dt_rank)), softplus(dt_proj.bias) log-uniform in
        [dt_min, dt_max], A = -(1, ..., d_state) for every channel (S4D-real), D = 1."""
        for layer in (self.in_proj, self.conv1d, self.x_proj, self.out_proj):
            layer.reset_parameters()
        with torch.no_grad():
            std = self.dt_rank ** -0.5 * self.dt_scale
            self.dt_proj.weight.uniform_(-std, std)
            self.dt_proj.bias.copy_(dt_bias_init(self.d_inner, self.dt_min, self.dt_max, self.dt_init_floor))
            A = torch.arange(1, self.d_state + 1, dtype=torch.float32)
            self.A_log.copy_(A.log().expand(self.d_inner, -1))
            self.D.fill_(1.0)

    def _mix(self, x, mask, lengths, state, decoding):
        x_in, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, d_inner] each
        if mask is not None:
            x_in = x_in * mask[..., None].to(x_in.dtype)
        xc, conv_state = causal_conv1d(x_in.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                       None if state is None else state["conv"], lengths)
        u = F.silu(xc)  # [B, d_inner, T]
        dt_r, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(F.linear(dt_r, self.dt_proj.weight).float() + self.dt_proj.bias.float())  # [B, T, d_inner]
        if mask is not None:
            delta = delta * mask[..., None]  # padded steps neither decay nor write to the state
        A = -torch.exp(self.A_log.float())
        h0 = None if state is None else state["ssm"]
        z, delta, B, C = z.transpose(1, 2), delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)
        if decoding:
            y, h = selective_state_update(h0, u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], self.D, z[..., 0])
            y = y[..., None]
        elif self._sequential(u):
            y, h = selective_scan_sequential(u, delta, A, B, C, self.D, z, initial_state=h0)
        else:
            y, h = selective_scan_chunked(u, delta, A, B, C, self.D, z, initial_state=h0, chunk_size=self.chunk_size)
        return self.out_proj(y.transpose(1, 2)), {"conv": conv_state, "ssm": h}

    def _sequential(self, u: torch.Tensor) -> bool:
        if self.scan == "auto":
            return (u.device.type == "cpu" and not torch.compiler.is_compiling()
                    and u.shape[0] * u.shape[1] * self.d_state > SEQUENTIAL_MIN_STATE)
        return self.scan == "sequential"

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        """``{"conv": zeros [B, d_inner, d_conv - 1] (``dtype`` or the conv weight's), "ssm": zeros
        [B, d_inner, d_state] float32, "pos": zeros [B] int64}``; ``max_len`` is not needed."""
        device = self.A_log.device if device is None else device
        return {"conv": torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device,
                                    dtype=dtype or self.conv1d.weight.dtype),
                "ssm": torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32),
                "pos": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def state_size(self, seq_len: int) -> int:
        """d_inner * (d_conv - 1) conv inputs plus d_inner * d_state SSM state (constant in seq_len;
        the position counter is not counted)."""
        return self.d_inner * (self.d_conv - 1 + self.d_state)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}, chunk_size={self.chunk_size}, scan={self.scan!r}")
