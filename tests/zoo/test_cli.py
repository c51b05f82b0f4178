"""The ``zoo`` command line: each subcommand on tiny inputs, and errors as exit status 2 with a message."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY_TRAIN = ["model.dim=32", "model.depth=1", "model.num_heads=2", "model.vocab_size=32", "model.max_seq_len=16",
              "data.vocab_size=32", "data.seq_len=16", "data.num_kv_pairs=2", "data.num_examples=64",
              "train.steps=4", "train.batch_size=8", "train.eval_every=4", "train.eval_batches=2", "train.progress=false", "train.device=cpu"]


def test_list_and_info(capsys):
    main(["list", "vit-*"])
    listed = capsys.readouterr().out.split()
    assert listed and all(n.startswith("vit-") for n in listed)
    main(["info", "lm-tiny"])
    out = capsys.readouterr().out
    assert '"family": "lm"' in out and "attention" in out and "decoding state" in out
    main(["info", "unet-tiny"])
    assert "    0  attention  backend sdpa" in capsys.readouterr().out  # auto resolves to SDPA without xformers


def test_train_then_eval(tmp_path, capsys):
    out_dir = tmp_path / "run"
    main(["train", str(ROOT / "configs/lm/tiny-attention-mqar.yaml"), *TINY_TRAIN, f"out_dir={out_dir}"])
    trained = json.loads(capsys.readouterr().out)
    main(["eval", str(out_dir), "batch_size=8", "max_batches=2", "device=cpu"])
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"])
    assert evaluated["split"] == "val"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "lm-tinyy"], "Did you mean: lm-tiny"),
        (["train", "no/such.yaml"], "no such config file"),
        (["reproduce", "mqar-smoke"], "Did you mean: lm-mqar-smoke"),
        (["eval", "no/such/run"], "neither a checkpoint folder"),
    ],
)
def test_errors_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_module_entrypoint_runs():
    result = subprocess.run([sys.executable, "-m", "zoo.cli", "list", "lm-tiny"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.split() == ["lm-tiny"]


def test_output_cut_short_by_its_reader_ends_quietly():
    """`zoo list | head -1`: the closed pipe ends the command without a traceback."""
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-m', 'zoo.cli', 'list'], "
            "stdout=subprocess.PIPE, stderr=subprocess.PIPE); p.stdout.readline(); p.stdout.close(); "
            "print(p.wait(), p.stderr.read().decode())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "Traceback" not in result.stdout, result.stdout


def test_zoo_convert_is_reachable_after_import_zoo():
    import zoo

    assert callable(zoo.convert.from_timm)


def test_bench_writes_a_table(tmp_path, capsys):
    main(["bench", "attention", "--seq-lens", "16", "--batch", "2", "--dim", "32", "--heads", "2", "--iters", "1",
          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "attention" in out and "SDPAAttention" in out
    assert (tmp_path / "bench.json").is_file() and (tmp_path / "bench.md").is_file()
