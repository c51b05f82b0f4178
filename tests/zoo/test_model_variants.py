"""Model options added by the state-space and mixture-of-experts issues: Mamba's MLP-free block, RWKV's
stateful channel mix, MoE MLPs (LM and V-MoE), active-parameter counts and the auxiliary losses the
task adds and the trainer logs. Decoding equals the full forward for every lm-tiny variant in
``test_models.py``; here, the wiring. float32 tolerance 1e-5 scaled by max(1, max|expected|).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import layers
import zoo
from zoo.config import validate_run_config
from zoo.models.base import MoEMLP
from zoo.tasks.base import create_task
from zoo.train import train


def ids(B, T, vocab=256):
    return torch.randint(0, vocab, (B, T))


def test_mamba_layout_has_no_mlps_and_twice_the_layers():
    dense, mamba2 = zoo.model_info("lm-125m"), zoo.model_info("lm-125m-mamba2")
    assert mamba2["config"]["block"] == "mamba" and mamba2["config"]["depth"] == 2 * dense["config"]["depth"]
    assert [row["mixer"] for row in mamba2["layers"]] == ["mamba2"] * 24
    model = zoo.create_model("lm-tiny-mamba")
    assert all(b.mlp is None and b.norm2 is None for b in model.blocks)
    # the state size zoo info shows is the mixer's own, constant in the context length
    assert all(row["state_size"] == model.blocks[0].mixer.state_size(1) for row in zoo.model_info("lm-tiny-mamba")["layers"])


def test_mamba_dt_bias_survives_the_lm_initialisation():
    """The LM re-initialises linear layers GPT-2 style; Mamba's dt bias (marked _no_reinit) keeps softplus(b) in [dt_min, dt_max]."""
    model = zoo.create_model("lm-tiny-mamba")
    for block in model.blocks:
        dt = F.softplus(block.mixer.dt_proj.bias.detach())
        assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
        assert dt.std() > 0  # log-uniform draws, not zeros


def test_rwkv6_lm_uses_the_channel_mix_and_decodes_through_its_state():
    model = zoo.create_model("lm-tiny-rwkv6", init_std=0.1)
    assert all(isinstance(b.mlp, layers.rwkv6.RWKV6ChannelMix) for b in model.blocks)
    x = ids(2, 9)
    with torch.no_grad():
        full = model(x)
        states = model.init_state(2)
        assert all(set(s) == {"mixer", "mlp"} for s in states)
        logits, states = model.prefill(x[:, :4], states)
        outs = [logits]
        for t in range(4, 9):
            logits, states = model.prefill(x[:, t:t + 1], states)
            outs.append(logits)
    got = torch.cat(outs, 1)
    torch.testing.assert_close(got, full, atol=1e-5 * max(1.0, full.abs().max().item()), rtol=1e-5)


def test_rwkv6_lm_initialises_each_layer_for_its_depth():
    """RWKV's token-shift coefficients depend on the layer's relative depth: first and last layers differ."""
    model = zoo.create_model("lm-tiny-rwkv6")
    first, last = model.blocks[0].mlp.time_maa_k, model.blocks[-1].mlp.time_maa_k
    assert not torch.allclose(first, last)


@pytest.mark.parametrize("name", ["lm-tiny-moe", "lm-tiny-moe-fine"])
def test_moe_lm_counts_active_params_and_adds_aux_losses(name):
    model = zoo.create_model(name).eval()  # eval: bias balancing would move the routing between the two forwards
    moes = [m for m in model.modules() if isinstance(m, MoEMLP)]
    assert len(moes) == model.config.depth
    info = zoo.model_info(name)
    idle = sum(m.moe.total_params - m.moe.active_params for m in moes)
    assert info["active_params"] == info["params"] - idle < info["params"]
    x = ids(2, 12)
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    task = create_task("lm")
    loss, metrics = task.loss(model, batch)
    plain, _ = task.objective(model, batch)
    aux = sum(r.loss for r in model.moe_aux())
    assert torch.allclose(loss, plain + aux) and torch.allclose(metrics["moe_aux_loss"], aux)
    assert metrics["loss"] == plain.detach()  # perplexity comes from the task's own loss
    for i in range(len(moes)):
        assert 1.0 - 1e-6 <= metrics[f"moe{i}_max_load"] <= model.config.moe.num_experts + 1e-6
        assert metrics[f"moe{i}_dropped"] == 0.0  # dropless by default


def test_fine_grained_moe_has_the_dense_models_active_width():
    """64 experts of 1/8 width, top-6 + 2 shared: a token uses as many MLP weights as the dense LM (plus the router)."""
    dense, fine = zoo.model_info("lm-125m"), zoo.model_info("lm-125m-moe-fine")
    router = fine["config"]["depth"] * 64 * 768
    assert fine["active_params"] == dense["params"] + router


def test_vmoe_puts_experts_in_every_other_block_and_trains_through_the_classification_task():
    model = zoo.create_model("vit-tiny-moe")
    kinds = [isinstance(b.mlp, MoEMLP) for b in model.blocks]
    assert kinds == [False, True, False, True]
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.randint(0, 10, (4,))}
    loss, metrics = create_task("classification").loss(model, batch)
    loss.backward()
    assert {"moe0_max_load", "moe1_max_load"} <= set(metrics)
    assert model.blocks[1].mlp.moe.router.weight.grad.abs().sum() > 0  # the balance loss reaches the router


def test_moe_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="block='mamba' has none"):
        zoo.create_model("lm-tiny", block="mamba", moe={"num_experts": 4, "top_k": 1})
    with pytest.raises(ValueError, match="future"):  # expert choice looks at every token of the batch
        zoo.create_model("lm-tiny", moe={"num_experts": 4, "top_k": 1, "router": "expert_choice"})
    with pytest.raises(ValueError, match="unknown moe router 'softmax_top2'"):
        zoo.create_model("lm-tiny-moe", moe={"router": "softmax_top2"})
    with pytest.raises(ValueError, match="granularity"):
        zoo.create_model("lm-tiny", moe={"granularity": 7})
    with pytest.raises(ValueError, match="extra"):
        zoo.create_model("lm-tiny", moe={"experts": 4})


def test_trainer_logs_expert_load_per_moe_layer(tmp_path):
    raw = {
        "model": {"name": "lm-tiny-moe", "vocab_size": 32, "dim": 32, "depth": 2, "num_heads": 2, "max_seq_len": 16},
        "data": {"name": "mqar", "vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2, "num_examples": 64},
        "task": {"name": "lm"},
        "train": {"steps": 4, "batch_size": 8, "log_every": 1, "eval_every": 4, "eval_batches": 1, "progress": False,
                  "device": "cpu"},
        "out_dir": str(tmp_path / "run"),
    }
    train(validate_run_config(raw))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["split"] == "train"]
    assert logged and all({"moe0_max_load", "moe1_max_load", "moe0_dropped", "moe_aux_loss"} <= set(r) for r in logged)
    assert all(math.isfinite(r["moe0_max_load"]) for r in logged)


def test_cuda_graph_decoding_needs_cuda():
    model = zoo.create_model("lm-tiny-gla")
    with pytest.raises(ValueError, match="cuda_graph=True needs .* CUDA"):
        model.generate(ids(1, 4), 3, temperature=0, cuda_graph=True)
    with pytest.raises(ValueError, match="compile=True compiles the captured decoding step: it needs cuda_graph=True"):
        model.generate(ids(1, 4), 3, temperature=0, compile=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["lm-tiny-gla", "lm-tiny-retnet", "lm-tiny-deltanet", "lm-tiny-mamba2", "lm-tiny-mamba",
                                  "lm-tiny-rwkv6"])
def test_cuda_graph_decoding_equals_eager_decoding(name):
    """Greedy tokens from the replayed graph equal eager decoding's (same kernels, same order)."""
    torch.manual_seed(0)
    model = zoo.create_model(name, init_std=0.2).cuda().eval()
    prompt = ids(2, 5).cuda()
    eager = model.generate(prompt, 16, temperature=0)
    graphed = model.generate(prompt, 16, temperature=0, cuda_graph=True)
    assert torch.equal(graphed, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["lm-tiny-gla", "lm-tiny-mamba2"])
def test_compiled_graph_decoding_follows_eager_decoding(name):
    """The captured torch.compile'd step gives eager's next-token logits (fp32, fused kernels: 1e-4) for 8 steps,
    the states carried through the graph's static buffers."""
    from zoo.decoding import GraphedDecoder

    torch.manual_seed(0)
    model = zoo.create_model(name, init_std=0.2).cuda().eval()
    prompt, tokens = ids(2, 5).cuda(), ids(2, 8).cuda()
    with torch.no_grad():
        states = model.init_state(2, device="cuda", max_len=16)
        _, states = model.prefill(prompt, states)
        eager_states = GraphedDecoder._copy(states)
        decoder = GraphedDecoder(model, states, compile=True)
        for t in range(8):
            want, eager_states = model.prefill(tokens[:, t:t + 1], eager_states)
            torch.testing.assert_close(decoder.step(tokens[:, t:t + 1]), want[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_graph_decoding_refuses_a_kv_cache():
    model = zoo.create_model("lm-tiny").cuda()
    with pytest.raises(ValueError, match="growing KV cache"):
        model.generate(ids(1, 4).cuda(), 3, temperature=0, cuda_graph=True)


@pytest.mark.parametrize("name", ["lm-tiny", "lm-tiny-mamba2"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(name):
    """Recomputing each block in backward changes memory, not results (float32, 1e-6)."""
    torch.manual_seed(0)
    plain = zoo.create_model(name, dropout=0.0)
    recomputed = zoo.create_model(name, dropout=0.0, grad_checkpointing=True)
    recomputed.load_state_dict(plain.state_dict())
    x = ids(2, 16)
    grads = []
    for model in (plain, recomputed):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


def test_fixed_size_state_is_read_from_the_mixers_state_size():
    """Graph-capturable decoding: recurrent LMs yes; a KV cache, hyena's input cache or a hybrid with attention, no."""
    from zoo.decoding import has_fixed_size_state

    expected = {"lm-tiny-gla": True, "lm-tiny-mamba2": True, "lm-tiny-rwkv6": True, "lm-tiny": False,
                "lm-tiny-hyena": False, "lm-tiny-gla-hybrid": False}
    with torch.device("meta"):
        assert {name: has_fixed_size_state(zoo.create_model(name)) for name in expected} == expected


MOE_MIXERS = ["gla", "mamba2", "rwkv6", "hyena", "s4d", "deltanet", "retnet"]


@pytest.mark.parametrize("mixer", MOE_MIXERS)
def test_any_mixer_combines_with_moe_mlps(mixer):
    """Issue 5: lm-tiny-moe with another mixer keeps its MoE MLPs, adds their aux loss, trains, and decodes
    (step path) exactly as greedy decoding by full forwards does."""
    model = zoo.create_model("lm-tiny-moe", mixer=mixer, dim=32, depth=2, num_heads=2, max_seq_len=32, vocab_size=64,
                             init_std=0.2)
    assert all(b.mixer.mixer_name == mixer for b in model.blocks)
    moes = [m for m in model.modules() if isinstance(m, MoEMLP)]
    assert len(moes) == model.config.depth
    x = ids(2, 12, vocab=64)
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    task = create_task("lm")
    loss, metrics = task.loss(model, batch)
    plain, _ = task.objective(model, batch)
    aux = sum(r.loss for r in model.moe_aux())
    assert len(model.moe_aux()) == len(moes) and aux > 0 and torch.isfinite(loss)
    assert torch.allclose(metrics["moe_aux_loss"], aux)
    loss.backward()
    assert all(m.moe.router.weight.grad.abs().sum() > 0 for m in moes)  # the balance loss reaches every router
    assert all(p.grad is not None for n, p in model.named_parameters() if "mixer" in n and p.requires_grad)
    model.eval()
    prompt = x[:, :4]
    generated = model.generate(prompt, 6, temperature=0)
    recomputed = prompt
    with torch.no_grad():
        for _ in range(6):  # greedy decoding by full forwards must match the mixers' step path through the MoE
            recomputed = torch.cat([recomputed, model(recomputed)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated.shape == (2, 10) and torch.equal(generated, recomputed)
