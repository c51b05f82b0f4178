"""`zoo reproduce diffusion-shapes` at toy size: both models train, every configuration has a row with finite
metrics or an honest n/a, and the tables are written."""
import json
import math

from zoo.reproduce import reproduce


def test_diffusion_shapes_tiny(tmp_path):
    result = reproduce("diffusion-shapes", quick=True, out_dir=tmp_path, steps=3,
                       grid={"samples": 6, "sample_steps": [2], "batch_size": 4})
    rows = result["rows"]
    measured = {(r["model"], r["acceleration"], r["scheduler"]) for r in rows if r["applies"]}
    assert measured == {("unet-tiny", acceleration, scheduler) for acceleration in ("none", "deepcache", "tome-sd")
                        for scheduler in ("ddim", "dpm")} | {("dit-tiny", "none", "ddim"), ("dit-tiny", "none", "dpm")}
    not_applied = {(r["model"], r["acceleration"]) for r in rows if not r["applies"]}
    assert not_applied == {("dit-tiny", "deepcache"), ("dit-tiny", "tome-sd")}
    assert all(math.isfinite(r[k]) for r in rows if r["applies"]
               for k in ("conditional_accuracy", "shapes_fid", "seconds_per_sample"))
    assert result["passed"] and 0 < result["classifier_val_accuracy"] <= 1
    assert json.loads((tmp_path / "result.json").read_text())["passed"]
    table = (tmp_path / "diffusion-shapes.md").read_text()
    assert "recorded val accuracy" in table and "| dit-tiny | deepcache | n/a |" in table
