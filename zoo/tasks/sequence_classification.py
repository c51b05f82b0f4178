"""Classification of token sequences (LRA tasks such as ListOps): cross-entropy and top-1, padding-aware."""
from __future__ import annotations

import torch.nn.functional as F

from zoo.tasks.base import Task, register_task


@register_task("sequence_classification")
class SequenceClassification(Task):
    def objective(self, model, batch, with_metrics=True):
        logits = model(batch["input_ids"], mask=batch.get("mask"))
        labels = batch["label"]
        loss = F.cross_entropy(logits.float(), labels)
        if not with_metrics:
            return loss, {}
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy.detach(), "count": labels.numel()}

    def check_data(self, model, dataset):
        config = model.config
        for attr, model_attr in (("num_classes", "num_classes"), ("vocab_size", "vocab_size")):
            data_value, model_value = getattr(dataset, attr, None), getattr(config, model_attr, None)
            if data_value is not None and model_value is not None and data_value > model_value:
                raise ValueError(f"the dataset's {attr} ({data_value}) exceeds the model's {model_attr} ({model_value})")
        seq_len, max_len = getattr(dataset, "seq_len", None), getattr(config, "max_seq_len", None)
        if seq_len is not None and max_len is not None and seq_len > max_len:
            raise ValueError(f"the dataset's seq_len ({seq_len}) exceeds the model's max_seq_len ({max_len})")
