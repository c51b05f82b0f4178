"""The task interface shared by every family: a loss for training and metrics for evaluation."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from layers.registry import Registry, check_kwargs, signature_kwargs

TASKS = Registry("task")


def register_task(name: str):
    def decorator(cls):
        cls.task_name = name
        return TASKS.register(name, cls)

    return decorator


def create_task(name: str, **kwargs: Any) -> "Task":
    cls = TASKS.get(name)
    allowed = signature_kwargs(cls.__init__)
    if allowed is not None:
        check_kwargs(f"task {name!r}", kwargs, [a for a in allowed if a != "self"])
    return cls(**kwargs)


def list_tasks(pattern: str = "*") -> list[str]:
    return TASKS.names(pattern)


class Task:
    """``loss(model, batch, with_metrics=True) -> (loss, metrics)`` for training; ``evaluate(model, batches) -> metrics``.

    ``metrics`` values (floats or 0-d tensors, kept on device during training) are summed over
    batches weighted by ``count`` (the labelled items in the batch) and averaged, so evaluation is
    exact whatever the batch size.
    """

    def objective(self, model: nn.Module, batch: dict[str, Any], with_metrics: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        """The task's own loss and metrics; ``with_metrics=False`` skips the metrics (the trainer asks for them
        only on logging steps)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Any], with_metrics: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`objective` plus the auxiliary losses of the model's MoE layers (balance, z-loss) and its
        ``aux_losses()`` (e.g. DynamicViT's keep-ratio loss, logged under its name). The metrics keep the
        task's ``loss`` and add ``moe_aux_loss`` and, per MoE layer ``i``,
        ``moe{i}_max_load`` (the busiest expert's share times the number of experts: 1.0 is even) and
        ``moe{i}_dropped`` (the fraction of assignments over capacity)."""
        loss, metrics = self.objective(model, batch, with_metrics)
        records = getattr(model, "moe_aux", lambda: [])()
        extra = getattr(model, "aux_losses", dict)()
        if records:
            aux = torch.stack([r.loss for r in records]).sum()
            loss = loss + aux
            if with_metrics:
                metrics["moe_aux_loss"] = aux.detach()
                for i, r in enumerate(records):
                    metrics[f"moe{i}_max_load"] = r.load.max() * r.load.numel()
                    metrics[f"moe{i}_dropped"] = r.dropped_fraction
        for name, value in extra.items():
            loss = loss + value
            if with_metrics:
                metrics[name] = value.detach()
        return loss, metrics

    def set_teacher(self, student: nn.Module, teacher: nn.Module, init: bool = False, **weights: float) -> None:
        """Train ``student`` with knowledge distilled from ``teacher`` (a run config's ``teacher:`` entry);
        ``init`` first copies the teacher's weights into the student. Tasks that support it override this."""
        raise ValueError(f"the {self.task_name} task does not train with a teacher (remove the run's teacher entry)")

    def check_data(self, model: nn.Module, dataset: Any) -> None:
        """Raise a clear error when ``dataset`` cannot feed ``model`` (vocabulary, classes, image size)."""

    def finalize(self, means: dict[str, float]) -> dict[str, float]:
        """Derived metrics (e.g. perplexity) from averaged ones."""
        return means

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]], max_batches: int | None = None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        count = 0
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            _, metrics = self.loss(model, batch)
            n = int(metrics.pop("count"))
            count += n
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value) * n
        model.train(was_training)
        if count == 0:
            raise ValueError("evaluation saw no labelled examples (empty split or max_batches=0)")
        return self.finalize({k: v / count for k, v in totals.items()} | {"count": count})
