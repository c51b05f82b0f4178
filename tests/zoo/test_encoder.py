"""The encoder family (LRA-style sequence classifiers) and the sequence_classification task."""
from __future__ import annotations

import pytest
import torch

import zoo
from zoo.config import validate_run_config
from zoo.train import train


@pytest.mark.parametrize("name", zoo.list_models("encoder-tiny*"))
def test_every_tiny_encoder_variant_classifies_padded_batches(name):
    model = zoo.create_model(name)
    ids = torch.randint(2, 17, (3, 40))
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 25:] = False
    logits = model(ids, mask)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_right_padding_does_not_change_a_sequences_logits(pool):
    model = zoo.create_model("encoder-tiny", pool=pool).eval()
    ids = torch.randint(2, 17, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 18:] = False
    batched = model(ids, mask)
    alone = model(ids[1:, :18])
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-5)  # fp32: padding is invisible


def test_encoder_errors_name_the_problem():
    with pytest.raises(ValueError, match="causal only"):
        zoo.create_model("encoder-tiny", mixer="gla")
    with pytest.raises(ValueError, match="max_seq_len"):
        zoo.create_model("encoder-tiny", max_seq_len=8)(torch.randint(0, 17, (1, 9)))
    with pytest.raises(ValueError, match="input_ids"):
        zoo.create_model("encoder-tiny")(torch.randn(2, 5))


def test_the_trainer_runs_listops_classification(tmp_path):
    raw = {
        "model": {"name": "encoder-tiny", "max_seq_len": 61},
        "data": {"name": "listops", "num_examples": 32, "min_length": 20, "max_length": 60},
        "task": {"name": "sequence_classification"},
        "train": {"steps": 3, "batch_size": 8, "eval_every": 3, "eval_batches": 2, "progress": False, "device": "cpu"},
        "out_dir": str(tmp_path),
    }
    metrics = train(validate_run_config(raw))
    assert metrics["count"] == 16 and 0.0 <= metrics["accuracy"] <= 1.0
    too_short = raw | {"model": {"name": "encoder-tiny", "max_seq_len": 32}, "out_dir": str(tmp_path / "short")}
    with pytest.raises(ValueError, match="seq_len"):
        train(validate_run_config(too_short))
