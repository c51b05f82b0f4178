"""Image classification: cross-entropy and top-1 accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.tasks.base import Task, register_task


@register_task("classification")
class Classification(Task):
    def __init__(self, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def objective(self, model, batch, with_metrics=True):
        logits = model(batch["image"])
        labels = batch["label"]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        if not with_metrics:
            return loss, {}
        with torch.no_grad():
            accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy, "count": labels.numel()}

    def check_data(self, model, dataset):
        classes = getattr(dataset, "num_classes", None)
        if classes is not None and getattr(model.config, "num_classes", classes) != classes:
            raise ValueError(f"the dataset has {classes} classes but the model's num_classes is {model.config.num_classes}")
        size = getattr(dataset, "image_size", None)
        if size is not None and getattr(model.config, "img_size", size) != size:
            raise ValueError(f"the dataset's image_size ({size}) differs from the model's img_size ({model.config.img_size})")
