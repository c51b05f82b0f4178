"""Diffusion backbones: noise predictors ``forward(sample, timestep, cond=None) -> prediction``.

Three families share that interface (:class:`DiffusionBackbone`):

- ``unet``: diffusers' ``UNet2DConditionModel`` (text-conditioned latent U-Nets: Stable Diffusion 1.5 and the
  block-removed BK-SDM U-Nets of Kim et al. 2023) or ``UNet2DModel`` (small class-conditioned pixel U-Nets);
- ``dit``: Diffusion Transformers (Peebles & Xie 2023), adaLN-Zero blocks with a swappable token mixer;
- ``uvit``: U-ViT (Bao et al. 2023), every input a token and long skips from shallow to deep blocks.

``cond`` is the text encoder's hidden states ``[B, L, cross_attention_dim]`` for a text-conditioned U-Net,
a list of ``B`` caption strings for a U-Net with its own :class:`CaptionEncoder` (``caption_encoder=``), and
class labels ``[B]`` (int) for a class-conditioned model, where label ``model.null_class`` is the "no class"
label of classifier-free guidance (the empty caption is the captions' one; dropping to them while training is
the task's job).
"""
from __future__ import annotations

import importlib.util
import math
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import NonNegativeInt, PositiveInt, model_validator
from timm.layers import Mlp
from torch import nn

import layers
from zoo.models.base import MixerStackConfig, ModelConfig, ZooModel, build_mixer
from zoo.registry import register_family, register_size_table

# --- shared pieces ------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``[B] -> [B, dim]``:
    ``[cos(t w_i), sin(t w_i)]`` with frequencies ``w_i = max_period^(-i / half)``, ``i < half = dim // 2``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return nn.functional.pad(embedding, (0, dim % 2))


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """DiT's fixed 2-D position embedding ``[grid * grid, dim]``: half the channels encode the row, half the
    column, each as ``[sin(p w_i), cos(p w_i)]`` with ``w_i = 10000^(-i / (dim / 4))``."""
    if dim % 4:
        raise ValueError(f"dim ({dim}) must be divisible by 4 for the 2-D sin-cos position embedding")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * freqs[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def unpatchify(tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """``[B, h * w, patch * patch * channels] -> [B, channels, h * patch, w * patch]`` (square grid), each
    token holding its patch as (row, column, channel)."""
    B, N, _ = tokens.shape
    grid = math.isqrt(N)
    x = tokens.reshape(B, grid, grid, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, grid * patch, grid * patch)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: a normalised ``x`` scaled by ``1 + scale`` and shifted by ``shift`` (both from the conditioning)."""
    return x * (1 + scale) + shift


def tanh_gelu_mlp(dim: int, hidden: int) -> nn.Module:
    """The transformer MLP of DiT and U-ViT (timm's ``Mlp``); DiT uses the tanh approximation of GELU."""
    return Mlp(dim, hidden, act_layer=lambda: nn.GELU(approximate="tanh"))


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def check_class_labels(cond: Any, batch: int, num_labels: int) -> None:
    """Labels ``[batch]`` of an integer dtype in ``[0, num_labels)``, else a ValueError naming ``cond``."""
    integer = isinstance(cond, torch.Tensor) and not cond.dtype.is_floating_point and cond.dtype != torch.bool
    if not integer or tuple(cond.shape) != (batch,):
        got = f"{_shape(cond)} {cond.dtype}" if isinstance(cond, torch.Tensor) else _shape(cond)
        raise ValueError(f"cond must be integer class labels of shape [{batch}], got {got}")
    if cond.numel() and (cond.min() < 0 or cond.max() >= num_labels):
        raise ValueError(f"cond class labels must lie in [0, {num_labels - 1}] (the last is the null class), "
                         f"got [{cond.min().item()}, {cond.max().item()}]")


class DiffusionBackbone(ZooModel):
    """Base of the diffusion families: the uniform ``forward(sample, timestep, cond=None)`` and its input checks.

    Subclasses set ``sample_shape`` (C, H, W), ``out_channels``, ``cond_kind`` (None when unconditional)
    and implement ``check_cond`` and ``predict``.
    """

    mixer_causal: ClassVar[bool] = False
    sample_shape: tuple[int, int, int]
    out_channels: int
    cond_kind: str | None

    def check_cond(self, cond: Any, batch: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def block_names(self) -> list[str]:
        """The names of the transformer blocks in the order they run (for feature distillation); none in a U-Net."""
        return []

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def check_inputs(self, sample: Any, timestep: Any, cond: Any) -> torch.Tensor:
        """Raise a ValueError naming the bad argument; return the timesteps as a float tensor ``[B]``."""
        c, h, w = self.sample_shape
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or tuple(sample.shape[1:]) != (c, h, w):
            raise ValueError(f"sample must have shape [batch, {c}, {h}, {w}], got {_shape(sample)}")
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if tuple(t.shape) != (batch,):
            raise ValueError(f"timestep must be a number or a tensor of shape [{batch}], got {_shape(t)}")
        if self.cond_kind is None and cond is not None:
            raise ValueError(f"cond must be None: {self.model_name} is unconditional")
        if self.cond_kind is not None:
            if cond is None:
                raise ValueError(f"cond is missing: {self.model_name} is conditioned on {self.cond_kind}")
            self.check_cond(cond, batch)
        return t.float()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, cond: Any = None) -> torch.Tensor:
        """The prediction ``[B, out_channels, H, W]`` for noisy ``sample`` at ``timestep`` (a number or ``[B]``)."""
        return self.predict(sample, self.check_inputs(sample, timestep, cond), cond)


# --- U-Nets (diffusers) -------------------------------------------------------------------------------------


def xformers_installed() -> bool:
    return importlib.util.find_spec("xformers") is not None


def _set_processor(unet: nn.Module, processor_name: str) -> None:
    """Give every diffusers attention layer of ``unet`` the processor class ``processor_name`` (stateless, so
    one instance is shared; ``UNet2DModel`` has no ``set_attn_processor``, hence the walk over modules)."""
    from diffusers.models import attention_processor

    processor = getattr(attention_processor, processor_name)()
    for module in unet.modules():
        if isinstance(module, attention_processor.Attention):
            module.set_processor(processor)


def _use_xformers(unet: nn.Module) -> None:
    if not xformers_installed():  # checked here so the message is ours, not diffusers'
        raise ValueError('attention_backend="xformers" needs the xformers package, which is not installed '
                         '(pip install "effzoo[xformers]"); use "sdpa" or "auto"')
    unet.enable_xformers_memory_efficient_attention()


# attention backend -> installer of diffusers' processors on a U-Net; "auto" resolves to one of these
ATTENTION_BACKENDS: dict[str, Callable[[nn.Module], None]] = {
    "sdpa": lambda unet: _set_processor(unet, "AttnProcessor2_0"),  # torch's F.scaled_dot_product_attention
    "math": lambda unet: _set_processor(unet, "AttnProcessor"),  # explicit softmax: slow reference
    "xformers": _use_xformers,  # xformers' memory-efficient attention (CUDA only)
}
AttentionBackend = Literal["auto", "sdpa", "math", "xformers"]


def resolve_attention_backend(name: str) -> str:
    """``"auto"``: xformers when it is installed and CUDA is available, else SDPA; any other name as is."""
    if name != "auto":
        return name
    return "xformers" if xformers_installed() and torch.cuda.is_available() else "sdpa"


CAPTIONS = "captions"  # the cond_kind of caption-conditioned models
CLASS_LABELS = "class labels"  # and of class-conditioned ones


class CaptionEncoderConfig(ModelConfig):
    """:class:`CaptionEncoder`'s size: captions are cut to ``max_len`` - 1 UTF-8 bytes."""

    max_len: PositiveInt = 64
    depth: PositiveInt = 2
    heads: PositiveInt = 4


class CaptionEncoder(nn.Module):
    """Captions -> text states ``[B, max_len, width]`` and their mask for a U-Net's cross-attention, trained with
    it: nothing pretrained is downloaded, so the embedded data's captions condition a CPU-sized model.

    A caption is a start token then its UTF-8 bytes (cut to ``max_len - 1``), padded; a small pre-norm
    transformer encoder reads them with the padding masked. The empty caption (the start token alone) is the
    unconditional input of classifier-free guidance."""

    PAD, START = 256, 257

    def __init__(self, width: int, max_len: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"caption_encoder.heads ({heads}) must divide cross_attention_dim ({width})")
        self.max_len = max_len
        self.embed = nn.Embedding(258, width)
        self.position = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def tokenize(self, captions: list[str], device: torch.device) -> torch.Tensor:
        """Byte ids ``[B, max_len]``: the start token, the caption's bytes, then PAD."""
        ids = torch.full((len(captions), self.max_len), self.PAD, dtype=torch.long)
        for row, caption in zip(ids, captions):
            data = [self.START, *caption.encode("utf-8")[: self.max_len - 1]]
            row[: len(data)] = torch.tensor(data)
        return ids.to(device)

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states ``[B, max_len, width]``, keep mask ``[B, max_len]``: False at padding)."""
        ids = self.tokenize(captions, self.position.device)
        keep = ids != self.PAD
        states = self.encoder(self.embed(ids) + self.position, src_key_padding_mask=~keep)
        return self.norm(states), keep


class UNetConfig(ModelConfig):
    """The diffusers U-Net arguments the zoo sizes use. With ``cross_attention_dim`` the model is a
    text-conditioned ``UNet2DConditionModel``, given text states or, with ``caption_encoder``, captions that its
    own :class:`CaptionEncoder` reads; without, a ``UNet2DModel``, class-conditioned when
    ``num_class_embeds`` is set (the last embedding is the null class). ``attention_backend`` picks diffusers'
    attention processors (see :data:`ATTENTION_BACKENDS`; ``"auto"`` is resolved when the model is built)."""

    sample_size: PositiveInt
    in_channels: PositiveInt
    out_channels: PositiveInt
    block_out_channels: tuple[PositiveInt, ...]
    layers_per_block: PositiveInt
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: str | None  # None: no mid block (BK-SDM small and tiny)
    attention_head_dim: PositiveInt = 8
    norm_num_groups: PositiveInt = 32
    cross_attention_dim: PositiveInt | None = None
    num_class_embeds: PositiveInt | None = None
    caption_encoder: CaptionEncoderConfig | None = None
    attention_backend: AttentionBackend = "auto"

    @model_validator(mode="after")
    def _check_unet(self) -> "UNetConfig":
        stages = len(self.block_out_channels)
        if len(self.down_block_types) != stages or len(self.up_block_types) != stages:
            raise ValueError(f"down_block_types and up_block_types need one entry per block_out_channels ({stages})")
        if any(ch % self.norm_num_groups for ch in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be divisible by "
                             f"norm_num_groups ({self.norm_num_groups})")
        blocks = (*self.down_block_types, *self.up_block_types, self.mid_block_type or "")
        if self.cross_attention_dim is None and any("CrossAttn" in b for b in blocks):
            raise ValueError("cross-attention blocks need cross_attention_dim (the text encoder's width)")
        if self.cross_attention_dim is not None and self.num_class_embeds is not None:
            raise ValueError("a U-Net is conditioned on text (cross_attention_dim) or classes (num_class_embeds), not both")
        if self.caption_encoder is not None and self.cross_attention_dim is None:
            raise ValueError("caption_encoder needs cross_attention_dim (the width of the caption states)")
        if self.sample_size % 2 ** (stages - 1):
            raise ValueError(f"sample_size ({self.sample_size}) must be divisible by 2**{stages - 1} (one halving per stage)")
        return self


@register_family("unet")
class DiffusionUNet(DiffusionBackbone):
    """A diffusers U-Net behind the zoo interface; its attention is diffusers' own (no mixer swap)."""

    config_class = UNetConfig

    def __init__(self, config: UNetConfig, name: str | None = None):
        super().__init__(config, name)
        from diffusers import UNet2DConditionModel, UNet2DModel  # imported here: diffusers is slow to import

        options = config.model_dump(exclude={"attention_backend", "caption_encoder"})
        text = options.pop("cross_attention_dim")
        if text is None:
            self.unet = UNet2DModel(**options)
        else:
            self.unet = UNet2DConditionModel(**options, cross_attention_dim=text)
        self.attention_backend = resolve_attention_backend(config.attention_backend)
        ATTENTION_BACKENDS[self.attention_backend](self.unet)
        self.cond_arg = "class_labels" if text is None else "encoder_hidden_states"
        self.sample_shape = (config.in_channels, config.sample_size, config.sample_size)
        self.out_channels = config.out_channels
        captions = config.caption_encoder
        self.caption_encoder = None if captions is None else CaptionEncoder(text, **captions.model_dump())
        self.cond_kind = (CAPTIONS if captions is not None else f"text states [batch, tokens, {text}]" if text is not None
                          else CLASS_LABELS if config.num_class_embeds is not None else None)

    @property
    def null_class(self) -> int | None:
        n = self.config.num_class_embeds
        return None if n is None else n - 1

    @classmethod
    def allowed_mixers(cls) -> list[str]:
        return ["attention"]

    def layer_summary(self) -> list[dict[str, Any]]:
        """One row per diffusers attention layer (self- and cross-attention), all softmax attention, with the
        resolved attention backend."""
        from diffusers.models.attention_processor import Attention

        attention = [m for m in self.unet.modules() if isinstance(m, Attention)]
        return [{"layer": i, "mixer": "attention", "backend": self.attention_backend} for i in range(len(attention))]

    def extra_repr(self) -> str:
        return f"attention_backend={self.attention_backend!r}"

    def check_cond(self, cond: Any, batch: int) -> None:
        dim = self.config.cross_attention_dim
        if self.caption_encoder is not None:
            if not isinstance(cond, (list, tuple)) or len(cond) != batch or not all(isinstance(c, str) for c in cond):
                got = f"a {type(cond).__name__} of {len(cond)}" if isinstance(cond, (list, tuple)) else _shape(cond)
                raise ValueError(f"cond must be a list of {batch} caption strings, got {got}")
        elif dim is None:
            check_class_labels(cond, batch, self.config.num_class_embeds)
        elif not isinstance(cond, torch.Tensor) or cond.dim() != 3 or cond.shape[0] != batch or cond.shape[2] != dim:
            raise ValueError(f"cond must be text states of shape [{batch}, tokens, {dim}], got {_shape(cond)}")

    def unet_inputs(self, cond: Any, dtype: torch.dtype) -> dict[str, Any]:
        """The diffusers U-Net's conditioning arguments for ``cond``: class labels, text states, or the caption
        encoder's states and padding mask (``encoder_attention_mask``, True where a token is kept)."""
        if self.caption_encoder is None:
            return {self.cond_arg: cond}
        states, keep = self.caption_encoder(list(cond))
        return {"encoder_hidden_states": states.to(dtype), "encoder_attention_mask": keep}

    def predict(self, sample, timesteps, cond):
        return self.unet(sample, timesteps, **self.unet_inputs(cond, sample.dtype)).sample


def create_unet(name: str, defaults: dict[str, Any], **overrides: Any) -> DiffusionUNet:
    """The one builder behind every U-Net entrypoint."""
    from zoo.config import merge_overrides

    return DiffusionUNet(UNetConfig.model_validate(merge_overrides(defaults, overrides, UNetConfig, where=name)), name=name)


SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
# BK-SDM removes blocks from SD's U-Net. base: one ResNet(+attention) pair less per stage, i.e. 1 per down
# stage and 2 per up stage (diffusers puts layers_per_block + 1 in an up stage); small: also no mid block;
# tiny: also without the innermost (8x8, attention-free) stage.
BK_BASE = {**SD15_UNET, "layers_per_block": 1}
BK_SMALL = {**BK_BASE, "mid_block_type": None}
BK_TINY = {**BK_SMALL, "block_out_channels": (320, 640, 1280), "down_block_types": ("CrossAttnDownBlock2D",) * 3,
           "up_block_types": ("CrossAttnUpBlock2D",) * 3}
# CPU-sized pixel U-Nets for 32x32 RGB with 10 classes (+ the null class), attention at 16x16 and 8x8
PIXEL_UNET: dict[str, Any] = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, mid_block_type="UNetMidBlock2D",
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=11,
)
# the same, conditioned on captions through cross-attention at 16x16 and 8x8 and a CaptionEncoder of width 64
PIXEL_CAPTION_UNET: dict[str, Any] = {
    **PIXEL_UNET, "num_class_embeds": None, "cross_attention_dim": 64, "caption_encoder": {},
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "mid_block_type": "UNetMidBlock2DCrossAttn",
}

UNET_SIZES: dict[str, dict[str, Any]] = {
    "sd15": SD15_UNET,  # 859.5M, Stable Diffusion 1.5
    "bk-base": BK_BASE,  # 579.4M
    "bk-small": BK_SMALL,  # 482.3M
    "bk-tiny": BK_TINY,  # 323.4M
    "tiny": {**PIXEL_UNET, "block_out_channels": (32, 64, 64), "norm_num_groups": 16},
    "small": {**PIXEL_UNET, "block_out_channels": (64, 128, 256), "layers_per_block": 2},
    "tiny-captions": {**PIXEL_CAPTION_UNET, "block_out_channels": (32, 64, 64), "norm_num_groups": 16},
    "small-captions": {**PIXEL_CAPTION_UNET, "block_out_channels": (64, 128, 256), "layers_per_block": 2},
}

register_size_table("unet", UNET_SIZES, {}, create_unet)


# --- DiT ----------------------------------------------------------------------------------------------------

# DiT embeds timesteps from 256 sinusoidal frequencies, then an MLP
TIME_FREQUENCIES = 256


class DiTConfig(MixerStackConfig):
    """DiT on a ``input_size``-square latent cut into ``patch_size`` patches; ``num_classes`` labels plus a null
    class (0: unconditional); ``learn_sigma`` doubles the output channels (noise, then the variance interpolation)."""

    input_size: PositiveInt = 32
    patch_size: PositiveInt = 2
    in_channels: PositiveInt = 4
    num_classes: NonNegativeInt = 1000
    learn_sigma: bool = True
    mlp_ratio: float = 4.0

    @model_validator(mode="after")
    def _check_patches(self) -> "DiTConfig":
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size ({self.input_size}) must be divisible by patch_size ({self.patch_size})")
        return self


class DiTBlock(nn.Module):
    """A transformer block whose norms are modulated by the conditioning ``c`` (adaLN-Zero):

    ``x += gate_a * mixer(modulate(norm(x), shift_a, scale_a))``; ``x += gate_m * mlp(modulate(norm(x), shift_m, scale_m))``,
    the six vectors regressed from ``c``. Zero-initialised, every gate starts at 0: the block starts as the identity.
    """

    def __init__(self, config: DiTConfig, mixer_name: str, mixer_kwargs: dict[str, Any], num_tokens: int):
        super().__init__()
        dim = config.dim
        defaults = {"qkv_bias": True, "proj_bias": True, "max_seq_len": num_tokens}
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mixer = build_mixer("dit", mixer_name, mixer_kwargs, dim, config.num_heads, causal=False, defaults=defaults)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = tanh_gelu_mlp(dim, int(dim * config.mlp_ratio))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate_a * self.mixer(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class DiTFinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map of each token to its patch's output pixels."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


@register_family("dit")
class DiT(DiffusionBackbone):
    """Diffusion Transformer: patch tokens plus a fixed 2-D sin-cos position embedding, conditioned through
    adaLN on ``c = time embedding + class embedding``. A fresh model predicts exactly zero."""

    config_class = DiTConfig

    def __init__(self, config: DiTConfig, name: str | None = None):
        super().__init__(config, name)
        dim, grid = config.dim, config.input_size // config.patch_size
        self.sample_shape = (config.in_channels, config.input_size, config.input_size)
        self.out_channels = config.in_channels * (2 if config.learn_sigma else 1)
        self.cond_kind = CLASS_LABELS if config.num_classes else None
        self.patch_embed = layers.PatchEmbed(config.input_size, config.patch_size, config.in_channels, dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid)[None], persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(TIME_FREQUENCIES, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.class_embed = nn.Embedding(config.num_classes + 1, dim) if config.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(config, n, kw, grid * grid) for n, kw in config.layer_mixers())
        self.final_layer = DiTFinalLayer(dim, config.patch_size, self.out_channels)
        self._init_weights()

    @property
    def null_class(self) -> int | None:
        return self.config.num_classes or None

    def _init_weights(self) -> None:
        """DiT's: Xavier-uniform linears (and patch projection), N(0, 0.02) embeddings, then adaLN-Zero: every
        modulation and the output projection zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        projection = self.patch_embed.proj
        nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
        nn.init.zeros_(projection.bias)
        for linear in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(linear.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        for block in (*self.blocks, self.final_layer):
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def check_cond(self, cond: Any, batch: int) -> None:
        check_class_labels(cond, batch, self.config.num_classes + 1)

    def block_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def predict(self, sample, timesteps, cond):
        x = self.patch_embed(sample) + self.pos_embed
        c = self.time_embed(timestep_embedding(timesteps, TIME_FREQUENCIES).to(x.dtype))
        if self.class_embed is not None:
            c = c + self.class_embed(cond)
        for block in self.blocks:
            x = block(x, c)
        return unpatchify(self.final_layer(x, c), self.config.patch_size, self.out_channels)


def create_dit(name: str, defaults: dict[str, Any], **overrides: Any) -> DiT:
    """The one builder behind every DiT entrypoint."""
    from zoo.config import merge_overrides

    return DiT(DiTConfig.model_validate(merge_overrides(defaults, overrides, DiTConfig, where=name)), name=name)


DIT_SIZES: dict[str, dict[str, Any]] = {  # patch 2 on a 32x32x4 latent (256x256 images)
    "s2": dict(dim=384, depth=12, num_heads=6),  # 33M
    "b2": dict(dim=768, depth=12, num_heads=12),  # 130M
    "l2": dict(dim=1024, depth=24, num_heads=16),  # 458M
    "xl2": dict(dim=1152, depth=28, num_heads=16),  # 675M
}
DIFFUSION_MIXER_VARIANTS: dict[str, Any] = {"linear": "linear"}

register_size_table("dit", DIT_SIZES, DIFFUSION_MIXER_VARIANTS, create_dit)


# --- U-ViT --------------------------------------------------------------------------------------------------


class UViTConfig(MixerStackConfig):
    """U-ViT on a ``input_size``-square latent: ``depth = 2k + 1`` blocks (k in, one middle, k out), predicting the
    noise; ``num_classes`` labels plus a null class (0: unconditional)."""

    input_size: PositiveInt = 32
    patch_size: PositiveInt = 2
    in_channels: PositiveInt = 4
    num_classes: NonNegativeInt = 1000
    mlp_ratio: float = 4.0
    qkv_bias: bool = False

    @model_validator(mode="after")
    def _check_layout(self) -> "UViTConfig":
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size ({self.input_size}) must be divisible by patch_size ({self.patch_size})")
        if self.depth % 2 == 0:
            raise ValueError(f"depth ({self.depth}) must be odd: equal in and out halves around one middle block")
        return self


class UViTBlock(nn.Module):
    """Pre-norm transformer block; a deep (out) block first fuses its shallow twin's output:
    ``x = W [x; skip]`` (the long skip connection)."""

    def __init__(self, config: UViTConfig, mixer_name: str, mixer_kwargs: dict[str, Any], num_tokens: int, skip: bool):
        super().__init__()
        dim = config.dim
        defaults = {"qkv_bias": config.qkv_bias, "proj_bias": True, "max_seq_len": num_tokens}
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = build_mixer("uvit", mixer_name, mixer_kwargs, dim, config.num_heads, causal=False, defaults=defaults)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@register_family("uvit")
class UViT(DiffusionBackbone):
    """U-ViT: the timestep (sinusoidal) and the class label are tokens beside the patch tokens, with learned
    positions; block ``i`` of the out half takes the output of in-block ``k - 1 - i`` as a skip. The output
    tokens are unpatchified and smoothed by a 3x3 convolution."""

    config_class = UViTConfig

    def __init__(self, config: UViTConfig, name: str | None = None):
        super().__init__(config, name)
        dim, half = config.dim, config.depth // 2
        self.sample_shape = (config.in_channels, config.input_size, config.input_size)
        self.out_channels = config.in_channels
        self.cond_kind = CLASS_LABELS if config.num_classes else None
        self.patch_embed = layers.PatchEmbed(config.input_size, config.patch_size, config.in_channels, dim)
        self.class_embed = nn.Embedding(config.num_classes + 1, dim) if config.num_classes else None
        num_tokens = self.patch_embed.num_patches + 1 + (self.class_embed is not None)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        mixers = config.layer_mixers()
        self.in_blocks = nn.ModuleList(UViTBlock(config, n, kw, num_tokens, skip=False) for n, kw in mixers[:half])
        self.mid_block = UViTBlock(config, *mixers[half], num_tokens, skip=False)
        self.out_blocks = nn.ModuleList(UViTBlock(config, n, kw, num_tokens, skip=True) for n, kw in mixers[half + 1:])
        self.norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, config.patch_size ** 2 * config.in_channels)
        self.final_conv = nn.Conv2d(config.in_channels, config.in_channels, 3, padding=1)
        self._init_weights()

    @property
    def null_class(self) -> int | None:
        return self.config.num_classes or None

    def _init_weights(self) -> None:
        """U-ViT's: truncated-normal (0.02) positions and linears, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def check_cond(self, cond: Any, batch: int) -> None:
        check_class_labels(cond, batch, self.config.num_classes + 1)

    def block_names(self) -> list[str]:
        return [*(f"in_blocks.{i}" for i in range(len(self.in_blocks))), "mid_block",
                *(f"out_blocks.{i}" for i in range(len(self.out_blocks)))]

    def predict(self, sample, timesteps, cond):
        patches = self.patch_embed(sample)
        extras = [timestep_embedding(timesteps, self.config.dim)[:, None].to(patches.dtype)]
        if self.class_embed is not None:
            extras.append(self.class_embed(cond)[:, None])
        x = torch.cat([*extras, patches], dim=1) + self.pos_embed
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())
        tokens = self.decoder_pred(self.norm(x))[:, len(extras):]
        return self.final_conv(unpatchify(tokens, self.config.patch_size, self.config.in_channels))


def create_uvit(name: str, defaults: dict[str, Any], **overrides: Any) -> UViT:
    """The one builder behind every U-ViT entrypoint."""
    from zoo.config import merge_overrides

    return UViT(UViTConfig.model_validate(merge_overrides(defaults, overrides, UViTConfig, where=name)), name=name)


UVIT_SIZES: dict[str, dict[str, Any]] = {
    "s2": dict(dim=512, depth=13, num_heads=8),  # U-ViT-S/2, ~44M
}

register_size_table("uvit", UVIT_SIZES, DIFFUSION_MIXER_VARIANTS, create_uvit)
