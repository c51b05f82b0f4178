"""RWKV-6 "Finch" (Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic
Recurrence"): the time-mix mixer ``rwkv6`` and the channel-mix MLP :class:`RWKV6ChannelMix`.

Time mix, with ``x'`` the previous token (token shift) and ``dx = x' - x``:

    ddlerp_*(x) = x + dx * (mu_* + lora_*(x + dx * mu_x))      * in {w, k, v, r, g}
    lora_*(y)   = tanh(y W1)_* W2_*                              (rank ``mix_rank``, 5 slices)
    r, k, v = W_r ddlerp_r, W_k ddlerp_k, W_v ddlerp_v,   g = silu(W_g ddlerp_g)
    log w_t = -exp(d + tanh(ddlerp_w W_d1) W_d2)                 (per channel, rank ``decay_rank``)
    o_t = r_t (S_{t-1} + diag(u) k_t^T v_t),   S_t = diag(w_t) S_{t-1} + k_t^T v_t     (per head)
    y = W_o (GroupNorm_heads(o) * g)

Parameter names follow RWKV-LM (``time_maa_*``, ``time_decay*``, ``time_faaaa`` = u, ``receptance``,
``key``, ``value``, ``gate``, ``output``, ``ln_x``); there is no attention scale (scale 1).

Chunked form. ``chunk_gla`` (``layers.linear_attention``) decays, then writes, then reads:
``S'_t = diag(exp(g_t)) S'_{t-1} + k_t^T v_t``, ``o'_t = q_t S'_t``. RWKV-6 reads the state *before*
the current token's write and decay. Feeding ``chunk_gla`` the keys, values and log decays shifted
one token later (``k'_t = k_{t-1}``, ``v'_t = v_{t-1}``, ``g'_t = log w_{t-1}``, zero at t = 0) gives
``S'_t = S_{t-1}`` exactly, so ``o'_t = r_t S_{t-1}``; the bonus ``(r_t . (u * k_t)) v_t`` is added
elementwise and one last update ``S = diag(w_{T-1}) S'_{T-1} + k_{T-1}^T v_{T-1}`` gives the final
state. All decays stay <= 1 (no division by w), so strong decays are as stable as in GLA.

Heads: RWKV fixes the head size (64 in the paper) rather than the head count. Here the head size is
``dim // num_heads`` by default (64 for the usual configs, e.g. 768 / 12); ``head_size=`` overrides
``num_heads`` (then ``num_heads = dim // head_size``).

Tolerances (tests): float32 1e-5 of ``max(1, max|expected|)`` against the sequential reference
:func:`naive_rwkv6`; bfloat16 3e-2 against the float32 reference on the same bf16-rounded weights, and
at most 2x (+1e-3) the error of the reference run in bf16 (``tests/layers/mixer_checks.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.linear_attention import GatedLinearMixer, call_fla, chunk_gla, finish_mix, try_kernel
from layers.mixer import State, register_mixer


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def token_shift(x: torch.Tensor, mask: torch.Tensor | None = None, last: torch.Tensor | None = None):
    """The previous real token of every position, and the last real token (the next call's ``last``).

    x [B, T, D]; mask [B, T] bool (True on real tokens) or None; last [B, D] the token before x
    (zeros if None). Position t gets the last real token before t in x, else ``last``, so with any
    padding each sequence sees exactly its own previous tokens. Returns ``(x_prev [B, T, D], last [B, D])``.
    """
    B, T, D = x.shape
    last = x.new_zeros(B, D) if last is None else last.to(x.dtype)
    if mask is None:
        return torch.cat([last[:, None], x[:, :-1]], dim=1), (x[:, -1] if T else last)
    seq = torch.cat([last[:, None], x], dim=1)  # index 0 holds the carried token
    pos = torch.arange(1, T + 1, device=x.device).expand(B, T)
    upto = torch.where(mask, pos, 0).cummax(dim=1).values  # index in seq of the last real token <= t
    before = F.pad(upto, (1, 0))[:, :T]  # ... strictly before t
    gather = lambda idx: seq.gather(1, idx[..., None].expand(*idx.shape, D))
    return gather(before), gather(upto[:, -1:])[:, 0]


# --- the WKV recurrence: reference, one step, chunked --------------------------------------------------


def naive_rwkv6(r, k, v, log_w, u, initial_state=None, scale=1.0, state_dtype=torch.float32):
    """The RWKV-6 recurrence token by token in ``state_dtype``: for each head,
    ``o_t = scale * r_t (S_{t-1} + diag(u) k_t^T v_t)``, ``S_t = diag(exp(log_w_t)) S_{t-1} + k_t^T v_t``.

    r, k, log_w [B, H, T, Dk]; v [B, H, T, Dv]; u [H, Dk]; initial_state [B, H, Dk, Dv] or None.
    Returns ``(o [B, H, T, Dv] in r.dtype, final state [B, H, Dk, Dv] in state_dtype)``.
    """
    B, H, T, Dk = r.shape
    rf, kf, vf, wf = (t.to(state_dtype) for t in (r, k, v, log_w.exp()))
    uf = u.to(state_dtype)[None, :, :, None]  # [1, H, Dk, 1]
    S = r.new_zeros(B, H, Dk, v.shape[-1], dtype=state_dtype) if initial_state is None else initial_state.to(state_dtype)
    outs = []
    for t in range(T):
        kv = kf[:, :, t, :, None] * vf[:, :, t, None, :]  # [B, H, Dk, Dv]
        outs.append(scale * (rf[:, :, t, :, None] * (S + uf * kv)).sum(dim=2))
        S = wf[:, :, t, :, None] * S + kv
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1], dtype=state_dtype)
    return o.to(r.dtype), S


def rwkv6_step(r, k, v, log_w, u, state=None, scale=1.0, state_dtype=torch.float32):
    """One token: r, k, log_w [B, H, Dk]; v [B, H, Dv]; u [H, Dk]; state [B, H, Dk, Dv] or None.
    Returns ``(o [B, H, Dv] in r.dtype, new state in state_dtype)``."""
    B, H, Dk = r.shape
    S = r.new_zeros(B, H, Dk, v.shape[-1], dtype=state_dtype) if state is None else state.to(state_dtype)
    kv = k.to(state_dtype)[..., :, None] * v.to(state_dtype)[..., None, :]
    read = S + u.to(state_dtype)[..., None] * kv
    o = (r.to(state_dtype)[..., None, :] @ read)[..., 0, :] * scale
    return o.to(r.dtype), log_w.to(state_dtype).exp()[..., None] * S + kv


def chunk_rwkv6(r, k, v, log_w, u, initial_state=None, scale=1.0, state_dtype=torch.float32, chunk_size=64):
    """The chunked form of :func:`naive_rwkv6` (same arguments and outputs): ``chunk_gla`` on keys,
    values and log decays shifted one token later, plus the bonus term (see the module docstring)."""
    later = lambda t: F.pad(t, (0, 0, 1, 0))[:, :, :-1]  # t_{i-1}, zero at i = 0
    o, S = chunk_gla(r, later(k), later(v), later(log_w), initial_state, scale, state_dtype, chunk_size)
    ku = k.to(state_dtype) * u.to(state_dtype)[:, None]
    bonus = scale * (r.to(state_dtype) * ku).sum(-1, keepdim=True) * v.to(state_dtype)
    o = (o.to(state_dtype) + bonus).to(r.dtype)
    k_T, v_T = k[:, :, -1].to(state_dtype), v[:, :, -1].to(state_dtype)
    S = log_w[:, :, -1].to(state_dtype).exp()[..., None] * S + k_T[..., :, None] * v_T[..., None, :]
    return o, S


# --- depth-dependent initialisation (RWKV-LM) ----------------------------------------------------------


def _channel_ramp(dim: int) -> torch.Tensor:
    """i / dim for the channels i = 0 .. dim - 1."""
    return torch.arange(dim, dtype=torch.float32) / dim


def _check_depth(init_depth) -> float:
    if not isinstance(init_depth, (int, float)) or isinstance(init_depth, bool) or not 0 <= init_depth <= 1:
        raise ValueError(f"init_depth must be a number in [0, 1] (layer index / (num_layers - 1)), got {init_depth!r}")
    return float(init_depth)


# --- the time-mix mixer ----------------------------------------------------------------------------------


@register_mixer("rwkv6")
class RWKV6(GatedLinearMixer):
    """RWKV-6 time mix, causal only; see the module docstring.

    Options: ``head_size`` (None: ``dim // num_heads``; an int overrides ``num_heads``), ``mix_rank``
    (32) and ``decay_rank`` (64) the ranks of the token-shift and decay LoRAs, ``init_depth`` in [0, 1]
    (the layer's relative depth, ``layer / (num_layers - 1)``, for RWKV-LM's depth-dependent
    initialisation of the mixing coefficients, decays and bonus), ``norm_eps`` of the per-head
    GroupNorm (RWKV-LM: 1e-5 * 8**2), ``chunk_size``, ``state_dtype``, ``backend``.

    Padding masks: padded positions neither write to nor decay the state, and the token shift skips
    them (the first real token shifts in zeros, or the state's last token); outputs there are zero.
    Decoding state ``{"S": [B, H, Dk, Dv] in state_dtype, "shift": [B, dim] (the last real input x),
    "pos": [B] int64}``. fla (``backend``): ``chunk_rwkv6`` for forward and prefill,
    ``fused_recurrent_rwkv6`` for decoding (log decays in float32, ``[B, T, H, D]``).
    """

    def __init__(self, dim: int, num_heads: int, causal: bool = True, head_size: int | None = None,
                 mix_rank: int = 32, decay_rank: int = 64, init_depth: float = 0.5, norm_eps: float = 64e-5,
                 chunk_size: int = 64, state_dtype: torch.dtype = torch.float32, backend: str = "auto"):
        if head_size is not None:
            _positive_int(head_size, "head_size")
            if isinstance(dim, int) and dim % head_size:
                raise ValueError(f"head_size ({head_size}) must divide dim ({dim})")
            num_heads = dim // head_size if isinstance(dim, int) else num_heads
        super().__init__(dim, num_heads, causal)
        self.mix_rank, self.decay_rank = _positive_int(mix_rank, "mix_rank"), _positive_int(decay_rank, "decay_rank")
        if not (isinstance(norm_eps, (int, float)) and norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive number, got {norm_eps!r}")
        self._setup_core(backend, chunk_size, state_dtype)
        self.head_k_dim = self.head_v_dim = self.head_dim
        self.scale = 1.0
        D = dim
        self.time_maa_x = nn.Parameter(torch.empty(D))
        self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g = (
            nn.Parameter(torch.empty(D)) for _ in range(5))
        self.time_maa_w1 = nn.Parameter(torch.empty(D, 5 * mix_rank))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, mix_rank, D))
        self.time_decay = nn.Parameter(torch.empty(D))
        self.time_decay_w1 = nn.Parameter(torch.empty(D, decay_rank))
        self.time_decay_w2 = nn.Parameter(torch.empty(decay_rank, D))
        self.time_faaaa = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        self.receptance, self.key, self.value, self.gate, self.output = (
            nn.Linear(D, D, bias=False) for _ in range(5))
        self.ln_x = nn.GroupNorm(self.num_heads, D, eps=norm_eps)
        self.reset_parameters(init_depth)

    @torch.no_grad()
    def reset_parameters(self, init_depth: float = 0.5) -> None:
        """RWKV-LM's initialisation of the time-mix parameters for a layer at relative depth ``init_depth``
        (0: first layer, 1: last); the linear layers keep PyTorch's default."""
        d = _check_depth(init_depth)
        D, ramp = self.dim, _channel_ramp(self.dim)
        for p, power, offset in ((self.time_maa_x, 1 - d, 0.0), (self.time_maa_w, 1 - d, 0.0), (self.time_maa_k, 1 - d, 0.0),
                                 (self.time_maa_v, 1 - d, 0.3 * d), (self.time_maa_r, 0.5 * (1 - d), 0.0),
                                 (self.time_maa_g, 0.5 * (1 - d), 0.0)):
            p.copy_(1 - (ramp.pow(power) + offset))
        self.time_maa_w1.zero_()
        self.time_maa_w2.uniform_(-0.01, 0.01)
        n = torch.arange(D, dtype=torch.float32) / max(D - 1, 1)
        self.time_decay.copy_(-6 + 5 * n.pow(0.7 + 1.3 * d))
        self.time_decay_w1.zero_()
        self.time_decay_w2.uniform_(-0.01, 0.01)
        zigzag = ((torch.arange(D) + 1) % 3 - 1) * 0.1
        self.time_faaaa.copy_((d * (1 - n) + zigzag).view(self.num_heads, self.head_dim))

    def _features(self, x: torch.Tensor, x_prev: torch.Tensor):
        """r, k, v [B, T, H, D], log_w [B, T, H, D] float32 and the output gate g [B, T, dim]."""
        B, T = x.shape[:2]
        dx = x_prev - x
        lora = torch.tanh((x + dx * self.time_maa_x) @ self.time_maa_w1).view(B, T, 5, self.mix_rank)
        offsets = torch.einsum("btfr,frd->fbtd", lora, self.time_maa_w2)  # [5, B, T, D]
        mus = (self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g)
        xw, xk, xv, xr, xg = (x + dx * (mu + off) for mu, off in zip(mus, offsets))
        decay = self.time_decay.float() + (torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2).float()
        heads = lambda t: t.view(B, T, self.num_heads, self.head_dim)
        log_w = -decay.exp()
        return heads(self.receptance(xr)), heads(self.key(xk)), heads(self.value(xv)), heads(log_w), F.silu(self.gate(xg))

    def _output(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """W_o (GroupNorm_heads(o) * g) from o [B, T, H, Dv] (the norm in float32)."""
        B, T = o.shape[:2]
        w, b = self.ln_x.weight, self.ln_x.bias
        o = F.group_norm(o.reshape(B * T, self.dim).float(), self.num_heads, w.float(), b.float(), self.ln_x.eps)
        return self.output((o.view(B, T, self.dim) * g.float()).to(g.dtype))

    def _fla_chunk(self, r, k, v, log_w, S0):
        return call_fla("fla.ops.rwkv6.chunk_rwkv6", r, k, v, log_w.contiguous(), self.time_faaaa, scale=self.scale,
                        initial_state=S0, output_final_state=True)

    def _fla_step(self, r, k, v, log_w, S0):
        return call_fla("fla.ops.rwkv6.fused_recurrent_rwkv6", r, k, v, log_w.contiguous(), self.time_faaaa,
                        scale=self.scale, initial_state=S0, output_final_state=True)

    def _core(self, r, k, v, log_w, state: State | None, decoding: bool):
        """r, k, v, log_w [B, T, H, D]; returns (o [B, T, H, Dv], {"S": new state})."""
        S0 = None if state is None else state["S"]
        if self._use_fla(r):
            fn = self._fla_step if decoding else self._fla_chunk
            out = try_kernel(f"fla's RWKV6.{'step' if decoding else 'chunk'}", r.dtype, self.backend == "fla",
                             lambda: fn(r, k, v, log_w, None if S0 is None else S0.float()))
            if out is not None:
                return out[0], {"S": out[1].to(self.state_dtype)}
        if decoding:
            o, S = rwkv6_step(r[:, 0], k[:, 0], v[:, 0], log_w[:, 0], self.time_faaaa, S0, self.scale, self.state_dtype)
            return o[:, None], {"S": S}
        tr = lambda t: t.transpose(1, 2)
        o, S = chunk_rwkv6(tr(r), tr(k), tr(v), tr(log_w), self.time_faaaa, S0, self.scale, self.state_dtype,
                           self.chunk_size)
        return tr(o), {"S": S}

    def _mix(self, x: torch.Tensor, mask: torch.Tensor | None, state: State | None, decoding: bool = False):
        x_prev, last = token_shift(x, mask, None if state is None else state["shift"])
        r, k, v, log_w, g = self._features(x, x_prev)
        if mask is not None:
            m = mask[:, :, None, None]
            k, v = k * m.to(k.dtype), v * m.to(v.dtype)
            log_w = torch.where(m, log_w, torch.zeros((), dtype=log_w.dtype, device=log_w.device))
        o, new_state = self._core(r, k, v, log_w, state, decoding)
        new_state["shift"] = last
        return finish_mix(self._output(o, g), mask, state, new_state, x.shape[1])

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        """The family's ``{"S", "pos"}`` plus ``"shift": zeros [B, dim]`` in ``dtype`` (default: the weights')."""
        state = super().init_state(batch_size, device, dtype, max_len)
        dtype = dtype if dtype is not None else self.receptance.weight.dtype
        state["shift"] = torch.zeros(batch_size, self.dim, device=state["S"].device, dtype=dtype)
        return state

    def state_size(self, seq_len: int) -> int:
        """H * Dk * Dv for the WKV state plus dim for the token shift."""
        return super().state_size(seq_len) + self.dim

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mix_rank={self.mix_rank}, decay_rank={self.decay_rank}"


# --- the channel mix (the block's MLP) -------------------------------------------------------------------


class RWKV6ChannelMix(nn.Module):
    """RWKV-6 channel mix: ``sigmoid(W_r xr) * W_v relu(W_k xk)^2`` with ``x* = x + (x' - x) * mu_*``
    (token shift, ``x'`` the previous token, as in the time mix). ``hidden_dim`` defaults to RWKV's
    ``3.5 * dim`` rounded down to a multiple of 32 (at least 32).

    ``forward(x, mask)``: padded positions are skipped by the token shift and give zero outputs.
    Decoding: ``init_state(B)`` -> ``{"shift": [B, dim]}`` (the last real input), ``step(x_t, state)``,
    ``prefill(x, state, mask)``.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, init_depth: float = 0.5):
        super().__init__()
        _positive_int(dim, "dim")
        hidden_dim = max(int(dim * 3.5) // 32 * 32, 32) if hidden_dim is None else _positive_int(hidden_dim, "hidden_dim")
        self.dim, self.hidden_dim = dim, hidden_dim
        self.time_maa_k = nn.Parameter(torch.empty(dim))
        self.time_maa_r = nn.Parameter(torch.empty(dim))
        self.key = nn.Linear(dim, hidden_dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(hidden_dim, dim, bias=False)
        self.reset_parameters(init_depth)

    @torch.no_grad()
    def reset_parameters(self, init_depth: float = 0.5) -> None:
        """RWKV-LM's token-shift coefficients for relative depth ``init_depth``."""
        mu = 1 - _channel_ramp(self.dim).pow(1 - _check_depth(init_depth))
        self.time_maa_k.copy_(mu)
        self.time_maa_r.copy_(mu)

    def _mix(self, x: torch.Tensor, mask: torch.Tensor | None, last: torch.Tensor | None):
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [batch, seq_len, {self.dim}], got {tuple(x.shape)}")
        x_prev, last = token_shift(x, mask, last)
        dx = x_prev - x
        k = torch.relu(self.key(x + dx * self.time_maa_k)).square()
        y = torch.sigmoid(self.receptance(x + dx * self.time_maa_r)) * self.value(k)
        return (y if mask is None else y * mask[..., None].to(y.dtype)), last

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._mix(x, mask, None)[0]

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        w = self.key.weight
        return {"shift": torch.zeros(batch_size, self.dim, device=device or w.device, dtype=dtype or w.dtype)}

    def prefill(self, x: torch.Tensor, state: State, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        y, last = self._mix(x, mask, state["shift"])
        return y, {"shift": last}

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if x_t.dim() != 3 or x_t.shape[1] != 1:
            raise ValueError(f"x_t must have shape [batch, 1, {self.dim}], got {tuple(x_t.shape)}")
        return self.prefill(x_t, state)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}"
