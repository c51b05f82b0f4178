"""Next-token prediction. Labels of -100 are ignored, so synthetic tasks score only their answer positions."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.tasks.base import Task, register_task

IGNORE = -100


@register_task("lm")
class LanguageModeling(Task):
    def objective(self, model, batch, with_metrics=True):
        logits = model(batch["input_ids"], mask=batch.get("mask"))
        labels = batch["labels"]
        # no explicit float cast: autocast runs cross_entropy in float32 without materialising fp32 logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        if not with_metrics:
            return loss, {}
        with torch.no_grad():  # tensors, not floats: no device sync on the training path
            labelled = labels != IGNORE
            count = labelled.sum()
            correct = ((logits.argmax(dim=-1) == labels) & labelled).sum()
            accuracy = correct / count.clamp(min=1)
        return loss, {"loss": loss.detach(), "accuracy": accuracy, "count": count}

    def check_data(self, model, dataset):
        model_vocab = getattr(model.config, "vocab_size", None)
        data_vocab = getattr(dataset, "vocab_size", None)
        if model_vocab is not None and data_vocab is not None and data_vocab > model_vocab:
            raise ValueError(f"the dataset's vocab_size ({data_vocab}) exceeds the model's vocab_size ({model_vocab}): set model.vocab_size")
        seq_len = getattr(dataset, "seq_len", None)
        max_len = getattr(model.config, "max_seq_len", None)
        if seq_len is not None and max_len is not None and seq_len > max_len:
            raise ValueError(f"the dataset's seq_len ({seq_len}) exceeds the model's max_seq_len ({max_len})")

    def finalize(self, means):
        return means | {"perplexity": math.exp(min(means["loss"], 50.0))}
