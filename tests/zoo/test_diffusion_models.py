"""Diffusion backbones (``zoo.models.diffusion``): U-Nets (diffusers), DiT and U-ViT.

Large models are inspected through ``model_info`` (meta device); only CPU-sized models and tiny
overrides run. Outputs of a reloaded model equal the saved one's exactly (atol 0).
"""
from __future__ import annotations

import json
import time

import pytest
import torch

import layers
import zoo
import zoo.models.diffusion  # noqa: F401  (registers the diffusion families until zoo.models imports it)
from zoo.models.base import load_pretrained
from zoo.models.diffusion import DiffusionBackbone, sincos_pos_embed_2d, timestep_embedding
from zoo.registry import FAMILIES

# published parameter counts (millions) and the relative tolerance each is checked to
PUBLISHED = {
    "unet-sd15": (859.5, 0.005),  # Stable Diffusion 1.5
    "unet-bk-base": (579.4, 0.005),  # BK-SDM (Kim et al. 2023), Table 1
    "unet-bk-small": (482.3, 0.005),
    "unet-bk-tiny": (323.4, 0.005),
    "dit-s2": (33, 0.01),  # DiT (Peebles & Xie 2023), Table 1
    "dit-b2": (130, 0.01),
    "dit-l2": (458, 0.01),
    "dit-xl2": (675, 0.01),
}
DIFFUSION_FAMILIES = ("unet", "dit", "uvit")
TINY_DIT = dict(depth=2, dim=64, num_heads=2, input_size=8)
TINY_UVIT = dict(depth=3, dim=64, num_heads=2, input_size=8, num_classes=10)
# BK-SDM-Tiny's layout (no mid block, three cross-attention stages) at toy width
TINY_TEXT_UNET = dict(block_out_channels=(32, 32, 64), sample_size=16, cross_attention_dim=24, norm_num_groups=8)


def diffusion_models() -> list[str]:
    return [n for f in DIFFUSION_FAMILIES for n in zoo.list_models(f"{f}-*")]


@pytest.fixture(autouse=True)
def empty_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFZOO_CHECKPOINTS", str(tmp_path / "checkpoints"))


# --- registry and parameter counts --------------------------------------------------------------------------


def test_registered_names():
    assert set(diffusion_models()) == {
        "unet-sd15", "unet-bk-base", "unet-bk-small", "unet-bk-tiny", "unet-tiny", "unet-small",
        "unet-tiny-captions", "unet-small-captions",
        *(f"dit-{s}{v}" for s in ("s2", "b2", "l2", "xl2") for v in ("", "-linear")), "uvit-s2", "uvit-s2-linear",
    }


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
    published, tolerance = PUBLISHED[name]
    params = zoo.model_info(name)["params"] / 1e6
    assert abs(params - published) <= tolerance * published, (name, params)


def test_uvit_s2_param_count():
    """U-ViT-S/2's 44M is the unconditional CIFAR-10 model; the class-conditional latent one adds 1001 label rows."""
    with torch.device("meta"):
        cifar = zoo.create_model("uvit-s2", num_classes=0, in_channels=3).num_params()
    assert abs(cifar / 1e6 - 44) <= 0.01 * 44, cifar
    latent = zoo.model_info("uvit-s2")["params"]
    assert 1001 * 512 < latent - cifar < 1001 * 512 + 10_000, latent  # the label rows, a position, 4th-channel weights
    assert zoo.model_info("uvit-s2-linear")["params"] == latent  # linear attention has the same projections


def test_pixel_unets_are_cpu_sized():
    assert zoo.model_info("unet-tiny")["params"] < 2_000_000
    assert zoo.model_info("unet-small")["params"] < 20_000_000
    assert zoo.model_info("unet-tiny-captions")["params"] < 2_500_000
    assert zoo.model_info("unet-small-captions")["params"] < 30_000_000


@pytest.mark.parametrize("name", diffusion_models())
def test_model_info(name):
    """What ``tests/zoo/test_models.py::test_model_info`` checks of every registered model."""
    info = zoo.model_info(name)
    assert info["family"] in FAMILIES and info["family"] in DIFFUSION_FAMILIES
    assert "attention" in info["allowed_mixers"]
    config_cls = FAMILIES.get(info["family"]).config_class
    assert config_cls.model_validate(json.loads(json.dumps(info["config"]))).model_dump() == info["config"]
    assert info["layers"] and all(row["mixer"] in info["allowed_mixers"] for row in info["layers"])
    if "depth" in info["config"]:
        assert len(info["layers"]) == info["config"]["depth"]


def test_bk_sdm_removes_blocks_from_sd15():
    with torch.device("meta"):
        sd, base, small, tiny = (zoo.create_model(f"unet-{n}").unet for n in ("sd15", "bk-base", "bk-small", "bk-tiny"))
    assert [len(b.resnets) for b in sd.down_blocks] == [2, 2, 2, 2] and [len(b.resnets) for b in sd.up_blocks] == [3] * 4
    assert [len(b.resnets) for b in base.down_blocks] == [1] * 4 and [len(b.resnets) for b in base.up_blocks] == [2] * 4
    assert base.mid_block is not None and small.mid_block is None and tiny.mid_block is None
    assert len(tiny.down_blocks) == len(tiny.up_blocks) == 3
    assert all(hasattr(b, "attentions") for b in (*tiny.down_blocks, *tiny.up_blocks))


# --- forward ------------------------------------------------------------------------------------------------


def test_unet_tiny_forward_shape_and_speed():
    model = zoo.create_model("unet-tiny").eval()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([3, model.null_class])
    with torch.no_grad():
        model(x, 10, labels)  # warm-up
        start = time.perf_counter()
        out = model(x, torch.tensor([10, 500]), labels)
        elapsed = time.perf_counter() - start
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert elapsed < 1.0, elapsed


def test_text_conditioned_unet_forward():
    model = zoo.create_model("unet-bk-tiny", **TINY_TEXT_UNET).eval()
    assert model.unet.mid_block is None
    with torch.no_grad():
        out = model(torch.randn(2, 4, 16, 16), torch.tensor([1, 999]), torch.randn(2, 7, 24))
    assert out.shape == (2, 4, 16, 16)


def test_dit_forward_shape_and_learned_sigma():
    model = zoo.create_model("dit-s2", **TINY_DIT)
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([0, 7, model.null_class]))
    assert model.out_channels == 8 and out.shape == (3, 8, 8, 8)
    out = zoo.create_model("dit-s2", learn_sigma=False, **TINY_DIT)(torch.randn(1, 4, 8, 8), 5, torch.tensor([1]))
    assert out.shape == (1, 4, 8, 8)


def test_fresh_dit_predicts_exactly_zero_and_then_uses_its_conditioning():
    """adaLN-Zero: zero modulation and output projection, so a fresh DiT's prediction is exactly 0."""
    torch.manual_seed(0)
    model = zoo.create_model("dit-s2", **TINY_DIT)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(model(x, torch.tensor([3, 700]), torch.tensor([1, 2])), torch.zeros(2, 8, 8, 8))
    for block in (*model.blocks, model.final_layer):
        torch.nn.init.normal_(block.modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    with torch.no_grad():
        a, b = model(x, 3, torch.tensor([1, 1])), model(x, 3, torch.tensor([2, 2]))
        c = model(x, 400, torch.tensor([1, 1]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_uvit_forward_and_long_skips():
    model = zoo.create_model("uvit-s2", **TINY_UVIT)
    assert len(model.in_blocks) == len(model.out_blocks) == 1
    assert model.in_blocks[0].skip_linear is None and model.out_blocks[0].skip_linear is not None
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, model.null_class]))
    assert out.shape == (2, 4, 8, 8)
    assert model.pos_embed.shape[1] == 16 + 2  # time token, class token, 4x4 patches


def test_unconditional_models_take_no_cond():
    dit = zoo.create_model("dit-s2", num_classes=0, **TINY_DIT)
    assert dit.class_embed is None and dit.null_class is None
    assert dit(torch.randn(1, 4, 8, 8), 3).shape == (1, 8, 8, 8)
    unet = zoo.create_model("unet-tiny", num_class_embeds=None)
    assert unet(torch.randn(1, 3, 32, 32), 3).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="cond must be None"):
        unet(torch.randn(1, 3, 32, 32), 3, torch.tensor([1]))


def test_embeddings():
    freqs = 10000 ** -(torch.arange(3) / 3)  # dim 6: three frequencies, cosines first
    torch.testing.assert_close(timestep_embedding(torch.tensor([7.0]), 6)[0], torch.cat([(7 * freqs).cos(), (7 * freqs).sin()]))
    pos = sincos_pos_embed_2d(8, 3)  # token (row 1, col 2): [sin, cos] of the row, then of the column
    freqs = torch.tensor([1.0, 0.01])
    expected = torch.cat([torch.sin(1 * freqs), torch.cos(1 * freqs), torch.sin(2 * freqs), torch.cos(2 * freqs)])
    torch.testing.assert_close(pos[1 * 3 + 2], expected)


# --- mixers -------------------------------------------------------------------------------------------------


def test_mixer_swap_builds_linear_attention_blocks():
    linear_cls = layers.get_mixer_class("linear")
    for model in (zoo.create_model("dit-s2", mixer="linear", **TINY_DIT), zoo.create_model("dit-s2-linear", **TINY_DIT)):
        assert all(isinstance(block.mixer, linear_cls) for block in model.blocks)
        assert model(torch.randn(2, 4, 8, 8), 1, torch.tensor([0, 1])).shape == (2, 8, 8, 8)
    assert {row["mixer"] for row in zoo.model_info("dit-s2-linear")["layers"]} == {"linear"}
    assert {row["mixer"] for row in zoo.model_info("dit-s2")["layers"]} == {"attention"}
    uvit = zoo.create_model("uvit-s2-linear", **TINY_UVIT)
    assert isinstance(uvit.mid_block.mixer, linear_cls)


def test_unknown_mixer_suggests_close_matches():
    with pytest.raises(ValueError, match="unknown mixer 'linaer'.*Did you mean: .*linear"):
        zoo.create_model("dit-s2", mixer="linaer", **TINY_DIT)


# --- bad inputs and configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sample,timestep,cond,match", [
    (torch.randn(2, 4, 32, 32), 1, torch.tensor([1, 2]), r"sample must have shape \[batch, 3, 32, 32\]"),
    (torch.randn(2, 3, 16, 16), 1, torch.tensor([1, 2]), r"sample must have shape"),
    (torch.randn(3, 32, 32), 1, torch.tensor([1, 2]), r"sample must have shape"),
    (torch.randn(2, 3, 32, 32), 1, None, r"cond is missing: unet-tiny is conditioned on class labels"),
    (torch.randn(2, 3, 32, 32), 1, torch.tensor([1.0, 2.0]), r"cond must be integer class labels of shape \[2\]"),
    (torch.randn(2, 3, 32, 32), 1, torch.tensor([1]), r"cond must be integer class labels"),
    (torch.randn(2, 3, 32, 32), 1, torch.tensor([1, 11]), r"cond class labels must lie in \[0, 10\]"),
    (torch.randn(2, 3, 32, 32), torch.tensor([1, 2, 3]), torch.tensor([1, 2]), r"timestep must be a number or"),
])
def test_unet_rejects_bad_inputs(sample, timestep, cond, match):
    model = zoo.create_model("unet-tiny")
    with pytest.raises(ValueError, match=match):
        model(sample, timestep, cond)


def test_conditional_models_require_cond():
    dit = zoo.create_model("dit-s2", **TINY_DIT)
    with pytest.raises(ValueError, match="cond is missing"):
        dit(torch.randn(1, 4, 8, 8), 1)
    with pytest.raises(ValueError, match=r"lie in \[0, 1000\]"):
        dit(torch.randn(1, 4, 8, 8), 1, torch.tensor([1001]))
    with pytest.raises(ValueError, match=r"sample must have shape \[batch, 4, 8, 8\]"):
        dit(torch.randn(1, 4, 32, 32), 1, torch.tensor([1]))
    text = zoo.create_model("unet-bk-tiny", **TINY_TEXT_UNET)
    with pytest.raises(ValueError, match=r"cond is missing: .* text states \[batch, tokens, 24\]"):
        text(torch.randn(1, 4, 16, 16), 1)
    with pytest.raises(ValueError, match=r"cond must be text states of shape \[1, tokens, 24\]"):
        text(torch.randn(1, 4, 16, 16), 1, torch.randn(1, 7, 768))


def test_bad_configs_are_clear_errors():
    with pytest.raises(TypeError, match="unknown argument 'sample_sise'.*Did you mean: sample_size"):
        zoo.create_model("unet-tiny", sample_sise=64)
    with pytest.raises(ValueError, match="must be odd"):
        zoo.create_model("uvit-s2", **{**TINY_UVIT, "depth": 4})
    with pytest.raises(ValueError, match="input_size .* divisible by patch_size"):
        zoo.create_model("dit-s2", **{**TINY_DIT, "input_size": 9})
    with pytest.raises(ValueError, match="need cross_attention_dim"):
        zoo.create_model("unet-bk-tiny", **{**TINY_TEXT_UNET, "cross_attention_dim": None})
    with pytest.raises(ValueError, match="one entry per block_out_channels"):
        zoo.create_model("unet-tiny", block_out_channels=(32, 64))


# --- checkpoints --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,overrides,sample,cond", [
    ("unet-tiny", {}, torch.randn(2, 3, 32, 32), torch.tensor([1, 2])),
    ("dit-s2", TINY_DIT, torch.randn(2, 4, 8, 8), torch.tensor([1, 2])),
    ("uvit-s2-linear", TINY_UVIT, torch.randn(2, 4, 8, 8), torch.tensor([1, 2])),
])
def test_save_pretrained_round_trip(tmp_path, name, overrides, sample, cond):
    model = zoo.create_model(name, **overrides).eval()
    if isinstance(model, zoo.models.diffusion.DiT):  # give the zero-initialised output something to carry
        torch.nn.init.normal_(model.final_layer.linear.weight)
        torch.nn.init.normal_(model.final_layer.modulation[-1].bias)
    model.save_pretrained(tmp_path / "saved")
    for loaded in (load_pretrained(tmp_path / "saved"), zoo.create_model(name, pretrained=tmp_path / "saved")):
        assert isinstance(loaded, DiffusionBackbone) and loaded.config == model.config
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(sample, 7, cond), model(sample, 7, cond), atol=0, rtol=0)
