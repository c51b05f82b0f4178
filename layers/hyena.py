"""The Hyena operator (Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language
Models"), causal only. For order N (default 2):

    x^1 .. x^N, v = split(shortconv(in_proj(u)))          (in_proj: dim -> (N + 1) dim; a causal
                                                           depthwise conv of ``short_filter_size`` taps)
    z^1 = v
    z^(n+1) = x^n * (h^n * z^n + b^n z^n)                 (n = 1 .. N; * is a causal convolution)
    y = out_proj(z^(N+1))

Each long filter h^n [dim, T] is implicit (Hyena's ``HyenaFilter``): an MLP with sine activations of a
positional embedding of the lag l, times an exponentially decaying window,

    e(l) = [l / (L - 1), cos(f_k w_l), -sin(f_k w_l)],    w_l = 2 pi l / L,  f_k = linspace(1e-4, K - 1, K)
    h(l) = MLP(e(l)) * exp(-|a_c| l / (L - 1))            a_c = linspace(ln(target) / slow, ln(target) / fast)

with L = ``max_seq_len``: the filter is defined for lags 0 .. max_seq_len - 1 only, and its value at
lag l does not depend on the input length (so padding and decoding see the same filter). Longer
inputs raise a ValueError. The long convolutions run by FFT of size 2T (no wrap-around) in float32
whatever the input dtype (the filter too); the projections and the short conv run in x's dtype.

Padding masks: the short conv's inputs and outputs are zeroed at padded positions, so every long
conv input and gate is zero there; both convolutions depend only on the distance t - s, so with
left or right padding every real token sees exactly its sequence alone. Padded outputs are zeroed.

Decoding caches the convolutions' inputs: the last ``short_filter_size - 1`` short-conv inputs and
every past input of each long conv, so the state grows with the sequence (see ``Hyena.state_size``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from layers.mixer import Mixer, State, register_mixer
from layers.s4d import causal_fft_conv, roll_rows


def naive_long_conv(u: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The explicit causal convolution y_t = sum_{s<=t} h_{t-s} u_s (+ bias u_t), O(T^2) (the reference).
    u [..., C, T]; h [C, >=T]; bias [C] or None. Computed in float32 (float64 stays float64)."""
    dt = torch.promote_types(u.dtype, torch.float32)
    u, h = u.to(dt), h.to(dt)
    T = u.shape[-1]
    y = torch.stack([(u[..., : t + 1] * h[:, : t + 1].flip(-1)).sum(-1) for t in range(T)], -1) if T else u
    return y if bias is None else y + bias.to(dt)[:, None] * u


class HyenaFilter(nn.Module):
    """The implicit long filters: ``forward(T)`` gives ``[channels, T]`` float32 (see the module docstring).

    ``emb_dim`` (odd, >= 3) positional features, an MLP of width ``width`` with ``depth`` hidden layers
    and sine activations sin(freq * .) (freq learned per unit, initialised to 1), then the decay window
    (fast_decay_pct, slow_decay_pct, target: the per-channel decay rates; ``shift`` is added to it)."""

    def __init__(self, channels: int, max_seq_len: int, emb_dim: int = 3, width: int = 64, depth: int = 3,
                 fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5, target: float = 1e-2, shift: float = 0.0):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.emb_dim = emb_dim
        self.layers = nn.ModuleList([nn.Linear(emb_dim, width)] + [nn.Linear(width, width) for _ in range(depth - 1)])
        self.freq = nn.Parameter(torch.ones(depth, width))
        self.out = nn.Linear(width, channels, bias=False)
        self.decay_rates = (math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct)
        self.shift = shift

    def positional_embedding(self, T: int, device) -> torch.Tensor:
        """e(l) for l = 0 .. T-1: [T, emb_dim] float32."""
        L = self.max_seq_len
        lag = torch.arange(T, device=device, dtype=torch.float32)[:, None]
        bands = (self.emb_dim - 1) // 2
        f = torch.linspace(1e-4, bands - 1, bands, device=device)
        w = 2 * math.pi * lag / L
        return torch.cat([lag / max(L - 1, 1), torch.cos(f * w), -torch.sin(f * w)], dim=-1)

    def window(self, T: int, device) -> torch.Tensor:
        """exp(-|a_c| l / (L - 1)) + shift: [T, channels] float32."""
        t = torch.arange(T, device=device, dtype=torch.float32)[:, None] / max(self.max_seq_len - 1, 1)
        rates = torch.linspace(*self.decay_rates, self.out.out_features, device=device).abs()
        return torch.exp(-t * rates) + self.shift

    def forward(self, T: int) -> torch.Tensor:
        device = self.freq.device
        z = self.positional_embedding(T, device)
        with torch.autocast(device.type, enabled=False):
            for layer, freq in zip(self.layers, self.freq):
                z = torch.sin(freq.float() * F.linear(z, layer.weight.float(), layer.bias.float()))
            h = F.linear(z, self.out.weight.float()) * self.window(T, device)
        return h.T


@register_mixer("hyena")
class Hyena(Mixer):
    """The Hyena operator, causal only; see the module docstring.

    Options: ``order`` (N = 2: N long convolutions and gates), ``max_seq_len`` (2048: the longest input,
    prefill or decoded sequence), ``filter_dim`` (3: the positional features, odd >= 3), ``filter_order``
    (64: the filter MLP's width), ``short_filter_size`` (3), ``proj_bias`` (True). ``num_heads`` is unused.
    Parameters: ``in_proj``, ``short_conv`` (depthwise Conv1d on (N + 1) dim channels), ``filter``
    (:class:`HyenaFilter`, N * dim channels: h^n is rows [n dim, (n + 1) dim)), ``bias`` [N, dim], ``out_proj``.

    Decoding state: ``{"short": [B, short_filter_size - 1, (N + 1) dim]`` (the last short-conv inputs, in
    the input dtype), ``"long": [B, N, dim, t]`` float32 (every input so far of each long conv)``}``.
    """

    supports_bidirectional = False

    def __init__(self, dim: int, num_heads: int, causal: bool = True, order: int = 2, max_seq_len: int = 2048,
                 filter_dim: int = 3, filter_order: int = 64, short_filter_size: int = 3, proj_bias: bool = True):
        super().__init__(dim, num_heads, causal)
        for name, value in (("order", order), ("max_seq_len", max_seq_len), ("filter_order", filter_order),
                            ("short_filter_size", short_filter_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(filter_dim, int) or isinstance(filter_dim, bool) or filter_dim < 3 or filter_dim % 2 == 0:
            raise ValueError(f"filter_dim must be an odd int >= 3 (time plus cos/sin pairs), got {filter_dim!r}")
        self.order, self.max_seq_len, self.short_filter_size = order, max_seq_len, short_filter_size
        width = (order + 1) * dim
        self.in_proj = nn.Linear(dim, width, bias=proj_bias)
        self.short_conv = nn.Conv1d(width, width, short_filter_size, groups=width)
        self.filter = HyenaFilter(order * dim, max_seq_len, emb_dim=filter_dim, width=filter_order)
        self.bias = nn.Parameter(torch.randn(order, dim))
        self.out_proj = nn.Linear(dim, dim, bias=proj_bias)

    def long_filters(self, T: int) -> torch.Tensor:
        """h [N, dim, T] float32."""
        return self.filter(T).view(self.order, self.dim, T)

    def _check_length(self, T: int, what: str) -> None:
        if T > self.max_seq_len:
            raise ValueError(f"{what} {T} exceeds max_seq_len={self.max_seq_len} (the implicit filters' length); "
                             "build the mixer with a larger max_seq_len")

    def _mix(self, z: torch.Tensor, mask: torch.Tensor | None, prev: torch.Tensor, history: torch.Tensor):
        """The operator after in_proj. z [B, T, (N+1) dim] (zero at padded positions) follows ``prev``
        [B, K-1, (N+1) dim] (the short conv's earlier inputs) and ``history`` [B, N, dim, P] float32
        (the long convs' earlier inputs). Returns (z^(N+1) [B, T, dim] float32, the long convs' inputs
        [B, N, dim, T] float32)."""
        T, P = z.shape[1], history.shape[-1]
        z = F.conv1d(torch.cat([prev.to(z.dtype), z], 1).transpose(1, 2), self.short_conv.weight.to(z.dtype),
                     self.short_conv.bias.to(z.dtype), groups=z.shape[-1]).transpose(1, 2)
        z = z if mask is None else z * mask[..., None].to(z.dtype)
        *gates, v = z.float().split(self.dim, dim=-1)  # [B, T, dim] each
        h = self.long_filters(P + T)
        inputs = []
        v = v.transpose(1, 2)  # [B, dim, T]
        for n, x_n in enumerate(gates):
            inputs.append(v)
            conv = causal_fft_conv(torch.cat([history[:, n], v], -1), h[n])[..., P:]
            v = x_n.transpose(1, 2) * (conv + self.bias[n].float()[:, None] * v)
        return v.transpose(1, 2), torch.stack(inputs, 1)

    def _output(self, y: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """out_proj(z^(N+1)) in x's dtype, padded outputs zeroed."""
        y = self.out_proj(y.to(x.dtype))
        return y if mask is None else y * mask[..., None].to(y.dtype)

    def _in(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """in_proj(x) [B, T, (N+1) dim], zero at padded positions (so the short conv sees zeros there)."""
        z = self.in_proj(x)
        return z if mask is None else z * mask[..., None].to(z.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        B, T, _ = x.shape
        self._check_length(T, "sequence length")
        z = self._in(x, mask)
        prev = z.new_zeros(B, self.short_filter_size - 1, z.shape[-1])
        y, _ = self._mix(z, mask, prev, z.new_zeros(B, self.order, self.dim, 0, dtype=torch.float32))
        return self._output(y, x, mask)

    # --- decoding ---

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        """Empty caches: ``"short"`` zeros [B, K-1, (N+1) dim] (``dtype``, default in_proj's weight dtype),
        ``"long"`` [B, N, dim, 0] float32. ``max_len`` (checked against max_seq_len) is not preallocated."""
        if max_len is not None:
            self._check_length(max_len, "max_len")
        weight = self.in_proj.weight
        device = device if device is not None else weight.device
        return {"short": torch.zeros(batch_size, self.short_filter_size - 1, weight.shape[0], device=device,
                                     dtype=dtype or weight.dtype),
                "long": torch.zeros(batch_size, self.order, self.dim, 0, device=device)}

    def prefill(self, x: torch.Tensor, state: State, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """Consume a prompt by FFT convolution over the cached inputs plus the new ones; returns
        ``(y, state)``. With a padding mask (left or right: real tokens contiguous) each row is first
        rotated so its real tokens come first and follow its cache directly; afterwards the caches are
        rotated so each row's last real input is last (its padding, zeros, moves to the front, where
        it contributes nothing). So each row continues exactly its own sequence."""
        self.check_input(x, mask)
        B, T, _ = x.shape
        P = state["long"].shape[-1]
        self._check_length(P + T, "cached plus prompt length")
        z = self._in(x, mask)
        lead = torch.zeros(B, dtype=torch.long, device=x.device) if mask is None else (mask.long().cumsum(1) == 0).sum(1)
        pads = torch.zeros_like(lead) if mask is None else T - mask.sum(1)
        aligned = None if mask is None else roll_rows(mask, -lead)
        z = roll_rows(z, -lead)  # real tokens first
        y, inputs = self._mix(z, aligned, state["short"], state["long"])
        short = roll_rows(torch.cat([state["short"].to(z.dtype), z], 1), pads)[:, T:]  # the padding moved to the front
        long = roll_rows(torch.cat([state["long"], inputs], -1).movedim(-1, 1), pads).movedim(1, -1)
        return self._output(roll_rows(y, lead), x, mask), {"short": short, "long": long}

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token x_t [B, 1, dim]: the short conv over the cached window, then each long conv as
        sum_{s<t} h_{t-s} z_s (cached) + (h_0 + b) z_t."""
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 3 or x_t.shape[1] != 1:
            raise ValueError(f"x_t must have shape [batch, 1, {self.dim}], got {tuple(getattr(x_t, 'shape', ()))}")
        self.check_input(x_t)
        history = state["long"]
        P = history.shape[-1]
        self._check_length(P + 1, "decoded length")
        z = self._in(x_t, None)
        window = torch.cat([state["short"].to(z.dtype), z], 1)  # [B, K, (N+1) dim]
        z = (window * self.short_conv.weight[:, 0].T.to(z.dtype)).sum(1) + self.short_conv.bias.to(z.dtype)
        *gates, v = z.float().split(self.dim, dim=-1)  # [B, dim] each
        h = self.long_filters(P + 1)
        past = (history * h[..., 1:].flip(-1)).sum(-1)  # [B, N, dim]: sum_{s<t} h_{t-s} z_s
        inputs = []
        for n, x_n in enumerate(gates):
            inputs.append(v)
            v = x_n * (past[:, n] + (h[n, :, 0] + self.bias[n].float()) * v)
        new_state = {"short": window[:, 1:], "long": torch.cat([history, torch.stack(inputs, 1)[..., None]], -1)}
        return self._output(v[:, None], x_t, None), new_state

    def state_size(self, seq_len: int) -> int:
        """Floats kept per sequence after ``seq_len`` tokens: N * dim * seq_len long-conv inputs plus
        (short_filter_size - 1) * (N + 1) * dim short-conv inputs."""
        return self.order * self.dim * seq_len + (self.short_filter_size - 1) * (self.order + 1) * self.dim

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={self.order}, max_seq_len={self.max_seq_len}"
