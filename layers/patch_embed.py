"""Patch embedding as one GEMM.

A convolution whose kernel equals its stride is a linear map applied to each non-overlapping patch. timm's
``PatchEmbed`` runs it as a strided convolution; on GPUs that means cuDNN's NCHW -> NHWC conversions plus a
convolution kernel (1.9 ms of a 29 ms ViT-B/16 forward at batch 256 on an H200), where cutting the image into
patches and multiplying by the flattened kernel takes a fraction of that. The parameters and state dict stay
timm's (``proj`` is still the ``nn.Conv2d``), so timm weights load as they are; the convolution is the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.layers import Format


class PatchEmbed(TimmPatchEmbed):
    """timm's patch embedding, computed as ``patches @ kernel^T + bias`` when the output is the usual token sequence
    ``[B, N, D]`` (``flatten``, no dynamic padding); other configurations run timm's convolution.

    ``leading_slots``: that many extra rows before the patches, each the embedding of an all-zero patch, for the
    ViT to overwrite with its CLS token: the GEMM writes them in passing, where concatenating a token to the
    sequence afterwards copies the whole sequence again (0.2 ms of a ViT-B/16 forward at batch 256, H200)."""

    def forward(self, x: torch.Tensor, leading_slots: int = 0) -> torch.Tensor:
        if not self.flatten or self.dynamic_img_pad or self.output_fmt != Format.NCHW:
            if leading_slots:
                raise ValueError("leading_slots needs the flattened token output without dynamic padding")
            return super().forward(x)
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        expected = self.img_size if self.img_size is not None and self.strict_img_size else None
        if expected is not None and (H, W) != tuple(expected):
            raise ValueError(f"images must be {expected[0]}x{expected[1]}, got {H}x{W} (input shape {tuple(x.shape)})")
        if H % ph or W % pw:
            raise ValueError(f"image size {H}x{W} must be divisible by the patch size {ph}x{pw}")
        gh, gw = H // ph, W // pw
        patches = x.new_empty(B, leading_slots + gh * gw, C * ph * pw)
        patches[:, :leading_slots].zero_()
        patches[:, leading_slots:].view(B, gh, gw, C, ph, pw).copy_(x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5))
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # [D, C * ph * pw], the same (C, ph, pw) order
        return self.norm(F.linear(patches, weight, self.proj.bias))
