"""zoo.viz.merged_tokens: ToMe's token groups drawn over the image."""
import pytest

import zoo.models  # noqa: F401  (registers the ViTs)
from zoo.data import create_dataset
from zoo.registry import create_model
from zoo.viz import merged_tokens, token_groups


@pytest.fixture(scope="module")
def image():
    return create_dataset("shapes", "val", image_size=32, num_examples=1)[0]["image"]


def test_r0_keeps_every_patch_its_own_group(image):
    groups = token_groups(image, create_model("vit-tiny"), r=0)
    assert groups.shape == (8, 8) and len(groups.unique()) == 64


def test_merging_makes_fewer_groups_and_writes_png(image, tmp_path):
    model = create_model("vit-tiny", token_reduction={"name": "tome", "r": 8})
    groups = token_groups(image, model)
    assert len(groups.unique()) == 65 - 1 - 4 * 8  # 65 tokens (CLS included) less 8 per layer, CLS not drawn
    path = merged_tokens(image, model, tmp_path / "tome.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert model.token_reduction.track_source is False  # restored


def test_model_without_tome_needs_r(image, tmp_path):
    with pytest.raises(ValueError, match="pass r="):
        merged_tokens(image, create_model("vit-tiny"), tmp_path / "x.png")
