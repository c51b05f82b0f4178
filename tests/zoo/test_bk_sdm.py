"""BK-SDM student initialisation from a teacher U-Net, and the bk-sdm-sizes reproduction."""
import pytest
import torch

import zoo
from zoo.diffusion import init_from_teacher
from zoo.reproduce import reproduce

# Stable Diffusion's U-Net layout (4 stages, the last without attention, 2 pairs per down stage) at toy width
TOY_SD = dict(block_out_channels=(32, 32, 64, 64), sample_size=16, cross_attention_dim=24, norm_num_groups=8,
              attention_head_dim=4)
TOY_SMALL = dict(TOY_SD, layers_per_block=1, mid_block_type=None)
TOY_TINY = dict(TOY_SMALL, block_out_channels=(32, 32, 64), down_block_types=("CrossAttnDownBlock2D",) * 3,
                up_block_types=("CrossAttnUpBlock2D",) * 3)


@pytest.fixture(autouse=True)
def empty_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFZOO_CHECKPOINTS", str(tmp_path / "checkpoints"))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return zoo.create_model("unet-sd15", **TOY_SD).eval()


@pytest.mark.parametrize("student_overrides", [TOY_SMALL, TOY_TINY], ids=["small", "tiny"])
def test_student_takes_teacher_weights(teacher, student_overrides):
    student = zoo.create_model("unet-bk-small", **student_overrides).eval()
    report = init_from_teacher(student, teacher)
    ours, theirs = student.unet.state_dict(), teacher.unet.state_dict()
    assert not report.skipped and set(report.copied) == set(ours)
    assert all(torch.equal(ours[k], theirs[v]) for k, v in report.copied.items())
    # BK-SDM's mapping: a down stage keeps its first pair; an up stage's last pair takes the teacher's last
    offset = 4 - len(student_overrides["block_out_channels"])
    assert report.copied["down_blocks.1.resnets.0.conv1.weight"] == "down_blocks.1.resnets.0.conv1.weight"
    assert report.copied["up_blocks.1.resnets.1.conv1.weight"] == f"up_blocks.{1 + offset}.resnets.2.conv1.weight"
    assert report.copied["up_blocks.1.attentions.1.proj_in.weight"] == f"up_blocks.{1 + offset}.attentions.2.proj_in.weight"
    assert any(k.startswith("mid_block.") for k in report.unused)
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 24)
    with torch.no_grad():
        out = student(sample, 10, text)
    assert out.shape == sample.shape and torch.isfinite(out).all()


def test_bk_base_keeps_the_mid_block(teacher):
    student = zoo.create_model("unet-bk-base", **dict(TOY_SD, layers_per_block=1))
    report = init_from_teacher(student, teacher)
    assert "mid_block.resnets.0.conv1.weight" in report.copied and not report.skipped


@pytest.mark.parametrize("overrides, message", [
    (dict(TOY_SMALL, block_out_channels=(32, 64, 64, 64)), "block_out_channels"),
    (dict(TOY_SMALL, cross_attention_dim=32), "cross_attention_dim"),
    (dict(TOY_SMALL, layers_per_block=3), "more layers per block"),
])
def test_incompatible_teacher(teacher, overrides, message):
    student = zoo.create_model("unet-bk-small", **overrides)
    with pytest.raises(ValueError, match=message):
        init_from_teacher(student, teacher)


def test_teacher_must_be_a_zoo_unet(teacher):
    with pytest.raises(ValueError, match="zoo U-Net"):
        init_from_teacher(teacher, zoo.create_model("dit-s2", depth=1, dim=64, num_heads=2, input_size=8))
    with pytest.raises(ValueError, match="zoo U-Net"):
        init_from_teacher(teacher, teacher.unet)


def test_bk_sdm_sizes_quick(tmp_path):
    result = reproduce("bk-sdm-sizes", quick=True, out_dir=tmp_path)
    assert result["passed"] and {r["model"] for r in result["rows"]} == {"unet-bk-tiny", "dit-s2"}
    tiny = next(r for r in result["rows"] if r["model"] == "unet-bk-tiny")
    assert tiny["our_macs_g_all"] > tiny["our_macs_g_weight_layers"]  # the attention products
    assert (tmp_path / "result.json").is_file() and "unet-bk-tiny" in (tmp_path / "sizes.md").read_text()


def test_bk_sdm_sizes_takes_no_sweep_options(tmp_path):
    with pytest.raises(ValueError, match="trains nothing"):
        reproduce("bk-sdm-sizes", quick=True, out_dir=tmp_path, steps=10)
