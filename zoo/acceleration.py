"""Training-free acceleration of the zoo's diffusers U-Nets (:class:`zoo.models.diffusion.DiffusionUNet`).

- :func:`deepcache` (DeepCache, Ma et al. 2024): every ``interval``-th denoising step runs the whole U-Net and
  caches the input of the up pair at skip branch ``branch``; the steps between run only the down pairs up to
  that branch and the up path from it, reusing the cached deep features.
- :func:`tome_sd` (ToMe for Stable Diffusion, Bolya & Hoffman 2023): in transformer blocks and plain
  self-attention layers at downsample factors ``<= max_downsample``, ``ratio`` of the tokens are merged into destination tokens (one per
  ``sy x sx`` cell of the feature map) before self-attention and copied back after it.

Both patch one model instance (never diffusers' classes), compose, and return an :class:`Acceleration`
handle: undo it with ``handle.remove()``, by using it as a context manager, or with :func:`remove`.
"""
from __future__ import annotations

import math
import types
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layers.token_reduction.base import gather_tokens
from zoo.models.diffusion import DiffusionUNet

class Acceleration:
    """A patch applied to ``model``; ``remove()`` (or leaving a ``with`` block) undoes it."""

    def __init__(self, model: DiffusionUNet):
        if not isinstance(model, DiffusionUNet):
            raise ValueError(f"model must be a zoo U-Net (DiffusionUNet), got {type(model).__name__}")
        if any(type(h) is type(self) for h in applied(model)):
            raise ValueError(f"{type(self).__name__} is already applied to {model.model_name}; remove it first")
        self.model = model

    def _register(self) -> None:
        self.model._accelerations = [*applied(self.model), self]

    def remove(self) -> None:
        if self in applied(self.model):
            self._undo()
            self.model._accelerations = [h for h in applied(self.model) if h is not self]

    def _undo(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self) -> "Acceleration":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def applied(model: DiffusionUNet) -> list[Acceleration]:
    """The accelerations applied to ``model``, in order."""
    return list(getattr(model, "_accelerations", []))


def remove(model: DiffusionUNet) -> None:
    """Undo every acceleration applied to ``model`` (latest first)."""
    for handle in reversed(applied(model)):
        handle.remove()


# --- DeepCache ----------------------------------------------------------------------------------------------


def _text_kwargs(block: torch.nn.Module, text: dict[str, Any]) -> dict[str, Any]:
    return text if getattr(block, "has_cross_attention", False) else {}


def _embedding(unet, sample: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
    """The time (plus class) embedding, as diffusers' ``UNet2DModel`` / ``UNet2DConditionModel`` forward."""
    from diffusers import UNet2DConditionModel

    if isinstance(unet, UNet2DConditionModel):
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
        return emb if unet.time_embed_act is None else unet.time_embed_act(emb)
    timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
    if unet.class_embedding is not None:
        emb = emb + unet.class_embedding(cond).to(dtype=unet.dtype)
    return emb


def _up(block, x: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, text: dict[str, Any]) -> torch.Tensor:
    """One up block, consuming its skip states from the end of ``skips``."""
    n = len(block.resnets)
    res, skips[-n:] = tuple(skips[-n:]), []
    return block(hidden_states=x, res_hidden_states_tuple=res, temb=emb, **_text_kwargs(block, text))


@contextmanager
def _pairs(block: nn.Module, start: int, stop: int, resample: bool):
    """Narrow a diffusers down/up block, for the duration, to its resnet(+attention) pairs ``[start, stop)``,
    with its down/upsamplers only when ``resample``: the block's own forward then runs just those (no copy)."""
    saved = {name: getattr(block, name) for name in ("resnets", "attentions", "downsamplers", "upsamplers")
             if getattr(block, name, None) is not None}
    try:
        for name in ("resnets", "attentions"):
            if name in saved:
                setattr(block, name, nn.ModuleList(saved[name][start:stop]))
        for name in ("downsamplers", "upsamplers"):
            if name in saved and not resample:
                setattr(block, name, None)
        yield block
    finally:
        for name, module in saved.items():
            setattr(block, name, module)


def unet_forward(unet, sample: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any], branch: int,
                 cached: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' U-Net forward split at skip branch ``branch``: returns (prediction, cached features).

    Branch ``b`` is the ``b``-th skip state of the down path, shallowest first, as DeepCache's
    ``cache_branch_id``: stage ``b // (pairs + 1)``, where ``pairs`` is the resnet(+attention) pairs per down
    stage; within the stage, ``b % (pairs + 1) == 0`` is the state entering it (conv_in's output for stage 0, the
    previous stage's downsampled output after) and ``j >= 1`` the output of its ``j``-th pair. The features are
    the input of the up pair that takes that skip state. Without ``cached`` the whole network runs. With it, only
    the down path up to the branch runs (for its skip states), then the up path from that up pair on, from
    ``cached``: branch 0 runs conv_in, the last up pair and conv_out. ``cond``: the U-Net's conditioning arguments
    (:meth:`zoo.models.diffusion.DiffusionUNet.unet_inputs`).
    """
    text = {k: v for k, v in cond.items() if k != "class_labels"}
    if text.get("encoder_attention_mask") is not None:  # a keep mask -> the additive bias, as diffusers' forward
        text["encoder_attention_mask"] = ((1 - text["encoder_attention_mask"].to(sample.dtype)) * -10000.0).unsqueeze(1)
    pairs = len(unet.down_blocks[0].resnets)
    stage, done = divmod(branch, pairs + 1)  # `done`: the stage's pairs that produce skips up to the branch
    up_stage = len(unet.up_blocks) - 1 - stage
    entry = pairs - done  # the up pair that takes the branch's skip state
    emb = _embedding(unet, sample, timesteps, cond.get("class_labels"))
    x = unet.conv_in(sample)
    skips = [x]

    def down(block):
        nonlocal x
        x, states = block(hidden_states=x, temb=emb, **_text_kwargs(block, text))
        skips.extend(states)

    if cached is None:
        for block in unet.down_blocks:
            down(block)
        if unet.mid_block is not None:
            x = unet.mid_block(x, emb, **_text_kwargs(unet.mid_block, text))
        for block in unet.up_blocks[:up_stage]:
            x = _up(block, x, skips, emb, text)
        with _pairs(unet.up_blocks[up_stage], 0, entry, resample=False) as block:
            x = features = _up(block, x, skips, emb, text) if entry else x
    else:
        for block in unet.down_blocks[:stage]:
            down(block)
        if done:
            with _pairs(unet.down_blocks[stage], 0, done, resample=False) as block:
                down(block)
        x = features = cached
    with _pairs(unet.up_blocks[up_stage], entry, pairs + 1, resample=True) as block:
        x = _up(block, x, skips, emb, text)
    for block in unet.up_blocks[up_stage + 1:]:
        x = _up(block, x, skips, emb, text)
    if unet.conv_norm_out is not None:
        x = unet.conv_act(unet.conv_norm_out(x))
    return unet.conv_out(x), features


class DeepCache(Acceleration):
    """DeepCache on a zoo U-Net (see :func:`deepcache`); ``calls`` counts model calls since the last full step."""

    def __init__(self, model: DiffusionUNet, interval: int, branch: int):
        super().__init__(model)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got interval={interval!r}")
        pairs = [len(block.resnets) for block in model.unet.down_blocks]
        if len(set(pairs)) != 1:
            raise ValueError(f"deepcache needs the same number of resnets in every down block, got {pairs}")
        branches = len(pairs) * (pairs[0] + 1)
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < branches:
            raise ValueError(f"branch must be an int in [0, {branches - 1}] (one per skip state of the down path: each "
                             f"stage's input and its {pairs[0]} resnet pairs' outputs), got branch={branch!r}")
        if any(hasattr(b, "skip_conv") for b in (*model.unet.down_blocks, *model.unet.up_blocks)):
            raise ValueError("deepcache does not support diffusers' skip blocks (AttnSkipDownBlock2D, ...)")
        self.interval, self.branch = interval, branch
        self.reset()
        model.predict = self._predict  # shadows DiffusionUNet.predict on this instance
        self._register()

    def reset(self) -> None:
        """Forget the cache: the next call runs the full U-Net."""
        self.features: torch.Tensor | None = None
        self.last_timestep: torch.Tensor | None = None
        self.calls = 0

    def _predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        # a timestep above the last one starts a new trajectory; a new batch shape cannot use the cache
        new_trajectory = self.last_timestep is not None and bool((timesteps > self.last_timestep).any())
        if new_trajectory or (self.features is not None and self.features.shape[0] != sample.shape[0]):
            self.reset()
        self.last_timestep = timesteps
        full = self.calls % self.interval == 0
        self.calls += 1
        out, features = unet_forward(self.model.unet, sample, timesteps, self.model.unet_inputs(cond, sample.dtype), self.branch,
                                     cached=None if full else self.features)
        self.features = features
        return out

    def _undo(self) -> None:
        del self.model.predict
        self.reset()


def deepcache(model: DiffusionUNet, interval: int = 3, branch: int = 0) -> DeepCache:
    """Apply DeepCache: model call ``k`` runs the full U-Net when ``k % interval == 0`` (caching the input of the
    up pair that takes skip branch ``branch``), otherwise only the down path up to that branch and the up path
    from it, on the cached features. Branches number the down path's skip states, shallowest first, as
    DeepCache's ``cache_branch_id`` (see :func:`unet_forward`): branch 0 (DeepCache's default) is conv_in's
    output, so a cached step runs conv_in, the last up pair and conv_out; on SD's U-Net (2 pairs a stage) branch
    ``b`` is pair ``b % 3 - 1`` of stage ``b // 3``, or the stage's input where ``b % 3 == 0``.
    The call count restarts when the timestep rises (a new sampling run) or the batch size changes.
    ``interval=1`` reproduces the model exactly. Use as ``with deepcache(model, 3): sample(model, ...)``."""
    return DeepCache(model, interval, branch)


# --- ToMe for Stable Diffusion ------------------------------------------------------------------------------


class GridMatching:
    """Bipartite soft matching with destinations one per ``sy x sx`` cell of an ``h x w`` token grid: the ``r``
    source tokens most similar (cosine) to a destination are averaged into it; ``unmerge`` copies merged values
    back to every original position."""

    def __init__(self, metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int, use_rand: bool):
        B, N, _ = metric.shape
        cells_h, cells_w = h // sy, w // sx
        device = metric.device
        if use_rand:
            pick = torch.randint(sy * sx, (cells_h, cells_w, 1), device=device)
        else:
            pick = torch.zeros(cells_h, cells_w, 1, dtype=torch.long, device=device)
        # -1 marks each cell's destination; the grid's remainder rows / columns are all sources
        is_dst = torch.zeros(cells_h, cells_w, sy * sx, dtype=torch.long, device=device).scatter_(2, pick, -1)
        is_dst = is_dst.view(cells_h, cells_w, sy, sx).transpose(1, 2).reshape(cells_h * sy, cells_w * sx)
        grid = torch.zeros(h, w, dtype=torch.long, device=device)
        grid[:cells_h * sy, :cells_w * sx] = is_dst
        order = grid.reshape(1, -1).argsort(dim=1, stable=True).expand(B, -1)  # destinations first
        num_dst = cells_h * cells_w
        self.dst_pos, self.src_pos = order[:, :num_dst], order[:, num_dst:]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = gather_tokens(metric, self.src_pos) @ gather_tokens(metric, self.dst_pos).transpose(1, 2)
        best, best_dst = scores.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)
        self.r = min(r, ranked.shape[1])
        self.merged, self.kept = ranked[:, :self.r], ranked[:, self.r:]  # indices into the sources
        self.merged_dst = best_dst.gather(1, self.merged)
        self.num_tokens = N

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C] -> [B, N - r, C]``: kept sources, then destinations averaged with their merged sources."""
        src, dst = gather_tokens(x, self.src_pos), gather_tokens(x, self.dst_pos)
        index = self.merged_dst[..., None].expand(-1, -1, x.shape[-1])
        dst = dst.scatter_reduce(1, index, gather_tokens(src, self.merged), reduce="mean")
        return torch.cat([gather_tokens(src, self.kept), dst], dim=1)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N - r, C] -> [B, N, C]``: each merged source takes its destination's value."""
        kept, dst = x[:, :self.kept.shape[1]], x[:, self.kept.shape[1]:]
        out = x.new_empty(x.shape[0], self.num_tokens, x.shape[-1])

        def put(positions: torch.Tensor, values: torch.Tensor) -> None:
            out.scatter_(1, positions[..., None].expand(-1, -1, x.shape[-1]), values)

        put(self.dst_pos, dst)
        put(self.src_pos.gather(1, self.kept), kept)
        put(self.src_pos.gather(1, self.merged), gather_tokens(dst, self.merged_dst))
        return out


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _tome_block_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        encoder_hidden_states: torch.Tensor | None = None,
                        encoder_attention_mask: torch.Tensor | None = None, timestep: Any = None,
                        cross_attention_kwargs: dict[str, Any] | None = None, class_labels: Any = None,
                        added_cond_kwargs: Any = None) -> torch.Tensor:
    """diffusers' ``BasicTransformerBlock.forward`` (layer-norm blocks, as in Stable Diffusion) with ToMe-SD:
    tokens merged before self-attention (and cross-attention / MLP when enabled) and unmerged after."""
    tome = self._tome
    merge_attn = merge_cross = merge_mlp = unmerge_attn = unmerge_cross = unmerge_mlp = _identity
    m = tome.matching(hidden_states)
    if m is not None:
        merge_attn, unmerge_attn = m.merge, m.unmerge
        if tome.merge_crossattn:
            merge_cross, unmerge_cross = m.merge, m.unmerge
        if tome.merge_mlp:
            merge_mlp, unmerge_mlp = m.merge, m.unmerge
    kwargs = cross_attention_kwargs or {}
    attn = self.attn1(merge_attn(self.norm1(hidden_states)),
                      encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                      attention_mask=attention_mask, **kwargs)
    hidden_states = unmerge_attn(attn) + hidden_states
    if self.attn2 is not None:
        attn = self.attn2(merge_cross(self.norm2(hidden_states)), encoder_hidden_states=encoder_hidden_states,
                          attention_mask=encoder_attention_mask, **kwargs)
        hidden_states = unmerge_cross(attn) + hidden_states
    return unmerge_mlp(self.ff(merge_mlp(self.norm3(hidden_states)))) + hidden_states


class ToMeAttnProcessor:
    """Self-attention of a diffusers ``Attention`` layer over a feature map (``AttnDownBlock2D``, ``UNetMidBlock2D``,
    ... in pixel U-Nets) with ToMe-SD: the group-normed tokens merge before q, k, v and the output is copied back
    before the residual; otherwise the math of diffusers' ``AttnProcessor2_0``. Calls it cannot merge (text or
    masks, no match at this resolution) go to the layer's previous processor."""

    def __init__(self, tome: "ToMeSD", previous: Any):
        self.tome, self.previous = tome, previous

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        plain = (hidden_states.dim() == 4 and encoder_hidden_states is None and attention_mask is None
                 and attn.spatial_norm is None and attn.norm_q is None and attn.norm_k is None)
        tokens = hidden_states.flatten(2).transpose(1, 2) if plain else None  # [B, C, H, W] -> [B, H * W, C]
        m = self.tome.matching(tokens) if plain else None
        if m is None:
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        tokens = m.merge(tokens)
        B, C, H, W = hidden_states.shape
        head_dim = attn.to_q.out_features // attn.heads
        q, k, v = (proj(tokens).view(B, -1, attn.heads, head_dim).transpose(1, 2)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, attn.heads * head_dim)
        out = m.unmerge(attn.to_out[1](attn.to_out[0](out))).transpose(1, 2).reshape(B, C, H, W)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class ToMeSD(Acceleration):
    """ToMe-SD on a zoo U-Net's transformer blocks and plain self-attention layers (see :func:`tome_sd`)."""

    def __init__(self, model: DiffusionUNet, ratio: float, max_downsample: int, sx: int, sy: int, use_rand: bool,
                 merge_crossattn: bool, merge_mlp: bool):
        super().__init__(model)
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.attention_processor import Attention

        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got ratio={ratio!r}")
        for name, value in (("max_downsample", max_downsample), ("sx", sx), ("sy", sy)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
        self.blocks = [m for m in model.unet.modules() if isinstance(m, BasicTransformerBlock)]
        in_blocks = {id(a) for b in self.blocks for a in (b.attn1, b.attn2) if a is not None}
        self.attentions = [m for m in model.unet.modules()
                           if isinstance(m, Attention) and id(m) not in in_blocks and not m.is_cross_attention]
        if not self.blocks and not self.attentions:
            raise ValueError(f"tome_sd needs self-attention (transformer blocks or attention layers); "
                             f"{model.model_name} has none")
        unsupported = {b.norm_type for b in self.blocks} - {"layer_norm"}
        if unsupported or any(b.pos_embed is not None or b._chunk_size is not None for b in self.blocks):
            raise ValueError("tome_sd supports Stable Diffusion's transformer blocks (layer norms, no positional "
                             f"embedding, no feed-forward chunking); got norm types {sorted(unsupported)}")
        self.ratio, self.max_downsample, self.sx, self.sy, self.use_rand = ratio, max_downsample, sx, sy, use_rand
        self.merge_crossattn, self.merge_mlp = merge_crossattn, merge_mlp
        self.sample_hw = model.sample_shape[1:]
        for block in self.blocks:
            block._tome = self
            block.forward = types.MethodType(_tome_block_forward, block)
        self.previous_processors = [a.processor for a in self.attentions]
        for attention in self.attentions:
            attention.set_processor(ToMeAttnProcessor(self, attention.processor))
        self._register()

    def matching(self, tokens: torch.Tensor) -> GridMatching | None:
        """The merge of ``tokens`` [B, N, C] of a feature map downsampled ``<= max_downsample`` times from the
        sample, or None where nothing merges."""
        H, W = self.sample_hw
        downsample = math.ceil(math.sqrt(H * W / tokens.shape[1]))
        r = int(tokens.shape[1] * self.ratio)
        if downsample > self.max_downsample or r == 0:
            return None
        return GridMatching(tokens, math.ceil(H / downsample), math.ceil(W / downsample), self.sx, self.sy, r,
                            self.use_rand)

    def _undo(self) -> None:
        for block in self.blocks:
            del block.forward, block._tome
        for attention, processor in zip(self.attentions, self.previous_processors):
            attention.set_processor(processor)


def tome_sd(model: DiffusionUNet, ratio: float = 0.5, max_downsample: int = 1, sx: int = 2, sy: int = 2,
            use_rand: bool = True, merge_crossattn: bool = False, merge_mlp: bool = False) -> ToMeSD:
    """Apply ToMe-SD to ``model``'s transformer blocks and plain self-attention layers (pixel U-Nets) whose token
    grid is downsampled ``<= max_downsample`` times from the sample: ``ratio`` of the tokens merge before
    self-attention (and, in transformer blocks if enabled, cross-attention and the MLP) and are copied back after. Destinations are one token per ``sy x sx`` cell, random
    (``use_rand``, from torch's global generator) or the cell's first. ``ratio=0`` reproduces the model exactly."""
    return ToMeSD(model, ratio, max_downsample, sx, sy, use_rand, merge_crossattn, merge_mlp)
