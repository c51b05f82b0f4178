"""The dataset registry: every dataset is a factory ``f(split, **kwargs) -> torch Dataset``.

``create_dataset`` is the one entry point: it validates the split and the keyword arguments
before building anything, and refuses to hand back an empty dataset (an empty split is almost
always a wrong path or a too-small ``max_bytes``/``seq_len`` combination, better caught here than
as a silent zero-step epoch).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch.utils.data import Dataset

from layers.registry import Registry, check_kwargs, signature_kwargs

DATASETS = Registry("dataset")

SPLITS = ("train", "val", "test")


def check_split(split: str) -> int:
    """Index of ``split`` in SPLITS (datasets derive per-split seeds from it); ValueError otherwise."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got split={split!r}")
    return SPLITS.index(split)


def check_int(name: str, value: object, minimum: int) -> None:
    """ValueError naming the argument ``name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")


def split_size(num_examples: int | Mapping[str, int] | None, split: str, defaults: Mapping[str, int]) -> int:
    """How many examples ``split`` has: ``num_examples`` as an int (every split), as ``{split: n}`` (the splits it
    names; e.g. more generated training data with the usual validation set) or None (``defaults``)."""
    if isinstance(num_examples, Mapping):
        unknown = sorted(set(num_examples) - set(SPLITS))
        if unknown:
            raise ValueError(f"num_examples keys must be splits ({', '.join(SPLITS)}), got {unknown}")
        num_examples = num_examples.get(split)
    size = defaults[split] if num_examples is None else num_examples
    check_int("num_examples", size, 1)
    return size


def register_dataset(name: str) -> Callable[[Callable], Callable]:
    """Decorator registering a class or function taking ``split`` plus keyword arguments."""

    def decorator(factory: Callable) -> Callable:
        DATASETS.register(name, factory)
        return factory

    return decorator


def create_dataset(name: str, /, split: str = "train", **kwargs: Any) -> Dataset:
    """Build the ``split`` ("train", "val" or "test") of dataset ``name`` with ``kwargs``."""
    factory = DATASETS.get(name)
    check_split(split)
    allowed = signature_kwargs(factory)
    if allowed is not None:
        check_kwargs(f"dataset {name!r}", kwargs, [a for a in allowed if a not in ("self", "split")])
    dataset = factory(split=split, **kwargs)
    if len(dataset) == 0:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "default arguments"
        raise ValueError(f"dataset {name!r} split {split!r} is empty ({args}); "
                         "check the path, or lower seq_len / raise max_bytes or num_examples")
    return dataset


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names matching the glob ``pattern``, sorted."""
    return DATASETS.names(pattern)
