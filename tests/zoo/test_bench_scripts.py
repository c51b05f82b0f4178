"""The state-space, mixer and mixture-of-experts GPU benchmark scripts and the Mamba CPU benchmark: their --smoke
runs write complete reports."""
import json
import sys
import types

import pytest
import torch
from script_loader import load_script



@pytest.fixture(scope="module")
def ssm(tmp_path_factory):
    script = load_script("bench_ssm_gpu")
    paths = script.main(["--smoke", "--out", str(tmp_path_factory.mktemp("ssm"))])
    return script, json.loads(paths["json"].read_text()), paths["md"].read_text()


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    script = load_script("bench_moe_gpu")
    paths = script.main(["--smoke", "--profile", "--out", str(tmp_path_factory.mktemp("moe"))])
    return script, json.loads(paths["json"].read_text()), paths["md"].read_text()


def test_ssm_scans_time_every_case_impl_and_length(ssm):
    script, report, md = ssm
    rows = report["scans"]["rows"]
    expected = {(case, impl.name, T) for case, (_, impls) in script.SCANS.items() for impl in impls
                for T in script.PRESETS["smoke"]["seq_lens"]}
    assert {(r["case"], r["impl"], r["seq_len"]) for r in rows} == expected and len(rows) == len(expected)
    for r in rows:
        if r["impl"] == "kernel":  # fla's kernel needs CUDA: reported, not run
            assert r["fwd_bwd_ms"] is None and r["error"] == "fla kernels need CUDA"
        elif r["impl"] == "triton":  # so do ours
            assert r["fwd_bwd_ms"] is None and r["error"] == "our SSD kernels need CUDA and Triton"
        elif r["impl"] == "mamba_ssm":  # and mamba-ssm's
            assert r["fwd_bwd_ms"] is None and r["error"] == "mamba-ssm's kernels need CUDA"
        else:
            assert r["error"] is None and r["fwd_bwd_ms"] > 0
    summary = report["scans"]["summary"]
    assert len(summary) == 4 and all(s["speedup"] > 0 and s["chunked_vs_kernel"] is None and s["chunked_vs_triton"] is None
                                 and s["triton_vs_mamba_ssm"] is None for s in summary)
    assert [s["meets_speedup_target"] is None for s in summary] == [True, False, True, False]  # judged at the longest T
    assert report["device_name"] == "cpu" and "Card: **cpu**" in md and "## Scans" in md


def test_ssm_mamba_ssm_peer(ssm, monkeypatch):
    """mamba-ssm's SSD is a peer found by import: missing, the row says why; present, it runs at its layer's
    chunk of 256 (``layers.mamba2.ssd_mamba_ssm``)."""
    from layers import mamba2
    script = ssm[0]
    assert script.mamba_ssm_missing(torch.device("cpu")) == "mamba-ssm's kernels need CUDA"
    monkeypatch.setattr(mamba2, "MAMBA_SSM_MODULE", "effzoo_no_such_module.ssd_combined")
    assert script.mamba_ssm_missing(torch.device("cuda")) == "mamba-ssm is not importable (ModuleNotFoundError)"
    calls = []

    def combined(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=False):
        calls.append((chunk_size, return_final_states))
        return script.ssd_chunked(x, dt, A, B, C, D, initial_states)

    monkeypatch.setitem(sys.modules, "fake_mamba_ssd", types.SimpleNamespace(mamba_chunk_scan_combined=combined))
    monkeypatch.setattr(mamba2, "MAMBA_SSM_MODULE", "fake_mamba_ssd")
    assert script.mamba_ssm_missing(torch.device("cuda")) is None
    inputs = script.mamba2_inputs(script.PRESETS["smoke"]["shapes"]["mamba2"], 8, torch.device("cpu"), torch.float32)
    y, final = script.ssd_mamba_ssm_default_chunk(**inputs)
    assert calls == [(256, True)] and y.shape == inputs["x"].shape and final.shape[-2:] == (8, 8)


def test_ssm_training_and_decoding_rows(ssm):
    _, report, md = ssm
    training = report["training"]
    assert [r["run"] for r in training["rows"]] == ["lm-tiny", "lm-tiny-mamba2", "lm-tiny-mamba2 grad_checkpointing=True"]
    assert all(r["error"] is None and r["tokens_per_s"] > 0 and r["params"] == r["active_params"] > 0
               for r in training["rows"])
    assert training["ratios"].keys() == {"lm-tiny-mamba2", "lm-tiny-mamba2 grad_checkpointing=True"}
    assert all(x > 0 for x in training["ratios"].values())
    decoding = report["decoding"]
    by = {(r["model"], r["context"]): r for r in decoding["rows"]}
    assert all(r["error"] is None and r["tokens_per_s"] > 0 and r["peak_decode_mb"] is None for r in decoding["rows"])
    assert by["lm-tiny", 32]["state_mb"] > by["lm-tiny", 16]["state_mb"]  # the KV cache grows with the context
    assert by["lm-tiny-mamba2", 32]["state_mb"] == by["lm-tiny-mamba2", 16]["state_mb"] > 0  # the SSM state does not
    (mamba2,) = [s for s in decoding["summary"] if s["model"] == "lm-tiny-mamba2"]
    assert mamba2["flat_memory"] and mamba2["memory_measure"] == "state_mb"
    assert "## Training" in md and "## Decoding" in md


def test_ssm_layer_rows(ssm):
    script, report, md = ssm
    rows = report["layer"]["rows"]
    assert [(r["backend"], r["compiled"]) for r in rows] == [(b, False) for b in script.LAYER_BACKENDS]
    torch_row, triton_row = rows
    assert torch_row["error"] is None and torch_row["fwd_bwd_ms"] > 0
    assert triton_row["fwd_bwd_ms"] is None and triton_row["error"] == "our SSD kernels need CUDA and Triton"
    assert report["layer"]["summary"] == {"eager": None} and "## The Mamba-2 layer" in md


def test_state_bytes_walk_nested_states():
    from zoo.bench import tensor_bytes

    state = [{"mixer": {"k": torch.zeros(2, 3), "pos": 0}}, {"mixer": {"ssm": torch.zeros(4, dtype=torch.float64)}},
             (torch.zeros(1, dtype=torch.bfloat16),)]
    assert tensor_bytes(state) == 6 * 4 + 4 * 8 + 2


def test_moe_layer_rows_and_summary(moe):
    script, report, md = moe
    layer = report["layer"]
    settings = script.PRESETS["smoke"]["settings"]
    assert [(r["top_k"], r["hidden"], r["impl"]) for r in layer["rows"]] == [
        (s["top_k"], s["hidden"], impl) for s in settings for impl in script.LAYER_IMPLS]
    for r in layer["rows"]:
        assert r["error"] is None and r["fwd_bwd_ms"] > 0 and r["tflops"] > 0
        assert r["expert_flops"] == r["tokens"] * r["top_k"] * 3 * r["dim"] * r["hidden"] * 2 * 3
    for s in layer["summary"]:
        assert s["efficiency"] > 0 and s["efficiency_vs_fused_dense"] > 0 and s["grouped_gemm_efficiency"] > 0
        assert s["compiled_efficiency"] > 0
        assert s["loop_speedup"] > 0
        assert s["auto_choice"] == "grouped_mm" or s["auto_choice"].startswith("loop (")
    assert report["device_name"] == "cpu" and "Card: **cpu**" in md and "## MoE layer" in md
    profiles = layer["profiles"]
    assert [(p["top_k"], p["hidden"]) for p in profiles] == [(s["top_k"], s["hidden"]) for s in settings]
    for prof in profiles:
        names = [e["name"] for e in prof["events"]]
        assert "aten::_grouped_mm" in names and all(e["ms_per_iter"] > 0 for e in prof["events"])
    assert "Where the grouped_mm layer's time goes" in md


def test_moe_training_matches_active_params(moe):
    script, report, md = moe
    assert [pair["moe"]["accum"] for pair in report["training"]] == [1, 2]  # micro-batches per optimiser step
    pair = report["training"][0]
    moe_row, dense_row = pair["moe"], pair["dense"]
    assert (moe_row["model"], dense_row["model"]) == ("lm-tiny-moe", "lm-tiny")
    assert moe_row["error"] is None and dense_row["error"] is None and pair["ratio"] > 0
    assert moe_row["compile"] is dense_row["compile"] is False  # --compile adds the compiled pair
    assert moe_row["active_params"] == pair["moe_active_params"] < moe_row["params"]
    hidden = pair["dense_mlp_hidden"]
    assert dense_row["overrides"] == {"mlp_hidden": hidden} and hidden % script.HIDDEN_MULTIPLE == 0
    # the nearest multiple of 64: one step changes a SwiGLU LM by 3 * dim * 64 per layer
    step = 3 * 192 * script.HIDDEN_MULTIPLE * 4
    assert abs(dense_row["params"] - pair["moe_active_params"]) <= step / 2
    (seen,) = pair["dispatch"]["in_model"]  # smoke: float32 tokens and weights, which grouped_mm takes
    assert seen.startswith("implementation=auto: tokens torch.float32, experts torch.float32") and "grouped_mm" in seen
    assert "## Training steps" in md and "What the MoE layers receive" in md


def test_mixers_smoke_kernels_and_decoding(tmp_path):
    """--mixers and --seq-lens pick the kernel rows; without CUDA only the torch path and SDPA run, and decoding is
    eager (the graph modes need CUDA)."""
    script = load_script("bench_mixers_gpu")
    paths = script.main(["--smoke", "--mixers", "linear,retnet", "--seq-lens", "32,64", "--iters", "1", "--out", str(tmp_path)])
    report, md = json.loads(paths["json"].read_text()), paths["md"].read_text()
    rows = report["kernels"]["rows"]
    assert {(r["mixer"], r["impl"], r["seq_len"]) for r in rows} == {
        (m, impl, T) for m in ("linear", "retnet") for impl in ("sdpa", "ours-torch") for T in (32, 64)}
    assert all(r["error"] is None and r["fwd_bwd_ms"] > 0 for r in rows)
    assert all(t["ours_torch_vs_fla"] is None and t["ours_torch_compiled_vs_fla"] is None
               for s in report["kernels"]["summary"] for t in s["per_seq_len"])
    decoding = report["decoding"]["rows"]
    assert {r["mode"] for r in decoding} == {"eager"} and all(r["tokens_per_s"] > 0 for r in decoding)
    assert "ours-torch-compiled/fla" in md and "## Decoding" in md


def test_scripts_refuse_to_run_without_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("bench_ssm_gpu", "bench_moe_gpu", "bench_mixers_gpu"):
        with pytest.raises(SystemExit, match="CUDA is not available"):
            load_script(name).main(["--out", str(tmp_path)])


def test_ssm_training_runs_can_be_narrowed_to_some_models(tmp_path):
    script = load_script("bench_ssm_gpu")
    runs = script.PRESETS["smoke"]["train_runs"]
    assert script.select_train_runs(runs, []) == runs[:1]
    assert script.select_train_runs(runs, ["lm-tiny-mamba2"]) == runs
    with pytest.raises(ValueError, match=r"--models: 'lm-tiny-mamba' .*did you mean lm-tiny-mamba2"):
        script.select_train_runs(runs, ["lm-tiny-mamba"])
    paths = script.main(["--smoke", "--only", "training", "--models", "lm-tiny", "--out", str(tmp_path)])
    assert [r["run"] for r in json.loads(paths["json"].read_text())["training"]["rows"]] == ["lm-tiny"]


def test_mamba_cpu_benchmark_times_every_scan_and_both_training_steps(tmp_path):
    script = load_script("bench_mamba_cpu")
    paths = script.main(["--smoke", "--out", str(tmp_path)])
    report, md = json.loads(paths["json"].read_text()), paths["md"].read_text()
    shapes = script.PRESETS["smoke"]["shapes"]
    assert [(r["batch"], r["d_inner"], r["seq_len"], r["d_state"], r["scan"]) for r in report["scans"]] == [
        (*shape, scan) for shape in shapes for scan in script.SCANS]
    for r in report["scans"]:  # the reference is skipped past ref_max_len, and says why
        skipped = r["scan"] == "reference" and r["seq_len"] > script.PRESETS["smoke"]["ref_max_len"]
        assert (r["fwd_bwd_ms"] is None) == skipped and (r["skipped"] is not None) == skipped
        assert skipped or r["fwd_bwd_ms"] > 0
    assert [r["scan"] for r in report["training"]] == ["chunked", "sequential"]
    assert all(r["step_ms"] > 0 and r["samples_per_s"] > 0 for r in report["training"])
    assert "| 1 | 8 | 40 | 4 | skipped |" in md and "chunked/sequential step time" in md
