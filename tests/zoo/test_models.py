"""Model families (LM, ViT), the model registry, timm conversion and checkpoints.

Only lm-tiny and vit-tiny (and tiny overrides of them) are built with real weights; every other
registered model is inspected through ``model_info``, which builds it on the meta device.
Tolerances: float32 logits agree to 1e-5 scaled by max(1, max|logit|) (observed ~1e-7); weights
loaded from a checkpoint or converted from timm give bit-identical logits (atol 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import layers
import zoo
from layers.mixer import MIXERS, Mixer, register_mixer
from zoo.convert import from_timm
from zoo.models.lm import LM, LMConfig
from zoo.models.vit import ViT
from zoo.registry import FAMILIES

TOL = 1e-5
SMALL = {"lm-tiny", "vit-tiny"}
FIXED_ARCHITECTURES = {"timm"}  # families that expose other libraries' models unchanged
TIMM_TWINS = {"vit-ti16": "vit_tiny_patch16_224", "vit-s16": "vit_small_patch16_224",
              "vit-b16": "vit_base_patch16_224", "vit-l16": "vit_large_patch16_224"}


def assert_close(actual, expected, tol=TOL):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


@pytest.fixture(autouse=True)
def empty_checkpoints(tmp_path, monkeypatch) -> Path:
    """Point EFFZOO_CHECKPOINTS at an empty folder: tests never see (or write) the repo's checkpoints/."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    monkeypatch.setenv("EFFZOO_CHECKPOINTS", str(root))
    return root


class CausalOnlyMixer(Mixer):
    """A toy causal-only mixer (causal running mean + linear): fine for LMs, refused by ViTs."""

    supports_bidirectional = False
    supports_mask = False

    def __init__(self, dim, num_heads, causal=True):
        super().__init__(dim, num_heads, causal)
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        return self.lin(x.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None])


@pytest.fixture
def causal_only_mixer():
    name = "toy-causal-only"
    register_mixer(name)(CausalOnlyMixer)
    yield name
    MIXERS._entries.pop(name)
    assert name not in layers.list_mixers()


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Randomise constant-initialised parameters (norm weights = 1, biases = 0), so that e.g. swapping
    two norms or dropping a bias changes the output and the tests can notice."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and torch.all(p == p.flatten()[0]):
                p.add_(0.1 * torch.randn_like(p))
    return model


def lm(**overrides) -> LM:
    return perturb(zoo.create_model("lm-tiny", **overrides)).eval()


def ids(B, T, vocab=256):
    return torch.randint(0, vocab, (B, T))


# --- every registered model -----------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo.list_models())
def test_model_info(name):
    info = zoo.model_info(name)
    assert info["name"] == name
    assert info["params"] > 0
    assert info["family"] in FAMILIES
    assert info["pretrained_tags"] == []
    # the config round-trips: through JSON and the family's typed config, unchanged
    config = info["config"]
    config_cls = FAMILIES.get(info["family"]).config_class
    assert config_cls.model_validate(json.loads(json.dumps(config))).model_dump() == config
    if info["family"] in FIXED_ARCHITECTURES:  # wrapped as they are: no mixer to swap, no layer summary
        assert info["allowed_mixers"] == [] and info["layers"] == []
        return
    assert "attention" in info["allowed_mixers"]
    assert info["layers"] and all(row["mixer"] in info["allowed_mixers"] for row in info["layers"])
    if "depth" in config:
        assert len(info["layers"]) == config["depth"]
    for row in info["layers"]:
        if info["family"] == "lm" and row["mixer"] == "attention":  # a KV cache at max_seq_len
            assert row["state_size"] == 2 * config["dim"] * config["max_seq_len"]
        if info["family"] == "vit":  # bidirectional: no decoding state
            assert "state_size" not in row


def test_model_info_accepts_tagged_name():
    assert zoo.model_info("lm-tiny.sometag")["name"] == "lm-tiny"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_models_build_and_match_info(name):
    model = zoo.create_model(name)
    info = zoo.model_info(name)
    assert model.num_params() == info["params"]
    assert model.config.model_dump() == info["config"]
    assert model.model_name == name and model.family == info["family"]


def test_lm_tiny_param_count():
    params = zoo.model_info("lm-tiny")["params"]
    assert 1_000_000 <= params <= 3_000_000, params


@pytest.mark.parametrize("name,timm_name", sorted(TIMM_TWINS.items()))
def test_vit_param_counts_match_timm(name, timm_name):
    with torch.device("meta"):
        ref = timm.create_model(timm_name, pretrained=False)
    assert zoo.model_info(name)["params"] == sum(p.numel() for p in ref.parameters())


def test_list_models_pattern():
    vits = zoo.list_models("vit-*")
    assert {"vit-tiny", "vit-ti16", "vit-s16", "vit-b16", "vit-l16"} <= set(vits)
    assert vits == sorted(n for n in zoo.list_models() if n.startswith("vit-"))
    assert {"lm-tiny", "lm-small", "lm-125m", "lm-350m", "lm-1b"} <= set(zoo.list_models("lm-*"))
    assert zoo.list_models("vit-t*16") == ["vit-ti16"]
    assert zoo.list_models("vit-t?ny") == ["vit-tiny"]
    assert zoo.list_models("nope-*") == []


def test_create_model_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'lm-tinny'. Did you mean: lm-tiny"):
        zoo.create_model("lm-tinny")


# --- LM -----------------------------------------------------------------------------------------


def test_lm_forward_shape_and_tied_embeddings():
    model = lm()
    logits = model(ids(2, 9))
    assert logits.shape == (2, 9, 256) and logits.dtype == torch.float32
    assert model.head.weight is model.embed.weight
    untied = lm(tie_embeddings=False)
    assert untied.head.weight is not untied.embed.weight
    assert untied.num_params() == model.num_params() + 256 * 192


def test_lm_is_causal():
    model = lm()
    x = ids(2, 12)
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 256
    assert_close(model(y)[:, :8], model(x)[:, :8])
    assert (model(y)[:, 8:] - model(x)[:, 8:]).abs().max() > 1e-3


def test_lm_padding_mask_equals_running_alone():
    model = lm(init_std=0.1)
    lengths = [10, 4, 7]
    x = ids(3, 10)
    mask = torch.arange(10)[None] >= 10 - torch.tensor(lengths)[:, None]  # left padding
    out = model(x, mask=mask)
    for b in range(3):
        assert_close(out[b, mask[b]], model(x[b : b + 1, mask[b]])[0])


@pytest.mark.parametrize("max_len_extra", [None, 0, 3])
def test_lm_decoding_logits_equal_forward(max_len_extra):
    """prefill(prompt) then one token at a time: every position's logits equal the full forward's."""
    model = lm(init_std=0.1)
    B, T, P = 2, 13, 5
    x = ids(B, T)
    with torch.no_grad():
        full = model(x)
        states = model.init_state(B, max_len=None if max_len_extra is None else T + max_len_extra)
        logits, states = model.prefill(x[:, :P], states)
        outs = [logits]
        for t in range(P, T):
            logits, states = model.prefill(x[:, t : t + 1], states)
            outs.append(logits)
    assert len(states) == model.config.depth and all(s["mixer"]["pos"] == T for s in states)
    assert_close(torch.cat(outs, 1), full)


def test_lm_greedy_generate_equals_recomputation():
    """temperature=0 decoding through the KV cache picks exactly the argmax of the full forward."""
    model = lm(init_std=0.2)  # spread-out logits: no near-ties for fp32 noise to flip
    prompt = ids(2, 4)
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert out.shape == (2, 16) and torch.equal(out[:, :4], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert len(set(out[0, 4:].tolist())) > 1  # not a degenerate constant sequence


def test_lm_sampled_generate_is_reproducible():
    model = lm(init_std=0.05)
    prompt = ids(2, 3)
    run = lambda seed, **kw: model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)
    a, b, c = run(123), run(123), run(124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(run(7, top_k=1), model.generate(prompt, 20, temperature=0))  # top-1 sampling is greedy


def test_lm_generate_top_k_stays_in_top_k():
    model = lm(init_std=0.2)
    prompt = ids(1, 3)
    out = model.generate(prompt, 8, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in range(3, 11):
            top3 = model(out[:, :t])[0, -1].topk(3).indices
            assert out[0, t] in top3


def test_lm_generate_errors():
    model = lm(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len is 16"):
        model.generate(ids(1, 10), max_new_tokens=7)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(ids(1, 3), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        model.generate(ids(1, 3), -1)
    assert torch.equal(model.generate(ids(1, 3).fill_(5), 0), torch.full((1, 3), 5))


def test_lm_hybrid_mixer_list():
    spec = [{"name": "attention", "backend": "math"}, "attention"]
    model = lm(depth=4, mixer=spec)
    backends = [b.mixer.backend for b in model.blocks]
    assert backends == ["math", "auto", "math", "auto"]
    assert all(isinstance(b.mixer, layers.Attention) and b.mixer.causal for b in model.blocks)
    assert [row["mixer"] for row in model.layer_summary()] == ["attention"] * 4
    assert model.config.mixer == spec
    # the backends compute the same function: same weights, same logits as the all-"auto" model
    plain = lm(depth=4)
    plain.load_state_dict(model.state_dict())
    x = ids(2, 7)
    assert_close(model(x), plain(x))


def test_lm_hybrid_with_other_mixer(causal_only_mixer):
    model = lm(depth=4, mixer=[causal_only_mixer, "attention"])
    assert [type(b.mixer).__name__ for b in model.blocks] == ["CausalOnlyMixer", "Attention"] * 2
    summary = model.layer_summary()
    assert [r["mixer"] for r in summary] == [causal_only_mixer, "attention"] * 2
    # the toy mixer has no decoding (state_size raises NotImplementedError): its rows simply omit it
    assert ["state_size" in r for r in summary] == [False, True] * 2
    assert model(ids(1, 5)).shape == (1, 5, 256)


def test_lm_mixer_list_must_divide_depth():
    with pytest.raises(ValueError, match=r"mixer list of length 3 must divide depth \(4\)"):
        lm(depth=4, mixer=["attention"] * 3)
    with pytest.raises(ValueError, match="must divide depth"):
        lm(mixer=[])


def test_lm_unknown_mixer_in_spec():
    with pytest.raises(ValueError, match="Did you mean: attention"):
        lm(mixer={"name": "atention"})
    with pytest.raises(TypeError, match="'bakend'"):
        lm(mixer={"name": "attention", "bakend": "math"})


def test_lm_sequence_too_long():
    model = lm(max_seq_len=8)
    model(ids(1, 8))
    with pytest.raises(ValueError, match="input_ids has length 9 but the model's max_seq_len is 8"):
        model(ids(1, 9))


@pytest.mark.parametrize("bad", [torch.randint(0, 256, (7,)), torch.randint(0, 256, (1, 2, 7)), torch.rand(2, 7), [1, 2, 3]],
                         ids=["rank1", "rank3", "float", "list"])
def test_lm_wrong_input(bad):
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor of shape \[batch, seq_len\]"):
        lm()(bad)


def test_lm_unknown_override_key():
    with pytest.raises(TypeError) as info:
        zoo.create_model("lm-tiny", dimm=64)
    msg = str(info.value)
    assert "'dimm'" in msg and "Did you mean: dim" in msg
    assert "Valid arguments:" in msg and all(k in msg for k in ("depth", "num_heads", "mixer", "vocab_size"))


def test_lm_wrong_override_type():
    with pytest.raises(ValueError, match="depth"):
        zoo.create_model("lm-tiny", depth="x")
    with pytest.raises(ValueError, match="dropout must be in"):
        zoo.create_model("lm-tiny", dropout=1.5)


def test_lm_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"dim \(100\) must be divisible by num_heads \(3\)"):
        zoo.create_model("lm-tiny", dim=100)


def test_lm_config_defaults():
    config = LMConfig()
    assert config.hidden_dim() == 512  # 8/3 * 192 = 512, a multiple of 64
    assert LMConfig(dim=100, num_heads=4).hidden_dim() == 320  # 266.7 rounded up to 64
    assert LMConfig(mlp="gelu").hidden_dim() == 768
    assert LMConfig(mlp_hidden=100).hidden_dim() == 100


# --- ViT ----------------------------------------------------------------------------------------


def vit(**overrides) -> ViT:
    return perturb(zoo.create_model("vit-tiny", **overrides)).eval()


def test_vit_forward_shape_and_features():
    model = vit()
    images = torch.randn(3, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (3, 10)
    features = model.forward_features(images)
    assert features.shape == (3, 1 + 64, 128)
    assert torch.equal(model.forward_head(features), logits)
    pooled = model.forward_head(features, pre_logits=True)
    assert torch.equal(pooled, features[:, 0])
    assert all(not b.mixer.causal and b.mixer.rotary is None for b in model.blocks)  # bidirectional, no rope
    assert all(b.mixer.qkv.bias is not None and b.mixer.proj.bias is not None for b in model.blocks)  # timm layout


def test_vit_avg_pool_and_headless():
    model = vit(global_pool="avg", num_classes=0)
    images = torch.randn(2, 3, 32, 32)
    out = model(images)
    assert out.shape == (2, 128)
    assert_close(out, model.forward_features(images)[:, 1:].mean(1))


def test_vit_is_bidirectional():
    """Changing the last patch changes the CLS token's features (an LM-style causal mixer would not)."""
    model = vit()
    images = torch.randn(1, 3, 32, 32)
    changed = images.clone()
    changed[..., -4:, -4:] += 1.0
    assert (model.forward_features(images)[:, 0] - model.forward_features(changed)[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 3, 32, 32, 1), (1, 1, 32, 32), (1, 3, 16, 16)])
def test_vit_wrong_image_shape(shape):
    with pytest.raises(ValueError, match=r"images must have shape \[batch, 3, 32, 32\]"):
        vit()(torch.randn(*shape))


def test_vit_refuses_causal_only_mixer(causal_only_mixer):
    with pytest.raises(ValueError, match=f"mixer '{causal_only_mixer}' is causal only"):
        vit(mixer=causal_only_mixer)
    with pytest.raises(ValueError, match="causal only"):
        vit(mixer=["attention", causal_only_mixer])
    assert causal_only_mixer not in ViT.allowed_mixers()


def test_vit_config_errors():
    with pytest.raises(ValueError, match=r"img_size \(32\) must be divisible by patch_size \(5\)"):
        vit(patch_size=5)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        vit(num_heads=3)
    with pytest.raises(TypeError, match="'patch'"):
        vit(patch=4)


def test_vit_mixer_kwargs_override_timm_layout():
    model = vit(depth=2, mixer={"name": "attention", "qkv_bias": False, "backend": "math"}, qkv_bias=True)
    assert all(b.mixer.qkv.bias is None and b.mixer.backend == "math" for b in model.blocks)


# --- from_timm ------------------------------------------------------------------------------------


def small_timm_vit(**kwargs) -> VisionTransformer:
    """A small randomly initialised timm ViT (32x32 images, patch 8) with non-trivial weights."""
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, **kwargs)
    with torch.no_grad():  # timm zero-inits some biases and the head: randomise everything
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def timm_vit_tiny():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()


@pytest.mark.parametrize("source", ["model", "state_dict"])
def test_from_timm_vit_tiny_patch16(timm_vit_tiny, source):
    arg = (timm_vit_tiny,) if source == "model" else (timm_vit_tiny.state_dict(), 3)
    model = from_timm(*arg).eval()
    assert isinstance(model, ViT) and model.num_params() == sum(p.numel() for p in timm_vit_tiny.parameters())
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = timm_vit_tiny(images)
        assert want.abs().max() > 1e-2  # non-trivial logits (timm's init leaves the head random)
        torch.testing.assert_close(model(images), want, atol=TOL, rtol=TOL)
    # matches the registered twin's config
    assert model.config.model_dump() == {**zoo.model_info("vit-ti16")["config"]}


@pytest.mark.parametrize("kwargs,source", [
    ({}, "model"), ({}, "state_dict"),
    ({"qkv_bias": False}, "model"), ({"qkv_bias": False}, "state_dict"),
    ({"mlp_ratio": 2.0}, "model"), ({"mlp_ratio": 2.0}, "state_dict"),
    ({"global_pool": "avg", "fc_norm": False}, "model"),  # a state dict does not record global_pool
], ids=["plain-model", "plain-sd", "no-qkv-bias-model", "no-qkv-bias-sd", "mlp2-model", "mlp2-sd", "avg-pool-model"])
def test_from_timm_small_custom(kwargs, source):
    ref = small_timm_vit(**kwargs)
    model = from_timm(ref) if source == "model" else from_timm(ref.state_dict(), num_heads=3)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(images)
        assert want.abs().max() > 1e-2  # non-trivial logits
        torch.testing.assert_close(model.eval()(images), want, atol=TOL, rtol=TOL)
        torch.testing.assert_close(model.forward_features(images), ref.forward_features(images), atol=TOL, rtol=TOL)
    assert model.config.img_size == 32 and model.config.patch_size == 8 and model.config.num_classes == 7


def test_from_timm_wrong_num_heads_changes_logits():
    """The state-dict path needs the true num_heads: a wrong one builds a different function."""
    ref = small_timm_vit()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        wrong = from_timm(ref.state_dict(), num_heads=1).eval()(images)
        assert (wrong - ref(images)).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs,what,what_in_state_dict", [
    ({"reg_tokens": 4}, "reg_token", "reg_token"),
    ({"qk_norm": True}, "qk_norm", "qk_norm"),
    ({"init_values": 1e-5}, "layer scale", "layer scale"),
    ({"class_token": False, "global_pool": "avg"}, "no class token", "no class token"),
    ({"global_pool": "avg"}, "fc_norm", "fc_norm"),
    ({"no_embed_class": True}, "no_embed_class", "shape mismatch for ['pos_embed']"),  # keys alone cannot tell
    ({"pre_norm": True}, "pre-norm", "pre-norm"),
], ids=["reg-tokens", "qk-norm", "layer-scale", "no-cls", "fc-norm", "no-embed-class", "pre-norm"])
@pytest.mark.parametrize("source", ["model", "state_dict"])
def test_from_timm_refuses_unsupported(kwargs, what, what_in_state_dict, source):
    """Variants we don't mirror are refused with a ValueError naming the feature (never a RuntimeError)."""
    ref = small_timm_vit(**kwargs)
    with pytest.raises(ValueError) as info:
        from_timm(ref) if source == "model" else from_timm(ref.state_dict(), num_heads=3)
    assert (what if source == "model" else what_in_state_dict) in str(info.value)


def test_from_timm_bad_arguments():
    ref = small_timm_vit()
    with pytest.raises(ValueError, match="needs num_heads"):
        from_timm(ref.state_dict())
    with pytest.raises(ValueError, match="not a timm ViT state dict"):
        from_timm({"weight": torch.randn(3)}, num_heads=3)
    with pytest.raises(TypeError, match="got int"):
        from_timm(3)


# --- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_lm_save_load_roundtrip(tmp_path, tie):
    model = lm(tie_embeddings=tie, init_std=0.1)
    x = ids(2, 9)
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"model.safetensors", "config.json"}
    record = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert record["family"] == "lm" and record["model"] == "lm-tiny" and record["config"]["tie_embeddings"] is tie
    loaded = zoo.load_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(loaded, LM) and loaded.model_name == "lm-tiny"
    assert loaded.config == model.config
    assert (loaded.head.weight is loaded.embed.weight) is tie
    assert torch.equal(loaded(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_vit_save_load_roundtrip(tmp_path):
    model = vit()
    images = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path)
    loaded = zoo.load_pretrained(str(tmp_path))
    assert isinstance(loaded, ViT) and loaded.config == model.config
    assert torch.equal(loaded.eval()(images), model(images))


def test_save_pretrained_extra_fields(tmp_path):
    lm().save_pretrained(tmp_path, extra={"step": 7})
    assert json.loads((tmp_path / "config.json").read_text())["step"] == 7
    zoo.load_pretrained(tmp_path)


def test_create_model_from_folder(tmp_path):
    model = lm(init_std=0.1)
    model.save_pretrained(tmp_path / "run")
    fresh = zoo.create_model("lm-tiny").eval()
    x = ids(1, 6)
    assert not torch.equal(fresh(x), model(x))
    loaded = zoo.create_model("lm-tiny", pretrained=str(tmp_path / "run")).eval()
    assert torch.equal(loaded(x), model(x))


def test_truncated_safetensors_is_one_clear_error(tmp_path):
    lm().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        zoo.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        zoo.create_model("lm-tiny", pretrained=str(tmp_path))


def test_garbage_safetensors_and_config(tmp_path):
    lm().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        zoo.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"family": "lm", "con')
    with pytest.raises(ValueError, match="not valid JSON"):
        zoo.load_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        zoo.load_pretrained(tmp_path)
    lm().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        zoo.load_pretrained(tmp_path)


def test_checkpoint_of_other_shape_is_refused(tmp_path):
    lm().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match this lm-tiny model's architecture; shape mismatch"):
        zoo.create_model("lm-tiny", pretrained=str(tmp_path), dim=256, num_heads=4)
    with pytest.raises(ValueError, match="missing: blocks.4"):
        zoo.create_model("lm-tiny", pretrained=str(tmp_path), depth=6)
    with pytest.raises(ValueError, match="unexpected: blocks.2"):
        zoo.create_model("lm-tiny", pretrained=str(tmp_path), depth=2)


def test_checkpoint_of_other_family_is_refused(tmp_path):
    vit().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds a 'vit' model \(vit-tiny\), which does not fit 'lm-tiny'"):
        zoo.create_model("lm-tiny", pretrained=str(tmp_path))


def test_pretrained_true_without_checkpoints(empty_checkpoints):
    assert zoo.list_models(pretrained=True) == []
    with pytest.raises(ValueError, match="model 'lm-tiny' has no pretrained checkpoints"):
        zoo.create_model("lm-tiny", pretrained=True)
    with pytest.raises(ValueError, match="unknown pretrained tag of lm-tiny 'mqar'"):
        zoo.create_model("lm-tiny.mqar")
    for path in ("runs/x/checkpoints/step_00000600", "./step_1", "~/nowhere"):  # a path, not a tag: said so
        with pytest.raises(ValueError, match="no such checkpoint folder"):
            zoo.create_model("lm-tiny", pretrained=path)


def test_pretrained_tag_listed_and_loaded(empty_checkpoints):
    model = lm(init_std=0.1)
    model.save_pretrained(empty_checkpoints / "lm-tiny" / "mqar")
    (empty_checkpoints / "lm-tiny" / "half-written").mkdir()  # no config.json: not a tag
    vit().save_pretrained(empty_checkpoints / "vit-tiny" / "shapes")
    assert zoo.list_models(pretrained=True) == ["lm-tiny.mqar", "vit-tiny.shapes"]
    assert zoo.list_models("vit-*", pretrained=True) == ["vit-tiny.shapes"]
    assert zoo.model_info("lm-tiny")["pretrained_tags"] == ["mqar"]
    x = ids(2, 5)
    want = model(x)
    for loaded in (zoo.create_model("lm-tiny.mqar"), zoo.create_model("lm-tiny", pretrained="mqar"),
                   zoo.create_model("lm-tiny", pretrained=True), zoo.create_model("lm-tiny.mqar", pretrained=True)):
        assert torch.equal(loaded.eval()(x), want)
    with pytest.raises(ValueError, match="Did you mean: mqar"):
        zoo.create_model("lm-tiny", pretrained="mqr")
    with pytest.raises(ValueError, match="already names tag 'mqar'"):
        zoo.create_model("lm-tiny.mqar", pretrained="other")
    with pytest.raises(TypeError, match="pretrained must be a bool, a tag or a folder path"):
        zoo.create_model("lm-tiny", pretrained=3)


@pytest.mark.parametrize("name", zoo.list_models("lm-tiny*"))
def test_every_tiny_lm_variant_trains_and_decodes_like_its_forward(name):
    model = zoo.create_model(name, max_seq_len=64).eval()
    ids = torch.randint(0, 256, (2, 21))
    logits = model(ids)
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    generated = model.generate(ids[:, :5], 6, temperature=0)
    recomputed = ids[:, :5]
    for _ in range(6):  # greedy decoding by full forwards must match the mixers' step path
        recomputed = torch.cat([recomputed, model(recomputed)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, recomputed)


@pytest.mark.parametrize("name", zoo.list_models("vit-tiny*"))
def test_every_tiny_vit_variant_runs(name):
    model = zoo.create_model(name)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_an_lm_refuses_a_bidirectional_only_mixer():
    with pytest.raises(ValueError, match="mixer 'nystromformer' is bidirectional only and cannot serve a lm model"):
        zoo.create_model("lm-tiny", mixer="nystromformer")


@pytest.mark.parametrize("name", zoo.list_models("vit-*-sliding-window") + zoo.list_models("vit-*-block-sparse"))
def test_vit_local_attention_variants_are_local(name):
    """The window (or block) is sized to the patch grid: shorter than the sequence, so the mixer is not full attention."""
    with torch.device("meta"):
        model = zoo.create_model(name)
    tokens = (model.config.img_size // model.config.patch_size) ** 2 + 1
    mixer = model.blocks[0].mixer
    span = mixer.window if hasattr(mixer, "window") else mixer.block_size * (2 * mixer.window_blocks + 1)
    assert span < tokens, (name, span, tokens)
