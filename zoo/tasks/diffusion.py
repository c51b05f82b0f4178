"""Denoising diffusion training (DDPM, Ho et al. 2020): noise the images with diffusers' ``DDPMScheduler`` at a
uniform random timestep and regress the noise (``epsilon``) or the velocity (``v_prediction``, Salimans & Ho 2022)
with an MSE. Class-conditioned models see the batch labels, dropped to ``model.null_class`` with probability
``cond_dropout`` for classifier-free guidance (Ho & Salimans 2022); caption-conditioned ones the batch captions,
dropped to the empty caption.

The model works in pixel space, or with ``vae`` (a local diffusers ``AutoencoderKL`` folder) on the VAE's scaled
latents (latent diffusion, Rombach et al. 2022). With a teacher (:meth:`Diffusion.set_teacher`), training adds
BK-SDM's output- and feature-level distillation; evaluation reports the task's loss alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from layers.registry import close_matches
from zoo.data.images import IMAGENET_MEAN, IMAGENET_STD, SHAPES_MEAN, SHAPES_STD
from zoo.models.diffusion import CAPTIONS, DiffusionBackbone
from zoo.tasks.base import Task, register_task

# the task's beta schedule names -> diffusers' ``beta_schedule``
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = ("epsilon", "v_prediction")
# per-channel (mean, std) the dataset normalised its images with; "none": images already in [0, 1]
NORMALIZATIONS = {
    "shapes": (SHAPES_MEAN, SHAPES_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
EVAL_SEED = 0  # evaluation draws its noise and timesteps from this seed: comparable val losses across steps


def _check_choice(option: str, value: str, choices) -> None:
    if value not in choices:
        matches = close_matches(value, choices)
        hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
        raise ValueError(f"unknown {option} {value!r}.{hint} Choices: {', '.join(choices)}")


@register_task("diffusion")
class Diffusion(Task):
    """MSE between the model's prediction (the first ``C`` output channels: DiT's learned-sigma half is left out)
    and the target for images mapped to [-1, 1]. Metrics: ``loss``, ``count`` (images)."""

    def __init__(self, prediction: str = "epsilon", beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                 cond_dropout: float = 0.1, normalization: str = "shapes", vae: str | None = None,
                 vae_scaling_factor: float | None = None):
        _check_choice("prediction", prediction, PREDICTIONS)
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        _check_choice("normalization", normalization, NORMALIZATIONS)
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {cond_dropout}")
        from diffusers import DDPMScheduler  # imported here: diffusers is slow to import

        self.prediction, self.cond_dropout = prediction, cond_dropout
        self.noise_config = {"num_train_timesteps": num_train_timesteps, "beta_schedule": BETA_SCHEDULES[beta_schedule],
                             "prediction_type": prediction}
        self.scheduler = DDPMScheduler(**self.noise_config)
        self.distillation = None
        if vae_scaling_factor is not None and (vae is None or not vae_scaling_factor > 0):
            raise ValueError(f"vae_scaling_factor={vae_scaling_factor!r} needs a vae and must be > 0")
        self.vae = None if vae is None else load_vae(vae)
        self.latent_scale = None
        if self.vae is not None:
            self.latent_scale = vae_scaling_factor or self.vae.config.scaling_factor
            self.vae_downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        mean, std = NORMALIZATIONS[normalization]
        self.mean, self.std = (torch.tensor(np.asarray(v, dtype=np.float32))[:, None, None] for v in (mean, std))

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Dataset-normalised images -> pixels in [-1, 1]."""
        return 2 * (images * self.std.to(images.device) + self.mean.to(images.device)) - 1

    def _vae_on(self, device: torch.device):
        if next(self.vae.parameters()).device != device:
            self.vae.to(device)
        return self.vae

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> what the model denoises: the pixels themselves, or a draw from the VAE's latent
        distribution times the scaling factor."""
        if self.vae is None:
            return pixels
        vae = self._vae_on(pixels.device)
        return vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator).float() * self.latent_scale

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """The model's samples -> pixels in [-1, 1] (through the VAE's decoder when there is one)."""
        if self.vae is None:
            return samples
        vae = self._vae_on(samples.device)
        return vae.decode((samples / self.latent_scale).to(vae.dtype)).sample.float()

    def condition(self, model, batch: dict[str, Any]) -> Any:
        """The model's ``cond`` for ``batch``: its captions or labels (dropped at ``cond_dropout`` while training);
        None for an unconditional model."""
        if model.cond_kind is None:
            return None
        if model.cond_kind == CAPTIONS:
            return self.drop_captions(batch["caption"]) if model.training else list(batch["caption"])
        return self.drop_labels(batch["label"], model.null_class) if model.training else batch["label"]

    def drop_captions(self, captions: list[str]) -> list[str]:
        """Each caption replaced by the empty caption with probability ``cond_dropout``."""
        drop = (torch.rand(len(captions)) < self.cond_dropout).tolist()
        return ["" if d else c for c, d in zip(captions, drop)]

    def drop_labels(self, labels: torch.Tensor, null_class: int) -> torch.Tensor:
        """Each label replaced by ``null_class`` with probability ``cond_dropout``."""
        drop = torch.rand(labels.shape, device=labels.device) < self.cond_dropout
        return torch.where(drop, torch.full_like(labels, null_class), labels)

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model regresses: the noise, or ``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0``."""
        if self.prediction == "epsilon":
            return noise
        return self.scheduler.get_velocity(clean, noise, timesteps)

    def objective(self, model, batch, with_metrics=True):
        pixels = self.to_model_space(batch["image"])
        # training draws from the global RNG (seeded and checkpointed by the trainer); evaluation from a fixed seed
        generator = None if model.training else torch.Generator(pixels.device).manual_seed(EVAL_SEED)
        clean = self.encode(pixels, generator)
        noise = torch.randn(clean.shape, device=clean.device, generator=generator)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device,
                                  generator=generator)
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        cond = self.condition(model, batch)
        distill = self.distillation if model.training else None
        if distill is None:
            prediction = model(noisy, timesteps, cond)[:, : clean.shape[1]]
        else:
            with distill.student_features(model) as features:
                prediction = model(noisy, timesteps, cond)[:, : clean.shape[1]]
        loss = F.mse_loss(prediction.float(), self.target(clean, noise, timesteps).float())
        metrics = {"loss": loss.detach(), "count": clean.shape[0]} if with_metrics else {}
        if distill is not None:
            output, feature = distill.losses(noisy, timesteps, cond, prediction, features)
            loss = distill.task_weight * loss + distill.output_weight * output + distill.feature_weight * feature
            if with_metrics:
                metrics.update(distill_output=output.detach(), distill_features=feature.detach())
        return loss, metrics

    def set_teacher(self, student, teacher, init: bool = False, output_weight: float = 1.0,
                    feature_weight: float = 1.0, task_weight: float = 1.0) -> None:
        """Distil ``teacher`` (frozen) into ``student`` during training: the loss becomes ``task_weight * MSE
        + output_weight * output KD + feature_weight * feature KD`` (``zoo.diffusion.Distillation``). ``init``
        first copies the teacher's kept blocks into a block-removed student U-Net (``init_from_teacher``)."""
        from zoo.diffusion import Distillation, init_from_teacher

        if init:
            init_from_teacher(student, teacher)
        self.distillation = Distillation(student, teacher, output_weight, feature_weight, task_weight)

    def check_data(self, model, dataset):
        if not isinstance(model, DiffusionBackbone):
            raise ValueError(f"the diffusion task needs a diffusion model (unet, dit, uvit), got {type(model).__name__}")
        if model.cond_kind not in (None, CAPTIONS) and model.null_class is None:
            raise ValueError(f"{model.model_name} is conditioned on {model.cond_kind}; the diffusion task supports "
                             "caption- and class-conditioned and unconditional models only")
        item = dataset[0]
        shape = tuple(item["image"].shape)
        if self.vae is not None:
            channels, height, width = shape
            if channels != self.vae.config.in_channels:
                raise ValueError(f"the dataset's images have {channels} channels but the VAE takes "
                                 f"{self.vae.config.in_channels}")
            f = self.vae_downsample
            if height % f or width % f:
                raise ValueError(f"the dataset's images ({height}x{width}) must be divisible by the VAE's "
                                 f"downsampling factor {f}")
            latent = (self.vae.config.latent_channels, height // f, width // f)
            if latent != tuple(model.sample_shape):
                raise ValueError(f"the VAE turns the dataset's {shape} images into latents of shape {latent} but the "
                                 f"model's sample_shape is {tuple(model.sample_shape)}")
        elif shape != tuple(model.sample_shape):
            raise ValueError(f"the dataset's images have shape (channels, height, width) {shape} but the model's "
                             f"sample_shape is {tuple(model.sample_shape)}")
        if model.cond_kind is None:
            return
        if model.cond_kind == CAPTIONS:
            if not isinstance(item.get("caption"), str):
                raise ValueError(f"{model.model_name} is caption-conditioned but the dataset's items have no 'caption' string")
            return
        if "label" not in item:
            raise ValueError(f"{model.model_name} is class-conditioned but the dataset's items have no 'label'")
        classes = getattr(dataset, "num_classes", None)
        if classes is not None and classes > model.null_class:
            raise ValueError(f"the dataset has {classes} classes but {model.model_name} has room for {model.null_class} "
                             f"(label {model.null_class} is the null class)")


def load_vae(path: str):
    """A frozen diffusers ``AutoencoderKL`` from a local folder (config.json + safetensors weights; pickled
    ``.bin`` weights are refused, never unpickled)."""
    from diffusers import AutoencoderKL

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"vae={path!r} is not a diffusers AutoencoderKL folder (no config.json there)")
    try:
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                            low_cpu_mem_usage=False)
    except (OSError, EnvironmentError) as e:
        raise ValueError(f"vae={path!r}: could not load safetensors weights ({e}); only safetensors are read") from None
    return vae.eval().requires_grad_(False)
