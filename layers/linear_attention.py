"""Causal linear attention with optional log-space decay gates, and the ``linear`` mixer.

The shared core of the gated-linear-attention family (``linear``, ``retnet``, ``gla``).

Convention: row vectors, one state ``S`` of shape ``[Dk, Dv]`` per head, and a *log* decay gate
``g_t <= 0`` (``exp(g_t)`` in (0, 1] is the fraction of the state kept). One step is

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t

Tensor layout of every function here (the same as ``layers/attention.py`` and ``layers/deltanet.py``;
fla's kernels take ``[B, T, H, D]``, the mixers transpose):

* q, k ``[B, H, T, Dk]``; v ``[B, H, T, Dv]``; state ``[B, H, Dk, Dv]``; o ``[B, H, T, Dv]``.
* ``log_g`` is one of: ``None`` (no decay: plain linear attention); a 1-D tensor ``[H]`` (a fixed
  decay per head, RetNet); or a 4-D tensor broadcastable to ``[B, H, T, Dk]`` whose last dim is
  ``Dk`` (a decay per key dimension, GLA) or ``1`` (one scalar per head and token, e.g.
  ``[B, H, T, 1]``).
* ``scale`` defaults to ``Dk ** -0.5`` (as fla).

Chunked form (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient
Training"). With chunks of C tokens, ``b`` the inclusive cumulative sum of ``g`` inside a chunk
(float32) and ``S0`` the state before the chunk:

    O = (Q * exp(b)) S0 + intra(Q, K, V, b)             intra_ij = q_i (exp(b_i - b_j) * k_j), j <= i
    S = diag(exp(b_C)) S0 + (K * exp(b_C - b))^T V

Everything is batched over all chunks at once; the states entering the chunks come from a
parallel prefix scan over chunks (:func:`chunk_states`). Decays are only ever exponentiated as differences ``<= 0``, so strong
decays cannot overflow: for a scalar gate the ``[C, C]`` decay matrix is built directly (masked
to -inf above the diagonal before ``exp``); for a per-dimension gate the causal intra-chunk term
is split by bisection: at each level, the right half of every block attends to its left half
through one matmul ``(q_i exp(b_i - r)) (k_j exp(r - b_j))^T`` with ``r`` the cumulative log
decay at the end of the left half, so both factors are ``<= 1``. (This is the secondary chunking
of fla's kernels.) Blocks of 8 tokens form their ``[8, 8, Dk]`` decays ``exp(b_i - b_j)`` directly,
masked to -inf above the diagonal before ``exp`` (with a hand-written backward). Matmuls run in
the input dtype; cumulative decays, the state and its accumulation in ``state_dtype``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from layers.mixer import Mixer, State, register_mixer

FLA_OFF_VARIABLE = "EFFZOO_NO_FLA"


def fla_usable(environ=os.environ, find_spec=importlib.util.find_spec) -> bool:
    """fla-core is installed and not switched off with ``EFFZOO_NO_FLA=1``. Switched off, ``backend='auto'``
    uses the torch paths: fla's first call of a kernel at a new shape can autotune for minutes on some
    GPU / Triton pairs (see docs/notes/gpu-findings.md)."""
    return find_spec("fla") is not None and environ.get(FLA_OFF_VARIABLE, "") in ("", "0")


FLA_AVAILABLE = fla_usable()  # read once at import, so torch.compile traces through the backend choice
BACKENDS = ("auto", "torch", "fla")


def fla_available() -> bool:
    return FLA_AVAILABLE


def check_chunk_size(chunk_size) -> int:
    """A chunk size is a positive power of two (the per-dimension decay path bisects chunks)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two (e.g. 16, 32, 64), got {chunk_size!r}")
    return chunk_size


def check_state_dtype(state_dtype) -> torch.dtype:
    if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
        raise ValueError(f"state_dtype must be a floating-point torch.dtype, got {state_dtype!r}")
    return state_dtype


def _gate(log_g: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """``log_g`` as a 4-D float tensor broadcastable to q's ``[B, H, T, Dk]``, or None."""
    if log_g is None:
        return None
    B, H, T, Dk = q.shape
    if log_g.dim() == 1:
        if log_g.shape[0] != H:
            raise ValueError(f"a 1-D log_g must have one decay per head ({H}), got shape {tuple(log_g.shape)}")
        return log_g.view(1, H, 1, 1)
    if log_g.dim() != 4 or log_g.shape[-1] not in (1, Dk) or any(
            s not in (1, full) for s, full in zip(log_g.shape[:3], (B, H, T))):
        raise ValueError(f"log_g must be None, [H] or broadcastable to [B, H, T, Dk] = {(B, H, T, Dk)} with last dim "
                         f"1 or Dk; got shape {tuple(log_g.shape)}")
    return log_g


# --- the reference: a token-by-token recurrence ---------------------------------------------------


def naive_recurrent_gla(q, k, v, log_g=None, initial_state=None, scale=None, state_dtype=torch.float32):
    """The recurrence one token at a time, in ``state_dtype`` (see the module docstring).

    q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; log_g: None, [H] or broadcastable to [B, H, T, Dk];
    initial_state: [B, H, Dk, Dv] or None (zeros). Returns ``(o [B, H, T, Dv] in q.dtype,
    final_state [B, H, Dk, Dv] in state_dtype)``.
    """
    B, H, T, Dk = q.shape
    g = _gate(log_g, q)
    scale = Dk ** -0.5 if scale is None else scale
    qf, kf, vf = q.to(state_dtype) * scale, k.to(state_dtype), v.to(state_dtype)
    S = q.new_zeros(B, H, Dk, v.shape[-1], dtype=state_dtype) if initial_state is None else initial_state.to(state_dtype)
    outs = []
    for t in range(T):
        if g is not None:
            g_t = g[:, :, min(t, g.shape[2] - 1)].to(state_dtype)  # [B|1, H|1, Dk|1]
            S = g_t.exp()[..., :, None] * S
        S = S + kf[:, :, t, :, None] * vf[:, :, t, None, :]
        outs.append((qf[:, :, t, None, :] @ S)[:, :, 0])
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1])
    return o.to(q.dtype), S


def recurrent_step(q, k, v, log_g=None, initial_state=None, scale=None, state_dtype=torch.float32):
    """One token: q, k [B, H, Dk]; v [B, H, Dv]; log_g None, [H] or broadcastable to [B, H, Dk]
    (last dim 1 or Dk); initial_state [B, H, Dk, Dv] or None. Returns ``(o [B, H, Dv] in
    q.dtype, state [B, H, Dk, Dv] in state_dtype)``."""
    B, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, Dk, v.shape[-1], dtype=state_dtype) if initial_state is None else initial_state.to(state_dtype)
    if log_g is not None:
        g = log_g.view(1, H, 1) if log_g.dim() == 1 else log_g
        S = g.to(state_dtype).exp()[..., :, None] * S
    S = S + k.to(state_dtype)[..., :, None] * v.to(state_dtype)[..., None, :]
    o = ((q.to(state_dtype) * scale)[..., None, :] @ S)[..., 0, :]
    return o.to(q.dtype), S


# --- the chunked parallel form -------------------------------------------------------------------


LEAF = 8  # bisection stops at blocks of this many tokens, whose decays are formed explicitly


def _leaf_decays(b: torch.Tensor) -> torch.Tensor:
    """``exp(b_i - b_j)`` for j <= i, 0 above the diagonal: [..., L, L, D] from b [..., L, D]."""
    L = b.shape[-2]
    causal = torch.ones(L, L, dtype=torch.bool, device=b.device).tril()[:, :, None]
    return (b[..., :, None, :] - b[..., None, :, :]).masked_fill(~causal, float("-inf")).exp()


class _LeafScores(torch.autograd.Function):
    """``s_ij = sum_d q_id k_jd exp(b_id - b_jd)`` (j <= i) within blocks of ``LEAF`` tokens, float32, with its
    backward written out:

        dq_i = sum_j ds_ij k_j e_ij,   dk_j = sum_i ds_ij q_i e_ij,   db = q dq - k dk

    Autograd's own backward took the gradient of the [..., L, L, D] decays and reduced it once per side of the
    difference; compiled, those two extra reductions took 2.5 of GLA's 15.4 ms fwd+bwd at T = 16k on an H200.
    Compiled, only q, k and b are kept and the backward recomputes the decays inside its reductions; eager, the
    decays are kept (a second exp cost more than their memory on CPU)."""

    @staticmethod
    def forward(ctx, q, k, b):
        dt = torch.promote_types(b.dtype, torch.float32)
        e = _leaf_decays(b)
        ctx.save_for_backward(q, k, b, None if torch.compiler.is_compiling() else e)
        return (q.to(dt)[..., :, None, :] * k.to(dt)[..., None, :, :] * e).sum(-1)

    @staticmethod
    def backward(ctx, ds):
        q, k, b, e = ctx.saved_tensors
        e = _leaf_decays(b) if e is None else e
        qf, kf = q.to(ds.dtype), k.to(ds.dtype)
        dq = (ds[..., :, :, None] * kf[..., None, :, :] * e).sum(-2)
        dk = (ds[..., :, :, None] * qf[..., :, None, :] * e).sum(-3)
        return dq.to(q.dtype), dk.to(k.dtype), (qf * dq - kf * dk).sum_to_size(b.shape)


def _intra_vector(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Causal intra-chunk term with a per-dimension decay, by bisection (see the module docstring).

    q, k [B, H, N, C, Dk] (q scaled); v [B, H, N, C, Dv]; b [B', H', N, C, Dk] float32 inclusive
    cumulative log decays. Returns float32 [B, H, N, C, Dv].

    Below ``LEAF`` tokens the halves' matmuls are a few rows wide (cuBLAS ran them as gemv: a third of the
    compiled fwd+bwd of GLA at T = 16k on an H200); there the decays ``exp(b_i - b_j)`` of each [LEAF, LEAF, Dk]
    block are formed directly (1.47x faster compiled), by :class:`_LeafScores`.
    """
    C, dtype = q.shape[-2], q.dtype
    leaf = min(LEAF, C)
    blocks = lambda t: t.reshape(*t.shape[:-2], C // leaf, leaf, t.shape[-1])
    scores = _LeafScores.apply(blocks(q), blocks(k), blocks(b))  # [..., leaf, leaf]
    o = (scores.to(dtype) @ blocks(v)).float().reshape(*q.shape[:-1], v.shape[-1])
    s = C // 2
    while s >= leaf:
        n = C // (2 * s)
        blk = lambda t: t.reshape(*t.shape[:-2], n, 2, s, t.shape[-1])  # [..., n, 2, s, D]
        qh, kh, vh, bh = blk(q), blk(k), blk(v), blk(b)
        ref = bh[..., 0, s - 1 : s, :]  # cumulative decay at the end of each left half [..., n, 1, D]
        q_r = (qh[..., 1, :, :] * (bh[..., 1, :, :] - ref).exp()).to(dtype)  # factors <= 1
        k_l = (kh[..., 0, :, :] * (ref - bh[..., 0, :, :]).exp()).to(dtype)
        o_r = (q_r @ k_l.transpose(-1, -2)) @ vh[..., 0, :, :]  # [..., n, s, Dv]
        o_pairs = torch.stack([torch.zeros_like(o_r), o_r], dim=-3)  # left halves get nothing at this level
        o = o + o_pairs.reshape(o.shape).float()
        s //= 2
    return o


def chunk_gla(q, k, v, log_g=None, initial_state=None, scale=None, state_dtype=torch.float32, chunk_size=64):
    """The chunked parallel form of :func:`naive_recurrent_gla` (same arguments and outputs).

    T need not be a multiple of ``chunk_size``: the sequence is padded internally with zero keys,
    values and gates, which leave the state untouched. Sequences shorter than a chunk use one
    chunk of the next power of two.
    """
    check_chunk_size(chunk_size)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    dtype = q.dtype
    g = _gate(log_g, q)
    scale = Dk ** -0.5 if scale is None else scale
    C = min(chunk_size, 1 << max(T - 1, 0).bit_length())
    N = -(-T // C)
    pad = N * C - T
    if g is not None and g.shape[2] != T:
        g = g.expand(g.shape[0], g.shape[1], T, g.shape[3])
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g = None if g is None else F.pad(g, (0, 0, 0, pad))
    chunks = lambda t: t.reshape(t.shape[0], t.shape[1], N, C, t.shape[-1])
    q, k, v = chunks(q * scale), chunks(k), chunks(v)

    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if g is None:
        o_intra = (q @ k.transpose(-1, -2)).masked_fill(~tril, 0) @ v
        q_dec, k_dec, chunk_log_decay = q, k, None
    else:
        b = chunks(g.to(state_dtype)).cumsum(dim=-2)  # [B', H', N, C, Dg]
        b_last = b[..., -1:, :]
        if b.shape[-1] == 1:  # one decay per head and token: a [C, C] decay matrix
            seg = (b[..., :, None, 0] - b[..., None, :, 0]).masked_fill(~tril, float("-inf")).exp()
            o_intra = ((q @ k.transpose(-1, -2)).to(state_dtype) * seg).to(dtype) @ v
        else:
            o_intra = _intra_vector(q, k, v, b)
        q_dec = (q * b.exp()).to(dtype)
        k_dec = (k * (b_last - b).exp()).to(dtype)
        chunk_log_decay = b_last.transpose(-1, -2)  # [B', H', N, Dg, 1]: scales the rows of S

    kv = (k_dec.transpose(-1, -2) @ v).to(state_dtype)  # [B, H, N, Dk, Dv]: each chunk's own contribution
    S0 = None if initial_state is None else initial_state.to(state_dtype)
    states, S = chunk_states(kv, chunk_log_decay, S0)
    o_inter = q_dec @ states.to(dtype)
    o = (o_inter.to(state_dtype) + o_intra.to(state_dtype)).to(dtype)
    return o.reshape(B, H, N * C, Dv)[:, :, :T], S


def chunk_states(kv: torch.Tensor, log_decay: torch.Tensor | None, S0: torch.Tensor | None):
    """The states entering every chunk, in parallel over chunks:

        S_n = exp(a_n) S_{n-1} + kv_n  (S_{-1} = S0),   returns ([S_{-1}, S_0, ..., S_{N-2}], S_{N-1})

    kv [B, H, N, Dk, Dv]; log_decay None or [B', H', N, Dk|1, 1] (a_n, each chunk's total log decay
    per key dimension). Without decays this is a cumulative sum; with decays, :func:`decay_scan`.
    """
    if log_decay is None:
        incl = kv.cumsum(dim=2)
        if S0 is not None:
            incl = incl + S0[:, :, None]
    else:
        incl = decay_scan(log_decay, kv)
        if S0 is not None:
            incl = incl + log_decay.cumsum(dim=2).exp() * S0[:, :, None]
    first = incl.new_zeros(incl[:, :, :1].shape) if S0 is None else S0[:, :, None].expand_as(incl[:, :, :1])
    states = torch.cat([first, incl[:, :, :-1]], dim=2)
    return states, incl[:, :, -1]


def decay_scan(log_a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Inclusive scan Y_n = exp(log_a_n) Y_{n-1} + x_n (Y_{-1} = 0) along dim 2, by recursive pairing.

    Neighbours (2i, 2i+1) combine into one step (log decay a_2i + a_2i+1, input exp(a_2i+1) x_2i +
    x_2i+1); the half-length scan gives every odd entry, and each even entry is one step past its odd
    predecessor. ceil(log2 N) levels of halving size: O(N) work and memory, where a loop over chunks
    would leave a GPU idle between N small kernel launches. Every factor is exp(log decay) <= 1.
    """
    N = x.shape[2]
    if N == 1:
        return x
    if N % 2:  # pad with an identity step (no decay, no input)
        log_a, x = F.pad(log_a, (0, 0, 0, 0, 0, 1)), F.pad(x, (0, 0, 0, 0, 0, 1))
    a_even, a_odd = log_a[:, :, 0::2], log_a[:, :, 1::2]
    x_even, x_odd = x[:, :, 0::2], x[:, :, 1::2]
    y_odd = decay_scan(a_even + a_odd, a_odd.exp() * x_even + x_odd)
    y_before_even = torch.cat([torch.zeros_like(y_odd[:, :, :1]), y_odd[:, :, :-1]], dim=2)
    y_even = a_even.exp() * y_before_even + x_even
    return torch.stack([y_even, y_odd], dim=3).flatten(2, 3)[:, :, :N]


# --- fla dispatch ----------------------------------------------------------------------------------

_KERNEL_FAILED: set = set()


@functools.lru_cache(maxsize=None)
def fla_function(path: str) -> Callable:
    """Import ``fla.ops.<...>.<name>`` lazily (fla is optional)."""
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def _takes_head_first(fn: Callable) -> bool:
    try:
        return "head_first" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - uninspectable
        return False


def call_fla(path: str, *args, **kwargs):
    """Call the fla op ``path`` on ``[B, T, H, D]`` tensors. fla < 0.3 defaulted some ops to
    ``head_first=True`` (and recent ones refuse the argument): pass ``head_first=False`` only to
    ops that name it."""
    fn = fla_function(path)
    if _takes_head_first(fn):
        kwargs["head_first"] = False
    return fn(*args, **kwargs)


def try_kernel(op: str, dtype: torch.dtype, strict: bool, thunk: Callable):
    """Run ``thunk()`` (a kernel call: fla's, or our own Triton's). With ``strict`` (the kernel's backend named
    explicitly) errors propagate; otherwise (backend='auto') a failure is warned about once, remembered per
    (op, dtype), and None is returned so the caller falls back to its torch path. CUDA out-of-memory always
    propagates."""
    key = (op, dtype)
    if not strict and key in _KERNEL_FAILED:
        return None
    try:
        return thunk()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any kernel failure (import, Triton, shape checks) falls back
        if strict:
            raise
        _KERNEL_FAILED.add(key)
        warnings.warn(f"{op} failed on {dtype} inputs ({type(e).__name__}: {e}); using the torch path instead "
                      "(warned once)", RuntimeWarning, stacklevel=3)
        return None


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "fla" and not FLA_AVAILABLE:
        raise ValueError("backend='fla' was requested but flash-linear-attention (import name fla) is not installed "
                         f"(pip install 'effzoo[fla]') or is switched off ({FLA_OFF_VARIABLE}=1)")
    return backend


# --- the shared mixer body -------------------------------------------------------------------------


def positions_from_mask(mask: torch.Tensor | None, T: int, device, start: torch.Tensor | None = None) -> torch.Tensor:
    """Token positions ``[T]`` or ``[B, T]``: real tokens numbered 0, 1, ... (from ``start`` [B]) as if
    each sequence ran alone; padded ones get a harmless position."""
    if mask is None:
        pos = torch.arange(T, device=device)
        return pos if start is None else start[:, None] + pos
    pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return pos if start is None else start[:, None] + pos


def finish_mix(y: torch.Tensor, mask: torch.Tensor | None, state: State | None, new_state: State, T: int):
    """Zero the outputs at padded positions and advance the decoding position by the real tokens seen."""
    if mask is not None:
        y = y * mask[..., None].to(y.dtype)
    if state is not None:
        new_state["pos"] = state["pos"] + (T if mask is None else mask.sum(dim=1))
    return y, new_state


class GatedLinearMixer(Mixer):
    """Shared body of the causal mixers of this family (``linear``, ``retnet``, ``gla``).

    Subclasses set ``head_k_dim``, ``head_v_dim``, ``scale`` and implement

    * ``_features(x, positions) -> (q, k, v, log_g)`` with q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``
      and log_g None, ``[H]`` or ``[B, T, H, Dk|1]`` (float32); with ``qk_norm`` (set up by
      ``Mixer._setup_qk_norm``) it applies ``self._normalize_qk`` to the projected q and k before any feature
      map or rotary embedding, so the chunked, recurrent and fla paths all see the normalised q and k;
    * ``_output(o, x) -> y`` from o ``[B, T, H, Dv]``;
    * optionally ``_fla_chunk`` / ``_fla_step`` (fla ops on ``[B, T, H, D]``).

    Padding masks: padded positions get zero keys and values and no decay (log gate 0), so they
    neither write to nor decay the state; their outputs are zeroed. So for any padding (left,
    right or both) real tokens see exactly their own sequence and the final state is the
    sequence's own. Decoding state: ``{"S": [B, H, Dk, Dv] in state_dtype, "pos": [B] int64}``.
    """

    supports_bidirectional = False
    uses_positions = False  # rotary embeddings need the token positions (kept in the state as "pos")

    def _setup_core(self, backend: str, chunk_size: int, state_dtype: torch.dtype) -> None:
        self.backend = check_backend(backend)
        self.chunk_size = check_chunk_size(chunk_size)
        self.state_dtype = check_state_dtype(state_dtype)

    # -- subclass hooks --
    def _features(self, x: torch.Tensor, positions: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fla_chunk(self, q, k, v, log_g, S0):
        """fla's chunked kernel on [B, T, H, D]; returns (o, final_state) or raises."""
        raise NotImplementedError(f"{type(self).__name__} has no fla kernel")

    def _fla_step(self, q, k, v, log_g, S0):
        return self._fla_chunk(q, k, v, log_g, S0)

    # -- backend resolution (a pure lookup, so torch.compile traces through it) --
    def _use_fla(self, x: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "auto":
            return FLA_AVAILABLE and x.device.type == "cuda"
        if x.device.type != "cuda":
            raise ValueError(f"backend='fla' needs CUDA tensors, got a tensor on {x.device.type}; "
                             "use backend='auto' or 'torch'")
        return True

    def _core(self, q, k, v, log_g, state: State | None, decoding: bool) -> tuple[torch.Tensor, State]:
        """q, k, v [B, T, H, D]; returns (o [B, T, H, Dv], the new state without "pos")."""
        S0 = None if state is None else state["S"]
        if self._use_fla(q):
            fn = self._fla_step if decoding else self._fla_chunk
            S_fla = None if S0 is None else S0.float()  # fla wants a float32 initial state
            out = try_kernel(f"fla's {type(self).__name__}.{'step' if decoding else 'chunk'}", q.dtype,
                             self.backend == "fla", lambda: fn(q, k, v, log_g, S_fla))
            if out is not None:
                return out[0], {"S": out[1].to(self.state_dtype)}
        tr = lambda t: t.transpose(1, 2)
        g = log_g if log_g is None or log_g.dim() == 1 else tr(log_g)
        if decoding:
            g_t = g if g is None or g.dim() == 1 else g[:, :, 0]  # [H] or [B, H, Dk|1]
            o, S = recurrent_step(q[:, 0], k[:, 0], v[:, 0], g_t, S0, self.scale, self.state_dtype)
            return o[:, None], {"S": S}
        o, S = chunk_gla(tr(q), tr(k), tr(v), g, S0, self.scale, self.state_dtype, self.chunk_size)
        return tr(o), {"S": S}

    def _mix(self, x: torch.Tensor, mask: torch.Tensor | None, state: State | None, decoding: bool = False):
        B, T, _ = x.shape
        start = None if state is None else state["pos"]
        positions = positions_from_mask(mask, T, x.device, start) if self.uses_positions else None
        q, k, v, log_g = self._features(x, positions)
        if mask is not None:
            m = mask[:, :, None, None]
            k, v = k * m.to(k.dtype), v * m.to(v.dtype)
            if log_g is not None:
                g = log_g.view(1, 1, -1, 1) if log_g.dim() == 1 else log_g
                log_g = torch.where(m, g, torch.zeros((), dtype=g.dtype, device=g.device))
        o, new_state = self._core(q, k, v, log_g, state, decoding)
        return finish_mix(self._output(o, x), mask, state, new_state, T)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        return self._mix(x, mask, None)[0]

    # --- incremental decoding ---------------------------------------------------------------------

    def _default_device(self):
        return next(self.parameters()).device

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        """``{"S": zeros [B, H, Dk, Dv] in state_dtype, "pos": zeros [B] int64}``; ``dtype`` and
        ``max_len`` are not needed (the state has a fixed size and its own dtype)."""
        if not self.causal:
            raise ValueError("incremental decoding needs a causal mixer (this one was built with causal=False)")
        device = device if device is not None else self._default_device()
        return {"S": torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device,
                                 dtype=self.state_dtype),
                "pos": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def prefill(self, x: torch.Tensor, state: State, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """Consume a prompt with the chunked form; returns ``(y, final state)``. With a padding
        ``mask`` each sequence's final state is that of its real tokens alone."""
        if not self.causal:
            raise ValueError("incremental decoding needs a causal mixer (this one was built with causal=False)")
        self.check_input(x, mask)
        return self._mix(x, mask, state)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if not self.causal:
            raise ValueError("incremental decoding needs a causal mixer (this one was built with causal=False)")
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 3 or x_t.shape[1] != 1:
            raise ValueError(f"x_t must have shape [batch, 1, {self.dim}], got {tuple(getattr(x_t, 'shape', ()))}")
        self.check_input(x_t)
        return self._mix(x_t, None, state, decoding=True)

    def state_size(self, seq_len: int) -> int:
        """H * Dk * Dv floats (the position counter is not counted, as for attention's cache)."""
        return self.num_heads * self.head_k_dim * self.head_v_dim

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, backend={self.backend!r}, chunk_size={self.chunk_size}, "
                f"head_k_dim={self.head_k_dim}, head_v_dim={self.head_v_dim}")


# --- the ``linear`` mixer ------------------------------------------------------------------------

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu1": lambda x: F.elu(x) + 1,
    "relu": F.relu,
    "identity": lambda x: x,
}


def naive_linear_attention(q, k, v, causal=True, normalize=False, scale=1.0, eps=1e-6, mask=None):
    """The explicit quadratic form: A = scale * q k^T (causal: lower triangle; ``mask`` [B, T]
    drops padded keys), o = A v, divided by the row sums of A plus eps with ``normalize``.

    q, k [B, H, T, Dk] (feature maps already applied); v [B, H, T, Dv]. float32 (float64 stays)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    A = scale * (q.to(dt) @ k.to(dt).transpose(-1, -2))
    T = q.shape[2]
    if causal:
        A = A.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), 0)
    if mask is not None:
        A = A.masked_fill(~mask[:, None, None, :], 0)
    o = A @ v.to(dt)
    if normalize:
        o = o / (A.sum(-1, keepdim=True) + eps)
    return o.to(q.dtype)


@register_mixer("linear")
class LinearAttention(GatedLinearMixer):
    """Linear attention (Katharopoulos et al. 2020): o_t = phi(q_t) S_t with S_t = sum_s phi(k_s)^T v_s
    over s <= t (causal) or all s (bidirectional).

    ``feature_map`` (``elu1`` = elu(x) + 1, ``relu``, ``identity``) is applied to q and k, per head
    (head_dim features). ``normalize=True`` divides by ``phi(q_t) . z_t + eps`` with ``z_t`` the sum of
    the same ``phi(k_s)`` (in causal decoding ``z`` is part of the state); the attention scores then
    need no scale (it would cancel), so ``scale`` is 1; without normalisation it is ``head_dim**-0.5``
    (fla's default). Bidirectional: o = phi(Q) (phi(K)^T V), padded keys contributing nothing.

    fla (causal only): ``chunk_linear_attn`` for forward/prefill and ``fused_recurrent_linear_attn``
    for decoding, always with ``normalize=False`` and the feature-mapped q, k (fla's ops apply no
    feature map; fla's own normalisation cannot take the running key sum of an initial state in
    every version), the division by ``phi(q) . z`` being done here in float32.

    ``qk_norm=True``: a per-head RMSNorm (learnable weights ``q_norm``, ``k_norm``) on the projected q and k,
    before the feature map (see ``Mixer._setup_qk_norm``).
    """

    supports_bidirectional = True

    def __init__(self, dim: int, num_heads: int, causal: bool = True, feature_map: str = "elu1",
                 normalize: bool = True, eps: float = 1e-6, chunk_size: int = 64,
                 state_dtype: torch.dtype = torch.float32, backend: str = "auto", qkv_bias: bool = False,
                 proj_bias: bool = False, qk_norm: bool = False):
        super().__init__(dim, num_heads, causal)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {feature_map!r}; valid ones: {', '.join(FEATURE_MAPS)}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self._setup_core(backend, chunk_size, state_dtype)
        self.feature_map = feature_map
        self.normalize = bool(normalize)
        self.eps = float(eps)
        self.head_k_dim = self.head_v_dim = self.head_dim
        self.scale = 1.0 if self.normalize else self.head_dim ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self._setup_qk_norm(qk_norm, self.head_dim)

    def _features(self, x, positions):
        B, T, _ = x.shape
        phi = FEATURE_MAPS[self.feature_map]
        shape = (B, T, self.num_heads, self.head_dim)
        q, k = self._normalize_qk(self.q_proj(x).view(shape), self.k_proj(x).view(shape))
        return phi(q), phi(k), self.v_proj(x).view(shape), None

    def _output(self, o, x):
        return self.proj(o.reshape(*o.shape[:2], self.dim))

    def _fla_chunk(self, q, k, v, log_g, S0):
        return call_fla("fla.ops.linear_attn.chunk_linear_attn", q, k, v, scale=self.scale, initial_state=S0,
                        output_final_state=True, normalize=False)

    def _fla_step(self, q, k, v, log_g, S0):
        return call_fla("fla.ops.linear_attn.fused_recurrent_linear_attn", q, k, v, scale=self.scale,
                        initial_state=S0, output_final_state=True, normalize=False)

    def _core(self, q, k, v, log_g, state, decoding):
        o, new_state = super()._core(q, k, v, log_g, state, decoding)
        if self.normalize:
            # z_t = z_0 + sum_{s<=t} phi(k_s); padded keys were zeroed, so they add nothing
            z0 = None if state is None else state["z"].to(self.state_dtype)  # [B, H, Dk]
            z = k.to(self.state_dtype).cumsum(dim=1)  # [B, T, H, Dk]
            if z0 is not None:
                z = z + z0[:, None]
            den = (q.to(self.state_dtype) * z).sum(-1, keepdim=True) * self.scale + self.eps
            o = (o.to(self.state_dtype) / den).to(q.dtype)
            new_state["z"] = z[:, -1]
        return o, new_state

    def _bidirectional(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v, _ = self._features(x, None)
        if mask is not None:
            m = mask[:, :, None, None]
            k, v = k * m.to(k.dtype), v * m.to(v.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        kv = (k.transpose(-1, -2) @ v).to(self.state_dtype)  # [B, H, Dk, Dv]
        o = (q @ kv.to(q.dtype)).to(self.state_dtype) * self.scale
        if self.normalize:
            z = k.to(self.state_dtype).sum(dim=2, keepdim=True)  # [B, H, 1, Dk]
            o = o / ((q.to(self.state_dtype) * z).sum(-1, keepdim=True) * self.scale + self.eps)
        y = self._output(o.to(x.dtype).transpose(1, 2), x)
        return y if mask is None else y * mask[..., None].to(y.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        if not self.causal:
            return self._bidirectional(x, mask)
        return self._mix(x, mask, None)[0]

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        """As the family's state, plus ``"z": [B, H, Dk]`` (the running key sum) with ``normalize``."""
        state = super().init_state(batch_size, device, dtype, max_len)
        if self.normalize:
            state["z"] = torch.zeros(batch_size, self.num_heads, self.head_k_dim, device=state["S"].device,
                                     dtype=self.state_dtype)
        return state

    def state_size(self, seq_len: int) -> int:
        """H * Dk * Dv, plus H * Dk for the running key sum with ``normalize``."""
        return super().state_size(seq_len) + (self.num_heads * self.head_k_dim if self.normalize else 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_map={self.feature_map!r}, normalize={self.normalize}"
