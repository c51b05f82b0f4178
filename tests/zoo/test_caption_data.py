"""The ``imagecaptions`` JSON loader on tiny PNG fixtures written to tmp_path."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from zoo.data import create_dataset, list_datasets
from zoo.data.captions import hash_split

# with these fractions the hash split of these six paths is val, train, val, train, test, test
NAMES = [f"img/{i}.png" for i in (0, 1, 3, 5, 7, 10)]
SPLIT_ALL = dict(val_fraction=0.3, test_fraction=0.3)


@pytest.fixture
def image_dir(tmp_path):
    """Six random 30x40 RGB PNGs under tmp_path/img/."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for name in NAMES:
        Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)).save(tmp_path / name)
    return tmp_path


def write(tmp_path, data, name="captions.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def all_splits(**kwargs):
    return {s: create_dataset("imagecaptions", s, **kwargs) for s in ("train", "val", "test")}


def test_registered_and_list_format(image_dir):
    assert "imagecaptions" in list_datasets()
    path = write(image_dir, [{"image": n, "caption": f"picture {i}", "label": i % 2} for i, n in enumerate(NAMES)])
    splits = all_splits(path=path, root=image_dir, image_size=16, **SPLIT_ALL)
    assert sum(len(d) for d in splits.values()) == 6 and all(len(d) for d in splits.values())
    item = splits["train"][0]
    assert set(item) == {"image", "caption", "label"} and splits["train"].num_classes == 2
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
    assert item["image"].min() < -1 and item["image"].max() > 1  # ImageNet-normalised, not [0, 1]
    assert item["label"].dtype == torch.long and item["label"].dim() == 0
    assert re.fullmatch(r"picture \d", item["caption"])


def test_coco_format_one_item_per_caption_and_root_defaults_to_json_folder(image_dir):
    data = {"images": [{"id": 10 + i, "file_name": n} for i, n in enumerate(NAMES)],
            "annotations": [{"image_id": 10 + i, "caption": f"{c} {i}"} for i in range(6) for c in ("a", "b")]}
    splits = all_splits(path=write(image_dir, data), image_size=8, **SPLIT_ALL)
    assert sum(len(d) for d in splits.values()) == 12
    item = splits["val"][0]
    assert set(item) == {"image", "caption"} and item["image"].shape == (3, 8, 8) and splits["val"].num_classes is None
    for ds in splits.values():  # both captions of an image fall in the same split
        assert len(ds.records) == 2 * len({r["image"] for r in ds.records})


def test_resize_and_centre_crop(tmp_path):
    """A 20x40 image, left half black and right half white, becomes 10x10 showing the middle 20x20."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    Image.fromarray(pixels).save(tmp_path / "half.png")
    path = write(tmp_path, [{"image": "half.png", "caption": "half", "split": "train"}])
    image = create_dataset("imagecaptions", path=path, image_size=10)[0]["image"]
    assert image.shape == (3, 10, 10)
    assert (image[:, :, :4] < 0).all() and (image[:, :, 6:] > 0).all()  # still half dark, half bright


def test_hash_split_is_deterministic_and_disjoint(image_dir):
    path = write(image_dir, [{"image": n, "caption": n} for n in NAMES])
    first = {s: [r["image"] for r in d.records] for s, d in all_splits(path=path, **SPLIT_ALL).items()}
    second = {s: [r["image"] for r in d.records] for s, d in all_splits(path=path, **SPLIT_ALL).items()}
    assert first == second
    assert sorted(sum(first.values(), [])) == sorted(NAMES)  # disjoint and complete
    assert all(hash_split(n, **SPLIT_ALL) == s for s, names in first.items() for n in names)
    fractions = [hash_split(f"x{i}.png", 0.1, 0.1) for i in range(2000)]
    assert 0.75 < fractions.count("train") / 2000 < 0.85


def test_explicit_split_field(image_dir):
    layout = ["train", "train", "train", "val", "test", "test"]
    path = write(image_dir, [{"image": n, "caption": n, "split": s} for n, s in zip(NAMES, layout)])
    splits = all_splits(path=path)
    assert {s: [r["image"] for r in d.records] for s, d in splits.items()} == {
        "train": NAMES[:3], "val": NAMES[3:4], "test": NAMES[4:]}


def test_default_collate_keeps_captions_as_strings(image_dir):
    path = write(image_dir, [{"image": n, "caption": f"c{i}", "label": i, "split": "train"} for i, n in enumerate(NAMES)])
    ds = create_dataset("imagecaptions", path=path, image_size=8)
    batch = default_collate([ds[i] for i in range(3)])
    assert batch["caption"] == ["c0", "c1", "c2"] and batch["image"].shape == (3, 3, 8, 8)
    assert batch["label"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("data, message", [
    ({"rows": []}, r"found an object with keys \['rows'\]"),
    ("just a string", "found str"),
    ([], "lists no image-caption pairs"),
    ({"images": [], "annotations": []}, "lists no image-caption pairs"),
    ([{"image": "img/0.png"}], "record 0 must be an object with 'image' and 'caption'"),
    ([{"image": "img/0.png", "caption": 3}], "record 0 has caption 3"),
    ([{"image": "img/0.png", "caption": "x", "label": -1}], "record 0 has label -1"),
    ([{"image": "img/0.png", "caption": "x", "split": "dev"}], "record 0 has split 'dev'"),
    ([{"image": "img/0.png", "caption": "x", "label": 1}, {"image": "img/1.png", "caption": "y"}],
     "1 of 2 records have a 'label'"),
    ({"images": [{"id": 1, "file_name": "img/0.png"}], "annotations": [{"image_id": 2, "caption": "x"}]},
     "refers to image_id 2"),
    ({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]}, "missing 'file_name'"),
])
def test_bad_json_is_named(image_dir, data, message):
    path = write(image_dir, data)
    with pytest.raises(ValueError, match=message) as info:
        create_dataset("imagecaptions", path=path)
    assert str(path) in str(info.value)


def test_missing_files_are_named(image_dir):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        create_dataset("imagecaptions", path=image_dir / "nowhere.json")
    (image_dir / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        create_dataset("imagecaptions", path=image_dir / "broken.json")
    path = write(image_dir, [{"image": "img/0.png", "caption": "x", "split": "train"},
                             {"image": "img/gone.png", "caption": "y", "split": "train"}])
    with pytest.raises(FileNotFoundError, match=re.escape(str(image_dir / "img" / "gone.png"))):
        create_dataset("imagecaptions", path=path)
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        create_dataset("imagecaptions", path=path, root=image_dir / "no_such_root")


def test_empty_split_and_bad_arguments(image_dir):
    path = write(image_dir, [{"image": "img/0.png", "caption": "x", "split": "train"}])
    with pytest.raises(ValueError, match="split 'val' is empty"):
        create_dataset("imagecaptions", "val", path=path)
    with pytest.raises(ValueError, match="val_fraction"):
        create_dataset("imagecaptions", path=path, val_fraction=1.5)
    with pytest.raises(ValueError, match="image_size"):
        create_dataset("imagecaptions", path=path, image_size=0)
    with pytest.raises(TypeError, match="caption_file"):  # unknown keyword, checked by create_dataset
        create_dataset("imagecaptions", path=path, caption_file="x")
