"""The ViT and diffusion GPU benchmark scripts: their --smoke runs on CPU write complete reports."""
import json
from pathlib import Path

import pytest
import torch
from script_loader import load_script



def run_smoke(script, out: Path, *args: str):
    paths = script.main(["--smoke", "--out", str(out), *args])
    return json.loads(paths["json"].read_text()), paths["md"].read_text()


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    script = load_script("bench_vit_gpu")
    return script, *run_smoke(script, tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory):
    script = load_script("bench_diffusion_gpu")
    return script, *run_smoke(script, tmp_path_factory.mktemp("diffusion"))


def test_vit_rows_ratios_and_targets(vit):
    script, report, md = vit
    p = script.PRESETS["smoke"]
    rows = report["vit"]["rows"]
    assert [(r["impl"], r["reduction"]) for r in rows] == [
        ("timm", ""), ("zoo", ""), *[("zoo", f"tome r={r}") for r in p["tome_r"]],
        *[("zoo", f"evit keep_rate={k}") for k in p["evit_keep"]],
        *[("zoo", f"dynamicvit keep_rate={k}") for k in p["dynamicvit_keep"]], ("timm", f"tome r={p['patch_r']}")]
    timm_rate = rows[0]["images_per_s"]
    for r in rows:
        assert r["error"] is None and r["ms"] > 0 and r["params"] > 0
        assert r["images_per_s"] == pytest.approx(p["batch"] / (r["ms"] / 1e3))
        assert r["vs_timm"] == pytest.approx(r["images_per_s"] / timm_rate)
        if r["target"] is None:
            assert r["meets_target"] is None
        else:
            assert r["meets_target"] is (r["vs_timm"] >= r["target"])
    assert [r["target"] for r in rows if r["target"] is not None] == list(p["targets"].values())
    assert all(r["impl"] == "zoo" for r in rows if r["target"] is not None)
    assert report["device_name"] == "cpu" and report["vit"]["img_size"] == 32
    assert "Card: **cpu**" in md and "## Inference throughput" in md and "tome r=8" in md


def test_vit_failed_row_is_reported_and_the_run_goes_on(vit, monkeypatch, tmp_path):
    script = vit[0]
    build = script.build

    def failing(impl, spec, p):
        if impl == "zoo":
            raise RuntimeError("no such kernel")
        return build(impl, spec, p)

    monkeypatch.setattr(script, "build", failing)
    report, md = run_smoke(script, tmp_path, "--only", "evit")
    timm_row, evit_row = report["vit"]["rows"]
    assert timm_row["error"] is None and timm_row["vs_timm"] == 1.0
    assert evit_row["error"] == "RuntimeError: no such kernel"
    assert evit_row["ms"] is None and evit_row["vs_timm"] is None and evit_row["meets_target"] is None
    assert "no such kernel" in md


def test_diffusion_step_rows(diffusion):
    script, report, md = diffusion
    rows = report["step"]
    assert [r["model"] for r in rows] == list(script.PRESETS["smoke"]["step_models"])
    sd15 = rows[0]
    assert sd15["model"] == "unet-sd15" and sd15["latent"] == [4, 16, 16]
    for r in rows:
        assert r["error"] is None and r["ms"] > 0 and r["params"] > 0
        if r["latent"] == sd15["latent"]:
            assert r["vs_sd15"] == pytest.approx(r["ms"] / sd15["ms"])
        else:  # DiT, on its own latent: no ratio
            assert r["model"].startswith("dit-") and r["vs_sd15"] is None
        target = script.STEP_TARGETS.get(r["model"])
        assert r["target"] == target and r["meets_target"] is (None if target is None else r["vs_sd15"] <= target)
    assert sum(r["meets_target"] is not None for r in rows) == 2  # bk-small, bk-tiny
    assert report["device_name"] == "cpu" and "Card: **cpu**" in md and "## One denoising step" in md


def test_diffusion_sampling_rows(diffusion):
    script, report, md = diffusion
    rows = report["sampling"]
    assert [r["method"] for r in rows] == ["plain", *script.ACCELERATIONS]
    for r in rows:
        assert r["error"] is None and r["seconds"] > 0 and r["steps"] == 3
        assert r["speedup"] == pytest.approx(rows[0]["seconds"] / r["seconds"])
        target = script.SAMPLING_TARGETS.get(r["method"])
        assert r["target"] == target and r["meets_target"] is (None if target is None else r["speedup"] >= target)
    options = {r["method"]: r["options"] for r in rows}
    assert options["deepcache"] == {"interval": 3} and options["tome_sd"] == {"ratio": 0.5}
    assert "## Sampling (unet-sd15, 3 DDIM steps, guidance 7.5)" in md


def test_diffusion_sampling_in_another_setting(diffusion, tmp_path):
    """--attention-backend / --latent set the sampling model (named in the title and the file); --methods narrows
    the rows; the step section refuses them."""
    script = diffusion[0]
    paths = script.main(["--smoke", "--out", str(tmp_path), "--only", "sampling", "--methods", "tome_sd",
                         "--attention-backend", "math", "--latent", "8"])
    assert paths["json"].name == "diffusion_gpu_sampling_math_latent8.json"
    report, md = json.loads(paths["json"].read_text()), paths["md"].read_text()
    assert [r["method"] for r in report["sampling"]] == ["plain", "tome_sd"]
    assert all(r["error"] is None and r["seconds"] > 0 and r["target"] is None for r in report["sampling"])
    assert report["sampling_setting"] == {"attention_backend": "math", "sample_size": 8}
    assert "## Sampling (unet-sd15, attention_backend math, sample_size 8, 3 DDIM steps" in md
    with pytest.raises(SystemExit):
        script.main(["--smoke", "--out", str(tmp_path), "--attention-backend", "math"])


def test_sampling_removes_the_acceleration(diffusion, monkeypatch):
    """Each sampling row's acceleration is taken off its model afterwards, even when sampling fails."""
    from zoo.acceleration import applied

    script = diffusion[0]
    models, build = [], script.build

    def recording(*args):
        models.append(build(*args))
        return models[-1]

    monkeypatch.setattr(script, "build", recording)

    def failing(*args):
        assert applied(models[-1])
        raise RuntimeError("out of steps")

    monkeypatch.setattr(script, "sample_latents", failing)
    with pytest.raises(RuntimeError, match="out of steps"):
        script.sampling_time("deepcache", script.PRESETS["smoke"])
    assert not applied(models[-1])


def test_scripts_refuse_to_run_without_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("bench_vit_gpu", "bench_diffusion_gpu"):
        with pytest.raises(SystemExit, match="CUDA is not available"):
            load_script(name).main(["--out", str(tmp_path)])
