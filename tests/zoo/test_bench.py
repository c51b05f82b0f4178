"""Benchmark tooling: rows for both regimes and impls, FLOP counts, peers that match ours, reports, the spine script."""
import json

import pytest
import torch
from script_loader import load_script
from torch import nn

import layers
import zoo
from zoo.bench import benchmark, count_flops, make_target, write_results
from zoo.models.vit import ViTConfig
from zoo.peers import SDPAAttention, plain_gpt_like, timm_peer_name, timm_vit_like

IMPLS = {"attention": "peer:SDPAAttention", "lm-tiny": "peer:PlainGPT", "vit-tiny": "peer:timm/VisionTransformer"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy CI box spinning threads make runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows():
    torch.manual_seed(0)
    return benchmark(list(IMPLS), seq_lens=(32, 64), warmup=1, iters=2, dim=64, num_heads=4, batch=2)


def test_rows_cover_names_impls_regimes_and_lengths(rows):
    seen = {(r["name"], r["impl"], r["regime"], r["seq_len"]) for r in rows}
    lengths = {"attention": (32, 64), "lm-tiny": (32, 64), "vit-tiny": (65,)}  # a ViT runs its own 8x8 patches + CLS
    expected = {(n, impl, regime, t) for n, peer in IMPLS.items() for impl in ("ours", peer)
                for regime in ("latency", "throughput") for t in lengths[n]}
    assert seen == expected and len(rows) == len(expected)
    for r in rows:
        assert r["error"] is None and r["device"] == "cpu" and r["device_name"] == "cpu" and r["peak_mem_mb"] is None
        assert r["batch"] == {"latency": 1, "throughput": 2}[r["regime"]]
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["tokens_per_s"] > 0 and r["params"] > 0
        assert r["flops_source"] == "counter" and r["macs"] == r["fwd_flops"] // 2 and r["fwd_bwd_flops"] > r["fwd_flops"] > 0
        assert (r["images_per_s"] is not None) == (r["name"] == "vit-tiny")
        assert r["kind"] == ("mixer" if r["name"] == "attention" else "model")


def test_ratio_is_ours_over_the_peer_of_the_same_run(rows):
    peers = {(r["name"], r["regime"], r["seq_len"]): r for r in rows if r["impl"] != "ours"}
    for r in rows:
        if r["impl"] == "ours":
            assert r["ratio_vs_peer"] == pytest.approx(r["fwd_bwd_ms"] / peers[r["name"], r["regime"], r["seq_len"]]["fwd_bwd_ms"])
            assert r["params"] == peers[r["name"], r["regime"], r["seq_len"]]["params"]
        else:
            assert r["ratio_vs_peer"] is None


def test_lm_forward_flops_match_the_analytic_count(rows):
    """2 FLOPs per multiply-add: the non-embedding matmuls, SDPA counted in full (q k^T and attn v, causal mask
    ignored, as torch's counter does) and the LM head."""
    c = zoo.create_model("lm-tiny").config
    d, L, h, V = c.dim, c.depth, c.hidden_dim(), c.vocab_size
    for r in (r for r in rows if r["name"] == "lm-tiny"):
        B, T = r["batch"], r["seq_len"]
        expected = 2 * B * T * L * (4 * d * d + 3 * d * h) + L * 4 * B * T * T * d + 2 * B * T * d * V
        assert r["fwd_flops"] == pytest.approx(expected, rel=0.01)


def test_analytic_flops_stand_in_for_kernels_the_counter_cannot_see():
    class Opaque(nn.Module):  # elementwise only: the counter sees no FLOPs, as with a custom kernel
        def forward(self, x):
            return x * 2

        def analytic_flops(self, batch, seq_len):
            return 1000 * batch * seq_len

    model = nn.Sequential(nn.Linear(8, 8, bias=False), Opaque())
    x = torch.randn(2, 3, 8, requires_grad=True)
    assert count_flops(model, lambda: model(x), 2, 3, backward=False) == (2 * 6 * 8 * 8 + 6000, "analytic")
    flops, source = count_flops(model, lambda: model(x).sum().backward(), 2, 3, backward=True)
    assert source == "analytic" and flops == 3 * 2 * 6 * 8 * 8 + 3 * 6000
    assert count_flops(model[0], lambda: model[0](x), 2, 3, backward=False) == (2 * 6 * 8 * 8, "counter")


@pytest.mark.parametrize("name", ["lm-tiny", "lm-125m", "lm-350m"])
def test_plain_gpt_has_the_lm_parameter_count(name):
    with torch.device("meta"):
        lm = zoo.create_model(name)
        assert sum(p.numel() for p in plain_gpt_like(lm).parameters()) == lm.num_params()


def test_plain_gpt_with_copied_weights_gives_the_same_logits():
    torch.manual_seed(0)
    lm = zoo.create_model("lm-tiny", vocab_size=96, dim=64, depth=2, num_heads=4, max_seq_len=32)
    plain = plain_gpt_like(lm)
    with torch.no_grad():
        for ours, peer in zip(lm.parameters(), plain.parameters(), strict=True):  # same shapes, same order
            peer.copy_(ours)
    ids = torch.randint(0, 96, (2, 32))
    torch.testing.assert_close(plain(ids), lm(ids), atol=1e-5, rtol=0)


def test_sdpa_attention_matches_the_attention_mixer():
    torch.manual_seed(0)
    ours = layers.create_mixer("attention", 64, 4)
    peer = SDPAAttention(64, 4)
    peer.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 64)
    torch.testing.assert_close(peer(x), ours(x), atol=1e-6, rtol=0)


def test_every_zoo_vit_has_a_timm_peer_of_its_size():
    names = {"vit-ti16": "vit_tiny_patch16_224", "vit-s16": "vit_small_patch16_224", "vit-b16": "vit_base_patch16_224",
             "vit-l16": "vit_large_patch16_224", "vit-tiny": None}
    for name, timm_name in names.items():
        with torch.device("meta"):
            ours = zoo.create_model(name)
            assert timm_peer_name(ours.config) == timm_name
            assert sum(p.numel() for p in timm_vit_like(ours.config).parameters()) == ours.num_params()
    assert timm_peer_name(ViTConfig(dim=768, depth=12, num_heads=12, patch_size=32)) is None


def test_lm_longer_than_max_seq_len_gets_a_longer_model():
    assert make_target("lm-tiny", (2048,), 64, 4).build().config.max_seq_len == 2048


def test_default_throughput_batch_fits_the_device():
    """~64k tokens a batch on a GPU; on a CPU 4096, so the README's `zoo bench` example finishes in minutes."""
    from zoo.bench import tokens_batch

    assert tokens_batch(1024, torch.device("cuda")) == 64 and tokens_batch(256, torch.device("cuda")) == 256
    assert tokens_batch(1024, torch.device("cpu")) == 4 and tokens_batch(8192, torch.device("cpu")) == 1


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="Did you mean: attention"):
        benchmark(["atention"], device="cpu")


def test_reduced_precision_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype='bfloat16'"):
        benchmark(["attention"], device="cpu", dtype="bfloat16")


def test_write_results(rows, tmp_path):
    paths = write_results(rows, tmp_path / "plain")
    assert set(paths) == {"json", "md"}
    assert json.loads(paths["json"].read_text()) == rows
    table = paths["md"].read_text()
    assert "peer:PlainGPT" in table and "vit-tiny" in table and "cpu" in table
    plotted = write_results(rows, tmp_path / "plot", plot=True)
    assert plotted["png"].read_bytes()[:4] == b"\x89PNG"


def test_spine_script_smoke(tmp_path):
    script = load_script("bench_spine_gpu")
    paths = script.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads(paths["json"].read_text())
    assert report["device_name"] == "cpu" and report["mfu_formula"].startswith("MFU = ")
    assert [r["regime"] for r in report["attention"]["ratios"]] == ["latency", "throughput"]
    assert all(r["ratio"] > 0 for r in report["attention"]["ratios"])
    (training,) = report["training"]
    assert training["model"] == "lm-tiny" and training["ratio"] > 0 and training["ours_mfu"] > 0
    assert "cpu" in paths["md"].read_text()


@pytest.mark.parametrize("mixer", layers.list_mixers())
def test_every_registered_mixer_benchmarks_as_a_layer(mixer):
    rows = benchmark([mixer], seq_lens=(16,), batch=2, dim=32, num_heads=2, warmup=1, iters=1, with_peer=False)
    ours = [r for r in rows if r["impl"] == "ours"]
    assert {r["regime"] for r in ours} == {"latency", "throughput"}
    assert all(r["fwd_bwd_ms"] > 0 and r["fwd_flops"] > 0 for r in ours)


def test_decode_modes_graph_only_fixed_size_states_on_cuda():
    """A KV cache grows, so attention decodes eagerly; recurrent models also replay graphs (eager and compiled
    step) on CUDA. Decided on the meta device: no GPU needed to ask."""
    from zoo.bench import DECODE_MODES, decode_modes

    cuda = torch.device("cuda")
    assert decode_modes("lm-tiny-gla", cuda) == list(DECODE_MODES) == ["eager", "cuda graph", "cuda graph + compile"]
    assert decode_modes("lm-tiny", cuda) == ["eager"]
    assert decode_modes("lm-tiny-gla", torch.device("cpu")) == ["eager"]
