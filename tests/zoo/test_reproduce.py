"""Reproductions: the sweep files load and validate, their grids build models, the filters pick the right
runs, the table keeps each cell's best learning rate, and the parallel runner records, survives and resumes."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

import zoo
import zoo.reproduce as reproduce
from zoo.cli import main
from zoo.config import load_config
from zoo.reproduce import SweepOptions

ALL_MQAR_MIXERS = {"attention", "linear", "based", "retnet", "gla", "deltanet", "gated_deltanet", "sliding_window",
                   "mamba", "mamba2", "hyena", "s4d", "rwkv6"}


def test_the_full_mqar_grid_is_zoologys_figure_2():
    sweep = reproduce.load_sweep("mqar", reproduce.MqarSweep)
    runs = [r.params for r in reproduce.mqar_runs(quick=False)]
    cells = {(r["mixer"], r["seq_len"], r["num_kv_pairs"], r["dim"]) for r in runs}
    assert len(runs) == len(cells) * len(sweep.full.lrs) == 13 * 4 * 4 * 4
    assert {(r["seq_len"], r["num_kv_pairs"]) for r in runs} == {(64, 4), (128, 8), (256, 16), (512, 64)}
    assert {r["dim"] for r in runs} == {64, 128, 256, 512}
    assert {r["mixer"] for r in runs} == ALL_MQAR_MIXERS
    assert all(r["vocab_size"] == 8192 and r["steps"] == 20000 for r in runs)
    assert {"mamba", "mamba2", "hyena", "s4d"} <= set(sweep.paper)
    quick = [r.params for r in reproduce.mqar_runs(quick=True)]
    assert [(r["mixer"], r["dim"], r["steps"]) for r in quick] == [("attention", 64, 1500), ("linear", 64, 1500)]


@pytest.mark.parametrize("mixer", sorted(ALL_MQAR_MIXERS))
def test_every_mqar_mixer_config_builds_a_model(mixer):
    [run] = reproduce.mqar_runs(False, SweepOptions(mixers=[mixer], lrs=[1e-3]))[4:5]  # seq 128, 8 kv pairs, d_model 64
    config = load_config(run.base, run.overrides)
    with torch.device("meta"):
        model = zoo.create_model(config.model.name, **config.model.kwargs())
    assert [b.mixer.mixer_name for b in model.blocks] == [mixer, mixer]
    assert config.data.kwargs()["num_kv_pairs"] == 8 and config.model.max_seq_len == 128 and config.train.lr == 1e-3


def test_filters_pick_and_override_the_grid():
    runs = [r.params for r in reproduce.mqar_runs(False, SweepOptions(mixers=["attention", "gla"], lrs=[1e-3, 3e-3], steps=2000))]
    assert len(runs) == 2 * 4 * 4 * 2
    assert {r["mixer"] for r in runs} == {"attention", "gla"} and {r["lr"] for r in runs} == {1e-3, 3e-3}
    assert {r["steps"] for r in runs} == {2000}
    quick = [r.params for r in reproduce.mqar_runs(True, SweepOptions(mixers=["mamba"]))]  # any mixer of the table
    assert [(r["mixer"], r["steps"], r["lr"]) for r in quick] == [("mamba", 1500, 2e-3)]
    with pytest.raises(ValueError, match="unknown mixer.*nope.*valid: attention, linear"):
        reproduce.mqar_runs(True, SweepOptions(mixers=["nope"]))
    listops = [r.params for r in reproduce.listops_runs(True, SweepOptions(lrs=[1e-3, 1e-4], steps=7))]
    assert [(r["mixer"], r["lr"], r["steps"]) for r in listops] == [
        ("attention", 1e-3, 7), ("attention", 1e-4, 7), ("linear", 1e-3, 7), ("linear", 1e-4, 7)]


def write_sweep(directory, name, text):
    (directory / f"{name}.yaml").write_text(text)
    return directory


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["quick"].update(lrz=[1e-3]), "quick.lrz: unknown key"),
    (lambda s: s.update(extra=1), "extra: unknown key"),
    (lambda s: s["full"].pop("widths"), "full.widths: Field required"),
    (lambda s: s["quick"].update(mixers=["attention", "transformer"]), "quick.mixers: transformer not in the mixers table"),
    (lambda s: s["mixers"].update(bad={"name": "no-such-mixer"}), "mixers: bad need a 'name'"),
    (lambda s: s.update(base="lm/missing.yaml"), "base: no such config file"),
])
def test_a_bad_sweep_file_names_the_bad_key(edit, message, monkeypatch, tmp_path):
    sweep = yaml.safe_load((reproduce.SWEEPS / "mqar.yaml").read_text())
    edit(sweep)
    monkeypatch.setattr(reproduce, "SWEEPS", write_sweep(tmp_path, "mqar", yaml.safe_dump(sweep)))
    with pytest.raises(ValueError, match="invalid sweep .*mqar.yaml") as error:
        reproduce.mqar_runs(quick=True)
    assert message in str(error.value)


def test_mqar_reports_the_best_learning_rate_per_cell(monkeypatch, tmp_path):
    accuracy = {("attention", 1e-3): 0.995, ("attention", 1e-2): 0.5, ("linear", 1e-3): 0.4, ("linear", 1e-2): 0.6,
                ("gla", 1e-3): None, ("gla", 1e-2): None}

    def fake_train(config):
        value = accuracy[(config.model.kwargs()["mixer"]["name"], config.train.lr)]
        if value is None:
            raise RuntimeError("diverged")
        return {"accuracy": value}

    monkeypatch.setattr(reproduce, "train", fake_train)
    result = reproduce.reproduce("mqar", quick=True, out_dir=tmp_path, lrs=[1e-3, 1e-2], mixers=["attention", "linear", "gla"])
    best = {r["mixer"]: (r["lr"], r["accuracy"]) for r in result["best"]}
    assert best == {"attention": (1e-3, 0.995), "linear": (1e-2, 0.6)}
    assert result["passed"] is True  # attention >= 0.99 and clearly above linear
    assert [(r["mixer"], r["error"]) for r in result["failed"]] == [("gla", "RuntimeError: diverged")] * 2
    table = (tmp_path / "mqar.md").read_text()
    assert "~1.0 at every width" in table and "## Failed runs" in table
    assert (tmp_path / "mqar.png").stat().st_size > 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 6
    assert json.loads((tmp_path / "result.json").read_text())["attention_d64"] == 0.995


TINY_SWEEP = """
base: lm/tiny-attention-mqar.yaml
overrides: [model.depth=1, model.num_heads=2, data.num_examples=64, train.batch_size=8, train.eval_every=100000,
            train.eval_batches=2, train.warmup_steps=2, train.device=cpu]
mixers:
  attention: {name: attention}
  linear: {name: linear}
  broken: {name: attention, no_such_argument: 1}
paper: {attention: "~1.0 at every width"}
full: &grid {lengths: [[16, 2]], widths: [16], lrs: [1.0e-3], steps: 20, vocab_size: 32}
quick: *grid
"""


def test_a_parallel_sweep_records_failures_and_resumes(monkeypatch, tmp_path):
    monkeypatch.setattr(reproduce, "SWEEPS", write_sweep(tmp_path, "mqar", TINY_SWEEP))
    out = tmp_path / "out"
    result = reproduce.reproduce("mqar", quick=True, out_dir=out, jobs=2)  # three subprocesses, two at a time
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["mixer"], r["status"]) for r in records) == [("attention", "ok"), ("broken", "failed"), ("linear", "ok")]
    [failed] = result["failed"]
    assert failed["returncode"] == 2 and "no_such_argument" in failed["error"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["metrics"]["step"] == 20 for r in result["best"])
    assert {r["mixer"] for r in result["best"]} == {"attention", "linear"}
    assert "| attention | 16 | 2 | 16 |" in (out / "mqar.md").read_text()
    assert (out / "mqar.png").stat().st_size > 0 and json.loads((out / "result.json").read_text())["failed"]

    launched = []

    def fail(run, run_dir, device):
        launched.append(run.params["mixer"])
        raise reproduce.RunFailed(1, "still broken")

    monkeypatch.setattr(reproduce, "run_in_subprocess", fail)
    resumed = reproduce.reproduce("mqar", quick=True, out_dir=out, jobs=2, resume=True)
    assert launched == ["broken"]  # finished runs are skipped, failed ones tried again
    assert resumed["best"] == result["best"] and resumed["failed"][0]["error"] == "still broken"
    assert len((out / "results.jsonl").read_text().splitlines()) == 4

    with pytest.raises(SystemExit):  # the tiny sweep has no seq-64 cell, so the check fails: exit status 1
        main(["reproduce", "mqar", "--quick", "--out", str(out), "--jobs", "2", "--resume", "--mixers", "linear"])
    assert launched == ["broken"]  # nothing left to run
    reported = json.loads((out / "result.json").read_text())
    assert not reported["failed"] and reported["best"] == result["best"]  # attention's earlier run is reported too


def test_devices_are_dealt_round_robin_to_the_job_slots(monkeypatch, tmp_path):
    monkeypatch.setattr(reproduce, "SWEEPS", write_sweep(tmp_path, "mqar", TINY_SWEEP))
    seen = []

    def fake(run, run_dir, device):
        seen.append(device)
        return {"metrics": {"accuracy": 0.5}}

    monkeypatch.setattr(reproduce, "run_in_subprocess", fake)
    reproduce.reproduce("mqar", quick=True, out_dir=tmp_path / "out", devices=["3"])  # devices alone: subprocesses
    assert seen == ["3"] * 3
    seen.clear()
    reproduce.reproduce("mqar", quick=True, out_dir=tmp_path / "out", jobs=4, devices=["0", "1"], lrs=[1e-3, 1e-2])
    assert len(seen) == 6 and set(seen) <= {"0", "1"}


def test_cli_reproduce_errors_name_the_valid_mixers(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "mqar", "--mixers", "attention,gpt", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unknown mixer(s) gpt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "mqar", "--jobs", "0", "--out", str(tmp_path)])
    assert "jobs must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("quick", [True, False])
def test_listops_configs_build(quick):
    for run in reproduce.listops_runs(quick):
        config = load_config(run.base, run.overrides)
        with torch.device("meta"):
            model = zoo.create_model(config.model.name, **config.model.kwargs())
        assert model.config.max_seq_len == run.params["max_length"] + 1
        assert config.data.kwargs()["num_examples"] == {"train": run.params["train_examples"], "val": run.params["val_examples"]}
        assert config.train.save_every == run.params["save_every"] == (None if quick else 1000)
        assert {b.mixer.mixer_name for b in model.blocks} == {run.params["mixer"]}
        assert run.test[0] == "split=test"


def test_listops_reports_each_mixer_beside_lra(monkeypatch, tmp_path):
    sweep = yaml.safe_load((reproduce.SWEEPS / "listops.yaml").read_text())
    sweep["quick"].update(train_examples=16, val_examples=8, test_examples=8, min_length=10, max_length=30)
    monkeypatch.setattr(reproduce, "SWEEPS", write_sweep(tmp_path, "listops", yaml.safe_dump(sweep)))
    result = reproduce.reproduce("listops", quick=True, out_dir=tmp_path / "out", steps=2)
    assert [r["mixer"] for r in result["runs"]] == ["attention", "linear"] and not result["failed"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["test"]["split"] == "test" for r in result["runs"])
    table = (tmp_path / "out" / "listops.md").read_text()
    assert "Transformer | 36.37" in table and "Linear Trans. | 16.13" in table


def test_the_smoke_reproduction_is_a_single_run(tmp_path):
    with pytest.raises(ValueError, match="single run"):
        reproduce.reproduce("lm-mqar-smoke", quick=True, out_dir=tmp_path, mixers=["linear"])


def test_grid_axes_can_be_replaced_from_the_command_line_and_bad_axes_are_named():
    from zoo.reproduce import MqarSweep, SweepOptions, load_sweep

    sweep = load_sweep("mqar", MqarSweep)
    grid = sweep.grid(False, SweepOptions(grid={"widths": [64, 128], "lengths": [[512, 64]]}, mixers=["gla"]))
    assert grid.widths == [64, 128] and [list(x) for x in grid.lengths] == [[512, 64]] and grid.mixers == ["gla"]
    with pytest.raises(ValueError, match="grid override: widthz: unknown key"):
        sweep.grid(False, SweepOptions(grid={"widthz": [64]}))
    with pytest.raises(ValueError, match="grid override: widths"):
        sweep.grid(False, SweepOptions(grid={"widths": "wide"}))


def test_moe_vs_dense_runs_the_dense_and_moe_models_at_equal_active_params(tmp_path):
    """The sweep's models build with (nearly) the dense LM's active parameters; a 3-step in-process run reports them."""
    from zoo.reproduce import moe_vs_dense_runs, reproduce

    runs = moe_vs_dense_runs(quick=True)
    assert [r.params["model"] for r in runs] == ["dense", "switch-top1", "fine-top6"]
    result = reproduce("moe-vs-dense", quick=True, out_dir=tmp_path, steps=3)
    by_model = {r["model"]: r for r in result["runs"]}
    dense = by_model["dense"]["active_params"]
    for name in ("switch-top1", "fine-top6"):
        moe = by_model[name]
        assert moe["params"] > 4 * dense and abs(moe["active_params"] - dense) / dense < 0.05
        assert math.isfinite(moe["val_loss"])
    assert (tmp_path / "moe-vs-dense.md").read_text().count("\n| ") == 1 + 3  # the header and a row per model
    with pytest.raises(ValueError, match="--mixers does not apply"):
        moe_vs_dense_runs(quick=True, options=SweepOptions(mixers=["gla"]))


def test_the_full_moe_vs_dense_run_sees_each_training_byte_at_most_once():
    """Repeated epochs let the 2.7x larger MoEs overfit the corpus (their validation loss then ends above the
    dense LM's while their training loss is lower): the full run reads the whole training split and stays
    under one epoch of it."""
    from zoo.data.text import pytext
    from zoo.reproduce import moe_vs_dense_runs

    for run in moe_vs_dense_runs(quick=False):
        config = load_config(run.base, run.overrides)
        data = config.data.kwargs()
        assert data["max_bytes"] is None
        consumed = config.train.steps * config.train.batch_size * data["seq_len"]
        assert consumed < len(pytext("train", seq_len=data["seq_len"]).data)


def test_resume_continues_an_interrupted_run_from_its_checkpoint(monkeypatch, tmp_path):
    """A run stopped after its step-10 checkpoint (here: trained to step 10 into its folder) continues from that
    checkpoint under --resume and ends at its 20 steps; without --resume the folder starts afresh."""
    monkeypatch.setattr(reproduce, "SWEEPS", write_sweep(tmp_path, "mqar", TINY_SWEEP))
    out = tmp_path / "out"
    [run] = reproduce.mqar_runs(True, SweepOptions(mixers=["attention"]))
    interrupted = load_config(run.base, [*run.overrides, f"out_dir={out / run.name}", "train.steps=10"])
    reproduce.train(interrupted)
    seen = []
    real_train = reproduce.train
    monkeypatch.setattr(reproduce, "train", lambda cfg: seen.append(cfg.resume) or real_train(cfg))
    result = reproduce.reproduce("mqar", quick=True, out_dir=out, mixers=["attention"], resume=True)
    assert seen == [True] and [r["metrics"]["step"] for r in result["runs"]] == [20]
    log = [json.loads(line) for line in (out / run.name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["split"] == "val"] == [10, 20]  # the first ten steps were not trained again
    reproduce.reproduce("mqar", quick=True, out_dir=out, mixers=["attention"])
    assert seen == [True, False]
