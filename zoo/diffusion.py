"""BK-SDM (Kim et al. 2023) student initialisation: a block-removed U-Net starts from its teacher's weights.

The student keeps a prefix of the teacher's stages (BK-SDM-Tiny drops the innermost one) and fewer
ResNet(+attention) pairs per stage. As in BK-SDM's ``copy_weight_from_teacher``: down stages are aligned from
the outermost, up stages from the outermost too (the student's last up stage is the teacher's last); within a
down stage the kept pairs are the teacher's first ones; within an up stage the student's last pair takes the
teacher's last (its skip comes from the stage input, so only there do the shapes match) and the others the
teacher's first ones. Everything else (stems, time embedding, mid block, resamplers, head) maps by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from zoo.models.diffusion import DiffusionUNet

# config fields a teacher must share with its student
SHARED_FIELDS = ("in_channels", "out_channels", "cross_attention_dim", "num_class_embeds", "attention_head_dim",
                 "norm_num_groups")
STAGE_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.")
RESAMPLER_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.")


@dataclass
class InitReport:
    """``copied``: student tensor name -> the teacher's it took; ``skipped``: student tensors left as
    initialised (no counterpart); ``unused``: teacher tensors nobody took (the removed blocks)."""

    copied: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def check_compatible(student: DiffusionUNet, teacher: DiffusionUNet) -> None:
    """ValueError unless ``student`` is a block-removed version of ``teacher``."""
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, DiffusionUNet):
            raise ValueError(f"{role} must be a zoo U-Net (DiffusionUNet), got {type(model).__name__}")
    s, t = student.config, teacher.config
    for name in SHARED_FIELDS:
        if getattr(s, name) != getattr(t, name):
            raise ValueError(f"teacher {teacher.model_name} is incompatible: {name} is {getattr(t, name)}, "
                             f"the student's {getattr(s, name)}")
    n = len(s.block_out_channels)
    layout = {"block_out_channels": (s.block_out_channels, t.block_out_channels[:n]),
              "down_block_types": (s.down_block_types, t.down_block_types[:n]),
              "up_block_types": (s.up_block_types, t.up_block_types[len(t.up_block_types) - n:])}
    for name, (ours, theirs) in layout.items():
        if n > len(t.block_out_channels) or ours != theirs:
            raise ValueError(f"teacher {teacher.model_name} is incompatible: the student's {name} {ours} is not "
                             f"the teacher's outer {n} stages ({getattr(t, name)})")
    if s.layers_per_block > t.layers_per_block:
        raise ValueError(f"the student has more layers per block ({s.layers_per_block}) than the teacher "
                         f"({t.layers_per_block}): nothing was removed")


def teacher_key(key: str, student: DiffusionUNet, teacher: DiffusionUNet) -> str:
    """The teacher's name for the student's state-dict entry ``key`` (of the wrapped diffusers U-Net)."""
    up_offset = len(teacher.config.block_out_channels) - len(student.config.block_out_channels)
    match = STAGE_KEY.match(key)
    if match:
        kind, stage, part, index = match[1], int(match[2]), match[3], int(match[4])
        if kind == "up_blocks":
            last_student, last_teacher = student.config.layers_per_block, teacher.config.layers_per_block
            index = last_teacher if index == last_student else index
            stage += up_offset
        return f"{kind}.{stage}.{part}.{index}.{key[match.end():]}"
    match = RESAMPLER_KEY.match(key)
    if match and match[1] == "up_blocks":
        return f"up_blocks.{int(match[2]) + up_offset}.{key[match.end():]}"
    return key


@torch.no_grad()
def init_from_teacher(student: DiffusionUNet, teacher: DiffusionUNet) -> InitReport:
    """Copy into ``student`` (in place) the teacher's weights of every block it kept, as BK-SDM does.

    Raises ValueError for an incompatible teacher (other channels, conditioning or stage layout) or when a
    counterpart's shape differs."""
    check_compatible(student, teacher)
    ours, theirs = student.unet.state_dict(), teacher.unet.state_dict()
    report = InitReport()
    for key, tensor in ours.items():
        source = teacher_key(key, student, teacher)
        if source not in theirs:
            report.skipped.append(key)
            continue
        if theirs[source].shape != tensor.shape:
            raise ValueError(f"teacher {teacher.model_name} is incompatible: {source} has shape "
                             f"{tuple(theirs[source].shape)}, the student's {key} {tuple(tensor.shape)}")
        report.copied[key] = source
    for key, source in report.copied.items():
        ours[key].copy_(theirs[source])
    taken = set(report.copied.values())
    report.unused = [k for k in theirs if k not in taken]
    return report
