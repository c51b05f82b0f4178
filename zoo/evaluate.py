"""Evaluate a saved model on the data and task it was trained with (or others given as overrides)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zoo.checkpoint import read_json
from zoo.config import Spec, apply_overrides
from zoo.data import create_dataset
from zoo.tasks import create_task
from zoo.train import eval_batches, load_checkpoint_model, resolve_checkpoint, resolve_device, to_device

EVAL_KEYS = ("split", "batch_size", "max_batches", "device", "ema")


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
