"""The ``qk_norm`` option of every attention-like mixer (a per-head RMSNorm with learnable weights on q and k).

For each mixer built with ``qk_norm=True`` (random weights, norm weights away from 1): the fast path (chunked /
SDPA / sparse) equals the mixer's own naive reference, whose projections go through ``ref_qk_norm`` (forward,
input and parameter gradients); prefill then one-token steps equal the forward pass (causal mixers); the option
changes the output on the same weights; the norm weights get gradients; ``qk_norm=False`` adds no parameter.
The references are those of each mixer's own test module.
"""
from __future__ import annotations

import pytest
import torch

import layers
from mixer_checks import (assert_close, check_compile_fullgraph, check_grads_match, check_prefill_then_steps,
                          forward_backward, param_grads)
from test_attention import make_mixers as make_attention, reference_attention_module
from test_based import make_mixer as make_based, reference_based_module
from test_block_sparse import make as make_block_sparse, reference_module as reference_block_sparse
from test_cosformer import make_mixer as make_cosformer, reference_module as reference_cosformer
from test_deltanet import make_mixer as make_delta, reference_module as reference_delta
from test_gla import make_mixer as make_gla, reference_gla_module
from test_linear_attention import make_mixer as make_linear, reference_linear_module
from test_linformer import make_mixer as make_linformer, reference_linformer_module
from test_nystromformer import make_mixer as make_nystromformer, reference_nystrom_module
from test_performer import make_mixer as make_performer, reference_module as reference_performer
from test_retnet import make_mixer as make_retnet, reference_retnet_module
from test_sliding_window import make as make_sliding_window, reference_module as reference_sliding_window

D, H = 32, 2

# name -> (make(**kwargs) with random weights, reference(m, x) in float32, causal)
MIXERS = {
    "attention": (lambda **kw: make_attention(D, H, backends=("sdpa",), **kw)["sdpa"], reference_attention_module, True),
    "sliding_window": (lambda **kw: make_sliding_window(D, H, window=5, **kw), reference_sliding_window, True),
    "block_sparse": (lambda **kw: make_block_sparse(D, H, **kw), reference_block_sparse, True),
    "linear": (lambda **kw: make_linear(D, H, **kw), reference_linear_module, True),
    "gla": (lambda **kw: make_gla(D, H, **kw), reference_gla_module, True),
    "retnet": (lambda **kw: make_retnet(D, H, **kw), reference_retnet_module, True),
    "based": (lambda **kw: make_based(D, H, feature_dim=4, **kw), reference_based_module, True),
    "performer": (lambda **kw: make_performer(D, H, num_features=16, **kw), reference_performer, True),
    "cosformer": (lambda **kw: make_cosformer(D, H, **kw), reference_cosformer, True),
    "linformer": (lambda **kw: make_linformer(D, H, **kw), reference_linformer_module, False),
    "nystromformer": (lambda **kw: make_nystromformer(D, H, num_landmarks=4, **kw), reference_nystrom_module, False),
    "deltanet": (lambda **kw: make_delta("deltanet", D, H, chunk_size=16, **kw),
                 lambda m, x: reference_delta(m, x)[0].float(), True),
    "gated_deltanet": (lambda **kw: make_delta("gated_deltanet", D, H, chunk_size=16, **kw),
                       lambda m, x: reference_delta(m, x)[0].float(), True),
}
NAMES = list(MIXERS)
CAUSAL_NAMES = [n for n in NAMES if MIXERS[n][2]]


def make(name: str, qk_norm: bool = True, **kw):
    """The mixer with random weights; with qk_norm, norm weights 1 + 0.3 N(0, 1) (so they matter)."""
    m = MIXERS[name][0](qk_norm=qk_norm, **kw)
    if qk_norm:
        with torch.no_grad():
            for norm in (m.q_norm, m.k_norm):
                norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
    return m


@pytest.mark.parametrize("name", NAMES)
def test_qk_norm_matches_reference_forward_and_grads(name):
    """Fast path vs the naive reference with the normalised q and k: outputs and every gradient (norm weights
    included, which get a nonzero gradient)."""
    torch.manual_seed(0)
    m, reference = make(name), MIXERS[name][1]
    x, dy = torch.randn(2, 37, D), torch.randn(2, 37, D)
    grads = []
    for fn in (m, lambda t: reference(m, t)):
        m.zero_grad()
        y, gx = forward_backward(fn, x, dy)
        grads.append({"y": y.detach(), "x": gx, **param_grads(m)})
    assert_close(grads[0]["y"], grads[1]["y"], msg="output")
    assert {"q_norm.weight", "k_norm.weight"} <= set(grads[0])
    check_grads_match({k: v for k, v in grads[0].items() if k != "y"}, {k: v for k, v in grads[1].items() if k != "y"})
    for key in ("q_norm.weight", "k_norm.weight"):
        assert grads[0][key] is not None and grads[0][key].abs().max() > 0, f"{key} got no gradient"


@pytest.mark.parametrize("name", CAUSAL_NAMES)
def test_qk_norm_prefill_then_steps_equal_forward(name):
    torch.manual_seed(1)
    m = make(name)
    x = torch.randn(2, 21, D)
    check_prefill_then_steps(m, x, prompt=0)
    check_prefill_then_steps(m, x, prompt=13)


@pytest.mark.parametrize("name", NAMES)
def test_qk_norm_changes_output_and_adds_only_the_norm_weights(name):
    torch.manual_seed(2)
    m = make(name)
    plain = make(name, qk_norm=False)
    default = MIXERS[name][0]()  # qk_norm left at its default
    assert not plain.qk_norm and not default.qk_norm and m.qk_norm
    assert set(plain.state_dict()) == set(default.state_dict())
    assert not any("q_norm" in k or "k_norm" in k for k in plain.state_dict()), "qk_norm=False added parameters"
    assert set(m.state_dict()) == set(plain.state_dict()) | {"q_norm.weight", "k_norm.weight"}
    # the width of one head's q and k: based projects them to feature_dim (before its Taylor map)
    qk_width = m.feature_dim if name == "based" else getattr(m, "head_k_dim", m.head_dim)
    assert m.q_norm.weight.shape == m.k_norm.weight.shape == (qk_width,)
    missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"q_norm.weight", "k_norm.weight"}
    x = torch.randn(2, 19, D)
    with torch.no_grad():
        diff = (m(x) - plain(x)).abs().max().item()
    assert diff > 1e-3, f"qk_norm=True did not change the output ({diff:.3g})"
    assert "qk_norm=True" in m.extra_repr() and "qk_norm" not in plain.extra_repr()


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_deltanet_qk_norm_is_a_gain_inside_the_l2_norm(name):
    """DeltaNet L2-normalises q and k already (scale-invariant), so with the initial norm weights (ones) qk_norm
    leaves the output unchanged (up to eps); only the learned per-dimension gains change it."""
    torch.manual_seed(3)
    m = MIXERS[name][0](qk_norm=True)  # norm weights left at 1
    plain = MIXERS[name][0](qk_norm=False)
    plain.load_state_dict(m.state_dict(), strict=False)
    x = torch.randn(2, 19, D)
    with torch.no_grad():
        assert_close(m(x), plain(x), tol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_qk_norm_must_be_a_bool(name):
    with pytest.raises(ValueError, match="qk_norm"):
        MIXERS[name][0](qk_norm="yes")


@pytest.mark.parametrize("name", ["attention", "linear"])
def test_qk_norm_compiles_fullgraph(name):
    torch.manual_seed(4)
    m = make(name)
    check_compile_fullgraph(m, torch.randn(2, 21, D), [None, torch.arange(21)[None].expand(2, -1) >= torch.tensor([[0], [6]])])


def test_qk_norm_reaches_models_through_mixer_specs():
    """``qk_norm`` is an ordinary constructor option: a mixer spec mapping passes it."""
    m = layers.create_mixer("gla", D, H, qk_norm=True)
    assert m.qk_norm and m.q_norm.weight.shape == (m.head_k_dim,)
