"""effzoo datasets: synthetic token tasks, byte-level text corpora, image classification sets and image-caption sets.

Importing this package registers every built-in dataset; build one with
``create_dataset(name, split, **kwargs)`` and list them with ``list_datasets()``.
"""
from zoo.data import captions, images, listops, synthetic, text  # noqa: F401  (registers the datasets)
from zoo.data.registry import DATASETS, SPLITS, create_dataset, list_datasets, register_dataset
from zoo.data.tokenizer import ByteTokenizer

__all__ = ["DATASETS", "SPLITS", "ByteTokenizer", "create_dataset", "list_datasets", "register_dataset"]
