"""What every zoo model shares: a typed config, ``save_pretrained``, loading, and a layer summary."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Union

from pydantic import BaseModel, ConfigDict, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from torch import nn

import layers
from layers.mixer import fill_accepted
from zoo.checkpoint import load_module, read_json, save_module, write_json
from zoo.registry import FAMILIES

FORMAT_VERSION = 1

MixerSpec = Union[str, dict[str, Any]]


class ModelConfig(BaseModel):
    """Base of the family configs: unknown keys and wrong types are errors naming the field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MixerStackConfig(ModelConfig):
    """Shared by families built from ``depth`` mixer layers: width, heads and the per-layer mixer spec.

    ``mixer`` is a name, a mapping ``{name: ..., **kwargs}``, or a list of those repeated over depth.
    """

    dim: PositiveInt
    depth: PositiveInt
    num_heads: PositiveInt
    mixer: Union[MixerSpec, list[MixerSpec]] = "attention"

    @model_validator(mode="after")
    def _check_mixer_stack(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        specs = self.mixer if isinstance(self.mixer, list) else [self.mixer]
        if not specs or self.depth % len(specs):
            raise ValueError(f"mixer list of length {len(specs)} must divide depth ({self.depth})")
        return self

    def layer_mixers(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, kwargs) of each layer's mixer."""
        specs = self.mixer if isinstance(self.mixer, list) else [self.mixer]
        return [layers.parse_mixer_spec(specs[i % len(specs)]) for i in range(self.depth)]


class MoEConfig(ModelConfig):
    """Mixture-of-experts MLPs (``layers.MoE``) in place of the dense MLP of every ``every``-th block
    (blocks ``every - 1``, ``2 * every - 1``, ...: V-MoE's every other block with ``every=2``).

    Each expert is the family's MLP with hidden width ``dense hidden // granularity`` (DeepSeekMoE's
    fine-grained segmentation: ``granularity=8`` with ``top_k=6`` and 2 shared experts uses as many
    parameters per token as the dense MLP). Router, balance and implementation names are checked by
    ``layers.MoE`` (an unknown name lists the valid ones)."""

    num_experts: PositiveInt = 8
    top_k: PositiveInt = 2
    router: str = "softmax_topk"
    capacity_factor: PositiveFloat | None = None
    shared_experts: NonNegativeInt = 0
    balance: str = "aux"
    aux_loss_weight: NonNegativeFloat = 0.01
    z_loss: NonNegativeFloat = 0.0
    jitter: NonNegativeFloat = 0.0
    bias_update_rate: NonNegativeFloat = 1e-3
    granularity: PositiveInt = 1
    every: PositiveInt = 1
    implementation: str = "auto"

    def applies_to(self, layer: int) -> bool:
        return (layer + 1) % self.every == 0


class MoEMLP(nn.Module):
    """A block's MLP slot filled by ``layers.MoE``: returns the hidden states and keeps the auxiliary
    record of the last forward in ``last_aux`` (collected by :meth:`ZooModel.moe_aux`)."""

    def __init__(self, config: MoEConfig, dim: int, dense_hidden: int, expert: str, causal: bool):
        super().__init__()
        if dense_hidden % config.granularity:
            raise ValueError(f"moe.granularity ({config.granularity}) must divide the dense MLP width ({dense_hidden})")
        options = config.model_dump(exclude={"granularity", "every"})
        self.moe = layers.MoE(dim, dense_hidden // config.granularity, expert=expert, causal=causal, **options)
        self.last_aux: layers.MoEAux | None = None

    def forward(self, x):
        y, self.last_aux = self.moe(x)
        return y


def build_mlp(moe: MoEConfig | None, layer: int, dense: nn.Module | None, dim: int, hidden: int, expert: str,
              causal: bool) -> nn.Module:
    """The MLP of block ``layer``: an MoE where the family's ``moe`` config places one, else ``dense``."""
    if moe is not None and moe.applies_to(layer):
        return MoEMLP(moe, dim, hidden, expert, causal)
    return dense


class ZooModel(nn.Module):
    """Base class of every family's model. Subclasses set ``config_class`` and ``mixer_causal``."""

    config_class: ClassVar[type[ModelConfig]]
    family: ClassVar[str]
    mixer_causal: ClassVar[bool]

    def __init__(self, config: ModelConfig, name: str | None = None):
        super().__init__()
        self.config = config
        self.model_name = name or self.family

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def num_active_params(self) -> int:
        """Parameters one token uses: all of them, less the experts an MoE layer does not route it to."""
        idle = sum(m.moe.total_params - m.moe.active_params for m in self.modules() if isinstance(m, MoEMLP))
        return self.num_params() - idle

    def aux_losses(self) -> dict[str, "torch.Tensor"]:
        """Auxiliary losses of the last forward beyond the MoE layers' (e.g. DynamicViT's keep-ratio loss),
        by name; the tasks add them to the loss and log them. None by default."""
        return {}

    def moe_aux(self) -> list[layers.MoEAux]:
        """The auxiliary records (losses, expert load, dropped fraction) of the MoE layers' last forward."""
        return [m.last_aux for m in self.modules() if isinstance(m, MoEMLP) and m.last_aux is not None]

    @classmethod
    def allowed_mixers(cls) -> list[str]:
        """Registered mixers that support this family's mode (causal for LMs, bidirectional for ViTs)."""
        attr = "supports_causal" if cls.mixer_causal else "supports_bidirectional"
        return [n for n in layers.list_mixers() if getattr(layers.get_mixer_class(n), attr)]

    def layer_summary(self) -> list[dict[str, Any]]:
        """One row per mixer layer: its mixer name and decoding state size at the model's max length."""
        seq_len = getattr(self.config, "max_seq_len", None)
        rows = []
        for i, mixer in enumerate(outer_mixers(self)):
            row = {"layer": i, "mixer": getattr(mixer, "mixer_name", type(mixer).__name__)}
            if mixer.causal and seq_len:
                try:
                    row["state_size"] = mixer.state_size(seq_len)
                except NotImplementedError:  # a mixer without incremental decoding has no state to count
                    pass
            rows.append(row)
        return rows

    def save_pretrained(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` then ``config.json`` (each atomically; config last, so a folder with a config is whole)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_module(directory / "model.safetensors", self, metadata={"format": "pt", "model": self.model_name})
        record = {
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "model": self.model_name,
            "config": self.config.model_dump(),
            **(extra or {}),
        }
        write_json(directory / "config.json", record)
        return directory


def outer_mixers(module: nn.Module):
    """The mixers of a model in order, not descending into a mixer (a wrapper's inner mixers are its own)."""
    for child in module.children():
        if isinstance(child, layers.Mixer):
            yield child
        else:
            yield from outer_mixers(child)


def build_mixer(family: str, name: str, kwargs: dict[str, Any], dim: int, num_heads: int, causal: bool,
                defaults: dict[str, Any]) -> layers.Mixer:
    """One layer's mixer for a family: refuse a mixer that cannot mix in the family's direction, and fill the
    family's ``defaults`` (e.g. ``max_seq_len`` for fixed-length mixers, timm's biases for ViTs) into the
    options the mixer's constructor takes (a mixer with a ``fill_defaults`` classmethod, such as the bidirectional
    wrapper, fills them itself, into its inner mixer's spec too); options given in the mixer spec win."""
    cls = layers.get_mixer_class(name)
    if not (cls.supports_causal if causal else cls.supports_bidirectional):
        kind = "bidirectional" if causal else "causal"
        raise ValueError(f"mixer {name!r} is {kind} only and cannot serve a {family} model")
    return layers.create_mixer(name, dim, num_heads, causal=causal, **fill_accepted(cls, kwargs, defaults))


def model_from_record(record: dict[str, Any]) -> ZooModel:
    cls = FAMILIES.get(record["family"])
    return cls(cls.config_class.model_validate(record["config"]), name=record.get("model"))


def load_weights(model: ZooModel, directory: str | os.PathLike) -> ZooModel:
    """Load ``directory/model.safetensors`` into ``model``; the config must describe the same architecture."""
    directory = Path(directory)
    record = read_json(directory / "config.json")
    if record.get("family") != model.family:
        raise ValueError(f"checkpoint {directory} holds a {record.get('family')!r} model, not a {model.family!r} model")
    load_module(directory / "model.safetensors", model, what=f"{model.model_name} model")
    return model


def load_pretrained(directory: str | os.PathLike, device=None) -> ZooModel:
    """Rebuild a model from a folder written by ``save_pretrained`` (or a training checkpoint)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a saved zoo model")
    model = model_from_record(read_json(directory / "config.json"))
    load_weights(model, directory)
    return model.to(device) if device is not None else model
