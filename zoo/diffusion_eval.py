"""Evaluate class-conditioned diffusion samples on the 32px ``shapes`` dataset with the shipped classifier
``vit-tiny.shapes``:

- ``conditional_accuracy``: the fraction of samples the classifier assigns to their conditioning label;
- ``shapes_fid``: the Fréchet distance between Gaussian fits of the classifier's pre-logit features of generated
  and real images. It is a *shapes-FID*, not Inception FID: its values are comparable only with each other.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from zoo.data.images import SHAPES_MEAN, SHAPES_STD

CLASSIFIER = "vit-tiny.shapes"
IMAGE_SIZE = 32


def load_classifier() -> nn.Module:
    """The shipped shapes classifier (``vit-tiny.shapes``), in eval mode."""
    from zoo.registry import create_model

    return create_model(CLASSIFIER).eval()


def _normalize(images: torch.Tensor, classifier: nn.Module) -> torch.Tensor:
    """Images ``[N, 3, 32, 32]`` in [0, 1] -> the shapes dataset's normalisation, on the classifier's device."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must have shape [N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}] with values in [0, 1], got {shape}")
    param = next(classifier.parameters())
    mean, std = (torch.as_tensor(v, dtype=param.dtype, device=param.device)[:, None, None] for v in (SHAPES_MEAN, SHAPES_STD))
    return (images.to(param) - mean) / std


@torch.no_grad()
def _run(classifier: nn.Module, images: torch.Tensor, pre_logits: bool, batch_size: int) -> torch.Tensor:
    x = _normalize(images, classifier)
    outs = [classifier.forward_head(classifier.forward_features(b), pre_logits=pre_logits) for b in x.split(batch_size)]
    return torch.cat(outs).float().cpu()


def conditional_accuracy(images: torch.Tensor, labels: Any, classifier: nn.Module, batch_size: int = 256) -> float:
    """Fraction of ``images`` ``[N, 3, 32, 32]`` in [0, 1] that ``classifier`` assigns to their ``labels`` ``[N]``."""
    labels = torch.as_tensor(labels).long().cpu()
    if tuple(labels.shape) != (len(images),):
        raise ValueError(f"labels must have shape [{len(images)}] (one per image), got {tuple(labels.shape)}")
    predicted = _run(classifier, images, False, batch_size).argmax(dim=-1)
    return (predicted == labels).float().mean().item()


def features(images: torch.Tensor, classifier: nn.Module, batch_size: int = 256) -> np.ndarray:
    """The classifier's pre-logit features ``[N, D]`` (float64) of ``images`` in [0, 1]."""
    return _run(classifier, images, True, batch_size).double().numpy()


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr(sqrtm(sigma1 @ sigma2))`` of two symmetric PSD matrices: scipy's ``sqrtm`` when scipy is installed
    (a small diagonal offset if the product is too singular), else the eigenvalues of the symmetric PSD
    ``sqrt(sigma1) sigma2 sqrt(sigma1)``, which has the same trace of square root."""
    try:
        from scipy import linalg
    except ImportError:
        values, vectors = np.linalg.eigh(sigma1)
        root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
        inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
        return float(np.sqrt(np.clip(inner, 0, None)).sum())
    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = np.eye(len(sigma1)) * 1e-6
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    return float(np.real(np.trace(root)))


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Fréchet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))`` between Gaussian fits of two feature sets."""
    if feats1.ndim != 2 or feats2.ndim != 2 or feats1.shape[1] != feats2.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {feats1.shape} and {feats2.shape}")
    if min(len(feats1), len(feats2)) < 2:
        raise ValueError(f"each set needs at least 2 images for a covariance, got {len(feats1)} and {len(feats2)}")
    mu1, mu2 = feats1.mean(0), feats2.mean(0)
    sigma1, sigma2 = np.cov(feats1, rowvar=False), np.cov(feats2, rowvar=False)
    distance = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2)
    return max(float(distance), 0.0)  # rounding can leave a tiny negative for identical sets


def shapes_fid(images: torch.Tensor, reference_images: torch.Tensor, classifier: nn.Module) -> float:
    """shapes-FID (not Inception FID): Fréchet distance between the classifier's pre-logit features of ``images``
    and ``reference_images`` (both ``[N, 3, 32, 32]`` in [0, 1]); lower is closer."""
    return frechet_distance(features(images, classifier), features(reference_images, classifier))


def reference_images(n: int, split: str = "val") -> torch.Tensor:
    """The first ``n`` real 32px shapes images of ``split``, in [0, 1]."""
    from zoo.data import create_dataset

    dataset = create_dataset("shapes", split, image_size=IMAGE_SIZE, num_examples=n)
    images = torch.stack([dataset[i]["image"] for i in range(n)])
    return images * torch.as_tensor(SHAPES_STD)[:, None, None] + torch.as_tensor(SHAPES_MEAN)[:, None, None]


def evaluate_samples(model: nn.Module, n: int, steps: int, scheduler: str = "ddim", guidance: float = 1.0,
                     classifier: nn.Module | None = None, reference: torch.Tensor | None = None, seed: int = 0,
                     task: Any = None) -> dict[str, float]:
    """Sample ``n`` images from the conditioned diffusion ``model`` with :func:`zoo.sampling.sample` and score them:
    a class-conditioned model's labels cycle through the classifier's classes; a caption-conditioned model takes
    the captions of the first ``n`` shapes val images, scored against those images' labels.

    ``classifier`` defaults to the shipped ``vit-tiny.shapes``, ``reference`` to the first ``n`` val images.
    Returns ``conditional_accuracy``, ``shapes_fid`` and ``seconds_per_sample`` (sampling wall time / ``n``).
    """
    from zoo.data import create_dataset
    from zoo.models.diffusion import CAPTIONS
    from zoo.sampling import sample

    classifier = load_classifier() if classifier is None else classifier.eval()
    num_classes = classifier.head.out_features
    if getattr(model, "cond_kind", None) == CAPTIONS:
        val = create_dataset("shapes", "val", image_size=IMAGE_SIZE, num_examples=n)
        items = [val[i] for i in range(n)]
        labels, cond = torch.stack([item["label"] for item in items]), {"captions": [item["caption"] for item in items]}
    elif getattr(model, "null_class", None) is None:
        raise ValueError(f"evaluate_samples needs a class-conditioned or caption-conditioned diffusion model; "
                         f"{getattr(model, 'model_name', type(model).__name__)} is neither")
    elif model.null_class < num_classes:
        raise ValueError(f"the model has {model.null_class} classes but the classifier has {num_classes}")
    else:
        labels = torch.arange(n) % num_classes
        cond = {"labels": labels.to(next(model.parameters()).device)}
    reference = reference_images(n) if reference is None else reference
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    start = time.perf_counter()
    images = sample(model, n, steps, scheduler, guidance, generator=generator, task=task, **cond)
    seconds = time.perf_counter() - start
    return {"conditional_accuracy": conditional_accuracy(images, labels, classifier),
            "shapes_fid": shapes_fid(images, reference, classifier),
            "seconds_per_sample": seconds / n}
