"""Plain reference implementations that benchmarks compare our models and mixers against.

They are written the way a user would write them by hand (nanoGPT style: no registry, no input
checks, no backends), so a benchmark ratio ours/peer measures what our abstractions cost.
``PlainGPT`` and ``SDPAAttention`` register their parameters in the same order and shapes as
``LM`` and the ``attention`` mixer, so weights can be copied across by position.
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class SDPAAttention(nn.Module):
    """Causal multi-head attention: qkv Linear -> half-rotation RoPE -> SDPA -> proj Linear (the "raw SDPA" peer)."""

    def __init__(self, dim: int, num_heads: int, rope: bool = True, rope_base: float = 10000.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rope = rope
        inv_freq = 1.0 / (rope_base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """RoPE on x: [B, T, H, Dh], in float32 (as LLaMA's reference does), rotating the two halves of each head."""
        angles = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)[:, None] * self.inv_freq
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim) for t in self.qkv(x).split(C, dim=2))
        if self.rope:
            q, k = self.rotate(q), self.rotate(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLUMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=False)  # gate and up projections in one matmul
        self.w3 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class PlainBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden_dim: int):
        super().__init__()
        self.ln_1 = nn.RMSNorm(dim, eps=1e-6)
        self.attn = SDPAAttention(dim, num_heads)
        self.ln_2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLUMLP(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    """A pre-norm decoder (RMSNorm, rope attention through SDPA, SwiGLU, tied embeddings): ``forward(idx) -> logits``."""

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, hidden_dim: int, max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.wte = nn.Embedding(vocab_size, dim)
        self.h = nn.ModuleList(PlainBlock(dim, num_heads, hidden_dim) for _ in range(depth))
        self.ln_f = nn.RMSNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        assert idx.shape[1] <= self.max_seq_len, f"sequence of length {idx.shape[1]} > max_seq_len {self.max_seq_len}"
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def plain_gpt_like(lm_model: nn.Module) -> PlainGPT:
    """The ``PlainGPT`` of an ``LM``'s shape; parameter for parameter the same for the default layout
    (attention everywhere, SwiGLU, RMSNorm, tied embeddings), a transformer baseline of the same size otherwise."""
    c = lm_model.config
    return PlainGPT(c.vocab_size, c.dim, c.depth, c.num_heads, c.hidden_dim(), c.max_seq_len)


TIMM_VITS = {  # (dim, depth, num_heads) of the patch-16, 224-pixel timm models
    (192, 12, 3): "vit_tiny_patch16_224",
    (384, 12, 6): "vit_small_patch16_224",
    (768, 12, 12): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
}


def timm_peer_name(vit_config) -> str | None:
    """timm's name for a ViT config of a standard shape (patch 16, 224 pixels, RGB, MLP ratio 4, qkv bias), else None."""
    c = vit_config
    standard = (c.patch_size, c.img_size, c.in_chans, c.mlp_ratio, c.qkv_bias) == (16, 224, 3, 4.0, True)
    return TIMM_VITS.get((c.dim, c.depth, c.num_heads)) if standard else None


def timm_vit_like(vit_config) -> nn.Module:
    """timm's ViT of a config's shape: ``timm.create_model`` for a standard one, else a ``VisionTransformer``
    built with matching arguments, so every zoo ViT has a timm peer."""
    c = vit_config
    kwargs = dict(
        img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, num_classes=c.num_classes,
        global_pool=c.global_pool, fc_norm=False, embed_dim=c.dim, depth=c.depth, num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, drop_path_rate=c.drop_path_rate, pos_drop_rate=c.dropout,
    )
    name = timm_peer_name(c)
    return timm.create_model(name, **kwargs) if name else VisionTransformer(**kwargs)
