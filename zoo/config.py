"""Typed run configs: YAML files validated by pydantic, with ``key.sub=value`` command-line overrides.

A run config has four parts. ``model``, ``data`` and ``task`` are specs ``{name: ..., **kwargs}``
(the kwargs are checked by the model, dataset or task they build); ``train`` is a typed block. An optional
``teacher`` block distils a trained model into the one being trained (tasks that support it: diffusion).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, ValidationError, field_validator

from layers.registry import check_kwargs, close_matches


def merge_overrides(defaults: Mapping[str, Any], overrides: Mapping[str, Any], config_cls: type[BaseModel], where: str) -> dict:
    """``defaults | overrides``, after checking every override key is a field of ``config_cls`` (TypeError naming it)."""
    check_kwargs(where, overrides, [k for k in config_cls.model_fields if k != "model_config"])
    return {**defaults, **overrides}


class Spec(BaseModel):
    """``{name: ..., **kwargs}``: the kwargs go to the named model, dataset or task."""

    model_config = ConfigDict(extra="allow")
    name: str

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt | None = None
    grad_accum: PositiveInt = 1
    lr: PositiveFloat = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    grad_clip: float | None = 1.0
    eval_every: PositiveInt = 200
    eval_batches: PositiveInt | None = 20
    save_every: PositiveInt | None = None
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 10
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    num_workers: int = 0
    progress: bool = True
    # EMA of the weights (kept in fp32, saved as ema.safetensors): ema = d * ema + (1 - d) * weights after each
    # optimizer step; ema_warmup ramps d as min(ema_decay, (1 + n) / (10 + n)) over the first steps n
    ema_decay: float | None = None
    ema_warmup: bool = False

    @field_validator("ema_decay")
    @classmethod
    def _unit_interval(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.999), got {v}")
        return v

    @field_validator("warmup_steps", "num_workers")
    @classmethod
    def _non_negative(cls, v: int, info) -> int:
        if v < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {v}")
        return v


class TeacherConfig(BaseModel):
    """A trained model to distil from: ``checkpoint`` is a run or checkpoint folder; ``ema`` picks its EMA
    weights (None: the EMA when there is one); ``init`` copies its weights into the student first (BK-SDM's
    block-removed U-Nets); the weights scale the task's loss and the output and feature distillation losses."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    checkpoint: str
    ema: bool | None = None
    init: bool = False
    task_weight: float = 1.0
    output_weight: float = 1.0
    feature_weight: float = 1.0

    @field_validator("task_weight", "output_weight", "feature_weight")
    @classmethod
    def _non_negative(cls, v: float, info) -> float:
        if v < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {v}")
        return v

    def weights(self) -> dict[str, float]:
        return {"task_weight": self.task_weight, "output_weight": self.output_weight,
                "feature_weight": self.feature_weight}


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: Spec
    data: Spec
    task: Spec
    train: TrainConfig = TrainConfig()
    teacher: TeacherConfig | None = None
    out_dir: str = "runs/default"
    resume: bool = False


SECTIONS = {"train": TrainConfig, "teacher": TeacherConfig}  # the typed blocks, for error messages


def parse_value(text: str) -> Any:
    """A command-line value as YAML (``1e-3`` also reads as a float)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict; keys of the typed blocks are checked when validated."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[leaf] = parse_value(text)
    return raw


def validate_run_config(raw: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Validate into a RunConfig; errors name the offending key (with close matches for typos)."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                section = RunConfig if len(err["loc"]) == 1 else SECTIONS[err["loc"][0]]
                matches = close_matches(str(err["loc"][-1]), section.model_fields)
                msg = "unknown key" + (f" (did you mean {', '.join(matches)}?)" if matches else "")
            problems.append(f"{loc}: {msg}")
        raise ValueError(f"invalid {source}: " + "; ".join(problems)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping at the top level")
    return validate_run_config(apply_overrides(raw, list(overrides or [])), source=str(path))
