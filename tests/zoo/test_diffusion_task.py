"""The ``diffusion`` task, ``zoo.sampling`` and ``zoo sample``: losses on tiny batches, the v target, CFG label
dropout, sampler outputs, a 3-step train then sample of the shipped config, and clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from zoo.cli import main
from zoo.data import create_dataset
from zoo.registry import create_model
from zoo.sampling import SCHEDULERS, save_grid, sample
from zoo.tasks import create_task

ROOT = Path(__file__).resolve().parents[2]
TINY_UNET = dict(num_class_embeds=7)  # unet-tiny for the 6 shapes + the null class
TINY_DIT = dict(depth=1, dim=32, num_heads=2, input_size=32, patch_size=8, in_channels=3, num_classes=6)


@pytest.fixture(scope="module")
def shapes():
    return create_dataset("shapes", "train", image_size=32, num_examples=8)


@pytest.fixture(scope="module")
def batch(shapes):
    return default_collate([shapes[i] for i in range(4)])


@pytest.fixture(scope="module")
def unet():
    return create_model("unet-tiny", **TINY_UNET)


def test_images_map_to_unit_range(batch):
    pixels = create_task("diffusion").to_model_space(batch["image"])
    assert pixels.min() >= -1.0 - 1e-5 and pixels.max() <= 1.0 + 1e-5 and pixels.min() < 0 < pixels.max()


@pytest.mark.parametrize("name, overrides", [("unet-tiny", TINY_UNET), ("dit-s2", TINY_DIT)])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_on_a_tiny_batch(name, overrides, prediction, batch, shapes):
    model = create_model(name, **overrides)
    task = create_task("diffusion", prediction=prediction)
    task.check_data(model, shapes)
    loss, metrics = task.loss(model, batch)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and metrics["count"] == 4 and metrics["loss"] == loss.detach()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_learned_sigma_half_stays_out_of_the_loss(batch):
    """A fresh DiT predicts exactly zero; making only its sigma half huge leaves the epsilon loss unchanged."""
    model = create_model("dit-s2", **TINY_DIT).eval()
    assert model.out_channels == 6
    task = create_task("diffusion")
    with torch.no_grad():
        loss_zero = task.loss(model, batch)[0].item()
        # the final linear maps each token to (row, column, channel): channels 3-5 are the sigma half
        model.final_layer.linear.bias.view(-1, 6)[:, 3:] = 100.0
        loss_sigma = task.loss(model, batch)[0].item()
    assert loss_sigma == loss_zero
    assert loss_zero == pytest.approx(1.0, abs=0.1)  # predicting zero: the MSE is the noise's variance


def test_v_target_matches_hand_computation():
    task = create_task("diffusion", prediction="v_prediction", beta_schedule="cosine")
    clean, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 500, 999])
    alpha_bar = task.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean
    torch.testing.assert_close(task.target(clean, noise, t), expected)
    torch.testing.assert_close(create_task("diffusion").target(clean, noise, t), noise)


def test_cond_dropout_replaces_labels_at_its_rate():
    labels = torch.randint(0, 6, (20000,))
    dropped = create_task("diffusion", cond_dropout=0.25).drop_labels(labels, null_class=6)
    changed = dropped != labels
    assert (dropped[changed] == 6).all() and (dropped[~changed] == labels[~changed]).all()
    assert changed.float().mean().item() == pytest.approx(0.25, abs=0.015)
    assert (create_task("diffusion", cond_dropout=0.0).drop_labels(labels, 6) == labels).all()


def test_eval_loss_is_deterministic(unet, batch):
    task = create_task("diffusion")
    unet.eval()
    with torch.no_grad():
        assert task.loss(unet, batch)[0] == task.loss(unet, batch)[0]


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_samplers_return_images_in_unit_range(unet, scheduler, guidance):
    generator = torch.Generator().manual_seed(0)
    images = sample(unet, 3, 2, scheduler, guidance=guidance, generator=generator)
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    again = sample(unet, 3, 2, scheduler, guidance=guidance, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, again)


def test_unconditional_dit_samples_and_grid(tmp_path):
    model = create_model("dit-s2", **{**TINY_DIT, "num_classes": 0, "learn_sigma": False})
    images = sample(model, 5, 2, "dpm")
    path = save_grid(images, tmp_path / "grid" / "g.png")
    assert images.shape == (5, 3, 32, 32) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="guidance=2.0 needs a conditioned model"):
        sample(model, 2, 2, guidance=2.0)
    with pytest.raises(ValueError, match="labels must be None"):
        sample(model, 2, 2, labels=[0, 1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheduler="dpn"), "unknown scheduler 'dpn'. Did you mean: dpm"),
    (dict(steps=0), "steps must be a positive int, got steps=0"),
    (dict(labels=[0, 1, 2]), r"labels must have shape \[2\]"),
])
def test_sample_errors(unet, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(unet, **{"n": 2, "steps": 2, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(prediction="sample"), "unknown prediction 'sample'"),
    (dict(beta_schedule="cosin"), "Did you mean: cosine"),
    (dict(cond_dropout=1.5), "cond_dropout must be in"),
])
def test_task_option_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_task("diffusion", **kwargs)


class Unlabelled(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"image": torch.zeros(3, 32, 32)}


def test_check_data_errors(unet):
    task = create_task("diffusion")
    with pytest.raises(ValueError, match=r"images have shape .* \(3, 64, 64\) but the model's sample_shape is \(3, 32, 32\)"):
        task.check_data(unet, create_dataset("shapes", "val", image_size=64, num_examples=2))
    with pytest.raises(ValueError, match="class-conditioned but the dataset's items have no 'label'"):
        task.check_data(unet, Unlabelled())
    with pytest.raises(ValueError, match="the dataset has 6 classes but unet-tiny has room for 4"):
        task.check_data(create_model("unet-tiny", num_class_embeds=5), create_dataset("shapes", "val", num_examples=2))
    with pytest.raises(ValueError, match="needs a diffusion model"):
        task.check_data(create_model("vit-tiny", num_classes=6), Unlabelled())


def test_train_then_sample_cli(tmp_path, capsys):
    out_dir = tmp_path / "run"
    main(["train", str(ROOT / "configs/diffusion/tiny-shapes.yaml"), "train.steps=3", "train.batch_size=4",
          "train.eval_every=3", "train.eval_batches=1", "train.progress=false", "train.device=cpu",
          "task.prediction=v_prediction", f"out_dir={out_dir}"])
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    main(["sample", str(out_dir), "--n", "4", "--steps", "2", "--scheduler", "dpm", "--guidance", "2.0",
          "--out", str(grid), "--device", "cpu"])
    assert str(grid) in capsys.readouterr().out
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(out_dir), "--scheduler", "ddmi"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown scheduler 'ddmi'. Did you mean:" in err and "ddim" in err
