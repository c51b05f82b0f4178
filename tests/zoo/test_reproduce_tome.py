"""`zoo reproduce tome`: token reduction applied off the shelf to one trained ViT."""
import pytest

from zoo.reproduce import TomeSweep, load_sweep, reproduce


def test_sweep_file_is_valid():
    sweep = load_sweep("tome", TomeSweep)
    assert {"baseline", "tome-r16", "evit-0.5", "dynamicvit-0.7"} <= set(sweep.methods)


def test_tiny_run_writes_table_and_plot(tmp_path):
    result = reproduce("tome", quick=True, out_dir=tmp_path, steps=5,
                       grid={"eval_examples": 32, "throughput_batch": 16, "repeats": 1})
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["baseline"]["top1"] >= 60  # fine-tuned from the shipped vit-tiny.shapes (95%), not 5 steps from scratch
    assert rows["tome-r0"]["top1"] == rows["baseline"]["top1"]  # r=0 reduces nothing: identical predictions
    assert rows["tome-r16"]["clipped"] and not rows["tome-r12"]["clipped"]
    assert all(r["images_per_s"] > 0 for r in rows.values())
    table = (tmp_path / "tome.md").read_text()
    assert "(5 steps from vit-tiny.shapes)" in table
    assert table.count("\n| ") == 1 + len(rows) + 1 + 2  # our header and rows, the paper's header and rows
    assert "309 -> 511" in table and (tmp_path / "tome.png").read_bytes()[:4] == b"\x89PNG"


def test_mixers_option_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--mixers"):
        reproduce("tome", quick=True, out_dir=tmp_path, mixers=["attention"])
