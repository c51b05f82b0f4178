"""effzoo datasets: synthetic token tasks, byte-level text corpora and image classification sets.

Importing this package registers every built-in dataset; build one with
``create_dataset(name, split, **kwargs)`` and list them with ``list_datasets()``.
"""
from zoo.data import images, listops, synthetic, text  # noqa: F401  (registers the datasets)
from zoo.data.registry import DATASETS, SPLITS, create_dataset, list_datasets, register_dataset
from zoo.data.tokenizer import ByteTokenizer

__all__ = ["DATASETS", "SPLITS", "ByteTokenizer", "create_dataset", "list_datasets", "register_dataset"]
