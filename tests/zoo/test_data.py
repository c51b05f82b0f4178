"""Tests of zoo.data: the registry, the synthetic tasks (checked by parsing), text corpora and image sets."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from zoo.data import DATASETS, ByteTokenizer, create_dataset, list_datasets, register_dataset
from zoo.data.images import PALETTE, SHAPES, render_shape
from zoo.data.text import pytext_split_of, stdlib_sources

IGNORE = -100
HAS_DATASETS = importlib.util.find_spec("datasets") is not None


# ----------------------------------------------------------------------------------------- fixtures

@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(40)))
    return path


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(10):
        folder = root / "sub" if i % 2 else root
        (folder / f"doc{i}.txt").write_text(f"document number {i} " * 20)
    (root / "ignored.md").write_text("not a txt file")
    return root


@pytest.fixture
def image_root(tmp_path):
    """root/train/{cat,dog}, root/val/dog only (so val's folder order differs from train's), root/test/cat."""
    rng = np.random.default_rng(0)
    layout = {"train": ["cat", "cat", "dog", "dog"], "val": ["dog"], "test": ["cat"]}
    for split, classes in layout.items():
        for j, cls in enumerate(classes):
            (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / split / cls / f"{j}.png")
    return tmp_path


@pytest.fixture
def hf_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "hf"
    texts = {split: [f"{split} text number {i}" for i in range(20)] for split in ("train", "validation", "test")}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in texts.items()}).save_to_disk(str(path))
    return path


def caption_file(image_root) -> Path:
    """A list-format captions JSON over image_root's train/val/test images (an explicit split per record)."""
    records = [{"image": str(p.relative_to(image_root)), "caption": f"a {p.parent.name} photo", "split": p.parts[-3]}
               for p in sorted(image_root.glob("*/*/*.png"))]
    path = image_root / "captions.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def tiny_kwargs(tmp_path, text_file, image_root):
    """Small, fast arguments for every registered dataset (a new dataset must be added here)."""
    kwargs = {
        "mqar": dict(vocab_size=64, seq_len=32, num_kv_pairs=4, num_examples=8),
        "selective_copy": dict(num_examples=8),
        "induction": dict(num_examples=8),
        "pytext": dict(seq_len=64, max_bytes=20_000),
        "textfile": dict(path=text_file, seq_len=16, val_fraction=0.2),
        "shapes": dict(num_examples=8),
        "imagefolder": dict(root=image_root, image_size=16),
        "listops": dict(num_examples=8, min_length=20, max_length=60),
        "imagecaptions": dict(path=caption_file(image_root), image_size=16),
    }
    if HAS_DATASETS:
        hf_path = tmp_path / "hf_tiny"
        import datasets
        datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": [f"{s} sample " * 10] * 4})
                              for s in ("train", "validation", "test")}).save_to_disk(str(hf_path))
        kwargs["hf"] = dict(path=str(hf_path), seq_len=16)
    return kwargs


# ------------------------------------------------------------------------------------------ registry

@pytest.mark.parametrize("name", list_datasets())
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_registered_dataset_builds(name, split, tiny_kwargs):
    if name == "hf" and not HAS_DATASETS:
        pytest.skip("the optional 'datasets' package is not installed (its error is tested below)")
    ds = create_dataset(name, split, **tiny_kwargs[name])
    assert len(ds) > 0
    ITEM_CHECKS[ds.task](ds, ds[0])


def check_token_item(ds, item):
    assert set(item) == {"input_ids", "labels"}
    for key in item:
        assert item[key].dtype == torch.long and item[key].shape == (ds.seq_len,)
    assert 0 <= int(item["input_ids"].min()) and int(item["input_ids"].max()) < ds.vocab_size


def check_image_item(ds, item):
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, ds.image_size, ds.image_size)
    assert item["label"].dtype == torch.long and item["label"].dim() == 0
    assert 0 <= int(item["label"]) < ds.num_classes == len(ds.class_names)
    assert isinstance(item["caption"], str) and item["caption"]


def check_sequence_item(ds, item):
    assert set(item) == {"input_ids", "mask", "label"}
    assert item["input_ids"].shape == item["mask"].shape == (ds.seq_len,) and item["mask"].dtype == torch.bool
    assert 0 <= int(item["input_ids"].max()) < ds.vocab_size and 0 <= int(item["label"]) < ds.num_classes


def check_caption_item(ds, item):
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, ds.image_size, ds.image_size)
    assert isinstance(item["caption"], str) and item["caption"]
    assert "label" not in item or (item["label"].dtype == torch.long and item["label"].dim() == 0)


ITEM_CHECKS = {"lm": check_token_item, "classification": check_image_item, "sequence_classification": check_sequence_item,
               "image_caption": check_caption_item}


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="mqar"):
        create_dataset("mqr")


def test_unknown_kwarg_is_named_with_the_valid_ones():
    with pytest.raises(TypeError, match="num_kv_pair'.*num_kv_pairs"):
        create_dataset("mqar", num_kv_pair=3)


def test_kwargs_are_checked_before_building():
    with pytest.raises(TypeError, match="seqlen"):
        create_dataset("textfile", path="/definitely/missing", seqlen=8)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        create_dataset("induction", "valid", num_examples=4)


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="empty.*max_bytes=100"):
        create_dataset("pytext", seq_len=256, max_bytes=100)


def test_register_dataset_decorator():
    @register_dataset("test-only-counting")
    def counting(split="train", n=3):
        return [{"x": torch.tensor(i)} for i in range(n)]

    try:
        assert "test-only-counting" in list_datasets("test-only-*")
        assert [int(d["x"]) for d in create_dataset("test-only-counting", "val", n=2)] == [0, 1]
    finally:
        del DATASETS._entries["test-only-counting"]


# ----------------------------------------------------------------------------------------- tokenizer

@settings(max_examples=50, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_byte_tokenizer_replaces_invalid_bytes():
    assert ByteTokenizer().decode([104, 105, 0xFF]) == "hi\ufffd"


# ---------------------------------------------------------------------------------------------- MQAR

def parse_mqar(ids, labels, k):
    """Context keys, context values and answer positions read back from one generated example."""
    keys, values = ids[0 : 2 * k : 2].tolist(), ids[1 : 2 * k : 2].tolist()
    return keys, values, (labels != IGNORE).nonzero().flatten().tolist()


def test_mqar_answers_match_the_context():
    vocab, k, seq_len = 128, 6, 64
    ds = create_dataset("mqar", vocab_size=vocab, seq_len=seq_len, num_kv_pairs=k, num_examples=200)
    for item in ds:
        ids, labels = item["input_ids"], item["labels"]
        keys, values, answers = parse_mqar(ids, labels, k)
        assert all(1 <= key < vocab // 2 for key in keys) and len(set(keys)) == k
        assert all(vocab // 2 <= v < vocab for v in values) and len(set(values)) == k
        context = dict(zip(keys, values, strict=True))
        assert len(answers) == k  # labels are -100 everywhere else
        assert sorted(ids[answers].tolist()) == sorted(keys)  # each key queried exactly once
        for p in answers:
            assert p >= 2 * k and (p - 2 * k) % 2 == 0
            assert int(labels[p]) == context[int(ids[p])]
            if p + 1 < seq_len:
                assert int(ids[p + 1]) == int(labels[p])  # the value really follows its key in the sequence


def test_mqar_filler_is_random_and_gaps_favour_short_distances():
    vocab, k, seq_len = 512, 4, 64
    ds = create_dataset("mqar", vocab_size=vocab, seq_len=seq_len, num_kv_pairs=k, num_examples=300)
    filler, slots = [], []
    for item in ds:
        _, _, answers = parse_mqar(item["input_ids"], item["labels"], k)
        used = set(range(2 * k)) | set(answers) | {p + 1 for p in answers}
        filler += [int(item["input_ids"][p]) for p in range(seq_len) if p not in used]
        slots += [(p - 2 * k) // 2 for p in answers]
    assert len(set(filler)) > vocab // 2 and Counter(filler).most_common(1)[0][1] < 0.02 * len(filler)
    space = (seq_len + 1 - 2 * k) // 2
    assert np.mean(np.array(slots) < space // 2) > 0.6  # a uniform sampler would give 0.5


def test_mqar_without_random_filler_pads_with_token_0():
    k = 4
    ds = create_dataset("mqar", vocab_size=64, seq_len=32, num_kv_pairs=k, num_examples=20, random_non_queries=False)
    for item in ds:
        ids = item["input_ids"]
        keys, _, answers = parse_mqar(ids, item["labels"], k)
        used = set(range(2 * k)) | set(answers) | {p + 1 for p in answers}
        assert all(int(ids[p]) == 0 for p in range(len(ids)) if p not in used)
        assert sorted(ids[answers].tolist()) == sorted(keys)


def test_mqar_is_deterministic_per_seed_and_split():
    def build(split="train", seed=0):
        return create_dataset("mqar", split, vocab_size=64, seq_len=32, num_examples=50, seed=seed).input_ids

    assert torch.equal(build(), build())
    assert not torch.equal(build(), build("val"))
    assert not torch.equal(build("val"), build("test"))
    assert not torch.equal(build(), build(seed=1))


@pytest.mark.parametrize("kwargs, argument", [
    (dict(seq_len=10, num_kv_pairs=4), "seq_len"),
    (dict(vocab_size=8, num_kv_pairs=4), "vocab_size"),
    (dict(num_kv_pairs=0), "num_kv_pairs"),
    (dict(power_a=0.0), "power_a"),
    (dict(num_examples=0), "num_examples"),
])
def test_mqar_validates_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        create_dataset("mqar", **kwargs)


# ---------------------------------------------------------------------------- selective copy, induction

def test_selective_copy_labels_are_the_data_tokens_in_order():
    vocab, seq_len, m = 16, 40, 6
    ds = create_dataset("selective_copy", vocab_size=vocab, seq_len=seq_len, num_tokens=m, num_examples=100)
    first_positions = set()
    for item in ds:
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        separator = ids.index(1)
        assert separator == seq_len - m
        data = [t for t in ids[:separator] if t != 0]
        assert len(data) == m and all(2 <= t < vocab for t in data)
        assert labels[separator:] == data and set(labels[:separator]) == {IGNORE}
        assert ids[separator + 1 :] == data[:-1]  # teacher forcing: the answers so far are the next inputs
        first_positions.add(next(i for i, t in enumerate(ids) if t != 0))
    assert len(first_positions) > 5  # data positions are scattered, not fixed


def test_induction_label_is_the_token_after_the_first_trigger():
    vocab, seq_len = 32, 48
    ds = create_dataset("induction", vocab_size=vocab, seq_len=seq_len, num_examples=100)
    for item in ds:
        ids, labels = item["input_ids"], item["labels"]
        triggers = (ids == 0).nonzero().flatten().tolist()
        assert len(triggers) == 2 and triggers[1] == seq_len - 1
        assert int(labels[-1]) == int(ids[triggers[0] + 1]) != 0
        assert (labels[:-1] == IGNORE).all()
    assert not torch.equal(ds.input_ids, create_dataset("induction", "val", vocab_size=vocab, seq_len=seq_len,
                                                         num_examples=100).input_ids)


@pytest.mark.parametrize("name, kwargs, argument", [
    ("selective_copy", dict(seq_len=10, num_tokens=6), "seq_len"),
    ("selective_copy", dict(vocab_size=2), "vocab_size"),
    ("induction", dict(seq_len=2), "seq_len"),
])
def test_token_tasks_validate_arguments(name, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        create_dataset(name, **kwargs)


# ------------------------------------------------------------------------------------------------ text

def test_pytext_splits_are_disjoint_by_file():
    sources = [rel for rel, _ in stdlib_sources()]
    shares = Counter(pytext_split_of(rel) for rel in sources)
    assert 0.8 < shares["train"] / len(sources) < 0.97 and shares["val"] > 0 and shares["test"] > 0
    files = {s: create_dataset("pytext", s, seq_len=64, max_bytes=100_000).files for s in ("train", "val", "test")}
    for split, names in files.items():
        assert names and all(pytext_split_of(name) == split for name in names)
    assert not set(files["train"]) & set(files["val"]) and not set(files["val"]) & set(files["test"])
    salted = [pytext_split_of(rel, seed=1) for rel in sources]
    assert salted != [pytext_split_of(rel) for rel in sources]


def test_pytext_windows_are_shifted_and_deterministic():
    ds = create_dataset("pytext", "val", seq_len=32, max_bytes=5000)
    assert len(ds.data) <= 5000 and torch.equal(ds.data, create_dataset("pytext", "val", seq_len=32, max_bytes=5000).data)
    first_file = dict(stdlib_sources())[ds.files[0]]
    with open(first_file, "rb") as f:
        head = f.read(33)
    a, b = ds[0], ds[1]
    assert bytes(a["input_ids"].tolist()) == head[:32] and bytes(a["labels"].tolist()) == head[1:33]
    assert torch.equal(a["labels"][:-1], a["input_ids"][1:]) and int(b["input_ids"][0]) == int(a["labels"][-1])
    assert len(ds) == (len(ds.data) - 1) // 32
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_textfile_single_file_is_split_by_bytes(text_file):
    parts = [create_dataset("textfile", s, path=text_file, seq_len=16, val_fraction=0.2) for s in ("train", "val", "test")]
    assert b"".join(bytes(p.data.tolist()) for p in parts) == text_file.read_bytes()
    assert len(parts[1].data) + len(parts[2].data) == round(0.2 * text_file.stat().st_size)
    item = parts[0][3]
    assert torch.equal(item["labels"][:-1], item["input_ids"][1:])


def test_textfile_directory_is_split_by_file(text_dir):
    parts = {s: create_dataset("textfile", s, path=text_dir, seq_len=16, val_fraction=0.2) for s in ("train", "val", "test")}
    files = {s: p.files for s, p in parts.items()}
    assert [len(files[s]) for s in ("train", "val", "test")] == [8, 1, 1]
    assert sorted(sum(files.values(), [])) == sorted(p.relative_to(text_dir).as_posix() for p in text_dir.rglob("*.txt"))
    assert b"document number" in bytes(parts["val"].data.tolist())


def test_textfile_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        create_dataset("textfile", path=tmp_path / "nowhere.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        create_dataset("textfile", path=tmp_path / "empty.txt")


def test_hf_without_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        create_dataset("hf", path="anything")


def test_hf_local_dataset(hf_dir):
    val = create_dataset("hf", "val", path=str(hf_dir), seq_len=8)
    text = bytes(val.data.tolist()).decode()
    assert text.startswith("validation text number 0\0validation text number 1")
    with pytest.raises(ValueError, match="text_field='body'"):
        create_dataset("hf", path=str(hf_dir), text_field="body")


def test_hf_unsplit_local_dataset_is_split_by_bytes(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"row {i} of an unsplit dataset" * 5 for i in range(40)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "flat"))
    parts = [create_dataset("hf", s, path=str(tmp_path / "flat"), seq_len=8).data for s in ("train", "val", "test")]
    assert bytes(torch.cat(parts).tolist()) == "\0".join(texts).encode()
    assert len(parts[1]) > 0 and len(parts[2]) > 0


# ---------------------------------------------------------------------------------------------- images

def test_render_shape_draws_each_class_distinctly():
    masks = []
    for cls in SHAPES:
        pixels = render_shape(cls, PALETTE["red"], PALETTE["blue"], size=10.0, center=(16.0, 16.0), image_size=32, rng=None)
        assert pixels.shape == (32, 32, 3) and np.allclose(pixels[0, 0], PALETTE["blue"])
        mask = pixels[..., 0] > 0.5
        assert 20 < mask.sum() < 21 * 21
        masks.append(mask)
    assert len({m.tobytes() for m in masks}) == len(SHAPES)


def test_shapes_is_deterministic_and_splits_differ():
    a, b = create_dataset("shapes", num_examples=20), create_dataset("shapes", num_examples=20)
    assert torch.equal(a[7]["image"], b[7]["image"]) and a[7]["caption"] == b[7]["caption"]
    assert torch.equal(a[-1]["image"], a[19]["image"])
    val = create_dataset("shapes", "val", num_examples=20)
    assert not torch.equal(a[7]["image"], val[7]["image"])


def test_shapes_labels_balanced_and_images_normalised():
    ds = create_dataset("shapes", num_examples=500)
    items = [ds[i] for i in range(500)]
    counts = Counter(int(it["label"]) for it in items)
    expected = 500 / ds.num_classes
    assert set(counts) == set(range(ds.num_classes))
    assert all(0.6 * expected < c < 1.4 * expected for c in counts.values())
    images = torch.stack([it["image"] for it in items[:200]])
    assert images.mean(dim=(0, 2, 3)).abs().max() < 0.2
    assert ((images.std(dim=(0, 2, 3)) > 0.8) & (images.std(dim=(0, 2, 3)) < 1.2)).all()
    for it in items[:50]:
        assert ds.class_names[int(it["label"])] in it["caption"]


def test_shapes_class_subset_and_validation():
    ds = create_dataset("shapes", num_examples=30, classes=["ring", "cross"], image_size=64)
    assert ds.num_classes == 2 and ds.class_names == ["ring", "cross"]
    assert {ds.class_names[int(ds[i]["label"])] in ds[i]["caption"] for i in range(30)} == {True}
    with pytest.raises(ValueError, match="image_size"):
        create_dataset("shapes", image_size=48)
    with pytest.raises(ValueError, match="circle"):
        create_dataset("shapes", classes=["circel"])


def test_shapes_render_fast():
    ds = create_dataset("shapes", num_examples=1000)
    start = time.perf_counter()
    for i in range(1000):
        ds[i]
    assert time.perf_counter() - start < 3.0


def test_imagefolder_labels_follow_all_splits(image_root):
    train = create_dataset("imagefolder", root=image_root, image_size=16)
    assert train.class_names == ["cat", "dog"] and len(train) == 4
    val = create_dataset("imagefolder", "val", root=image_root, image_size=16)
    item = val[0]
    assert int(item["label"]) == 1 and item["caption"] == "dog"  # val has only dog/, still label 1
    assert item["image"].shape == (3, 16, 16) and item["image"].min() < -1 and item["image"].max() > 1


def test_imagefolder_missing_folders(tmp_path, image_root):
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        create_dataset("imagefolder", root=tmp_path / "no_such_root")
    (image_root / "test" / "cat" / "0.png").unlink()
    (image_root / "test" / "cat").rmdir()
    (image_root / "test").rmdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(image_root / "test"))):
        create_dataset("imagefolder", "test", root=image_root)


def test_num_examples_per_split():
    """``num_examples={"train": n}`` sizes the named splits only: the others keep their default, and their items
    do not change (a bigger generated training set leaves the validation set alone)."""
    from zoo.data.images import SHAPES_NUM_EXAMPLES

    train = create_dataset("shapes", "train", num_examples={"train": 12})
    val = create_dataset("shapes", "val", num_examples={"train": 12})
    default_val = create_dataset("shapes", "val")
    assert len(train) == 12 and len(val) == len(default_val) == SHAPES_NUM_EXAMPLES["val"]
    assert torch.equal(val[3]["image"], default_val[3]["image"])
    mqar = create_dataset("mqar", "val", vocab_size=64, seq_len=32, num_kv_pairs=4, num_examples={"val": 5, "train": 7})
    assert len(mqar) == 5
    with pytest.raises(ValueError, match=r"num_examples keys must be splits \(train, val, test\), got \['valid'\]"):
        create_dataset("shapes", "val", num_examples={"valid": 3})
    with pytest.raises(ValueError, match="num_examples must be an int >= 1, got num_examples=0"):
        create_dataset("listops", "train", num_examples={"train": 0})
