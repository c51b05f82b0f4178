"""Every shipped checkpoint loads by tag and reproduces the metrics recorded when it was made."""
from __future__ import annotations

import pytest

import zoo
from zoo.checkpoint import read_json
from zoo.evaluate import evaluate_checkpoint
from zoo.registry import checkpoint_root, split_tag

SHIPPED = zoo.list_models(pretrained=True)


def test_the_mqar_checkpoint_is_shipped():
    assert "lm-tiny.mqar" in SHIPPED


@pytest.mark.parametrize("tagged", SHIPPED)
def test_shipped_checkpoint_reproduces_its_recorded_metrics(tagged):
    name, tag = split_tag(tagged)
    folder = checkpoint_root() / name / tag
    recorded = read_json(folder / "config.json")["metrics"]["val"]
    got = evaluate_checkpoint(folder, ["split=val", "device=cpu"])  # recorded on CPU
    assert got["count"] == recorded["count"]
    # accuracy is a ratio of counts; allow one flipped argmax for another CPU's float rounding
    assert got["accuracy"] == pytest.approx(recorded["accuracy"], abs=1.5 / recorded["count"])
    assert got["loss"] == pytest.approx(recorded["loss"], rel=1e-4)
    model = zoo.create_model(tagged)
    assert model.num_params() > 0
