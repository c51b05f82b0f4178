"""Pictures of what a model does: :func:`merged_tokens` shows which patches ToMe merged into one token."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from layers.token_reduction import ToMe

DISPLAY_SIZE = 256  # pixels a side the drawn images are enlarged to (at least)


def token_groups(image: torch.Tensor, model, r: int | None = None) -> torch.Tensor:
    """Run a zoo ViT on ``image`` [3, H, W] with ToMe tracking sources; returns [H/p, W/p] (p: patch size),
    for each patch the index of the final token it was merged into. ``r``: None uses the model's own ToMe
    (its ``token_reduction`` must be ``tome``); an int applies ToMe with that ``r`` to the same weights."""
    config = getattr(model, "config", None)
    if not hasattr(config, "patch_size") or not hasattr(model, "token_reduction"):
        raise TypeError(f"model must be a zoo ViT, got {type(model).__name__}")
    c, s = config.in_chans, config.img_size
    if image.dim() != 3 or tuple(image.shape) != (c, s, s):
        raise ValueError(f"image must have shape [{c}, {s}, {s}], got {tuple(image.shape)}")
    own = model.token_reduction
    if r is None and not isinstance(own, ToMe):
        raise ValueError(f"model has token_reduction {config.token_reduction}, not ToMe: pass r= to apply ToMe")
    tome = ToMe(depth=config.depth, r=r, track_source=True) if r is not None else own
    tracked, was_training = tome.track_source, model.training
    tome.track_source = True
    model.token_reduction = tome
    try:
        model.eval()
        with torch.no_grad():
            model(image[None].to(next(model.parameters()).device))
        source = tome.last_tokens.source[0]  # [tokens, 1 + patches], CLS first
    finally:
        tome.track_source = tracked
        model.token_reduction = own
        model.train(was_training)
    side = s // config.patch_size
    return source[:, 1:].argmax(dim=0).reshape(side, side).cpu()


def merged_tokens(image: torch.Tensor, model, path: str | os.PathLike, r: int | None = None) -> Path:
    """Save a PNG of ``image`` beside it with every patch painted the mean colour of the ToMe token it ended in,
    group boundaries drawn in white (see :func:`token_groups` for ``model`` and ``r``); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = token_groups(image, model, r)
    pixels = image.detach().float().cpu()
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp(min=1e-8)  # [C, H, W] in [0, 1]
    scale = max(1, DISPLAY_SIZE // pixels.shape[-1])  # small images are enlarged so boundaries stay thin
    pixels = F.interpolate(pixels[None], scale_factor=scale, mode="nearest")[0].permute(1, 2, 0)
    labels = F.interpolate(groups[None, None].float(), size=pixels.shape[:2], mode="nearest")[0, 0].long()
    flat = labels.flatten()
    count = torch.zeros(int(flat.max()) + 1).index_add_(0, flat, torch.ones(len(flat)))
    mean = torch.zeros(len(count), pixels.shape[-1]).index_add_(0, flat, pixels.reshape(len(flat), -1)) / count.clamp(min=1)[:, None]
    painted = mean[labels]
    edge = torch.zeros_like(labels, dtype=torch.bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    painted[edge] = 1.0
    shown = pixels if pixels.shape[-1] == 3 else pixels.mean(dim=-1, keepdim=True).expand(-1, -1, 3)
    painted = painted if painted.shape[-1] == 3 else painted.mean(dim=-1, keepdim=True).expand(-1, -1, 3)

    fig = Figure(figsize=(6, 3.2))
    FigureCanvasAgg(fig)
    for ax, picture, title in zip(fig.subplots(1, 2), (shown, painted), ("image", f"{len(groups.unique())} tokens")):
        ax.imshow(picture.numpy(), interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
