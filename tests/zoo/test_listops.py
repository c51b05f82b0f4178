"""Tests of zoo.data.listops: labels checked by an independent recursive evaluator, lengths, determinism, items."""
from __future__ import annotations

import statistics
import time
from collections import Counter

import numpy as np
import pytest
import torch

from zoo.data.listops import VOCAB, ListOps, evaluate_listops, generate_expression
from zoo.data.registry import create_dataset

SMALL = dict(min_length=20, max_length=60)
ID_TO_TOKEN = {i: t for t, i in VOCAB.items()}
OPS = {"[MIN": min, "[MAX": max, "[MED": statistics.median_low, "[SM": lambda xs: sum(xs) % 10}


def reference_value(text: str) -> int:
    """Recursive-descent evaluation of the space-joined token string (independent of the module's evaluator)."""
    tokens = text.split()

    def parse(pos: int) -> tuple[int, int]:
        token = tokens[pos]
        if token.isdigit():
            return int(token), pos + 1
        assert token in OPS, token
        args, pos = [], pos + 1
        while tokens[pos] != "]":
            value, pos = parse(pos)
            args.append(value)
        assert 2 <= len(args)
        return OPS[token](args), pos + 1

    value, end = parse(0)
    assert end == len(tokens)
    return value


def depth_of(tokens: list[str]) -> int:
    depth = deepest = 0
    for t in tokens:
        depth += t.startswith("[")
        deepest = max(deepest, depth)
        depth -= t == "]"
    return deepest


def decode(item: dict) -> list[str]:
    ids = item["input_ids"][item["mask"]].tolist()
    assert ids[0] == VOCAB["<cls>"]
    return [ID_TO_TOKEN[i] for i in ids[1:]]


def test_labels_match_reference_evaluator_and_lengths_in_bounds():
    ds = ListOps("train", num_examples=300, **SMALL)
    for i in range(len(ds)):
        item = ds[i]
        tokens = decode(item)
        assert 20 <= len(tokens) <= 60
        assert int(item["label"]) == reference_value(" ".join(tokens)) == evaluate_listops(tokens)
        assert depth_of(tokens) <= 10


def test_evaluator_examples_and_median_convention():
    assert evaluate_listops("[MAX 2 9 [MIN 4 7 ] 0 ]".split()) == 9
    assert evaluate_listops("[MED 1 8 3 6 ]".split()) == 3  # even count: lower middle of 1 3 6 8
    assert evaluate_listops("[MED 5 1 9 ]".split()) == 5
    assert evaluate_listops("[SM 7 8 [MIN 9 5 ] ]".split()) == 0
    assert evaluate_listops(["4"]) == 4
    for bad in ["[MIN 3", "[MIN 3 ] ]", "[MIN ]", "3 4", "[FOO 1 2 ]", ""]:
        with pytest.raises(ValueError):
            evaluate_listops(bad.split())


def test_generate_expression_respects_depth_args_and_bounds():
    rng = np.random.default_rng(1)
    for _ in range(200):
        tokens = generate_expression(rng, min_length=10, max_length=80, max_depth=3, max_args=4)
        assert 10 <= len(tokens) <= 80 and depth_of(tokens) <= 3
        assert evaluate_listops(tokens) == reference_value(" ".join(tokens))
        # every operator has 2..max_args arguments
        counts = []
        for t in tokens:
            if t.startswith("["):
                counts.append(0)
            elif t == "]":
                assert 2 <= counts.pop() <= 4
                if counts:
                    counts[-1] += 1
            elif counts:
                counts[-1] += 1


def test_lra_default_lengths_and_timing():
    ds = create_dataset("listops", "test", num_examples=50)
    assert ds.seq_len == 2001 and len(ds) == 50
    start = time.perf_counter()
    for i in range(50):
        item = ds[i]
        tokens = decode(item)
        assert 500 <= len(tokens) <= 2000
        assert int(item["label"]) == reference_value(" ".join(tokens))
    assert time.perf_counter() - start < 5


def test_default_sizes_and_lazy_construction():
    start = time.perf_counter()
    sizes = {split: len(ListOps(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 96000, "val": 2000, "test": 2000}
    assert time.perf_counter() - start < 0.5


def test_deterministic_per_seed_split_index():
    a, b = ListOps("train", num_examples=20, **SMALL), ListOps("train", num_examples=20, **SMALL)
    for i in (0, 7, 19):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
    assert torch.equal(a[-1]["input_ids"], a[19]["input_ids"])
    # item i does not depend on which items were generated before
    c = ListOps("train", num_examples=20, **SMALL)
    assert torch.equal(c[19]["input_ids"], a[19]["input_ids"])
    other_seed = ListOps("train", num_examples=20, seed=1, **SMALL)
    assert any(not torch.equal(a[i]["input_ids"], other_seed[i]["input_ids"]) for i in range(5))
    with pytest.raises(IndexError):
        a[20]


def test_splits_differ():
    seqs = {split: {tuple(ListOps(split, num_examples=30, **SMALL)[i]["input_ids"].tolist()) for i in range(30)}
            for split in ("train", "val", "test")}
    assert not seqs["train"] & seqs["val"] and not seqs["train"] & seqs["test"] and not seqs["val"] & seqs["test"]


def test_token_coverage_and_label_distribution():
    ds = ListOps("val", num_examples=200, **SMALL)
    tokens, labels = Counter(), Counter()
    for i in range(len(ds)):
        item = ds[i]
        tokens.update(decode(item))
        labels[int(item["label"])] += 1
    assert set(tokens) == set(VOCAB) - {"<pad>", "<cls>"}
    assert len(labels) >= 8 and max(labels.values()) < 0.5 * len(ds)


def test_item_layout_padding_and_mask():
    ds = ListOps("train", num_examples=5, **SMALL)
    assert ds.vocab_size == 17 and ds.num_classes == 10 and ds.task == "sequence_classification" and ds.seq_len == 61
    assert sorted(VOCAB.values()) == list(range(17)) and VOCAB["<pad>"] == 0 and VOCAB["<cls>"] == 1
    for i in range(5):
        item = ds[i]
        assert set(item) == {"input_ids", "mask", "label"}
        ids, mask = item["input_ids"], item["mask"]
        assert ids.dtype == torch.long and ids.shape == (61,)
        assert mask.dtype == torch.bool and mask.shape == (61,)
        assert item["label"].dtype == torch.long and item["label"].dim() == 0 and 0 <= int(item["label"]) < 10
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # real tokens first, then right padding
        assert ids[0] == 1 and (ids[1:n] >= 2).all() and (ids[n:] == 0).all() and int(ids.max()) < ds.vocab_size


@pytest.mark.parametrize("kwargs, name", [
    (dict(min_length=100, max_length=50), "min_length"),
    (dict(min_length=0), "min_length"),
    (dict(max_args=1), "max_args"),
    (dict(max_depth=-1), "max_depth"),
    (dict(max_depth=0, min_length=2, max_length=10), "max_depth"),
    (dict(min_length=2, max_length=3), "max_length"),
    (dict(max_depth=2, max_args=2, min_length=20, max_length=30), "min_length"),
    (dict(num_examples=0), "num_examples"),
    (dict(seed=-1), "seed"),
    (dict(max_length=2.5), "max_length"),
])
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ListOps("train", **kwargs)


def test_bad_split_and_unknown_kwarg():
    with pytest.raises(ValueError, match="split"):
        create_dataset("listops", "valid")
    with pytest.raises(TypeError, match="max_len"):
        create_dataset("listops", max_len=30)


def test_impossible_bounds_give_runtime_error_after_bounded_tries():
    # max_args=2 gives lengths 1, 4, 7, ... (1 mod 3): 5..6 cannot be hit
    with pytest.raises(RuntimeError, match="tries"):
        generate_expression(np.random.default_rng(0), min_length=5, max_length=6, max_depth=3, max_args=2, max_tries=200)
