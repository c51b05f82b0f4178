"""Attention backends of the diffusers U-Nets (``UNetConfig.attention_backend``): which diffusers processor every
attention layer carries, that SDPA and the explicit-softmax reference compute the same function, how ``"auto"``
resolves, the errors for xformers-less machines and unknown names, and that the backend survives a save/reload.
"""
from __future__ import annotations

from typing import get_args

import pytest
import torch

import zoo
import zoo.models.diffusion as diffusion
from zoo.acceleration import deepcache, tome_sd
from zoo.models.base import load_pretrained

# Stable Diffusion's layout (cross-attention at 32x32, plain 16x16 stage, cross-attention mid block), toy width
TINY_SD = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=32, cross_attention_dim=32,
               norm_num_groups=8)
MODELS = {"text": ("unet-sd15", TINY_SD), "class": ("unet-tiny", {})}
PROCESSORS = {"sdpa": "AttnProcessor2_0", "math": "AttnProcessor"}


def build(kind: str, **overrides):
    name, sizes = MODELS[kind]
    return zoo.create_model(name, **sizes, **overrides).eval()


def processors(model) -> list[str]:
    from diffusers.models.attention_processor import Attention

    return [type(m.processor).__name__ for m in model.modules() if isinstance(m, Attention)]


def random_inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.sample_shape, generator=g)
    t = torch.rand(batch, generator=g) * 999
    if model.config.cross_attention_dim is not None:
        cond = torch.randn(batch, 7, model.config.cross_attention_dim, generator=g)
    else:
        cond = torch.randint(0, model.config.num_class_embeds, (batch,), generator=g)
    return x, t, cond


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request):
    """(sdpa model, math model) with the same weights."""
    torch.manual_seed(0)
    sdpa = build(request.param, attention_backend="sdpa")
    math = build(request.param, attention_backend="math")
    math.load_state_dict(sdpa.state_dict())
    return sdpa, math


def test_backend_names_match_config_literal():
    assert set(get_args(diffusion.AttentionBackend)) == {"auto", *diffusion.ATTENTION_BACKENDS}


def test_processors_installed_on_every_attention_layer(pair):
    for model in pair:
        backend = model.config.attention_backend
        assert model.attention_backend == backend
        names = processors(model)
        assert names and names == [PROCESSORS[backend]] * len(names)
        assert [row["backend"] for row in model.layer_summary()] == [backend] * len(names)
        assert f"attention_backend={backend!r}" in repr(model).splitlines()[1]


def test_sdpa_and_math_agree(pair):
    sdpa, math = pair
    x, t, cond = random_inputs(sdpa)
    with torch.no_grad():
        a, b = sdpa(x, t, cond), math(x, t, cond)
    assert a.abs().mean() > 1e-3  # a real output, not a degenerate one
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_auto_resolves_to_sdpa_here():
    if diffusion.xformers_installed() and torch.cuda.is_available():
        pytest.skip("xformers and CUDA are available: auto picks xformers")
    model = build("class")
    assert model.config.attention_backend == "auto"  # the config keeps "auto"; the model records the choice
    assert model.attention_backend == "sdpa"
    assert set(processors(model)) == {"AttnProcessor2_0"}  # diffusers' own default: behaviour unchanged


def test_auto_resolution_rule(monkeypatch):
    for installed, cuda, expected in [(False, False, "sdpa"), (True, False, "sdpa"), (False, True, "sdpa"),
                                      (True, True, "xformers")]:
        monkeypatch.setattr(diffusion, "xformers_installed", lambda installed=installed: installed)
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert diffusion.resolve_attention_backend("auto") == expected
        assert diffusion.resolve_attention_backend("math") == "math"


def test_xformers_missing_raises(monkeypatch):
    monkeypatch.setattr(diffusion, "xformers_installed", lambda: False)
    with pytest.raises(ValueError, match="attention_backend.*xformers.*not installed"):
        build("class", attention_backend="xformers")


def test_unknown_backend_raises():
    with pytest.raises(ValueError) as info:
        build("class", attention_backend="flash")
    message = str(info.value)
    assert "attention_backend" in message
    assert all(repr(name) in message for name in get_args(diffusion.AttentionBackend))


def test_saved_math_backend_reloads(tmp_path):
    torch.manual_seed(0)
    model = build("text", attention_backend="math")
    model.save_pretrained(tmp_path / "unet")
    loaded = load_pretrained(tmp_path / "unet").eval()
    assert loaded.config == model.config and loaded.attention_backend == "math"
    assert set(processors(loaded)) == {"AttnProcessor"}
    x, t, cond = random_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond), model(x, t, cond), atol=0, rtol=0)


def test_accelerations_run_on_math_backend(pair):
    sdpa, math = pair
    x, t, cond = random_inputs(sdpa)
    with torch.no_grad():
        reference = sdpa(x, t, cond)
        with deepcache(math, interval=1):  # interval 1: the full U-Net every call, i.e. exact
            torch.testing.assert_close(math(x, t, cond), reference, atol=1e-5, rtol=1e-5)
        if math.config.cross_attention_dim is not None:  # ToMe-SD patches the text U-Net's transformer blocks
            with tome_sd(math, ratio=0.0):
                torch.testing.assert_close(math(x, t, cond), reference, atol=1e-5, rtol=1e-5)
    assert set(processors(math)) == {"AttnProcessor"}
