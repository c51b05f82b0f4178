"""The ``bidirectional`` wrapper against the same inner modules run by hand: ``fwd(x) + flip(bwd(flip(x)))``
(or the concat projection), padding (each sequence alone), dependence on future tokens, and its errors.

Tolerance: float32 1e-5 of ``max(1, max|expected|)`` (``assert_close``).
"""
from __future__ import annotations

import pytest
import torch

import layers
import layers.bidirectional  # noqa: F401  (registers "bidirectional")
import layers.rwkv6  # noqa: F401  (registers "rwkv6")
import zoo
from layers.bidirectional import Bidirectional
from mixer_checks import assert_close, check_compile_fullgraph, check_padded_equals_alone, padding_mask

# every registered mixer that can run causally, so that a new causal mixer is covered without editing this list
INNERS = [n for n in layers.list_mixers() if layers.get_mixer_class(n).supports_causal]
MASKED_INNERS = [n for n in INNERS if layers.get_mixer_class(n).supports_mask]
B, T, D, H = 3, 13, 32, 2
MAX_LEN = 32  # the model-level max_seq_len the tests fill in (fixed-length mixers: cosformer, hyena's filter, ...)
# windows and blocks small enough that the tests' 13 / 21 tokens span several of them
INNER_OPTIONS = {"block_sparse": {"block_size": 4}, "sliding_window": {"window": 5}}


def make(inner="gla", **kwargs) -> Bidirectional:
    return layers.create_mixer("bidirectional", D, H, causal=False, inner=inner, **kwargs)


def make_any(inner: str, **kwargs) -> Bidirectional:
    """The wrapper around any registered causal mixer, with a model's ``max_seq_len`` filled in as a model would."""
    spec = {"name": inner, **INNER_OPTIONS.get(inner, {})}
    options = Bidirectional.fill_defaults({"inner": spec, **kwargs}, {"max_seq_len": MAX_LEN})
    return layers.create_mixer("bidirectional", D, H, causal=False, **options)


def test_inners_cover_the_registry():
    assert {"gla", "retnet", "deltanet", "linear", "rwkv6", "cosformer", "mamba2", "hyena", "s4d"} <= set(INNERS)
    assert "bidirectional" not in INNERS and "linformer" not in INNERS


def by_hand(m: Bidirectional, x, mask=None):
    flip = lambda t: None if t is None else t.flip(1)
    y_fwd, y_bwd = m.fwd(x, mask=mask), flip(m.bwd(flip(x), mask=flip(mask)))
    y = y_fwd + y_bwd if m.combine == "add" else y_fwd @ m.proj.weight[:, :D].T + y_bwd @ m.proj.weight[:, D:].T
    return y if mask is None else y * mask[..., None]


@pytest.mark.parametrize("inner", INNERS)
def test_matches_inner_mixers_by_hand(inner):
    m = make_any(inner)
    assert m.fwd is not m.bwd and m.fwd.causal and m.bwd.causal and m.inner_name == inner
    x = torch.randn(B, T, D)
    assert_close(m(x), by_hand(m, x))
    if m.fwd.supports_mask:
        mask = padding_mask([13, 8, 3], T, "right")
        assert_close(m(x, mask), by_hand(m, x, mask))


@pytest.mark.parametrize("inner", MASKED_INNERS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_alone(inner, side):
    m = make_any(inner)
    x = torch.randn(4, 21, D)
    check_padded_equals_alone(m, x, padding_mask([21, 9, 1, 14], 21, side))


@pytest.mark.parametrize("combine", ["add", "concat"])
def test_depends_on_past_and_future_tokens(combine):
    m = make("gla", combine=combine)
    x = torch.randn(1, T, D, requires_grad=True)
    t = T // 2
    m(x)[0, t].square().sum().backward()
    per_token = x.grad[0].abs().amax(-1)
    assert torch.all(per_token > 0), "position t must depend on every token, before and after it"
    x.grad = None
    m.fwd(x)[0, t].square().sum().backward()  # the causal inner mixer alone does not see the future
    assert torch.all(x.grad[0, t + 1:] == 0) and x.grad[0, t].abs().max() > 0


def test_concat_and_share():
    m = make("retnet", combine="concat")
    assert m.proj.weight.shape == (D, 2 * D) and m.proj.bias is None
    x, mask = torch.randn(B, T, D), padding_mask([13, 8, 3], T, "left")
    assert_close(m(x, mask), by_hand(m, x, mask))
    shared = make("gla", share=True)
    assert shared.fwd is shared.bwd
    separate = make("gla")
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    assert n(separate) == 2 * n(shared) == 2 * n(shared.fwd)
    assert_close(shared(x), by_hand(shared, x))
    assert "inner='gla', share=True, combine='add'" in repr(shared)


def test_config_spec_mapping():
    """``{name: bidirectional, inner: {name: ..., **options}}`` builds through parse_mixer_spec + create_mixer."""
    name, kwargs = layers.parse_mixer_spec({"name": "bidirectional", "inner": {"name": "gla", "expand_k": 1.0}})
    m = layers.create_mixer(name, D, H, causal=False, **kwargs)
    assert m.fwd.head_k_dim == m.bwd.head_k_dim == D // H and m.inner_name == "gla"
    assert layers.get_mixer_class("bidirectional").supports_causal is False


def test_fill_defaults_reaches_the_inner_mixer():
    """A model's options go into the inner spec where the inner mixer takes them; the spec's own options win."""
    fill = Bidirectional.fill_defaults
    vit = {"qkv_bias": True, "proj_bias": True, "max_seq_len": 17}
    assert fill({"inner": "cosformer", "combine": "concat"}, vit) == {
        "inner": {"name": "cosformer", "qkv_bias": True, "proj_bias": True, "max_seq_len": 17}, "combine": "concat"}
    assert fill({}, vit) == {"inner": {"name": "gla", "qkv_bias": True, "proj_bias": True}}  # the default inner
    assert fill({"inner": {"name": "cosformer", "max_seq_len": 9}}, {"max_seq_len": 17}) == {
        "inner": {"name": "cosformer", "max_seq_len": 9}}
    assert fill({"inner": "mamba2"}, vit) == {"inner": "mamba2"}  # takes none of them: the spec is left as given
    assert fill({"inner": {"name": "bidirectional", "inner": "cosformer"}}, {"max_seq_len": 17}) == {
        "inner": {"name": "bidirectional", "inner": {"name": "cosformer", "max_seq_len": 17}}}
    for bad in ("glaa", {"expand_k": 1.0}, 3):  # left for the constructor to report
        assert fill({"inner": bad}, vit) == {"inner": bad}


def test_vit_passes_its_max_seq_len_to_a_fixed_length_inner_mixer():
    """cosformer needs max_seq_len when causal; a ViT's token count must reach it through the wrapper."""
    model = zoo.create_model("vit-tiny", depth=2, mixer={"name": "bidirectional", "inner": {"name": "cosformer"}})
    num_tokens = (model.config.img_size // model.config.patch_size) ** 2 + 1
    for block in model.blocks:
        assert block.mixer.inner_name == "cosformer" and block.mixer.fwd.max_seq_len == num_tokens
        assert block.mixer.fwd.qkv.bias is not None  # the ViT's biased projections too
    img = torch.randn(2, 3, model.config.img_size, model.config.img_size)
    out = model(img)
    assert out.shape == (2, model.config.num_classes) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert model.blocks[0].mixer.bwd.qkv.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match=r"inner: unknown mixer 'cosformr'"):
        zoo.create_model("vit-tiny", depth=2, mixer={"name": "bidirectional", "inner": "cosformr"})


def test_compile_fullgraph():
    m = make("retnet", combine="concat")
    check_compile_fullgraph(m, torch.randn(2, 11, D), [padding_mask([11, 4], 11, "right")])


def test_errors(monkeypatch):
    with pytest.raises(ValueError, match="causal=True"):
        layers.create_mixer("bidirectional", D, H, causal=True)
    with pytest.raises(ValueError, match=r"inner: unknown mixer 'glaa'.*Did you mean: gla"):
        make("glaa")
    with pytest.raises(ValueError, match=r"inner: .*'name'"):
        make({"expand_k": 1.0})
    with pytest.raises(ValueError, match="inner mixer 'linformer' cannot run causally"):
        make("linformer")
    with pytest.raises(ValueError, match="inner: the inner mixer's causal option"):
        make({"name": "gla", "causal": False})
    with pytest.raises(TypeError, match="expand_kk"):
        make({"name": "gla", "expand_kk": 1.0})
    with pytest.raises(TypeError, match="'mixer'"):
        layers.create_mixer("bidirectional", D, H, causal=False, mixer="gla")
    with pytest.raises(ValueError, match="combine"):
        make(combine="mean")
    m = make("gla")
    for call in (lambda: m.init_state(1), lambda: m.step(torch.randn(1, 1, D), {}),
                 lambda: m.prefill(torch.randn(1, 3, D), {})):
        with pytest.raises(ValueError, match="causal=False.*no incremental decoding"):
            call()
    monkeypatch.setattr(m.fwd, "supports_mask", False)
    with pytest.raises(ValueError, match="inner mixer 'gla' does not accept a padding mask"):
        m(torch.randn(1, 3, D), mask=torch.ones(1, 3, dtype=torch.bool))
    m(torch.randn(1, 3, D))  # without a mask it still runs
