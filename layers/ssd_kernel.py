"""Mamba-2's chunked SSD (:func:`layers.mamba2.ssd_chunked`) as Triton kernels, forward and backward.

Same arguments, outputs and layout as :func:`layers.mamba2.ssd_chunked`: x [b, T, H, P]; dt [b, T, H]
(after softplus); A [H]; B, C [b, T, G, N] (head h reads group h // (H / G)); D [H] or None; initial
state [b, H, P, N] or None; returns y [b, T, H, P] in x's dtype and the final state [b, H, P, N] float32.

With cs the cumulative log decay dt A inside a chunk of L tokens, S the state entering the chunk and
v = dt x, each chunk computes

    y_i   = sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) v_j  +  exp(cs_i) C_i S  +  D x_i
    S_out = exp(cs_L) S + sum_j exp(cs_L - cs_j) B_j^T v_j

in three kernels: each chunk's own state contribution, a scan over chunks (programs walk the chunks in order,
each with a slice of one head's state in registers), then every chunk's output. The backward mirrors it: each
chunk's contribution to the gradient of its entering state, a reverse scan, then one kernel for the gradients of
x, dt, B, C and the log decays (a reverse cumulative sum of the cs gradients), with dA and dD reduced from
per-chunk partial sums. Between forward and backward the inputs and the states entering the chunks are kept
([b, H, chunks, N, P] in the inputs' dtype: N / L times x's size, 2x at d_state 128 and chunks of 64), so the
backward does not recompute them; nothing of size [b, T, H, L].

Why: the torch path materialises the [L, L] decay and score blocks and the float32 products in memory
(fused under torch.compile, still 0.5x lm-125m's training tokens/s at T = 16k on an H200). Here they live in
registers. On an H200 (``docs/benchmarks/ssd_kernels_gpu.md``, each pair timed in one run): fwd+bwd at [4, 4096]
tokens, 24 heads of 64, d_state 128, bf16, 1.7 ms against 9.7 ms for the eager torch path; the compiled Mamba-2
layer 6.3 ms against 8.5 ms with the compiled torch path.

Dots run in the inputs' dtype with float32 accumulation (exact float32 for float32 inputs); decays, the scans'
running states and every accumulation are float32. The per-chunk states the scans hand to the output and
backward kernels are stored in the inputs' dtype, the dtype their dots read them in.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (the tests' float32 and float16 checks).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from layers.triton_support import kernels_take, tl, triton


def supports(x: Tensor, chunk_size: int) -> bool:
    """Whether the mixers run :func:`fused_ssd` on ``x``: Triton present, a CUDA float32 / bfloat16 / float16
    tensor, and chunks of at least 16 tokens (the smallest Triton dot)."""
    return kernels_take(x) and chunk_size >= 16


if triton is not None:

    @triton.jit
    def _chunk_decays(dt_ptr, A_ptr, b, h, t, T, H, L: tl.constexpr):
        """Rows t's dt and inclusive cumulative log decays cs for head h (rows past T: dt = 0, no decay), and the
        chunk's total cs_last."""
        dt = tl.load(dt_ptr + (b * T + t).to(tl.int64) * H + h, mask=t < T, other=0.0).to(tl.float32)
        cs = tl.cumsum(dt * tl.load(A_ptr + h).to(tl.float32), 0)
        cs_last = tl.sum(tl.where(tl.arange(0, L) == L - 1, cs, 0.0), 0)
        return dt, cs, cs_last

    @triton.jit
    def _chunk_program(dt_ptr, A_ptr, T, H, G, L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's chunk c and (batch, head) pair bh = b * H + h, the head's group g, the tiles' column
        indices p and n, the chunk's rows t and their :func:`_chunk_decays`."""
        c, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        t = c * L + tl.arange(0, L)
        dt, cs, cs_last = _chunk_decays(dt_ptr, A_ptr, b, h, t, T, H, L)
        return c, bh, b, h, h // (H // G), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N), t, dt, cs, cs_last

    @triton.jit
    def _rows(ptr, b, t, T, width, head, heads, cols):
        """The [L, len(cols)] tile of rows t of a [b, T, heads, width] tensor at ``head`` (zeros past T / width)."""
        offs = ((b * T + t).to(tl.int64) * heads + head)[:, None] * width + cols[None, :]
        return tl.load(ptr + offs, mask=(t < T)[:, None] & (cols < width)[None, :], other=0.0)

    @triton.jit
    def _store_rows(ptr, value, b, t, T, width, head, heads, cols):
        offs = ((b * T + t).to(tl.int64) * heads + head)[:, None] * width + cols[None, :]
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=(t < T)[:, None] & (cols < width)[None, :])

    @triton.jit
    def _state_offsets(bh, c, nc, N, P, n, p):
        """Offsets of the [BLOCK_N, BLOCK_P] tile of chunk c in a [b * H, nc, N, P] buffer."""
        return ((bh * nc + c).to(tl.int64) * N + n[:, None]) * P + p[None, :]

    @triton.jit
    def _chunk_state_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, kv_ptr, dec_ptr, T, H, G, P, N, nc,
                            L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """kv[c] = sum_j exp(cs_L - cs_j) B_j^T (dt_j x_j)  [N, P];  dec[c] = cs_L."""
        c, bh, b, h, g, p, n, t, dt, cs, cs_last = _chunk_program(dt_ptr, A_ptr, T, H, G, L, BLOCK_P, BLOCK_N)
        x = _rows(x_ptr, b, t, T, P, h, H, p)
        Bt = _rows(B_ptr, b, t, T, N, g, G, n)
        v = (x.to(tl.float32) * (dt * tl.exp(cs_last - cs))[:, None]).to(x.dtype)
        kv = tl.dot(tl.trans(Bt), v, input_precision=PRECISION)
        live = (n < N)[:, None] & (p < P)[None, :]
        tl.store(kv_ptr + _state_offsets(bh, c, nc, N, P, n, p), kv, mask=live)
        tl.store(dec_ptr + bh * nc + c, cs_last)

    @triton.jit
    def _scan_kernel(own_ptr, out_ptr, dec_ptr, init_ptr, final_ptr, nc, N, P, REVERSE: tl.constexpr,
                     HAS_INIT: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
        """Over chunks (reversed with REVERSE): out[c] <- S;  S <- exp(dec[c]) S + own[c], starting from init (or
        0); the last S goes to final. States are [N, P], init and final [b * H, P, N] (mamba-ssm's). The walk is
        sequential, so each program takes BLOCK contiguous elements of one head's flattened state (many programs,
        coalesced loads) and the loads run STAGES chunks ahead of the walk (``own`` and ``out`` do not alias)."""
        e, bh = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), tl.program_id(1)
        live = e < N * P
        transposed = (bh.to(tl.int64) * P + e % P) * N + e // P
        if HAS_INIT:
            S = tl.load(init_ptr + transposed, mask=live, other=0.0).to(tl.float32)
        else:
            S = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in tl.range(0, nc, num_stages=STAGES):
            c = nc - 1 - i if REVERSE else i
            at = (bh * nc + c).to(tl.int64) * N * P + e
            own = tl.load(own_ptr + at, mask=live, other=0.0)
            decay = tl.exp(tl.load(dec_ptr + bh * nc + c))
            tl.store(out_ptr + at, S.to(out_ptr.dtype.element_ty), mask=live)
            S = decay * S + own
        tl.store(final_ptr + transposed, S, mask=live)

    @triton.jit
    def _chunk_output_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, S_ptr, y_ptr, T, H, G, P, N, nc,
                             L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr,
                             PRECISION: tl.constexpr):
        """y = ((C B^T) * exp(cs_i - cs_j) [j <= i]) (dt x) + exp(cs) C S + D x for chunk c."""
        c, bh, b, h, g, p, n, t, dt, cs, cs_last = _chunk_program(dt_ptr, A_ptr, T, H, G, L, BLOCK_P, BLOCK_N)
        i = tl.arange(0, L)
        x = _rows(x_ptr, b, t, T, P, h, H, p)
        Bt = _rows(B_ptr, b, t, T, N, g, G, n)
        Ct = _rows(C_ptr, b, t, T, N, g, G, n)
        decay = tl.exp(tl.where(i[:, None] >= i[None, :], cs[:, None] - cs[None, :], float("-inf")))
        scores = (tl.dot(Ct, tl.trans(Bt), input_precision=PRECISION) * decay).to(x.dtype)
        v = (x.to(tl.float32) * dt[:, None]).to(x.dtype)
        y = tl.dot(scores, v, input_precision=PRECISION)
        S = tl.load(S_ptr + _state_offsets(bh, c, nc, N, P, n, p), mask=(n < N)[:, None] & (p < P)[None, :], other=0.0)
        y += tl.exp(cs)[:, None] * tl.dot(Ct, S, input_precision=PRECISION)
        if HAS_D:
            y += tl.load(D_ptr + h).to(tl.float32) * x.to(tl.float32)
        _store_rows(y_ptr, y, b, t, T, P, h, H, p)

    @triton.jit
    def _chunk_dstate_kernel(dy_ptr, dt_ptr, A_ptr, C_ptr, q_ptr, T, H, G, P, N, nc,
                             L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """q[c] = sum_i exp(cs_i) C_i^T dy_i  [N, P]: the gradient chunk c's outputs send to its entering state."""
        c, bh, b, h, g, p, n, t, dt, cs, cs_last = _chunk_program(dt_ptr, A_ptr, T, H, G, L, BLOCK_P, BLOCK_N)
        dy = _rows(dy_ptr, b, t, T, P, h, H, p)
        Ct = _rows(C_ptr, b, t, T, N, g, G, n)
        Ce = (Ct.to(tl.float32) * tl.exp(cs)[:, None]).to(dy.dtype)
        q = tl.dot(tl.trans(Ce), dy, input_precision=PRECISION)
        tl.store(q_ptr + _state_offsets(bh, c, nc, N, P, n, p), q, mask=(n < N)[:, None] & (p < P)[None, :])

    @triton.jit
    def _chunk_backward_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, S_ptr, Gs_ptr, dy_ptr,
                               dx_ptr, ddt_ptr, dA_ptr, dD_ptr, T, H, G, P, N, nc,
                               L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr,
                               PRECISION: tl.constexpr):
        """Gradients of chunk c for one head given its entering state S and the gradient Gs of its leaving state:
        dx, ddt, and this chunk's parts of dA and dD (dB and dC: :func:`_chunk_backward_bc_kernel`)."""
        c, bh, b, h, g, p, n, t, dt, cs, cs_last = _chunk_program(dt_ptr, A_ptr, T, H, G, L, BLOCK_P, BLOCK_N)
        i = tl.arange(0, L)
        x = _rows(x_ptr, b, t, T, P, h, H, p)
        dy = _rows(dy_ptr, b, t, T, P, h, H, p)
        Bt = _rows(B_ptr, b, t, T, N, g, G, n)
        Ct = _rows(C_ptr, b, t, T, N, g, G, n)
        state_at, state_live = _state_offsets(bh, c, nc, N, P, n, p), (n < N)[:, None] & (p < P)[None, :]
        v = (x.to(tl.float32) * dt[:, None]).to(x.dtype)

        # within the chunk: scores_ij = (C_i . B_j) exp(cs_i - cs_j), j <= i
        decay = tl.exp(tl.where(i[:, None] >= i[None, :], cs[:, None] - cs[None, :], float("-inf")))
        scores = tl.dot(Ct, tl.trans(Bt), input_precision=PRECISION) * decay
        dyv = tl.dot(dy, tl.trans(v), input_precision=PRECISION)  # dy_i . v_j
        dv = tl.dot(tl.trans(scores.to(x.dtype)), dy, input_precision=PRECISION)
        both = scores * dyv
        dcs = tl.sum(both, 1) - tl.sum(both, 0)

        # the entering state read by C: exp(cs_i) C_i S, whose log-decay gradient is exp(cs_i) dy_i . (C_i S)
        S = tl.load(S_ptr + state_at, mask=state_live, other=0.0)
        dcs += tl.exp(cs) * tl.sum(dy.to(tl.float32) * tl.dot(Ct, S, input_precision=PRECISION), 1)

        # the leaving state: exp(cs_L - cs_j) B_j^T v_j and exp(cs_L) S
        Gs = tl.load(Gs_ptr + state_at, mask=state_live, other=0.0)
        dv_state = tl.exp(cs_last - cs)[:, None] * tl.dot(Bt, Gs, input_precision=PRECISION)
        dv += dv_state
        through_state = tl.sum(dv_state * v.to(tl.float32), 1)
        dcs -= through_state
        S_dot_Gs = tl.sum(tl.sum(S.to(tl.float32) * Gs.to(tl.float32), 1), 0)
        dcs += tl.where(i == L - 1, tl.sum(through_state, 0) + tl.exp(cs_last) * S_dot_Gs, 0.0)

        da = tl.sum(dcs, 0) - tl.cumsum(dcs, 0) + dcs  # cs_k = a_0 + ... + a_k: da_t = sum_{k >= t} dcs_k
        A = tl.load(A_ptr + h).to(tl.float32)
        xf = x.to(tl.float32)
        dx = dv * dt[:, None]
        if HAS_D:
            dyf = dy.to(tl.float32)
            dx += tl.load(D_ptr + h).to(tl.float32) * dyf
            tl.store(dD_ptr + bh * nc + c, tl.sum(tl.sum(dyf * xf, 1), 0))
        _store_rows(dx_ptr, dx, b, t, T, P, h, H, p)
        tl.store(ddt_ptr + (b * T + t).to(tl.int64) * H + h, tl.sum(dv * xf, 1) + da * A, mask=t < T)
        tl.store(dA_ptr + bh * nc + c, tl.sum(da * dt, 0))

    @triton.jit
    def _chunk_backward_bc_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, S_ptr, Gs_ptr, dy_ptr, dB_ptr, dC_ptr,
                                  T, H, G, P, N, nc, L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                                  PRECISION: tl.constexpr, LOOP_STAGES: tl.constexpr):
        """dB and dC of chunk c for one (batch, group): summed over the group's heads in registers, stored once in
        B's dtype. Per head, with M = (dy v^T) * decay: dC += M B + exp(cs) dy S^T;  dB += M^T C + exp(cs_L - cs)
        v Gs^T."""
        c, bg = tl.program_id(0), tl.program_id(1)
        b, g = bg // G, bg % G
        i = tl.arange(0, L)
        t = c * L + i
        p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        Bt = _rows(B_ptr, b, t, T, N, g, G, n)
        Ct = _rows(C_ptr, b, t, T, N, g, G, n)
        dB = tl.zeros((L, BLOCK_N), dtype=tl.float32)
        dC = tl.zeros((L, BLOCK_N), dtype=tl.float32)
        heads = H // G
        for k in tl.range(0, heads, num_stages=LOOP_STAGES):
            h = g * heads + k
            dt, cs, cs_last = _chunk_decays(dt_ptr, A_ptr, b, h, t, T, H, L)
            x = _rows(x_ptr, b, t, T, P, h, H, p)
            dy = _rows(dy_ptr, b, t, T, P, h, H, p)
            v = (x.to(tl.float32) * dt[:, None]).to(x.dtype)
            decay = tl.exp(tl.where(i[:, None] >= i[None, :], cs[:, None] - cs[None, :], float("-inf")))
            M = (tl.dot(dy, tl.trans(v), input_precision=PRECISION) * decay).to(x.dtype)
            state_at = _state_offsets(b * H + h, c, nc, N, P, n, p)
            state_live = (n < N)[:, None] & (p < P)[None, :]
            S = tl.load(S_ptr + state_at, mask=state_live, other=0.0)
            Gs = tl.load(Gs_ptr + state_at, mask=state_live, other=0.0)
            dC += tl.dot(M, Bt, input_precision=PRECISION)
            dC += tl.exp(cs)[:, None] * tl.dot(dy, tl.trans(S), input_precision=PRECISION)
            dB += tl.dot(tl.trans(M), Ct, input_precision=PRECISION)
            dB += tl.exp(cs_last - cs)[:, None] * tl.dot(v, tl.trans(Gs), input_precision=PRECISION)
        _store_rows(dC_ptr, dC, b, t, T, N, g, G, n)
        _store_rows(dB_ptr, dB, b, t, T, N, g, G, n)


def _launch_shape(x: Tensor, B: Tensor, chunk_size: int):
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    return batch, T, H, P, G, N, triton.cdiv(T, chunk_size)


def _meta(x: Tensor, P: int, N: int) -> dict:
    """Tile sizes (powers of two >= 16, the smallest Triton dot) and the dots' precision: exact for float32."""
    return dict(BLOCK_P=max(16, triton.next_power_of_2(P)), BLOCK_N=max(16, triton.next_power_of_2(N)),
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32")


# The scan's tiling, from a sweep on an H200 (B = 2, T = 16k, 24 heads, N = 128, P = 64, 256 chunks): 0.16 ms a
# scan, against 1.6 ms with one program per head walking [N, P] tiles and 0.64-0.94 ms for flat slices whose loads
# waited on the previous chunk's store (in place). The backward kernel runs 4 warps: 1.46 ms against 2.49 ms with 8.
SCAN_BLOCK, SCAN_WARPS, SCAN_STAGES = 256, 2, 3


def _scan(own: Tensor, dec: Tensor, init: Tensor, final: Tensor, reverse: bool, has_init: bool,
          dtype: torch.dtype) -> Tensor:
    """:func:`_scan_kernel` over the chunks' own parts ``own`` [b * H, nc, N, P] float32 and their log decays
    ``dec`` [b * H, nc]: the states entering (``reverse``: leaving) every chunk, [b * H, nc, N, P] in ``dtype``."""
    heads, nc, N, P = own.shape
    out = torch.empty_like(own, dtype=dtype)
    _scan_kernel[(triton.cdiv(N * P, SCAN_BLOCK), heads)](own, out, dec, init, final, nc, N, P, REVERSE=reverse,
                                                          HAS_INIT=has_init, BLOCK=SCAN_BLOCK, STAGES=SCAN_STAGES,
                                                          num_warps=SCAN_WARPS)
    return out


def _head_loop_stages(x: Tensor, L: int, meta: dict) -> int:
    """Loads in flight in the dB/dC kernel's loop over a group's heads: as many as fit in ~160 KB of shared memory
    (one head's x, dy, S and Gs tiles per stage; float32 at N = 128, P = 64 takes 98 KB a stage, so one)."""
    per_stage = (2 * meta["BLOCK_N"] * meta["BLOCK_P"] + 2 * L * meta["BLOCK_P"]) * x.element_size()
    return max(1, min(3, (160 * 1024) // per_stage))


def _chunk_states(x, dt, A, B, initial_state, chunk_size):
    """The states entering every chunk, [b * H, nc, N, P] in x's dtype (the dots that read them take that dtype;
    the scan itself runs in float32), the chunks' log decays [b * H, nc] and the final state [b, H, P, N] float32."""
    batch, T, H, P, G, N, nc = _launch_shape(x, B, chunk_size)
    meta = _meta(x, P, N)
    own = torch.empty(batch * H, nc, N, P, device=x.device, dtype=torch.float32)
    dec = torch.empty(batch * H, nc, device=x.device, dtype=torch.float32)
    _chunk_state_kernel[(nc, batch * H)](x, dt, A, B, own, dec, T, H, G, P, N, nc, L=chunk_size, **meta)
    final = torch.empty(batch, H, P, N, device=x.device, dtype=torch.float32)
    has_init = initial_state is not None
    states = _scan(own, dec, initial_state if has_init else final, final, reverse=False, has_init=has_init,
                   dtype=x.dtype)
    return states, dec, final


# The kernels run inside two custom ops (forward, backward), so torch.compile keeps them as opaque calls in its
# graphs (with their output shapes from the fake implementations) instead of tracing into Triton launches.


@torch.library.custom_op("effzoo::ssd_forward", mutates_args=())
def _ssd_forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 initial_state: Optional[Tensor], chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, the final state, and for the backward the states entering the chunks and the chunks' log decays."""
    batch, T, H, P, G, N, nc = _launch_shape(x, B, chunk_size)
    states, dec, final = _chunk_states(x, dt, A, B, initial_state, chunk_size)
    y = torch.empty_like(x)
    _chunk_output_kernel[(nc, batch * H)](x, dt, A, B, C, A if D is None else D, states, y, T, H, G, P, N, nc,
                                          L=chunk_size, HAS_D=D is not None, **_meta(x, P, N))
    return y, final, states, dec


@_ssd_forward.register_fake
def _(x, dt, A, B, C, D, initial_state, chunk_size):
    batch, T, H, P, G, N, nc = _launch_shape(x, B, chunk_size)
    return (torch.empty_like(x), x.new_empty(batch, H, P, N, dtype=torch.float32), x.new_empty(batch * H, nc, N, P),
            x.new_empty(batch * H, nc, dtype=torch.float32))


@torch.library.custom_op("effzoo::ssd_backward", mutates_args=())
def _ssd_backward(dy: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  D: Optional[Tensor], initial_state: Optional[Tensor], states: Tensor, dec: Tensor,
                  chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, dt, A, B, C, D and the initial state (the last two empty when absent), given the forward's
    chunk states and log decays."""
    L = chunk_size
    batch, T, H, P, G, N, nc = _launch_shape(x, B, L)
    meta = _meta(x, P, N)
    grads_own = torch.empty(batch * H, nc, N, P, device=x.device, dtype=torch.float32)
    _chunk_dstate_kernel[(nc, batch * H)](dy, dt, A, C, grads_own, T, H, G, P, N, nc, L=L, **meta)
    d_init = torch.empty(batch, H, P, N, device=x.device, dtype=torch.float32)
    grads_out = _scan(grads_own, dec, d_init if dfinal is None else dfinal, d_init, reverse=True,
                      has_init=dfinal is not None, dtype=x.dtype)
    dx, ddt = torch.empty_like(x), torch.empty_like(dt)
    dA_parts = torch.empty(batch * H, nc, device=x.device, dtype=torch.float32)
    dD_parts = torch.empty_like(dA_parts)
    _chunk_backward_kernel[(nc, batch * H)](x, dt, A, B, C, A if D is None else D, states, grads_out, dy, dx, ddt,
                                            dA_parts, dD_parts, T, H, G, P, N, nc, L=L, HAS_D=D is not None,
                                            num_warps=4, **meta)
    dB, dC = torch.empty_like(B), torch.empty_like(C)
    _chunk_backward_bc_kernel[(nc, batch * G)](x, dt, A, B, C, states, grads_out, dy, dB, dC, T, H, G, P, N, nc, L=L,
                                               LOOP_STAGES=_head_loop_stages(x, L, meta), num_warps=4, **meta)
    dD = x.new_empty(0) if D is None else dD_parts.view(batch, H, nc).sum((0, 2)).to(D.dtype)
    return (dx, ddt, dA_parts.view(batch, H, nc).sum((0, 2)), dB, dC, dD,
            x.new_empty(0) if initial_state is None else d_init)


@_ssd_backward.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, initial_state, states, dec, chunk_size):
    # a fresh empty tensor for each absent gradient: outputs of a custom op must not alias each other
    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B), torch.empty_like(C),
            x.new_empty(0) if D is None else torch.empty_like(D),
            x.new_empty(0) if initial_state is None else torch.empty_like(initial_state, dtype=torch.float32))


def _save_inputs(ctx, inputs, output):
    *tensors, ctx.chunk_size = inputs
    _, _, states, dec = output
    ctx.mark_non_differentiable(states, dec)
    ctx.save_for_backward(*tensors, states, dec)


def _backward(ctx, dy, dfinal, _dstates, _ddec):
    x, dt, A, B, C, D, initial_state, states, dec = ctx.saved_tensors
    dy = torch.zeros_like(x) if dy is None else dy.to(x.dtype).contiguous()
    dfinal = None if dfinal is None else dfinal.float().contiguous()
    dx, ddt, dA, dB, dC, dD, d_init = _ssd_backward(dy, dfinal, x, dt, A, B, C, D, initial_state, states, dec,
                                                    ctx.chunk_size)
    return dx, ddt, dA, dB, dC, None if D is None else dD, None if initial_state is None else d_init, None


_ssd_forward.register_autograd(_backward, setup_context=_save_inputs)


def fused_ssd(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64):
    """:func:`layers.mamba2.ssd_chunked` through the kernels (see the module docstring); ``chunk_size`` a power
    of two >= 16. Runs wherever Triton does (CUDA, or CPU tensors under the interpreter): callers check
    :func:`supports`."""
    cast = lambda t, dtype: None if t is None else t.to(dtype).contiguous()
    y, final, _, _ = _ssd_forward(x.contiguous(), cast(dt, torch.float32), cast(A, torch.float32), cast(B, x.dtype),
                                  cast(C, x.dtype), None if D is None else D.contiguous(),
                                  cast(initial_state, torch.float32), chunk_size)
    return y, final
