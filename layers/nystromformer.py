"""Nystromformer (Xiong et al. 2021, "Nystromformer: A Nystrom-Based Algorithm for Approximating
Self-Attention"): bidirectional only.

With ``m = num_landmarks`` landmarks Q~, K~ (segment means of q and k) and s = 1/sqrt(Dh):

    F = softmax(s Q K~^T) [T, m],  A = softmax(s Q~ K~^T) [m, m],  B = softmax(s Q~ K^T) [m, T]
    out = F pinv(A) (B V)  (+ a depthwise convolution of V over the sequence, ``conv_kernel`` taps)

``pinv(A)`` is the paper's iterative Moore-Penrose approximation (``PINV_ITERS`` = 6 iterations from
Z0 = A^T / (||A||_1 ||A||_inf), the norms taken per matrix, i.e. per sequence and head).

Landmarks when T is not a multiple of m: instead of zero-padding the sequence to a multiple of m
(which, when T is just above m, leaves whole segments made only of padding and hence spurious landmarks),
the T tokens are split into m contiguous segments whose sizes differ by at most one, as
``torch.tensor_split`` does: the first ``T % m`` segments have ``T // m + 1`` tokens, the others
``T // m``; each landmark is the mean of its segment. Equivalently: each short segment is padded by one
token that is left out of its mean. For T divisible by m this is the paper's segment means.

T <= m: exact softmax attention (the Nystrom form with the tokens as their own landmarks is exact too,
S pinv(S) S = S, but the direct form avoids the iterative pseudo-inverse's error), plus the conv residual.

The kernels and the pseudo-inverse run in float32 whatever the input dtype (the iteration is unstable in
bf16). No padding mask (``supports_mask = False``): the segment means and the conv residual mix padded and
real tokens, so masked outputs could not equal those of running each sequence alone. No decoding.

``naive_nystromformer`` is the reference: the same math with explicit per-segment means and
``torch.linalg.pinv`` (or the iteration, for an exact comparison).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from layers.mixer import Mixer, register_mixer
from layers.sparse_attention import check_int_option

PINV_ITERS = 6


def iterative_pinv(A: torch.Tensor, iters: int = PINV_ITERS) -> torch.Tensor:
    """The paper's iterative Moore-Penrose pseudo-inverse of A [..., m, m] (per matrix scaling of Z0)."""
    I = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    norm1 = A.abs().sum(dim=-2).amax(dim=-1, keepdim=True)  # max column sum
    norm_inf = A.abs().sum(dim=-1).amax(dim=-1, keepdim=True)  # max row sum
    Z = A.transpose(-1, -2) / (norm1 * norm_inf)[..., None]
    for _ in range(iters):
        AZ = A @ Z
        Z = 0.25 * Z @ (13 * I - AZ @ (15 * I - AZ @ (7 * I - AZ)))
    return Z


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of ``m`` contiguous segments of x [..., T, D] along T (sizes as torch.tensor_split); T >= m."""
    T = x.shape[-2]
    q, r = divmod(T, m)
    long_part = x[..., : r * (q + 1), :].unflatten(-2, (r, q + 1)).mean(dim=-2)
    short_part = x[..., r * (q + 1):, :].unflatten(-2, (m - r, q)).mean(dim=-2)
    return torch.cat([long_part, short_part], dim=-2)


def naive_nystromformer(q, k, v, num_landmarks: int, pinv_iters: int | None = None) -> torch.Tensor:
    """The reference in float32 (no conv residual). q, k, v: [B, H, T, Dh].

    T <= num_landmarks: exact softmax attention. Else landmarks are the means of the segments
    ``torch.tensor_split(range(T), num_landmarks)``; ``pinv_iters=None`` uses ``torch.linalg.pinv``,
    an int the iterative approximation with that many iterations.
    """
    qf, kf, vf = q.float(), k.float(), v.float()
    s = 1.0 / math.sqrt(q.shape[-1])
    T = q.shape[-2]
    if T <= num_landmarks:
        return ((s * qf @ kf.transpose(-1, -2)).softmax(-1) @ vf).to(q.dtype)
    segments = torch.tensor_split(torch.arange(T), num_landmarks)
    q_l = torch.stack([qf[..., seg, :].mean(-2) for seg in segments], dim=-2)
    k_l = torch.stack([kf[..., seg, :].mean(-2) for seg in segments], dim=-2)
    F_ = (s * qf @ k_l.transpose(-1, -2)).softmax(-1)
    A = (s * q_l @ k_l.transpose(-1, -2)).softmax(-1)
    B_ = (s * q_l @ kf.transpose(-1, -2)).softmax(-1)
    A_pinv = torch.linalg.pinv(A) if pinv_iters is None else iterative_pinv(A, pinv_iters)
    return (F_ @ A_pinv @ B_ @ vf).to(q.dtype)


@register_mixer("nystromformer")
class Nystromformer(Mixer):
    """Nystrom-approximated softmax attention (bidirectional only).

    Options: ``num_landmarks`` (int >= 1, default 32), ``conv_kernel`` (odd int >= 1 for a depthwise
    conv residual on V over the sequence, one kernel per head shared by its features as in the official
    code, ``same`` padding; 0 disables it; default 33), ``qkv_bias``, ``proj_bias``, ``qk_norm`` (per-head
    RMSNorm on q and k before the landmarks are taken). No mask, no decoding.
    """

    supports_causal = False
    supports_bidirectional = True
    supports_mask = False

    def __init__(
        self,
        dim: int,
        num_heads: int,
        causal: bool = False,
        num_landmarks: int = 32,
        conv_kernel: int = 33,
        qkv_bias: bool = False,
        proj_bias: bool = False,
        qk_norm: bool = False,
    ):
        super().__init__(dim, num_heads, causal)
        self.num_landmarks = check_int_option("num_landmarks", num_landmarks, 1)
        conv_kernel = check_int_option("conv_kernel", conv_kernel, 0)
        if conv_kernel and conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd (or 0 to disable the conv residual), got {conv_kernel}")
        self.conv_kernel = conv_kernel
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self._setup_qk_norm(qk_norm, self.head_dim)
        self.conv = (nn.Conv2d(num_heads, num_heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=num_heads,
                               bias=False) if conv_kernel else None)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        B, T, _ = x.shape
        H, Dh, m = self.num_heads, self.head_dim, self.num_landmarks
        q, k, v = self.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, Dh]
        q, k = self._normalize_qk(q, k)
        qf, kf, vf = q.float(), k.float(), v.float()
        s = 1.0 / math.sqrt(Dh)
        if T <= m:
            y = F.scaled_dot_product_attention(qf, kf, vf)
        else:
            q_l, k_l = segment_means(qf, m), segment_means(kf, m)
            kernel_f = (s * qf @ k_l.transpose(-1, -2)).softmax(-1)  # [B, H, T, m]
            kernel_a = (s * q_l @ k_l.transpose(-1, -2)).softmax(-1)  # [B, H, m, m]
            kernel_b = (s * q_l @ kf.transpose(-1, -2)).softmax(-1)  # [B, H, m, T]
            y = (kernel_f @ iterative_pinv(kernel_a)) @ (kernel_b @ vf)
        y = y.to(x.dtype)
        if self.conv is not None:
            y = y + self.conv(v)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * Dh))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_landmarks={self.num_landmarks}, conv_kernel={self.conv_kernel}"
