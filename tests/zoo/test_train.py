"""The trainer: exact resume after SIGKILL, atomic checkpoints, accumulation, evaluation, config errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zoo.config import load_config, validate_run_config
from zoo.evaluate import evaluate_checkpoint
from zoo.train import SampleStream, latest_checkpoint, train

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "model": {"name": "lm-tiny", "vocab_size": 32, "dim": 32, "depth": 1, "num_heads": 2, "max_seq_len": 16, "dropout": 0.1},
    "data": {"name": "mqar", "vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2, "num_examples": 96},
    "task": {"name": "lm"},
    "train": {"steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "eval_every": 10, "eval_batches": 2,
              "log_every": 1, "save_every": 5, "progress": False,
              "device": "cpu"},  # exact-trajectory checks are CPU facts; the GPU test below opts in
}


def tiny_run(out_dir: Path, model: dict | None = None, **train_overrides):
    raw = json.loads(json.dumps(TINY))
    raw["model"].update(model or {})
    raw["train"].update(train_overrides)
    raw["out_dir"] = str(out_dir)
    return validate_run_config(raw)


def losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_resume_after_sigkill_reproduces_the_loss_trajectory(tmp_path):
    steps = 400
    reference = tmp_path / "reference"
    train(tiny_run(reference, steps=steps, save_every=20))

    killed = tmp_path / "killed"
    run = tiny_run(killed, steps=steps, save_every=20)
    (tmp_path / "run.json").write_text(run.model_dump_json())
    script = (
        "import torch, sys; from zoo.config import RunConfig; from zoo.train import train;"
        f"train(RunConfig.model_validate_json(open({str(tmp_path / 'run.json')!r}).read()))"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.time() + 120
    while latest_checkpoint(killed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = latest_checkpoint(killed)
    assert resumed_from is not None, "the run never wrote a checkpoint"
    step = int(resumed_from.name.split("_")[1])
    assert step < steps, "the run finished before it was killed: nothing was tested"

    train(tiny_run(killed, steps=steps, save_every=20).model_copy(update={"resume": True}))
    ref, got = losses(reference), losses(killed)
    assert sorted(got) == list(range(1, steps + 1))
    assert all(got[s] == ref[s] for s in ref), "resumed trajectory differs from the uninterrupted one"


def test_checkpoint_folder_is_complete_and_evaluates(tmp_path):
    metrics = train(tiny_run(tmp_path, steps=10))
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000010"
    assert {p.name for p in latest.iterdir()} == {"model.safetensors", "config.json", "trainer_state.safetensors", "trainer_state.json"}
    assert not list((tmp_path / "checkpoints").glob(".tmp*")), "temporary folders left behind"
    assert len(list((tmp_path / "checkpoints").glob("step_*"))) == 2  # keep_checkpoints
    evaluated = evaluate_checkpoint(tmp_path, ["max_batches=2", "batch_size=8", "device=cpu"])  # as the run evaluated
    assert evaluated["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert evaluated["loss"] == pytest.approx(metrics["loss"], rel=1e-5)


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    no_dropout = {"dropout": 0.0}  # dropout masks would differ between the two batchings
    big = train(tiny_run(tmp_path / "big", no_dropout, steps=3, batch_size=16, grad_accum=1, save_every=None,
                      eval_batch_size=8))
    accumulated = train(tiny_run(tmp_path / "acc", no_dropout, steps=3, batch_size=8, grad_accum=2, save_every=None,
                              eval_batch_size=8))
    assert accumulated["loss"] == pytest.approx(big["loss"], rel=1e-4)


def test_sample_stream_is_deterministic_and_shards_by_rank():
    first = SampleStream(10, 4, seed=3)
    batches = [b for _, b in zip(range(5), first)]
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs are permutations
    resumed = SampleStream(10, 4, seed=3, consumed=8)
    assert next(iter(resumed)) == batches[2]
    ranks = [next(iter(SampleStream(10, 2, seed=3, rank=r, world=2))) for r in range(2)]
    assert ranks[0] + ranks[1] == batches[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=3"], "train.stepz: unknown key (did you mean steps"),
        (["train.steps=0"], "train.steps"),
        (["train.batch_size=-1"], "train.batch_size"),
        (["train.lr=fast"], "train.lr"),
        (["modle.name=x"], "modle: unknown key"),
    ],
)
def test_bad_config_is_an_error_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_config(ROOT / "configs/lm/tiny-attention-mqar.yaml", overrides)


def test_run_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        train(tiny_run(tmp_path / "none").model_copy(update={"resume": True}))
    with pytest.raises(ValueError, match="dtype='float16' is not supported on cpu"):
        train(tiny_run(tmp_path / "fp16", dtype="float16"))
    train(tiny_run(tmp_path / "done", steps=5))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tiny_run(tmp_path / "done", steps=5))
    other_width = tiny_run(tmp_path / "done", steps=10, model={"dim": 2 * TINY["model"]["dim"]})
    with pytest.raises(ValueError, match="rebuilds the model from the config and overrides given now"):
        train(other_width.model_copy(update={"resume": True}))
    small_vocab = tiny_run(tmp_path / "vocab")
    small_vocab.model = small_vocab.model.model_copy(update={"vocab_size": 8})
    with pytest.raises(ValueError, match="vocab_size"):
        train(validate_run_config(small_vocab.model_dump()))
    with pytest.raises(TypeError, match="'dimm'"):
        raw = TINY | {"model": TINY["model"] | {"dimm": 3}, "out_dir": str(tmp_path / "x")}
        train(validate_run_config(raw))
    with pytest.raises(ValueError, match="num_examples"):
        raw = TINY | {"data": TINY["data"] | {"num_examples": 0}, "out_dir": str(tmp_path / "y")}
        train(validate_run_config(raw))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast training needs a CUDA GPU (none on this machine)")
@pytest.mark.gpu
def test_bf16_training_on_gpu(tmp_path):
    metrics = train(tiny_run(tmp_path, steps=20, device="cuda", dtype="bfloat16"))
    assert metrics["loss"] < 4.0


def test_the_same_trainer_runs_classification(tmp_path):
    raw = {
        "model": {"name": "vit-tiny", "num_classes": 6, "dim": 32, "depth": 1, "num_heads": 2},
        "data": {"name": "shapes", "image_size": 32, "num_examples": 64},
        "task": {"name": "classification", "label_smoothing": 0.1},
        "train": {"steps": 3, "batch_size": 8, "eval_every": 3, "eval_batches": 2, "progress": False, "device": "cpu"},
        "out_dir": str(tmp_path),
    }
    metrics = train(validate_run_config(raw))
    assert metrics["count"] == 16 and 0.0 <= metrics["accuracy"] <= 1.0
    wrong_classes = raw | {"model": raw["model"] | {"num_classes": 10}, "out_dir": str(tmp_path / "wrong")}
    with pytest.raises(ValueError, match="num_classes"):
        train(validate_run_config(wrong_classes))
