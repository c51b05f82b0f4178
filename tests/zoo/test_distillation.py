"""Teacher distillation in the diffusion task (BK-SDM's output- and feature-level KD): which features pair up,
the loss terms against hand computation, frozen teachers, ``init``, the ``teacher:`` run-config entry end to end,
and clear errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from zoo.cli import main
from zoo.config import validate_run_config
from zoo.data import create_dataset
from zoo.diffusion import Distillation, FeatureCapture, feature_pairs
from zoo.registry import create_model
from zoo.tasks import create_task

# a 3-stage pixel U-Net for the 6 shapes (+ the null class) and its BK-SDM-style students
TEACHER = dict(block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=2, num_class_embeds=7)
SMALL_STUDENT = dict(TEACHER, layers_per_block=1, mid_block_type=None)  # BK-SDM small: fewer pairs, no mid block
TINY_STUDENT = dict(SMALL_STUDENT, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"))  # BK-SDM tiny: also without the innermost stage
TINY_DIT = dict(dim=32, num_heads=2, input_size=32, patch_size=8, in_channels=3, num_classes=6)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_model("unet-small", **TEACHER)


@pytest.fixture(scope="module")
def batch():
    shapes = create_dataset("shapes", "train", image_size=32, num_examples=4)
    return default_collate([shapes[i] for i in range(4)])


def test_unet_pairs_follow_the_stage_alignment(teacher):
    small = create_model("unet-small", **SMALL_STUDENT)
    stages = [f"unet.down_blocks.{i}" for i in range(3)] + [f"unet.up_blocks.{i}" for i in range(3)]
    assert feature_pairs(small, teacher) == [(name, name) for name in stages]
    base = create_model("unet-small", **dict(TEACHER, layers_per_block=1))
    assert ("unet.mid_block", "unet.mid_block") in feature_pairs(base, teacher)
    tiny = create_model("unet-small", **TINY_STUDENT)
    # up stages align from the outermost: the student's first up stage is the teacher's second
    assert feature_pairs(tiny, teacher) == [("unet.down_blocks.0", "unet.down_blocks.0"),
                                            ("unet.down_blocks.1", "unet.down_blocks.1"),
                                            ("unet.up_blocks.0", "unet.up_blocks.1"),
                                            ("unet.up_blocks.1", "unet.up_blocks.2")]


def test_tiny_student_leaves_out_pairs_of_other_shapes(teacher):
    """The student's last down stage has no downsampler (the teacher's has): that pair is dropped, with a warning."""
    tiny = create_model("unet-small", **TINY_STUDENT)
    with pytest.warns(UserWarning, match=r"unet.down_blocks.1 \(1, 32, 16, 16\) vs unet.down_blocks.1 \(1, 32, 8, 8\)"):
        distill = Distillation(tiny, teacher)
    assert distill.pairs == [("unet.down_blocks.0", "unet.down_blocks.0"), ("unet.up_blocks.0", "unet.up_blocks.1"),
                             ("unet.up_blocks.1", "unet.up_blocks.2")]


def test_transformer_blocks_pair_uniformly():
    """Student block i of d_s meets teacher block ceil((i + 1) d_t / d_s) - 1: the last blocks always meet."""
    deep, shallow = create_model("dit-s2", depth=6, **TINY_DIT), create_model("dit-s2", depth=4, **TINY_DIT)
    assert feature_pairs(shallow, deep) == [("blocks.0", "blocks.1"), ("blocks.1", "blocks.2"),
                                            ("blocks.2", "blocks.4"), ("blocks.3", "blocks.5")]
    uvit = create_model("uvit-s2", depth=5, dim=32, num_heads=2, input_size=32, patch_size=8, num_classes=6)
    assert uvit.block_names() == ["in_blocks.0", "in_blocks.1", "mid_block", "out_blocks.0", "out_blocks.1"]
    assert feature_pairs(create_model("unet-small", **SMALL_STUDENT), deep) == []


def test_losses_match_hand_computation(teacher, batch):
    torch.manual_seed(1)
    student = create_model("unet-small", **SMALL_STUDENT)
    distill = Distillation(student, teacher, output_weight=0.5, feature_weight=2.0, task_weight=1.0)
    sample, t, cond = torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4,)), batch["label"]
    with distill.student_features(student) as features:
        prediction = student(sample, t, cond)
    output, feature = distill.losses(sample, t, cond, prediction, features)
    names = [name for name, _ in distill.pairs]
    with torch.no_grad(), FeatureCapture(teacher, names) as targets:  # the pairs are same-named here
        expected_output = F.mse_loss(prediction, teacher(sample, t, cond))
    expected_feature = sum(F.mse_loss(f, g) for f, g in zip(features, targets))
    torch.testing.assert_close(output, expected_output)
    torch.testing.assert_close(feature, expected_feature)
    assert output > 0 and feature > 0


def test_a_copy_of_the_teacher_has_nothing_to_learn(teacher, batch):
    student = copy.deepcopy(teacher).train()
    task = create_task("diffusion")
    task.set_teacher(student, teacher)
    torch.manual_seed(2)
    loss, metrics = task.loss(student, batch)
    assert metrics["distill_output"] == 0 and metrics["distill_features"] == 0 and metrics["loss"] > 0
    torch.testing.assert_close(loss, metrics["loss"])


def test_only_the_student_learns_and_evaluation_leaves_the_teacher_out(teacher, batch):
    student = create_model("unet-small", **SMALL_STUDENT).train()
    task = create_task("diffusion")
    task.set_teacher(student, teacher, output_weight=1.0, feature_weight=0.5, task_weight=0.25)
    torch.manual_seed(3)
    loss, metrics = task.loss(student, batch)
    expected = 0.25 * metrics["loss"] + metrics["distill_output"] + 0.5 * metrics["distill_features"]
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0
    student.eval()
    _, eval_metrics = task.loss(student, batch)
    assert set(eval_metrics) == {"loss", "count"}


def test_init_copies_the_kept_blocks(teacher):
    student = create_model("unet-small", **SMALL_STUDENT)
    create_task("diffusion").set_teacher(student, teacher, init=True)
    torch.testing.assert_close(student.unet.conv_in.weight, teacher.unet.conv_in.weight)
    torch.testing.assert_close(student.unet.down_blocks[1].attentions[0].to_q.weight,
                               teacher.unet.down_blocks[1].attentions[0].to_q.weight)


@pytest.mark.parametrize("student_spec, options, message", [
    (("unet-small", dict(TEACHER, sample_size=16)), {}, "sample_shape is \\(3, 32, 32\\), the student's \\(3, 16, 16\\)"),
    (("unet-small", dict(TEACHER, num_class_embeds=None)), {}, "conditioning is class labels, the student's None"),
    (("dit-s2", dict(TINY_DIT, depth=1, num_classes=6)), {}, "no features of the same shape"),
    (("dit-s2", dict(TINY_DIT, depth=1, num_classes=6)), {"init": True}, "must be a zoo U-Net"),
    (("unet-small", SMALL_STUDENT), {"output_weight": -1.0}, "output_weight must be >= 0"),
])
def test_incompatible_teachers_and_options(teacher, student_spec, options, message):
    student = create_model(student_spec[0], **student_spec[1])
    with pytest.raises(ValueError, match=message):
        create_task("diffusion").set_teacher(student, teacher, **options)


def test_a_dit_student_without_feature_loss_learns_from_a_unet(teacher, batch):
    student = create_model("dit-s2", depth=1, **TINY_DIT).train()
    task = create_task("diffusion")
    task.set_teacher(student, teacher, feature_weight=0.0)
    _, metrics = task.loss(student, batch)
    assert metrics["distill_output"] > 0 and metrics["distill_features"] == 0


def test_tasks_without_distillation_refuse_a_teacher(teacher):
    with pytest.raises(ValueError, match="the classification task does not train with a teacher"):
        create_task("classification").set_teacher(create_model("vit-tiny"), teacher)


def test_teacher_entry_is_typed():
    raw = {"model": {"name": "unet-tiny"}, "data": {"name": "shapes"}, "task": {"name": "diffusion"}}
    with pytest.raises(ValueError, match=r"teacher.feature_wieght: unknown key \(did you mean feature_weight"):
        validate_run_config(raw | {"teacher": {"checkpoint": "x", "feature_wieght": 1.0}})
    with pytest.raises(ValueError, match="teacher.task_weight.*task_weight must be >= 0"):
        validate_run_config(raw | {"teacher": {"checkpoint": "x", "task_weight": -0.5}})
    with pytest.raises(ValueError, match="teacher.checkpoint: Field required"):
        validate_run_config(raw | {"teacher": {}})


def test_zoo_train_with_a_teacher_entry(tmp_path, capsys):
    """Train a teacher for 2 steps, then a block-removed student from it (init + KD); the student's log has the
    distillation terms, its validation does not, and a missing teacher checkpoint is a clear error."""
    common = ["data.name=shapes", "data.image_size=32", "data.num_examples=16", "task.name=diffusion",
              "train.steps=2", "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1", "train.log_every=1",
              "train.progress=false", "train.device=cpu", "train.warmup_steps=0"]
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"name": "unet-small", **TEACHER}}))
    main(["train", str(config), *common, f"out_dir={tmp_path / 'teacher'}"])
    config.write_text(json.dumps({"model": {"name": "unet-small", **SMALL_STUDENT}}))
    main(["train", str(config), *common, f"out_dir={tmp_path / 'student'}", f"teacher.checkpoint={tmp_path / 'teacher'}",
          "teacher.init=true", "teacher.feature_weight=0.1"])
    capsys.readouterr()
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert len(train_records) == 2 and all(r["distill_output"] > 0 and r["distill_features"] > 0 for r in train_records)
    assert [set(r) & {"distill_output", "distill_features"} for r in records if r["split"] == "val"] == [set()]
    run = json.loads((tmp_path / "student" / "run.json").read_text())
    assert run["teacher"]["feature_weight"] == 0.1 and run["teacher"]["init"] is True
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), *common, f"out_dir={tmp_path / 'other'}", f"teacher.checkpoint={tmp_path / 'none'}"])
    assert exit_info.value.code == 2 and "none is neither a checkpoint folder" in capsys.readouterr().err


def test_shipped_distillation_config_is_valid():
    from pathlib import Path

    from zoo.config import load_config

    run = load_config(Path(__file__).resolve().parents[2] / "configs/diffusion/bk-distill-shapes.yaml")
    assert run.teacher.checkpoint == "runs/unet-tiny-shapes" and run.teacher.init and run.model.kwargs()["mid_block_type"] is None
