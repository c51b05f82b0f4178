"""The mixer registry: creation, listing, helpful errors, registration rules and capabilities."""
from __future__ import annotations

import pytest
import torch

import layers
from layers.mixer import MIXERS, Mixer, create_mixer, get_mixer_class, list_mixers, parse_mixer_spec, register_mixer
from layers.registry import Registry, check_kwargs, close_matches, signature_kwargs


@pytest.fixture
def temp_mixer():
    """Register mixers for one test only: ``temp_mixer(name, cls)``; all are removed afterwards."""
    added = []

    def add(name: str, cls: type) -> type:
        register_mixer(name)(cls)
        added.append(name)
        return cls

    yield add
    for name in added:
        MIXERS._entries.pop(name, None)
    assert not any(n in list_mixers() for n in added)


class CausalOnly(Mixer):
    """A toy causal-only mixer: a causal running mean followed by a linear map."""

    supports_bidirectional = False
    supports_mask = False

    def __init__(self, dim, num_heads, causal=True, scale: float = 1.0):
        super().__init__(dim, num_heads, causal)
        self.scale = scale
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        counts = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        return self.lin(self.scale * x.cumsum(1) / counts)


class BidirOnly(Mixer):
    supports_causal = False

    def forward(self, x, mask=None):
        return x


class AnyKwargs(Mixer):
    def __init__(self, dim, num_heads, causal=True, **kwargs):
        super().__init__(dim, num_heads, causal)
        self.kwargs = kwargs


# --- create / list --------------------------------------------------------------------------


def test_attention_is_registered_and_created():
    assert "attention" in list_mixers()
    assert get_mixer_class("attention") is layers.Attention
    m = create_mixer("attention", 64, 4, causal=False, backend="math", qkv_bias=True)
    assert isinstance(m, layers.Attention) and isinstance(m, Mixer)
    assert (m.dim, m.num_heads, m.head_dim, m.causal, m.backend) == (64, 4, 16, False, "math")
    assert m.qkv.bias is not None and m.proj.bias is None
    assert m.mixer_name == "attention"
    y = m(torch.randn(2, 5, 64))
    assert y.shape == (2, 5, 64)


def test_list_mixers_is_sorted_and_filters(temp_mixer):
    temp_mixer("toy-b", CausalOnly)
    temp_mixer("toy-a", BidirOnly)
    names = list_mixers()
    assert names == sorted(names) and {"toy-a", "toy-b", "attention"} <= set(names)
    assert list_mixers("toy-*") == ["toy-a", "toy-b"]
    assert list_mixers("att*") == ["attention"]
    assert list_mixers("nothing-*") == []


# --- errors -----------------------------------------------------------------------------------


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match=r"unknown mixer 'atention'\. Did you mean: attention[,?]"):  # best match first
        create_mixer("atention", 32, 2)
    with pytest.raises(ValueError, match="Did you mean: attention"):
        get_mixer_class("Attention")


def test_unknown_name_without_close_match():
    with pytest.raises(ValueError, match=r"unknown mixer 'zzzzzz'\.") as info:
        create_mixer("zzzzzz", 32, 2)
    assert "Did you mean" not in str(info.value) and "list_mixers()" in str(info.value)


def test_non_string_name_is_type_error():
    with pytest.raises(TypeError, match="mixer name must be a str, got int"):
        create_mixer(3, 32, 2)


def test_unknown_kwarg_names_it_and_lists_valid_ones():
    with pytest.raises(TypeError) as info:
        create_mixer("attention", 32, 2, bakend="math")
    msg = str(info.value)
    assert "'bakend'" in msg and "Did you mean: backend" in msg
    assert "Valid arguments: backend, proj_bias, qk_norm, qkv_bias, rope, rope_base" in msg


def test_unknown_kwarg_skipped_for_var_kwargs_mixers(temp_mixer):
    """A mixer whose __init__ takes **kwargs accepts anything: the registry cannot check."""
    temp_mixer("toy-any", AnyKwargs)
    assert create_mixer("toy-any", 8, 2, whatever=3).kwargs == {"whatever": 3}


def test_register_non_mixer_raises():
    class NotAMixer(torch.nn.Module):
        pass

    for bad in (NotAMixer, torch.nn.Linear, lambda dim, num_heads: None, "attention"):
        with pytest.raises(TypeError, match="must decorate a Mixer subclass"):
            register_mixer("toy-bad")(bad)
    assert "toy-bad" not in list_mixers()


def test_duplicate_registration_raises(temp_mixer):
    temp_mixer("toy-dup", CausalOnly)
    with pytest.raises(ValueError, match="mixer 'toy-dup' is already registered"):
        register_mixer("toy-dup")(BidirOnly)
    assert get_mixer_class("toy-dup") is CausalOnly  # the first registration survives
    assert getattr(BidirOnly, "mixer_name", None) != "toy-dup"  # ... and the refused class is not renamed
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("attention")(CausalOnly)
    assert get_mixer_class("attention") is layers.Attention
    assert CausalOnly.mixer_name == "toy-dup"


# --- specs ------------------------------------------------------------------------------------


def test_parse_mixer_spec_str_and_dict():
    assert parse_mixer_spec("attention") == ("attention", {})
    assert parse_mixer_spec({"name": "attention"}) == ("attention", {})
    spec = {"name": "attention", "backend": "math", "rope": False}
    assert parse_mixer_spec(spec) == ("attention", {"backend": "math", "rope": False})
    assert spec == {"name": "attention", "backend": "math", "rope": False}  # not mutated
    name, kwargs = parse_mixer_spec(spec)
    m = create_mixer(name, 32, 2, **kwargs)
    assert m.backend == "math" and m.rope is False


@pytest.mark.parametrize("bad,err,match", [
    ({"backend": "math"}, ValueError, r"needs a 'name' key, got keys \['backend'\]"),
    ({}, ValueError, "needs a 'name' key"),
    (3, TypeError, "got int"),
    (None, TypeError, "got NoneType"),
    (["attention"], TypeError, "got list"),
])
def test_parse_mixer_spec_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        parse_mixer_spec(bad)


# --- capabilities -------------------------------------------------------------------------------


def test_causal_only_mixer_refuses_bidirectional(temp_mixer):
    temp_mixer("toy-causal", CausalOnly)
    m = create_mixer("toy-causal", 16, 2, scale=2.0)
    assert m.causal and m.scale == 2.0
    x = torch.randn(1, 4, 16)
    torch.testing.assert_close(m(x)[:, :2], m(x[:, :2]))  # it really is causal
    with pytest.raises(ValueError, match=r"CausalOnly does not support causal=False \(it is causal only; the bidirectional "
                                         r"wrapper"):
        create_mixer("toy-causal", 16, 2, causal=False)


def test_bidirectional_only_mixer_refuses_causal(temp_mixer):
    temp_mixer("toy-bidir", BidirOnly)
    assert create_mixer("toy-bidir", 16, 2, causal=False).causal is False
    with pytest.raises(ValueError, match="does not support causal=True"):
        create_mixer("toy-bidir", 16, 2)


def test_capability_attributes():
    cls = get_mixer_class("attention")
    assert cls.supports_causal and cls.supports_bidirectional and cls.supports_mask
    assert Mixer.supports_causal and Mixer.supports_bidirectional  # defaults


def test_mask_refused_when_unsupported(temp_mixer):
    temp_mixer("toy-nomask", CausalOnly)
    m = create_mixer("toy-nomask", 16, 2)
    with pytest.raises(ValueError, match="does not accept a padding mask"):
        m(torch.randn(1, 3, 16), mask=torch.ones(1, 3, dtype=torch.bool))


def test_models_see_capabilities(temp_mixer):
    """LMs may use causal mixers only; ViTs bidirectional ones only."""
    import zoo  # noqa: F401
    from zoo.models.lm import LM
    from zoo.models.vit import ViT

    temp_mixer("toy-causal", CausalOnly)
    temp_mixer("toy-bidir", BidirOnly)
    assert "toy-causal" in LM.allowed_mixers() and "toy-bidir" not in LM.allowed_mixers()
    assert "toy-bidir" in ViT.allowed_mixers() and "toy-causal" not in ViT.allowed_mixers()
    assert "attention" in LM.allowed_mixers() and "attention" in ViT.allowed_mixers()


def test_base_mixer_has_no_decoding():
    m = BidirOnly(8, 2, causal=False)
    with pytest.raises(NotImplementedError, match="BidirOnly has no incremental decoding"):
        m.init_state(1)
    with pytest.raises(NotImplementedError, match="no incremental decoding"):
        m.step(torch.randn(1, 1, 8), {})
    with pytest.raises(NotImplementedError):
        m.state_size(4)
    assert "dim=8, num_heads=2, causal=False" in repr(m)


def test_default_prefill_loops_step():
    """Mixer.prefill's default is a loop of step calls (the attention mixer overrides it)."""

    class Cumsum(Mixer):
        def init_state(self, batch_size, device=None, dtype=None, max_len=None):
            return {"sum": torch.zeros(batch_size, 1, self.dim)}

        def step(self, x_t, state):
            state["sum"] = state["sum"] + x_t
            return state["sum"], state

    m = Cumsum(8, 2)
    x = torch.randn(2, 5, 8)
    y, state = m.prefill(x, m.init_state(2))
    torch.testing.assert_close(y, x.cumsum(1))
    torch.testing.assert_close(state["sum"], x.sum(1, keepdim=True))


# --- the generic registry helpers -----------------------------------------------------------------


def test_registry_helpers():
    reg = Registry("widget")
    reg.register("alpha", dict)
    assert reg.get("alpha") is dict and "alpha" in reg and "beta" not in reg
    with pytest.raises(ValueError, match=r"unknown widget 'alpah'\. Did you mean: alpha\?") as info:
        reg.get("alpah")
    assert "list_widgets()" in str(info.value)
    assert close_matches("atention", ["attention", "mamba", "gla"]) == ["attention"]
    check_kwargs("thing", {"a": 1}, ["a", "b"])
    with pytest.raises(TypeError, match="thing got an unknown argument 'c'. Valid arguments: a, b"):
        check_kwargs("thing", {"a": 1, "c": 2}, ["b", "a"])
    assert signature_kwargs(lambda a, b=1, *, c: None) == ["a", "b", "c"]
    assert signature_kwargs(lambda a, **kw: None) is None
