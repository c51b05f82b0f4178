"""Evaluate a saved model on the data and task it was trained with (or others given as overrides)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zoo.checkpoint import load_module, read_json
from zoo.config import Spec, apply_overrides
from zoo.data import create_dataset
from zoo.models.base import ZooModel, load_pretrained
from zoo.tasks import create_task
from zoo.train import EMA_FILE, eval_batches, latest_checkpoint, resolve_device, to_device

EVAL_KEYS = ("split", "batch_size", "max_batches", "device", "ema")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder resolves to its latest checkpoint; a checkpoint folder is itself."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (config.json) nor a run folder with checkpoints")
    return latest


def load_checkpoint_model(folder: Path, device: torch.device, ema: bool | None) -> ZooModel:
    """The model of a checkpoint folder with its raw weights (``ema=False``), its EMA weights (``True``;
    ValueError if the folder holds no ``ema.safetensors``) or the EMA when there is one (``None``)."""
    has_ema = (folder / EMA_FILE).is_file()
    if ema and not has_ema:
        raise ValueError(f"ema=true but {folder} holds no {EMA_FILE} (the run was trained without train.ema_decay)")
    model = load_pretrained(folder, device=device)
    if has_ema if ema is None else ema:
        load_module(folder / EMA_FILE, model, what=f"{model.model_name} model (EMA weights)")
    return model


def evaluate_checkpoint(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Metrics of the checkpoint at ``path``. Overrides: ``split=test``, ``batch_size=``, ``max_batches=``,
    ``device=``, ``ema=true`` (the EMA weights; default false: the raw weights, as the trainer's ``loss``), and
    ``data.*`` / ``task.*`` keys that replace those of the recorded run."""
    folder = resolve_checkpoint(path)
    record = read_json(folder / "config.json")
    if "run" not in record:
        raise ValueError(f"{folder} records no training run (data and task): it cannot be evaluated by itself")
    raw = {"data": dict(record["run"]["data"]), "task": dict(record["run"]["task"]), "split": "val",
           "batch_size": 64, "max_batches": None, "device": "auto", "ema": False}
    raw = apply_overrides(raw, list(overrides or []))
    unknown = set(raw) - {"data", "task", *EVAL_KEYS}
    if unknown:
        raise ValueError(f"unknown eval override(s) {sorted(unknown)}; valid: data.*, task.*, {', '.join(EVAL_KEYS)}")
    data, task_spec = Spec.model_validate(raw["data"]), Spec.model_validate(raw["task"])
    if not isinstance(raw["ema"], bool):
        raise ValueError(f"ema must be true or false, got ema={raw['ema']!r}")
    device = resolve_device(raw["device"])
    model = load_checkpoint_model(folder, device, raw["ema"])
    dataset = create_dataset(data.name, raw["split"], **data.kwargs())
    task = create_task(task_spec.name, **task_spec.kwargs())
    task.check_data(model, dataset)
    with torch.inference_mode():
        batches = (to_device(b, device) for b in eval_batches(dataset, int(raw["batch_size"])))
        metrics = task.evaluate(model, batches, raw["max_batches"])
    return {"checkpoint": str(folder), "split": raw["split"], "ema": raw["ema"], **metrics}
