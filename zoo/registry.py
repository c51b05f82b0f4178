"""The model registry: thin ``@register_model`` entrypoints, ``create_model``, ``list_models``, ``model_info``.

An entrypoint is a function ``name_with_underscores(pretrained=False, **overrides) -> model``;
its registered name uses hyphens (``lm_tiny`` -> ``lm-tiny``). Pretrained weights are tags,
``name.tag``, found as folders ``checkpoints/<name>/<tag>/`` (or under ``$EFFZOO_CHECKPOINTS``).
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from layers.registry import Registry, unknown_name_error

MODELS = Registry("model")
FAMILIES = Registry("family")


def checkpoint_root() -> Path:
    return Path(os.environ.get("EFFZOO_CHECKPOINTS", Path(__file__).resolve().parents[1] / "checkpoints"))


def register_model(fn: Callable | None = None, *, name: str | None = None):
    """Register an entrypoint. Use bare (``@register_model``) or with an explicit ``name=``."""

    def decorator(fn: Callable) -> Callable:
        MODELS.register(name or fn.__name__.replace("_", "-"), fn)
        return fn

    return decorator(fn) if fn is not None else decorator


@dataclass(frozen=True)
class Variant:
    """A table variant that sets more than the mixer: config ``overrides``, or a function of the size's
    defaults returning them (e.g. Mamba's layout doubles the depth of the size it is applied to)."""

    overrides: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]

    def apply(self, defaults: dict[str, Any]) -> dict[str, Any]:
        extra = self.overrides(defaults) if callable(self.overrides) else self.overrides
        return {**defaults, **extra}


def register_size_table(prefix: str, sizes: dict[str, dict[str, Any]], variants: dict[str, Any],
                        build: Callable[..., nn.Module]) -> None:
    """Register ``<prefix>-<size>`` and ``<prefix>-<size>-<variant>`` as thin entrypoints calling
    ``build(name, defaults, **overrides)``. A variant is a mixer spec (it sets ``mixer``) or a
    :class:`Variant`. A per-layer mixer list is registered only for sizes whose depth it divides."""

    def entrypoint(name: str, defaults: dict[str, Any]) -> Callable[..., nn.Module]:
        def create(**overrides) -> nn.Module:
            return build(name, defaults, **overrides)

        create.__doc__ = f"{name}: {defaults}"
        return create

    for size, defaults in sizes.items():
        register_model(entrypoint(f"{prefix}-{size}", defaults), name=f"{prefix}-{size}")
        for variant, spec in variants.items():
            config = spec.apply(defaults) if isinstance(spec, Variant) else {**defaults, "mixer": spec}
            mixer = config.get("mixer")
            if isinstance(mixer, list) and config["depth"] % len(mixer):
                continue
            name = f"{prefix}-{size}-{variant}"
            register_model(entrypoint(name, config), name=name)


def register_family(name: str):
    """Class decorator for a family's model class (it must define ``config_class``)."""

    def decorator(cls):
        cls.family = name
        return FAMILIES.register(name, cls)

    return decorator


def pretrained_tags(name: str) -> list[str]:
    folder = checkpoint_root() / name
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())


def split_tag(name: str) -> tuple[str, str | None]:
    """``lm-tiny.mqar`` -> (``lm-tiny``, ``mqar``); names without a tag give (name, None)."""
    base, _, tag = name.partition(".")
    return base, tag or None


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered names matching an fnmatch ``pattern``; with ``pretrained=True`` the ``name.tag`` of each shipped checkpoint."""
    if not pretrained:
        return MODELS.names(pattern)
    tagged = [f"{n}.{t}" for n in MODELS.names() for t in pretrained_tags(n)]
    return sorted(n for n in tagged if fnmatch.fnmatchcase(n, pattern))


def create_model(name: str, pretrained: bool | str | os.PathLike = False, **overrides: Any) -> nn.Module:
    """Build a registered model; ``pretrained`` is False, True (default tag), a tag, or a checkpoint folder."""
    base, tag = split_tag(name)
    entrypoint = MODELS.get(base)
    if tag is not None:
        if pretrained not in (False, True, tag):
            raise ValueError(f"name {name!r} already names tag {tag!r}; got pretrained={pretrained!r} too")
        pretrained = tag
    source = _resolve_pretrained(base, pretrained)
    if source is None:
        return entrypoint(**overrides)
    from zoo.checkpoint import read_json
    from zoo.models.base import load_weights

    # the checkpoint's own config defines the architecture; explicit overrides still win
    record = read_json(source / "config.json")
    try:
        model = entrypoint(**{**record.get("config", {}), **overrides})
    except TypeError as e:
        raise ValueError(f"checkpoint {source} holds a {record.get('family')!r} model ({record.get('model')}), "
                         f"which does not fit {base!r}: {e}") from None
    return load_weights(model, source)


def _resolve_pretrained(name: str, pretrained: bool | str) -> Path | None:
    if pretrained is False or pretrained is None:
        return None
    tags = pretrained_tags(name)
    if pretrained is True:
        if not tags:
            raise ValueError(f"model {name!r} has no pretrained checkpoints (see list_models(pretrained=True))")
        return checkpoint_root() / name / tags[0]
    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    if not isinstance(pretrained, str):
        raise TypeError(f"pretrained must be a bool, a tag or a folder path, got {type(pretrained).__name__}")
    if pretrained in tags:
        return checkpoint_root() / name / pretrained
    if Path(pretrained).is_dir():
        return Path(pretrained)
    if Path(pretrained).expanduser().parts[1:] or pretrained.startswith((".", "~")):  # a path, not a tag
        raise ValueError(f"pretrained={pretrained!r}: no such checkpoint folder")
    raise unknown_name_error(f"pretrained tag of {name}", pretrained, tags, listing="zoo.list_models(pretrained=True)")


def model_info(name: str) -> dict[str, Any]:
    """Family, parameter count, default config, allowed mixers and per-layer summary, without allocating weights."""
    base, _ = split_tag(name)
    with torch.device("meta"):
        model = MODELS.get(base)()
    return {
        "name": base,
        "family": model.family,
        "params": sum(p.numel() for p in model.parameters()),
        "active_params": model.num_active_params(),
        "config": model.config.model_dump(),
        "allowed_mixers": model.allowed_mixers(),
        "layers": model.layer_summary(),
        "pretrained_tags": pretrained_tags(base),
    }
