"""EMA weights: the update against a hand computation, ema.safetensors in checkpoints, exact resume, evaluation and
sampling with the EMA weights, and config errors."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.zoo.test_train import tiny_run
from zoo.checkpoint import load_tensors, save_module
from zoo.cli import main
from zoo.evaluate import evaluate_checkpoint
from zoo.registry import create_model
from zoo.train import EMA, build_run, latest_checkpoint, seed_everything, train

NO_DROPOUT = {"dropout": 0.0}


def test_ema_of_three_steps_matches_hand_computation(tmp_path):
    run = tiny_run(tmp_path, NO_DROPOUT, steps=3, save_every=1, keep_checkpoints=3, ema_decay=0.6, eval_every=3)
    seed_everything(run.train.seed)
    initial = build_run(run, torch.device("cpu"))[0].state_dict()  # the trainer builds the same model first
    train(run)
    expected = {k: v.clone() for k, v in initial.items()}
    for step in (1, 2, 3):
        folder = tmp_path / "checkpoints" / f"step_{step:08d}"
        weights, ema = load_tensors(folder / "model.safetensors"), load_tensors(folder / "ema.safetensors")
        assert set(ema) == set(weights)
        for name in weights:
            expected[name] = 0.6 * expected[name] + 0.4 * weights[name]
            torch.testing.assert_close(ema[name], expected[name], rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(ema[k], weights[k]) for k in weights)


def test_warmup_ramps_the_decay_and_buffers_are_copied():
    model = torch.nn.BatchNorm1d(2)
    ema = EMA(model, decay=0.99, warmup=True)
    assert [ema.decay_at(n) for n in (1, 2, 1000)] == [2 / 11, 3 / 12, 0.99]
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(5.0)
    ema.update(model, 1)
    torch.testing.assert_close(ema.module.weight, torch.full((2,), 2 / 11 + 2 * 9 / 11))
    assert torch.equal(ema.module.running_mean, torch.full((2,), 5.0)) and not ema.module.weight.requires_grad


def test_checkpoint_holds_ema_and_resume_restores_it_exactly(tmp_path):
    reference = tmp_path / "reference"
    metrics = train(tiny_run(reference, steps=20, save_every=5, keep_checkpoints=4, ema_decay=0.9))
    assert {p.name for p in latest_checkpoint(reference).iterdir()} == {
        "model.safetensors", "config.json", "trainer_state.safetensors", "trainer_state.json", "ema.safetensors"}
    assert "ema_loss" in metrics and metrics["ema_loss"] != metrics["loss"]

    # the state of a run killed after its step-10 checkpoint: drop the later checkpoints, then resume
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for step in (15, 20):
        shutil.rmtree(resumed / "checkpoints" / f"step_{step:08d}")
    (resumed / "checkpoints" / "latest").write_text("step_00000010\n")
    train(tiny_run(resumed, steps=20, save_every=5, keep_checkpoints=4, ema_decay=0.9).model_copy(update={"resume": True}))
    for step in (15, 20):
        name = f"checkpoints/step_{step:08d}/ema.safetensors"
        got, want = load_tensors(resumed / name), load_tensors(reference / name)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), f"EMA differs at step {step}"


def test_eval_with_ema_uses_the_ema_weights(tmp_path, capsys):
    metrics = train(tiny_run(tmp_path, steps=10, ema_decay=0.9))
    options = ["max_batches=2", "batch_size=8", "device=cpu"]  # as the run evaluated
    raw, ema = evaluate_checkpoint(tmp_path, options), evaluate_checkpoint(tmp_path, [*options, "ema=true"])
    assert raw["loss"] == pytest.approx(metrics["loss"], rel=1e-5) and raw["ema"] is False
    assert ema["loss"] == pytest.approx(metrics["ema_loss"], rel=1e-5) and ema["ema"] is True
    assert ema["loss"] != raw["loss"]
    with pytest.raises(ValueError, match="ema must be true or false"):
        evaluate_checkpoint(tmp_path, [*options, "ema=maybe"])

    plain = tmp_path / "plain"
    train(tiny_run(plain, steps=2))
    with pytest.raises(SystemExit):
        main(["eval", str(plain), "ema=true", "device=cpu"])
    err = capsys.readouterr().err
    assert "ema=true but" in err and "holds no ema.safetensors" in err
    with pytest.raises(ValueError, match="train.ema_decay is set but .* holds no ema.safetensors"):
        train(tiny_run(plain, steps=4, ema_decay=0.9).model_copy(update={"resume": True}))


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "fast"])
def test_bad_ema_decay_is_an_error_naming_the_key(tmp_path, value):
    with pytest.raises(ValueError, match="train.ema_decay"):
        tiny_run(tmp_path, ema_decay=value)


@pytest.fixture
def diffusion_checkpoint(tmp_path):
    """A unet-tiny checkpoint folder whose EMA weights are the raw ones plus 0.1."""
    model = create_model("unet-tiny", num_class_embeds=7)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, extra={"run": {"task": {"name": "diffusion"}}})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    save_module(folder / "ema.safetensors", model)
    return folder


def test_sample_picks_the_ema_weights(diffusion_checkpoint, tmp_path, monkeypatch):
    import zoo.sampling

    used = []
    original = zoo.sampling.sample
    monkeypatch.setattr(zoo.sampling, "sample", lambda model, *a, **k: used.append(model.state_dict()) or original(model, *a, **k))
    args = ["sample", str(diffusion_checkpoint), "--n", "1", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "g.png")]
    for flags in ([], ["--ema"], ["--no-ema"]):
        main(args + flags)
    ema, raw = load_tensors(diffusion_checkpoint / "ema.safetensors"), load_tensors(diffusion_checkpoint / "model.safetensors")
    default, with_ema, without = used
    for name in raw:
        assert torch.equal(default[name], ema[name]) and torch.equal(with_ema[name], ema[name])
        assert torch.equal(without[name], raw[name])

    (diffusion_checkpoint / "ema.safetensors").unlink()
    with pytest.raises(ValueError, match="ema=true but .* holds no ema.safetensors"):
        zoo.sampling.sample_checkpoint(diffusion_checkpoint, 1, 1, device="cpu", ema=True)
    zoo.sampling.sample_checkpoint(diffusion_checkpoint, 1, 1, out=tmp_path / "g.png", device="cpu")  # default: raw
    assert all(torch.equal(used[-1][k], raw[k]) for k in raw)
