"""The shipped shapes classifier and the diffusion sample metrics built on it (conditional accuracy, shapes-FID)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import zoo
from zoo.checkpoint import read_json
from zoo.diffusion_eval import (conditional_accuracy, evaluate_samples, frechet_distance, load_classifier,
                                reference_images, shapes_fid)
from zoo.registry import checkpoint_root

N = 240  # val images per check: enough for a 64-dim covariance, a couple of seconds on CPU


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def real():
    from zoo.data import create_dataset

    dataset = create_dataset("shapes", "val", image_size=32, num_examples=N)
    return reference_images(N), torch.tensor([int(dataset[i]["label"]) for i in range(N)])


def test_the_classifier_is_shipped_and_accurate(classifier, real):
    assert "vit-tiny.shapes" in zoo.list_models(pretrained=True)
    recorded = read_json(checkpoint_root() / "vit-tiny" / "shapes" / "config.json")["metrics"]["val"]["accuracy"]
    images, labels = real
    # a sample of the val split: within a few points of the full split's recorded accuracy
    assert conditional_accuracy(images, labels, classifier) >= recorded - 0.04


def test_conditional_accuracy_of_real_images_and_wrong_labels(classifier, real):
    images, labels = real
    right = conditional_accuracy(images, labels, classifier)
    assert right == pytest.approx((_predict(classifier, images) == labels).float().mean().item())
    assert conditional_accuracy(images, (labels + 1) % 6, classifier) < right
    with pytest.raises(ValueError, match="labels must have shape"):
        conditional_accuracy(images, labels[:-1], classifier)
    with pytest.raises(ValueError, match="images must have shape"):
        conditional_accuracy(images[:, :, :16, :16], labels, classifier)


def _predict(classifier, images):
    from zoo.data.images import SHAPES_MEAN, SHAPES_STD

    with torch.no_grad():
        return classifier((images - torch.as_tensor(SHAPES_MEAN)[:, None, None]) / torch.as_tensor(SHAPES_STD)[:, None, None]).argmax(-1)


def test_shapes_fid_of_a_set_with_itself_is_zero_and_symmetric(classifier, real):
    images, _ = real
    assert shapes_fid(images, images, classifier) == pytest.approx(0.0, abs=1e-3)
    first, second = images[: N // 2], images[N // 2:]
    assert shapes_fid(first, second, classifier) == pytest.approx(shapes_fid(second, first, classifier), rel=1e-4)


def test_shapes_fid_of_noise_is_large(classifier, real):
    images, _ = real
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    between_real = shapes_fid(images[: N // 2], images[N // 2:], classifier)
    assert shapes_fid(noise, images, classifier) > 10 * between_real + 1.0


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3)) * [1.0, 2.0, 3.0]
    b = rng.standard_normal((20000, 3)) * [2.0, 2.0, 1.0] + [1.0, 0.0, 0.0]
    # |mu1 - mu2|^2 + sum (s1 - s2)^2 for diagonal covariances
    assert frechet_distance(a, b) == pytest.approx(1.0 + 1.0 + 0.0 + 4.0, rel=0.05)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_evaluate_samples_on_an_untrained_unet(classifier, real):
    model = zoo.create_model("unet-tiny", num_class_embeds=7)  # the 6 shapes + the null class
    metrics = evaluate_samples(model, n=12, steps=2, classifier=classifier, reference=real[0][:12])
    assert set(metrics) == {"conditional_accuracy", "shapes_fid", "seconds_per_sample"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["conditional_accuracy"] <= 1.0 and metrics["seconds_per_sample"] > 0
    with pytest.raises(ValueError, match="class-conditioned"):
        evaluate_samples(zoo.create_model("unet-tiny", num_class_embeds=None), n=2, steps=1, classifier=classifier)
