"""timm's efficient vision families through the zoo registry: ``timm/levit_128s``, ``timm/efficientvit_b1``,
``timm/efficientvit_m5``, ``timm/mobilevit_s``, ``timm/fastvit_sa12``.

Each is a :class:`TimmModel` wrapping ``timm.create_model(..., pretrained=False)``: always randomly
initialised, nothing is downloaded (timm's weights are not shipped; zoo checkpoints under
``checkpoints/timm/<name>/`` load as for any zoo model).
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import timm
import torch
from pydantic import PositiveInt
from torch import nn

from zoo.models.base import ModelConfig, ZooModel
from zoo.registry import register_family, register_model

# the efficient-ViT families of the "ViT efficiency" issue, all present in timm 1.0.31
TIMM_EFFICIENT = ("levit_128s", "efficientvit_b1", "efficientvit_m5", "mobilevit_s", "fastvit_sa12")


@lru_cache(maxsize=None)
def timm_defaults(timm_name: str) -> tuple[int, bool]:
    """(default input resolution, whether the constructor takes ``img_size``), from a weightless meta build."""
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False)
    takes_size = any("img_size" in inspect.signature(cls.__init__).parameters for cls in type(model).__mro__
                     if issubclass(cls, nn.Module) and cls is not nn.Module)
    return model.pretrained_cfg["input_size"][-1], takes_size


class TimmConfig(ModelConfig):
    """``timm_name``: a timm model name; ``img_size``: the input resolution (None: timm's default), passed to
    timm where the constructor takes it (LeViT, EfficientViT-M and MobileViT size position biases by it; the
    others accept any resolution)."""

    timm_name: str
    num_classes: int = 1000
    img_size: PositiveInt | None = None
    in_chans: PositiveInt = 3

    def resolution(self) -> int:
        return self.img_size or timm_defaults(self.timm_name)[0]


def build_timm(config: TimmConfig) -> nn.Module:
    """The bare timm model of ``config`` (random weights)."""
    size = {"img_size": config.resolution()} if timm_defaults(config.timm_name)[1] else {}
    return timm.create_model(config.timm_name, pretrained=False, num_classes=config.num_classes, in_chans=config.in_chans, **size)


@register_family("timm")
class TimmModel(ZooModel):
    """``forward(images [B, C, S, S]) -> logits`` through the wrapped timm model (``self.model``)."""

    config_class = TimmConfig
    mixer_causal = False

    def __init__(self, config: TimmConfig, name: str | None = None):
        super().__init__(config, name)
        self.model = build_timm(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c, s = self.config.in_chans, self.config.resolution()
        if images.dim() != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(f"images must have shape [batch, {c}, {s}, {s}] (img_size={s}), got {tuple(images.shape)}")
        return self.model(images)

    @classmethod
    def allowed_mixers(cls) -> list[str]:
        """None: a timm model's token mixers are its own, not swappable."""
        return []


def create_timm(timm_name: str, **overrides: Any) -> TimmModel:
    """The builder behind every ``timm/<name>`` entrypoint."""
    from zoo.config import merge_overrides

    name = f"timm/{timm_name}"
    config = TimmConfig.model_validate(merge_overrides({"timm_name": timm_name, "img_size": timm_defaults(timm_name)[0]}, overrides, TimmConfig, where=name))
    return TimmModel(config, name=name)


def timm_entrypoint(timm_name: str):
    def create(**overrides: Any) -> TimmModel:
        return create_timm(timm_name, **overrides)

    create.__doc__ = f"timm's {timm_name} (random weights; pretrained timm weights are not shipped)"
    return create


for _name in TIMM_EFFICIENT:
    register_model(timm_entrypoint(_name), name=f"timm/{_name}")
