"""cosFormer (Qin et al. 2022, "cosFormer: Rethinking Softmax in Attention").

ReLU feature maps with a cos re-weighting of the scores by the token distance:

    o_i = sum_j relu(q_i) . relu(k_j) cos(pi/2 (i - j) / M) v_j / (sum_j relu(q_i) . relu(k_j) cos(...) + eps)

kept linear by ``cos(a - b) = cos a cos b + sin a sin b``: with ``theta_i = pi i / (2M)`` the features
are ``[relu(x_i) cos theta_i, relu(x_i) sin theta_i]`` (2 Dh per head), for queries and keys alike.
``i`` counts the real tokens of each sequence from 0 (padding does not move it).

``M``: bidirectionally, each sequence's length (its number of real tokens) unless ``max_seq_len``
fixes it. Causally, ``max_seq_len`` is required and fixes ``M``, so that one-token decoding sees the
same weights as the parallel form; sequences (or a decoding run) longer than ``max_seq_len`` raise a
ValueError (beyond it the weights ``cos`` would turn negative). Causal: :func:`chunk_gla` on the
concatenated features with normalisation; the decoding state is ``{"S": [B, H, 2 Dh, Dh],
"z": [B, H, 2 Dh], "pos": [B]}``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from layers.kernel_attention import KernelAttentionMixer
from layers.mixer import State, register_mixer


def cos_features(x: torch.Tensor, positions: torch.Tensor, M) -> torch.Tensor:
    """[relu(x) cos(pi i / 2M), relu(x) sin(pi i / 2M)]: x [B, H, T, D], positions [B, T], M a number or a
    tensor broadcastable to [B, 1] -> [B, H, T, 2D] in x's dtype."""
    theta = (math.pi / 2) * positions.to(x.dtype) / M  # [B, T]
    r = F.relu(x)
    return torch.cat([r * theta.cos()[:, None, :, None], r * theta.sin()[:, None, :, None]], dim=-1)


def naive_cosformer_attention(q, k, v, M, causal=True, mask=None, eps=1e-6):
    """The explicit quadratic form: A_ij = relu(q_i) . relu(k_j) cos(pi/2 (i - j) / M) over allowed j
    (j <= i when causal; ``mask`` [B, T] drops padded keys), o = A v / (A 1 + eps), positions i = 0..T-1.
    q, k, v [B, H, T, D]; float32 inside (float64 stays); returns o in q's dtype."""
    dt = torch.promote_types(q.dtype, torch.float32)
    T = q.shape[2]
    i = torch.arange(T, dtype=dt, device=q.device)
    A = (F.relu(q.to(dt)) @ F.relu(k.to(dt)).transpose(-1, -2)) * torch.cos(math.pi / 2 * (i[:, None] - i[None]) / M)
    if causal:
        A = A.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), 0)
    if mask is not None:
        A = A.masked_fill(~mask[:, None, None, :], 0)
    o = (A @ v.to(dt)) / (A.sum(-1, keepdim=True) + eps)
    return o.to(q.dtype)


@register_mixer("cosformer")
class CosFormer(KernelAttentionMixer):
    """cosFormer attention (see the module docstring); causal needs ``max_seq_len``. ``qk_norm=True``: per-head
    RMSNorm on q and k before the ReLU / cos features (see ``KernelAttentionMixer``)."""

    def __init__(self, dim: int, num_heads: int, causal: bool = True, max_seq_len: int | None = None,
                 eps: float = 1e-6, chunk_size: int = 64, state_dtype: torch.dtype = torch.float32,
                 qkv_bias: bool = False, proj_bias: bool = False,
                 qk_norm: bool = False):
        super().__init__(dim, num_heads, causal)
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                        or max_seq_len <= 0):
            raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
        if causal and max_seq_len is None:
            raise ValueError("max_seq_len is required for causal=True (it fixes M of the cos re-weighting, "
                             "so that decoding matches the parallel form)")
        self._setup(eps, chunk_size, state_dtype, qkv_bias, proj_bias, qk_norm)
        self.max_seq_len = max_seq_len
        self.feature_dim = 2 * self.head_dim

    def _check_length(self, T: int, state: State | None) -> None:
        if self.max_seq_len is None:
            return
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.max_seq_len}")
        if state is not None and int(state["pos"].max()) + T > self.max_seq_len:
            raise ValueError(f"decoding past max_seq_len={self.max_seq_len}: {int(state['pos'].max())} tokens "
                             f"already consumed, {T} more given")

    def _feature_maps(self, q, k, mask, positions, state):
        sd = self.state_dtype
        if self.max_seq_len is not None:
            M = float(self.max_seq_len)
        elif mask is None:
            M = float(q.shape[2])
        else:
            M = mask.sum(dim=1, keepdim=True).clamp(min=1).to(sd)  # [B, 1]: each sequence's length
        return cos_features(q.to(sd), positions, M), cos_features(k.to(sd), positions, M), None, {}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_seq_len={self.max_seq_len}"
