"""Shared body of the normalised kernelized linear-attention mixers (``performer``, ``cosformer``).

A subclass maps the projected ``q, k`` to non-negative features ``phi(q), phi(k)`` (``feature_dim``
per head) and, optionally, a scalar log decay per token (used by ``performer`` to carry its running
key stabiliser). The output is the normalised kernel attention

    o_i = sum_j phi(q_i) . phi(k_j) v_j / (sum_j phi(q_i) . phi(k_j) + eps)

over ``j <= i`` (causal) or all real ``j`` (bidirectional). Causal: :func:`chunk_gla` (no scale) on
``v`` extended by a column of ones, so one chunked pass gives the numerator and the normaliser;
the decoding state is ``{"S": [B, H, F, Dv], "z": [B, H, F], "pos": [B]}`` (as the ``linear``
mixer's with ``normalize=True``) plus whatever the subclass adds. Bidirectional:
``phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1 + eps)``.

The projections run in the input dtype; the feature maps, the kernel core and its state run in
``state_dtype`` (float32 by default: the features are exponentials / products that bf16 would round
coarsely), the result being cast back before the output projection. Padded keys (``mask`` False)
get zero features and values (and no decay), so they contribute nothing; padded outputs are zeroed.

``qk_norm=True`` (a constructor option of every subclass) applies a per-head RMSNorm with learnable weights
(``q_norm``, ``k_norm``) to the projected q and k before the feature maps, on every path (forward, prefill,
step), so the naive references see the same normalised q and k.
"""
from __future__ import annotations

import torch
from torch import nn

from layers.linear_attention import chunk_gla, check_chunk_size, check_state_dtype, finish_mix, positions_from_mask
from layers.mixer import Mixer, State


class KernelAttentionMixer(Mixer):
    """Base class; subclasses set ``feature_dim`` and implement ``_feature_maps``."""

    feature_dim: int

    def _setup(self, eps: float, chunk_size: int, state_dtype: torch.dtype, qkv_bias: bool, proj_bias: bool,
               qk_norm: bool = False) -> None:
        if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.eps = float(eps)
        self.chunk_size = check_chunk_size(chunk_size)
        self.state_dtype = check_state_dtype(state_dtype)
        self.qkv = nn.Linear(self.dim, 3 * self.dim, bias=qkv_bias)
        self.proj = nn.Linear(self.dim, self.dim, bias=proj_bias)
        self._setup_qk_norm(qk_norm, self.head_dim)

    # -- subclass hook --
    def _feature_maps(self, q, k, mask, positions, state):  # pragma: no cover - abstract
        """q, k [B, H, T, Dh] (input dtype); mask [B, T] or None; positions [B, T] int64 (real tokens
        numbered from the state's "pos"); state or None. Returns ``(fq, fk, log_g, extra)``: features
        [B, H, T, F] in ``state_dtype`` (fk is zeroed on padded keys here anyway), log_g None or
        [B, H, T, 1] (0 on padded tokens), and the subclass's entries of the new state (a dict)."""
        raise NotImplementedError

    def _check_length(self, T: int, state: State | None) -> None:
        """Subclasses with a length limit raise a ValueError here."""

    def _mix(self, x: torch.Tensor, mask: torch.Tensor | None, state: State | None) -> tuple[torch.Tensor, State]:
        B, T, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        self._check_length(T, state)
        q, k, v = self.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, Dh]
        q, k = self._normalize_qk(q, k)  # qk_norm: before the feature maps
        start = None if state is None else state["pos"]
        positions = positions_from_mask(mask, T, x.device, start)
        if positions.dim() == 1:
            positions = positions.expand(B, T)
        fq, fk, log_g, extra = self._feature_maps(q, k, mask, positions, state)
        sd = self.state_dtype
        va = torch.cat([v.to(sd), torch.ones(B, H, T, 1, dtype=sd, device=x.device)], dim=-1)  # [v, 1]
        if mask is not None:
            m = mask[:, None, :, None]
            fk = torch.where(m, fk, torch.zeros((), dtype=fk.dtype, device=fk.device))
            va = va * m.to(sd)
        if self.causal:
            S0 = None if state is None else torch.cat([state["S"], state["z"][..., None]], dim=-1).to(sd)
            o, Sa = chunk_gla(fq.to(sd), fk.to(sd), va, log_g, S0, scale=1.0, state_dtype=sd, chunk_size=self.chunk_size)
            new_state = {"S": Sa[..., :Dh], "z": Sa[..., Dh], **extra}
        else:
            kv = fk.to(sd).transpose(-1, -2) @ va  # [B, H, F, Dv + 1]
            o = fq.to(sd) @ kv
            new_state = {}
        o = o[..., :Dh] / (o[..., Dh:] + self.eps)
        return finish_mix(self.proj(o.to(x.dtype).transpose(1, 2).reshape(B, T, H * Dh)), mask, state, new_state, T)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        return self._mix(x, mask, None)[0]

    # --- incremental decoding ---------------------------------------------------------------------

    def _require_causal(self) -> None:
        if not self.causal:
            raise ValueError("incremental decoding needs a causal mixer (this one was built with causal=False)")

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        """``{"S": zeros [B, H, F, Dh], "z": zeros [B, H, F]`` in ``state_dtype``, ``"pos": zeros [B] int64}``
        (plus the subclass's entries); ``dtype`` and ``max_len`` are not needed (fixed-size state)."""
        self._require_causal()
        device = device if device is not None else self.qkv.weight.device
        H, F = self.num_heads, self.feature_dim
        return {"S": torch.zeros(batch_size, H, F, self.head_dim, device=device, dtype=self.state_dtype),
                "z": torch.zeros(batch_size, H, F, device=device, dtype=self.state_dtype),
                "pos": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def prefill(self, x: torch.Tensor, state: State, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """Consume a prompt with the chunked form; with a padding ``mask`` each sequence's final state is
        that of its real tokens alone."""
        self._require_causal()
        self.check_input(x, mask)
        return self._mix(x, mask, state)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        self._require_causal()
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 3 or x_t.shape[1] != 1:
            raise ValueError(f"x_t must have shape [batch, 1, {self.dim}], got {tuple(getattr(x_t, 'shape', ()))}")
        self.check_input(x_t)
        return self._mix(x_t, None, state)

    def state_size(self, seq_len: int) -> int:
        """H * F * Dh for S plus H * F for the normaliser z (the position counter is not counted)."""
        return self.num_heads * self.feature_dim * (self.head_dim + 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_dim={self.feature_dim}, chunk_size={self.chunk_size}, eps={self.eps}"
