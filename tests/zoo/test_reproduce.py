"""Reproductions: the MQAR grid's configs build, and the table keeps each cell's best learning rate."""
from __future__ import annotations

import json

import pytest
import torch

import zoo
import zoo.reproduce as reproduce
from zoo.config import load_config


def test_the_full_mqar_grid_is_zoologys_figure_2():
    runs = reproduce.mqar_runs(quick=False)
    cells = {(r["mixer"], r["seq_len"], r["num_kv_pairs"], r["dim"]) for r in runs}
    assert len(runs) == len(cells) * len(reproduce.MQAR_LRS)
    assert {(r["seq_len"], r["num_kv_pairs"]) for r in runs} == {(64, 4), (128, 8), (256, 16), (512, 64)}
    assert {r["dim"] for r in runs} == {64, 128, 256, 512}
    assert all(r["vocab_size"] == 8192 for r in runs)


@pytest.mark.parametrize("mixer", sorted(reproduce.MQAR_MIXERS))
def test_every_mqar_mixer_config_builds_a_model(mixer, tmp_path):
    run = dict(mixer=mixer, seq_len=128, num_kv_pairs=8, dim=64, lr=1e-3, vocab_size=8192, steps=10)
    config = load_config(reproduce.CONFIGS / "lm" / "tiny-attention-mqar.yaml", reproduce.mqar_overrides(run, tmp_path))
    with torch.device("meta"):
        model = zoo.create_model(config.model.name, **config.model.kwargs())
    assert [b.mixer.mixer_name for b in model.blocks] == [mixer, mixer]
    assert config.data.kwargs()["num_kv_pairs"] == 8 and config.train.lr == 1e-3


def test_mqar_reports_the_best_learning_rate_per_cell(monkeypatch, tmp_path):
    accuracy = {("attention", 1e-3): 0.995, ("attention", 1e-2): 0.5, ("linear", 1e-3): 0.4, ("linear", 1e-2): 0.6}
    runs = [dict(mixer=m, seq_len=64, num_kv_pairs=4, dim=64, lr=lr, vocab_size=256, steps=1) for m, lr in accuracy]
    monkeypatch.setattr(reproduce, "mqar_runs", lambda quick: runs)
    monkeypatch.setattr(reproduce, "train", lambda config: {"accuracy": accuracy[(config.model.kwargs()["mixer"]["name"], config.train.lr)]})
    result = reproduce.reproduce("mqar", quick=True, out_dir=tmp_path)
    best = {r["mixer"]: (r["lr"], r["accuracy"]) for r in result["best"]}
    assert best == {"attention": (1e-3, 0.995), "linear": (1e-2, 0.6)}
    assert result["passed"] is True  # attention >= 0.99 and clearly above linear
    assert "~1.0 at every width" in (tmp_path / "mqar.md").read_text()
    assert (tmp_path / "mqar.png").stat().st_size > 0
    assert json.loads((tmp_path / "result.json").read_text())["attention_d64"] == 0.995


@pytest.mark.parametrize("quick", [True, False])
def test_listops_configs_build(quick, tmp_path):
    for run in reproduce.listops_runs(quick):
        config = reproduce.listops_config(run, tmp_path / run["mixer"])
        with torch.device("meta"):
            model = zoo.create_model(config.model.name, **config.model.kwargs())
        assert model.config.max_seq_len == run["max_length"] + 1
        assert {b.mixer.mixer_name for b in model.blocks} == {run["mixer"]}


def test_listops_reports_each_mixer_beside_lra(monkeypatch, tmp_path):
    runs = [dict(r, steps=2, train_examples=16, min_length=10, max_length=30) for r in reproduce.listops_runs(True)]
    monkeypatch.setattr(reproduce, "listops_runs", lambda quick: runs)
    result = reproduce.reproduce("listops", quick=True, out_dir=tmp_path)
    assert [r["mixer"] for r in result["runs"]] == ["attention", "linear"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in result["runs"])
    table = (tmp_path / "listops.md").read_text()
    assert "Transformer | 36.37" in table and "Linear Trans. | 16.13" in table
