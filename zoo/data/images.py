"""Image classification data: procedurally rendered shapes (offline, no files) and a generic image folder.

Items are ``{"image": FloatTensor[3, H, W] (normalised), "label": LongTensor[], "caption": str}``.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from layers.registry import close_matches
from zoo.data.registry import SPLITS, check_int, check_split, register_dataset, split_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-channel mean/std of rendered shapes images in [0, 1], measured over 5000 renders at 32 and 64 px
# (and 300 at 224 px: they hardly depend on the size); normalised images have ~zero mean, ~unit std.
SHAPES_MEAN = np.array([0.46, 0.42, 0.37], dtype=np.float32)
SHAPES_STD = np.array([0.33, 0.27, 0.32], dtype=np.float32)
SHAPES_IMAGE_SIZES = (32, 64, 224)
SHAPES_NUM_EXAMPLES = {"train": 10000, "val": 1000, "test": 1000}
SHAPES_NOISE_STD = 0.03
DARK_BELOW = 0.6  # a background dimmed below this factor is captioned "dark <colour>", or by DARK_NAMES
DARK_NAMES = {"white": "grey"}

PALETTE = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.90, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
    "white": (0.95, 0.95, 0.95),
    "orange": (1.00, 0.55, 0.05),
}


# Signed distances (pixels, negative inside) of shapes centred at the origin that fill the box
# [-r, r]^2, with y pointing down. Distinct silhouettes, all recognisable at 32 px.
def _circle(dx, dy, r):
    return np.hypot(dx, dy) - r


def _ring(dx, dy, r):
    return np.abs(np.hypot(dx, dy) - 0.7 * r) - 0.3 * r


def _square(dx, dy, r):
    return np.maximum(np.abs(dx), np.abs(dy)) - r


def _diamond(dx, dy, r):
    return (np.abs(dx) + np.abs(dy) - r) * 0.7071  # / sqrt(2): distance to the edge


def _triangle(dx, dy, r):
    # Equilateral, apex up, vertices on the circle of radius r: three half-planes at inradius r/2.
    return np.maximum(dy, np.maximum(0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy)) - r / 2


def _cross(dx, dy, r):
    ax, ay, arm = np.abs(dx), np.abs(dy), 0.3 * r
    return np.minimum(np.maximum(ax - r, ay - arm), np.maximum(ax - arm, ay - r))


SHAPES = {"circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross, "ring": _ring, "diamond": _diamond}


def _check_shape_names(names) -> list[str]:
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        matches = close_matches(unknown[0], SHAPES)
        hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
        raise ValueError(f"unknown shape class {unknown[0]!r}.{hint} Shape classes: {', '.join(SHAPES)}")
    return list(names)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@functools.cache
def _pixel_centres(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    return xs, ys


def render_shape(cls: str, colour, bg, size: float, center: tuple[float, float], image_size: int,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Render shape ``cls`` filling the box of half-width ``size`` px around ``center = (x, y)``.

    ``colour`` and ``bg`` are RGB triples in [0, 1]. Edges are anti-aliased (one-pixel ramp of the
    signed distance); with ``rng``, Gaussian noise of std ``SHAPES_NOISE_STD`` is added. Returns a
    float32 array [image_size, image_size, 3] in [0, 1] (``plt.imshow``-ready).
    """
    _check_shape_names([cls])
    xs, ys = _pixel_centres(image_size)
    coverage = np.clip(0.5 - SHAPES[cls](xs - float(center[0]), ys - float(center[1]), float(size)), 0.0, 1.0)[..., None]
    image = np.asarray(bg, np.float32) * (1 - coverage) + np.asarray(colour, np.float32) * coverage
    if rng is not None:
        image += SHAPES_NOISE_STD * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0.0, 1.0)


@register_dataset("shapes")
class Shapes(Dataset):
    """Coloured geometric shapes on a coloured background; the label is the shape.

    Item i is rendered on the fly from a generator seeded by ``(seed, split, i)``: the shape is
    uniform over ``class_names``, its colour and the background's are two different palette colours
    (the background dimmed by a factor in [0.35, 1], captioned "dark" below ``DARK_BELOW``), its
    half-width is 18-36 % of the image and it lies fully inside. Images are normalised with
    ``SHAPES_MEAN`` / ``SHAPES_STD``.
    """

    task = "classification"

    def __init__(self, split: str = "train", image_size: int = 32, num_examples: int | dict[str, int] | None = None, seed: int = 0,
                 classes: list[str] | None = None):
        self._split_index = check_split(split)
        if image_size not in SHAPES_IMAGE_SIZES:
            sizes = ", ".join(map(str, SHAPES_IMAGE_SIZES))
            raise ValueError(f"image_size must be one of {sizes}, got image_size={image_size!r}")
        check_int("seed", seed, 0)
        num_examples = split_size(num_examples, split, SHAPES_NUM_EXAMPLES)
        self.class_names = list(SHAPES) if classes is None else _check_shape_names(classes)
        if len(set(self.class_names)) != len(self.class_names) or not self.class_names:
            raise ValueError(f"classes must be distinct shape names, got classes={classes!r}")
        self.num_classes = len(self.class_names)
        self.image_size, self.num_examples, self.seed, self.split = image_size, num_examples, seed, split

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict:
        if not -self.num_examples <= i < self.num_examples:
            raise IndexError(f"index {i} out of range for {self.num_examples} images")
        rng = np.random.default_rng([self.seed, self._split_index, i % self.num_examples])
        label = int(rng.integers(self.num_classes))
        fg_name, bg_name = rng.choice(list(PALETTE), size=2, replace=False).tolist()
        size = rng.uniform(0.18, 0.36) * self.image_size
        center = rng.uniform(size + 1, self.image_size - size - 1, size=2)
        dim = rng.uniform(0.35, 1.0)
        pixels = render_shape(self.class_names[label], PALETTE[fg_name], np.asarray(PALETTE[bg_name]) * dim, size, center,
                              self.image_size, rng)
        image = torch.from_numpy(np.ascontiguousarray(((pixels - SHAPES_MEAN) / SHAPES_STD).transpose(2, 0, 1)))
        if dim < DARK_BELOW:
            bg_name = DARK_NAMES.get(bg_name, f"dark {bg_name}")
        caption = f"{_article(fg_name)} {fg_name} {self.class_names[label]} on {_article(bg_name)} {bg_name} background"
        return {"image": image, "label": torch.tensor(label), "caption": caption}


@register_dataset("imagefolder")
class ImageFolderDataset(Dataset):
    """Images under ``root/<split>/<class>/*``: resized and centre-cropped to ``image_size``, ImageNet-normalised.

    Class indices come from the sorted union of the class folders of all splits, so a class missing
    from one split does not shift the labels of the others. The caption is the class name.
    """

    task = "classification"

    def __init__(self, split: str = "train", *, root: str | os.PathLike, image_size: int = 224):
        from torchvision import datasets, transforms

        check_split(split)
        check_int("image_size", image_size, 1)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"imagefolder root {str(root)!r} does not exist")
        if not (root / split).is_dir():
            raise FileNotFoundError(f"imagefolder split folder {str(root / split)!r} does not exist "
                                    f"(expected {root}/<train|val|test>/<class>/<image>)")
        transform = transforms.Compose([
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
        self.folder = datasets.ImageFolder(root / split, transform=transform, allow_empty=True)
        split_folders = [root / s for s in SPLITS if (root / s).is_dir()]
        self.class_names = sorted({d.name for folder in split_folders for d in folder.iterdir() if d.is_dir()})
        self._label_of = [self.class_names.index(name) for name in self.folder.classes]
        self.num_classes = len(self.class_names)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> dict:
        image, folder_label = self.folder[i]
        label = self._label_of[folder_label]
        return {"image": image, "label": torch.tensor(label), "caption": self.class_names[label]}
