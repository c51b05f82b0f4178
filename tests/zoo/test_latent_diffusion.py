"""Latent diffusion: the diffusion task with a local diffusers AutoencoderKL (``task.vae``): the model denoises scaled
latents, sampling decodes them, shapes are checked against the VAE, only safetensors are read, and ``zoo train`` /
``zoo sample`` run end to end."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from zoo.cli import main
from zoo.data import create_dataset
from zoo.registry import create_model
from zoo.sampling import sample
from zoo.tasks import create_task

LATENT_UNET = dict(in_channels=4, out_channels=4, sample_size=16, num_class_embeds=7)  # 32x32 images, VAE factor 2


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL (downsampling 2, 4 latent channels) saved as diffusers saves one."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=32)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shapes():
    return create_dataset("shapes", "train", image_size=32, num_examples=8)


def test_the_model_denoises_scaled_latents(vae_dir, shapes):
    task = create_task("diffusion", vae=str(vae_dir))
    model = create_model("unet-tiny", **LATENT_UNET)
    task.check_data(model, shapes)
    batch = default_collate([shapes[i] for i in range(4)])
    pixels = task.to_model_space(batch["image"])
    generator = torch.Generator().manual_seed(0)
    latents = task.encode(pixels, generator)
    expected = task.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0)) * task.vae.config.scaling_factor
    assert latents.shape == (4, 4, 16, 16) and torch.allclose(latents, expected)
    loss, metrics = task.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and metrics["count"] == 4
    assert all(p.grad is None for p in task.vae.parameters())  # the VAE stays frozen
    images = sample(model, 2, 2, generator=torch.Generator().manual_seed(0), task=task)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1 and images.std() > 0


def test_scaling_factor_override(vae_dir):
    task = create_task("diffusion", vae=str(vae_dir), vae_scaling_factor=0.5)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = task.encode(pixels, torch.Generator().manual_seed(1))
    raw = task.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(latents, raw * 0.5)
    torch.testing.assert_close(task.decode(latents), task.vae.decode(raw).sample)


def test_shape_and_file_errors(vae_dir, shapes, tmp_path):
    task = create_task("diffusion", vae=str(vae_dir))
    with pytest.raises(ValueError, match=r"latents of shape \(4, 16, 16\) but the model's sample_shape is \(3, 32, 32\)"):
        task.check_data(create_model("unet-tiny", num_class_embeds=7), shapes)
    with pytest.raises(ValueError, match="must be divisible by the VAE's downsampling factor 2"):
        task.check_data(create_model("unet-tiny", **LATENT_UNET), [{"image": torch.rand(3, 33, 33), "label": 0}])
    with pytest.raises(ValueError, match="the dataset's images have 1 channels but the VAE takes 3"):
        task.check_data(create_model("unet-tiny", **LATENT_UNET), [{"image": torch.rand(1, 32, 32), "label": 0}])
    for bad in ({"vae_scaling_factor": 0.5}, {"vae": str(vae_dir), "vae_scaling_factor": 0.0}):
        with pytest.raises(ValueError, match="vae_scaling_factor=.* needs a vae and must be > 0"):
            create_task("diffusion", **bad)
    with pytest.raises(FileNotFoundError, match="not a diffusers AutoencoderKL folder"):
        create_task("diffusion", vae=str(tmp_path / "missing"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((vae_dir / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="only safetensors are read"):
        create_task("diffusion", vae=str(pickled))


def test_train_and_sample_a_latent_model(vae_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: {name: unet-tiny, in_channels: 4, out_channels: 4, sample_size: 16, num_class_embeds: 7}\n"
                      f"data: {{name: shapes, image_size: 32, num_examples: 16}}\ntask: {{name: diffusion, vae: '{vae_dir}'}}\n")
    out_dir = tmp_path / "run"
    main(["train", str(config), "train.steps=2", "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1",
          "train.progress=false", "train.device=cpu", f"out_dir={out_dir}"])
    grid = tmp_path / "grid.png"
    main(["sample", str(out_dir), "--n", "4", "--steps", "2", "--out", str(grid), "--device", "cpu"])
    capsys.readouterr()
    from PIL import Image

    assert Image.open(grid).size == (2 * 32 + 3, 2 * 32 + 3)  # a 2x2 grid of decoded 32x32 images, 1-pixel padding
