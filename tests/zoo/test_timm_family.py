"""timm's efficient families through the zoo registry (random weights, nothing downloaded)."""
import pytest
import torch

import zoo.models  # noqa: F401
import zoo.models.timm_family  # noqa: F401  (registers timm/*)
from zoo.bench import make_target
from zoo.config import load_config
from zoo.models.base import load_pretrained
from zoo.models.timm_family import TIMM_EFFICIENT
from zoo.reproduce import CONFIGS
from zoo.registry import create_model, list_models, model_info
from zoo.train import train


def test_registered_names():
    assert list_models("timm/*") == sorted(f"timm/{n}" for n in TIMM_EFFICIENT)


@pytest.mark.parametrize("name", TIMM_EFFICIENT)
def test_model_info_on_meta(name):
    info = model_info(f"timm/{name}")
    assert info["family"] == "timm" and info["params"] > 1e6 and info["config"]["timm_name"] == name
    assert info["config"]["img_size"] in (224, 256)


def test_create_forward_and_save(tmp_path):
    model = create_model("timm/levit_128s", num_classes=10, img_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="img_size=32"):
        model(torch.randn(2, 3, 64, 64))
    loaded = load_pretrained(model.save_pretrained(tmp_path / "levit"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="patch_size"):
        create_model("timm/fastvit_sa12", patch_size=4)
    with pytest.raises(ValueError, match="no pretrained checkpoints"):
        create_model("timm/levit_128s", pretrained=True)


def test_bench_target_feeds_model_size():
    target = make_target("timm/mobilevit_s", (1024,), 64, 4)
    assert target.unit == "images" and target.peer[0] == "timm/mobilevit_s"
    assert target.inputs(2, target.seq_lens[0], torch.device("cpu"), torch.float32)[0].shape == (2, 3, 256, 256)


def test_trains_on_shapes(tmp_path):
    run = load_config(CONFIGS / "vit" / "tiny-shapes.yaml", [
        "model.name=timm/fastvit_sa12", "model.img_size=32", "train.steps=2", "train.batch_size=8", "train.eval_every=2",
        "train.eval_batches=1", "train.warmup_steps=1", "train.progress=false", f"out_dir={tmp_path / 'run'}"])
    metrics = train(run)
    assert metrics["step"] == 2 and 0.0 <= metrics["accuracy"] <= 1.0
