"""Image-caption pairs listed in a JSON file, for diffusion and multimodal models.

Two JSON layouts are accepted (detected from the top-level value):

* a list of records ``{"image": "relative/path.png", "caption": "...", "label": int (optional),
  "split": "train" | "val" | "test" (optional)}``;
* COCO captions: ``{"images": [{"id", "file_name", "split" (optional)}], "annotations": [{"image_id", "caption"}]}``,
  one item per annotation.

Items are ``{"image": FloatTensor[3, S, S] (resized, centre-cropped, ImageNet-normalised like
``imagefolder``), "caption": str}`` plus ``"label": LongTensor[]`` when the records have labels
(all of them or none). ``torch.utils.data.default_collate``, which the trainer uses, batches the
captions as a list of strings.

Splits: when the records carry a ``"split"`` field (all of them, e.g. Karpathy's COCO splits) it is
used as is; otherwise an image goes to a split by a hash of its path as written in the JSON, so the
split is deterministic, stable across machines and keeps every caption of one image in one split.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from zoo.data.images import IMAGENET_MEAN, IMAGENET_STD
from zoo.data.registry import SPLITS, check_int, check_split, register_dataset


def hash_split(image: str, val_fraction: float, test_fraction: float) -> str:
    """The split of the image at relative path ``image``: a uniform value in [0, 1) from its SHA-1, cut into test|val|train."""
    u = int.from_bytes(hashlib.sha1(image.encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _records(data, path: Path) -> list[dict]:
    """``[{"image", "caption", "label"?, "split"?}]`` from either JSON layout; ValueError naming the problem."""
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        images, annotations = data["images"], data["annotations"]
        if not isinstance(images, list) or not isinstance(annotations, list):
            raise ValueError(f"{path}: COCO 'images' and 'annotations' must be lists")
        try:
            by_id = {im["id"]: im for im in images}
            records = []
            for ann in annotations:
                image = by_id.get(ann["image_id"])
                if image is None:
                    raise ValueError(f"{path}: annotation {ann!r} refers to image_id {ann['image_id']!r}, "
                                     "which is not in 'images'")
                record = {"image": image["file_name"], "caption": ann["caption"]}
                if "split" in image:
                    record["split"] = image["split"]
                records.append(record)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: COCO images need 'id' and 'file_name', annotations 'image_id' and 'caption' "
                             f"(missing {e})") from None
    elif isinstance(data, list):
        records = data
        for i, record in enumerate(records):
            if not isinstance(record, dict) or "image" not in record or "caption" not in record:
                raise ValueError(f"{path}: record {i} must be an object with 'image' and 'caption', got {record!r}")
    else:
        found = f"an object with keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a list of {{'image', 'caption'}} records or a COCO object with "
                         f"'images' and 'annotations', found {found}")
    if not records:
        raise ValueError(f"{path} lists no image-caption pairs")
    for i, record in enumerate(records):
        if not isinstance(record["image"], str) or not record["image"]:
            raise ValueError(f"{path}: record {i} has image {record['image']!r}; expected a non-empty path string")
        if not isinstance(record["caption"], str):
            raise ValueError(f"{path}: record {i} has caption {record['caption']!r}; expected a string")
        label = record.get("label", 0)
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ValueError(f"{path}: record {i} has label {label!r}; expected an int >= 0")
        if record.get("split", "train") not in SPLITS:
            raise ValueError(f"{path}: record {i} has split {record['split']!r}; expected one of {', '.join(SPLITS)}")
    for key in ("label", "split"):
        having = sum(key in r for r in records)
        if 0 < having < len(records):
            raise ValueError(f"{path}: {having} of {len(records)} records have a {key!r}; give it to all or none")
    return records


@register_dataset("imagecaptions")
class ImageCaptions(Dataset):
    """Image-caption pairs from the JSON file ``path``, images relative to ``root`` (default: the JSON's folder).

    ``val_fraction`` / ``test_fraction`` size the hash split used when the records carry no ``"split"``.
    ``num_classes`` is 1 + the largest label when there are labels, else None.
    """

    task = "image_caption"

    def __init__(self, split: str = "train", *, path: str | os.PathLike, root: str | os.PathLike | None = None,
                 image_size: int = 64, val_fraction: float = 0.1, test_fraction: float = 0.1):
        from torchvision import transforms

        check_split(split)
        check_int("image_size", image_size, 1)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {name}={value!r}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"imagecaptions file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        records = _records(data, path)
        self.root = path.parent if root is None else Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"imagecaptions root {str(self.root)!r} does not exist")
        has_labels = "label" in records[0]
        self.num_classes = 1 + max(r["label"] for r in records) if has_labels else None
        self.records = [r for r in records
                        if r.get("split", hash_split(r["image"], val_fraction, test_fraction)) == split]
        missing = sorted({r["image"] for r in self.records if not (self.root / r["image"]).is_file()})
        if missing:
            raise FileNotFoundError(f"imagecaptions: {len(missing)} image(s) of split {split!r} missing under "
                                    f"{self.root}, e.g. {str(self.root / missing[0])!r}")
        self.transform = transforms.Compose([
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
        self.image_size, self.split = image_size, split

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        with Image.open(self.root / record["image"]) as image:
            item = {"image": self.transform(image.convert("RGB")), "caption": record["caption"]}
        if "label" in record:
            item["label"] = torch.tensor(record["label"])
        return item
