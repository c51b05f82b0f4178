"""Token reduction in zoo ViTs (``token_reduction=``, the ``-tome`` / ``-evit`` variants) and on timm ViTs
(``zoo.patch.patch``): no-op settings give the unreduced logits exactly; a patched timm ViT and the zoo
ViT converted from it reduce alike (1e-5)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import zoo
from zoo.convert import from_timm
from zoo.models.vit import ViT, ViTConfig
from zoo.patch import patch

IMAGES = (2, 3, 32, 32)


def twin(model: ViT, spec: dict | None) -> ViT:
    """``model``'s architecture and weights with token reduction ``spec``."""
    other = ViT(ViTConfig(**{**model.config.model_dump(), "token_reduction": spec})).eval()
    other.load_state_dict(model.state_dict(), strict=False)
    return other


@pytest.fixture(scope="module")
def base() -> ViT:
    torch.manual_seed(0)
    return zoo.create_model("vit-tiny").eval()


@pytest.mark.parametrize("spec", [
    {"name": "tome", "r": 0}, {"name": "evit", "keep_rate": 1.0}, {"name": "dynamicvit", "keep_rate": 1.0},
    {"name": "patch_dropout", "keep_rate": 0.5},  # eval mode: identity
], ids=["tome-r0", "evit-keep1", "dynamicvit-keep1", "patch-dropout-eval"])
def test_noop_reduction_is_exact(base, spec):
    images = torch.randn(*IMAGES)
    with torch.no_grad():
        torch.testing.assert_close(twin(base, spec)(images), base(images), atol=0, rtol=0)


def test_tome_and_evit_reduce_tokens(base):
    images = torch.randn(*IMAGES)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r=16 is clipped at the last layer
        tome = twin(base, {"name": "tome", "r": 16, "track_source": True})
        features = tome.forward_features(images)
        evit = twin(base, {"name": "evit", "keep_rate": 0.5})
        # patches at layers 1, 2, 3 (kept + fused): 64 -> 32 + 1 -> ceil(16.5) + 1 -> 9 + 1, plus the CLS
        assert evit.forward_features(images).shape[1] == 1 + 9 + 1
        logits = tome(images)
    tokens = tome.token_reduction.last_tokens
    assert features.shape[1] == 65 - 16 * 3 - 8 and (tokens.size.sum(dim=1) == 65).all()
    assert (tokens.source.sum(dim=1) == 1).all()
    assert logits.shape == (2, 10) and (logits - base(images)).abs().max() > 1e-4


# 65 tokens: 64 go through the GEMM, 1 is added after; r=1 has a layer of 64 tokens (all in the GEMM)
@pytest.mark.parametrize("r", [1, 7], ids=["one-aligned-layer", "tails"])
def test_tome_under_bf16_autocast_keeps_the_residual_dtype(base, r):
    """Under autocast the merge GEMM runs in bf16 like every matmul; the merged tokens keep the residual
    stream's float32 (the tail of tokens past the last multiple of 8 is added in the GEMM's dtype). Closeness
    to float32 is not asserted here: bf16 noise may flip which tokens merge (the layer-level bf16 test covers
    the merge itself)."""
    tome = twin(base, {"name": "tome", "r": r})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = tome.forward_features(torch.randn(*IMAGES))
    assert features.dtype == torch.float32 and features.shape[1] == 65 - 4 * r and features.isfinite().all()


def test_registered_variants():
    assert {"vit-tiny-tome", "vit-tiny-evit", "vit-b16-tome", "vit-b16-evit"} <= set(zoo.list_models("vit-*"))
    assert zoo.model_info("vit-b16-tome")["config"]["token_reduction"] == {"name": "tome", "r": 15}
    assert zoo.model_info("vit-l16-tome")["config"]["token_reduction"] == {"name": "tome", "r": 7}
    assert zoo.model_info("vit-b16-evit")["config"]["token_reduction"] == {"name": "evit", "keep_rate": 0.7}
    assert zoo.create_model("vit-tiny-evit").token_reduction.layers == [1, 2, 3]
    assert zoo.create_model("vit-tiny", token_reduction={"name": "tome", "r": 4}).token_reduction.schedule == [4] * 4


def test_config_errors():
    with pytest.raises(ValueError, match="needs the 'attention' mixer.*got mixer linear"):
        zoo.create_model("vit-tiny", mixer="linear", token_reduction={"name": "tome"})
    with pytest.raises(ValueError, match="Did you mean: evit"):
        zoo.create_model("vit-tiny", token_reduction={"name": "evvit"})
    with pytest.raises(TypeError, match="unknown argument 'rr'"):
        zoo.create_model("vit-tiny", token_reduction={"name": "tome", "rr": 3})
    with pytest.raises(ValueError, match="keep_rate must be in"):
        zoo.create_model("vit-tiny", token_reduction={"name": "evit", "keep_rate": 0.0})
    with pytest.raises(ValueError, match="rotary"):
        zoo.create_model("vit-tiny", mixer={"name": "attention", "rope": True}, token_reduction={"name": "tome"})


def test_dynamicvit_keep_ratio_loss_reaches_the_task_and_inference_keeps_the_target_counts(base):
    from zoo.tasks.base import create_task

    model = twin(base, {"name": "dynamicvit", "keep_rate": 0.5}).train()
    images = torch.randn(*IMAGES)
    batch = {"image": images, "label": torch.randint(0, 10, (IMAGES[0],))}
    task = create_task("classification")
    loss, metrics = task.loss(model, batch)
    keep = metrics["keep_ratio_loss"]
    assert keep.dim() == 0 and keep >= 0 and set(model.aux_losses()) == {"keep_ratio_loss"}
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.token_reduction.predictors.parameters())
    model.eval()  # an untrained predictor still keeps the target counts: 64 -> 32 -> 16 -> 8
    with torch.no_grad():
        assert model.forward_features(images).shape[1] == 1 + 8
    assert model.aux_losses() == {}


def test_save_load_keeps_token_reduction(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFZOO_CHECKPOINTS", str(tmp_path / "none"))
    model = zoo.create_model("vit-tiny-tome").eval()
    loaded = zoo.load_pretrained(model.save_pretrained(tmp_path / "m")).eval()
    assert loaded.config.token_reduction == {"name": "tome", "r": 12}


# --- zoo.patch on timm -------------------------------------------------------------------------------


@pytest.fixture
def timm_vit() -> VisionTransformer:
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=7)
    with torch.no_grad():  # timm zero-inits some biases and the head: randomise everything
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_patch_noop_is_exact(timm_vit):
    images = torch.randn(*IMAGES)
    with torch.no_grad():
        want = timm_vit(images)
        torch.testing.assert_close(patch(timm_vit, "tome", r=0)(images), want, atol=0, rtol=0)
        torch.testing.assert_close(patch(timm_vit, "evit", keep_rate=1.0)(images), want, atol=0, rtol=0)


@pytest.mark.parametrize("spec", [{"name": "tome", "r": 8}, {"name": "tome", "r": 6, "inflection": -0.5},
                                  {"name": "evit", "keep_rate": 0.5}], ids=["tome-r8", "tome-decreasing", "evit"])
def test_patched_timm_equals_zoo(timm_vit, spec):
    zoo_vit = twin(from_timm(timm_vit), spec)
    images = torch.randn(*IMAGES)
    with torch.no_grad():
        unreduced = timm_vit(images)
        got = patch(timm_vit, **spec)(images)
        torch.testing.assert_close(got, zoo_vit(images), atol=1e-5, rtol=1e-5)
    assert (got - unreduced).abs().max() > 1e-3  # the reduction did change something


def test_patch_timm_with_layer_scale_and_qk_norm():
    """Features from_timm does not mirror still patch: r=0 is exact, r=4 runs and merges."""
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                              init_values=0.1, qk_norm=True).eval()
    images = torch.randn(*IMAGES)
    with torch.no_grad():
        want = model(images)
        torch.testing.assert_close(patch(model, "tome", r=0)(images), want, atol=0, rtol=0)
        patch(model, "tome", r=4)(images)
    assert model.token_reduction.last_tokens.size.shape == (2, 17 - 8, 1)


def test_patch_mask_fallback_equals_folded_bias(timm_vit):
    """With qk-norm or an attention-output norm, log(size) stays an additive mask instead of riding in spare
    head dims: with those modules as identities that aren't nn.Identity, both paths agree (fp32: 1e-5)."""
    fallback = copy.deepcopy(timm_vit)
    for block in fallback.blocks:
        for name in ("q_norm", "k_norm", "norm"):
            setattr(block.attn, name, torch.nn.Sequential())
    images = torch.randn(*IMAGES)
    with torch.no_grad():
        want = patch(timm_vit, "tome", r=8)(images)
        torch.testing.assert_close(patch(fallback, "tome", r=8)(images), want, atol=1e-5, rtol=1e-5)


def test_patch_refuses_other_models():
    with pytest.raises(TypeError, match="got Linear"):
        patch(torch.nn.Linear(2, 2), "tome")
    with pytest.raises(ValueError, match="needs a CLS token"):
        patch(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, class_token=False,
                                global_pool="avg"), "tome")
    with pytest.raises(ValueError, match="'evit' protects only the CLS token; this model has 3 prefix tokens"):
        patch(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, reg_tokens=2), "evit")


@pytest.mark.parametrize("kind", ["distilled", "registers"])
def test_patch_tome_protects_distillation_and_register_tokens(kind):
    """DeiT's distillation token and register tokens stay first and alone under ToMe (r=0: exact)."""
    from timm.models.deit import VisionTransformerDistilled

    config = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    model = (VisionTransformerDistilled(**config) if kind == "distilled" else VisionTransformer(reg_tokens=3, **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prefix = model.num_prefix_tokens
    images = torch.randn(*IMAGES)
    with torch.no_grad():
        want = model(images)
        torch.testing.assert_close(patch(model, "tome", r=0)(images), want, atol=0, rtol=0)
        got = patch(model, "tome", r=8, track_source=True)(images)
    tokens = model.token_reduction.last_tokens
    assert tokens.size.shape[1] == 64 + prefix - 3 * 8 and (tokens.size[:, :prefix] == 1).all()
    assert torch.equal(tokens.source[:, :prefix, :prefix], torch.eye(prefix).expand(2, -1, -1))
    assert (got - want).abs().max() > 1e-3
