"""Image sampling from diffusion models with diffusers' schedulers, with classifier-free guidance.

The sampling scheduler shares the training noise schedule (timesteps, betas, prediction type) of the
:class:`~zoo.tasks.diffusion.Diffusion` task the model was trained with.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from layers.registry import close_matches
from zoo.models.diffusion import CAPTIONS, CLASS_LABELS, DiffusionBackbone
from zoo.tasks.diffusion import Diffusion

# scheduler name -> diffusers class name (imported on use: diffusers is slow to import)
SCHEDULERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "ddpm": "DDPMScheduler"}


def make_scheduler(name: str, task: Diffusion):
    """The diffusers scheduler ``name`` on ``task``'s noise schedule; ValueError with close matches if unknown."""
    if name not in SCHEDULERS:
        matches = close_matches(name, SCHEDULERS)
        hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
        raise ValueError(f"unknown scheduler {name!r}.{hint} Schedulers: {', '.join(SCHEDULERS)}")
    import diffusers

    return getattr(diffusers, SCHEDULERS[name])(**task.noise_config)


def _captions(model: DiffusionBackbone, n: int, captions: Any) -> list[str] | None:
    """The captions of ``n`` samples (given, for a caption-conditioned model), else None."""
    if model.cond_kind != CAPTIONS:
        if captions is not None:
            raise ValueError(f"captions must be None: {model.model_name} is conditioned on {model.cond_kind or 'nothing'}")
        return None
    if captions is None:
        raise ValueError(f"captions are needed: {model.model_name} is caption-conditioned (one string per sample)")
    if isinstance(captions, str) or len(captions) != n or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"captions must be a list of {n} strings (one per sample), got {captions!r:.80}")
    return list(captions)


def _labels(model: DiffusionBackbone, n: int, labels: Any, device: torch.device) -> torch.Tensor | None:
    """The class labels of ``n`` samples: given, or cycling through the model's classes; None when unconditional."""
    if model.cond_kind != CLASS_LABELS:
        if labels is not None:
            raise ValueError(f"labels must be None: {model.model_name} is not class-conditioned")
        return None
    if labels is None:
        return torch.arange(n, device=device) % model.null_class
    labels = torch.as_tensor(labels, device=device)
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape [{n}] (one per sample), got {tuple(labels.shape)}")
    return labels


@torch.no_grad()
def sample(model: DiffusionBackbone, n: int, steps: int, scheduler: str = "ddim", guidance: float = 1.0,
           labels: Any = None, generator: torch.Generator | None = None, task: Diffusion | None = None,
           captions: Any = None) -> torch.Tensor:
    """``n`` images ``[n, C, H, W]`` in [0, 1] after ``steps`` denoising steps of ``scheduler`` (ddim, dpm, ddpm);
    a latent model's samples go through the task's VAE decoder.

    ``guidance`` > 1 mixes conditional and unconditional predictions (one batch of ``2n``):
    ``uncond + guidance * (cond - uncond)``; ``labels`` default to cycling through the classes; a
    caption-conditioned model needs ``captions`` (``n`` strings; the empty caption is its unconditional input).
    ``task`` is the training task (its noise schedule and prediction type), default ``Diffusion()``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got steps={steps!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got n={n!r}")
    task = task or Diffusion()
    noise_scheduler = make_scheduler(scheduler, task)
    device = next(model.parameters()).device
    texts, class_labels = _captions(model, n, captions), _labels(model, n, labels, device)
    cond = texts if texts is not None else class_labels
    guided = guidance != 1.0
    if guided and cond is None:
        raise ValueError(f"guidance={guidance} needs a conditioned model; {model.model_name} is unconditional")
    if guided:
        cond = texts + [""] * n if texts is not None else torch.cat([cond, torch.full_like(cond, model.null_class)])
    from diffusers.utils.torch_utils import randn_tensor

    was_training = model.training
    model.eval()
    noise_scheduler.set_timesteps(steps, device=device)
    x = randn_tensor((n, *model.sample_shape), generator=generator, device=device) * noise_scheduler.init_noise_sigma
    channels = model.sample_shape[0]
    for t in noise_scheduler.timesteps:
        model_input = noise_scheduler.scale_model_input(x, t)
        prediction = model(torch.cat([model_input] * 2) if guided else model_input, t, cond)[:, :channels]
        if guided:
            conditional, unconditional = prediction.chunk(2)
            prediction = unconditional + guidance * (conditional - unconditional)
        x = noise_scheduler.step(prediction, t, x, generator=generator).prev_sample
    model.train(was_training)
    return ((task.decode(x) + 1) / 2).clamp(0, 1)


def save_grid(images: torch.Tensor, path: str | Path) -> Path:
    """Write ``images`` ``[N, C, H, W]`` in [0, 1] as a PNG grid (about square); returns the path."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=math.ceil(math.sqrt(len(images))), padding=1)
    return path


def sample_checkpoint(path: str | Path, n: int, steps: int, scheduler: str = "ddim", guidance: float = 1.0,
                      out: str | Path | None = None, seed: int = 0, device: str = "auto", ema: bool | None = None,
                      captions: list[str] | None = None) -> Path:
    """Sample from the checkpoint at ``path`` (a run folder: its latest) with the run's noise schedule and write
    the grid to ``out`` (default: ``samples.png`` in ``path``).

    ``ema``: None (default) samples with the EMA weights when the checkpoint has them (they usually give better
    images), else the raw weights; True requires the EMA weights (ValueError if absent); False the raw weights.
    ``captions`` (caption-conditioned models) repeat in turn over the ``n`` samples; by default the first ``n``
    captions of the run's validation split.
    """
    from zoo.checkpoint import read_json
    from zoo.train import load_checkpoint_model, resolve_checkpoint
    from zoo.tasks import create_task
    from zoo.train import resolve_device

    folder = resolve_checkpoint(path)
    run = read_json(folder / "config.json").get("run", {})
    task_spec = run.get("task", {"name": "diffusion"})
    task = create_task(task_spec["name"], **{k: v for k, v in task_spec.items() if k != "name"})
    if not isinstance(task, Diffusion):
        raise ValueError(f"{folder} was trained with task {task_spec['name']!r}, not diffusion: it cannot be sampled")
    torch_device = resolve_device(device)
    model = load_checkpoint_model(folder, torch_device, ema)
    generator = torch.Generator(torch_device).manual_seed(seed)
    if model.cond_kind == CAPTIONS:
        captions = captions or validation_captions(run, n)
        captions = [captions[i % len(captions)] for i in range(n)]
    images = sample(model, n, steps, scheduler, guidance, generator=generator, task=task, captions=captions)
    return save_grid(images, out if out is not None else Path(path) / "samples.png")


def validation_captions(run: dict[str, Any], n: int) -> list[str]:
    """The first ``n`` captions of the validation split of ``run`` (a saved run config's ``run`` entry)."""
    from zoo.data import create_dataset

    data = dict(run.get("data") or {})
    if "name" not in data:
        raise ValueError("captions are needed: the checkpoint records no dataset to take validation captions from")
    val = create_dataset(data.pop("name"), "val", **data)
    return [val[i]["caption"] for i in range(min(n, len(val)))]
