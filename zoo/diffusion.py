"""BK-SDM (Kim et al. 2023): a block-removed U-Net starts from its teacher's weights and learns from its
outputs and features.

Initialisation:

The student keeps a prefix of the teacher's stages (BK-SDM-Tiny drops the innermost one) and fewer
ResNet(+attention) pairs per stage. As in BK-SDM's ``copy_weight_from_teacher``: down stages are aligned from
the outermost, up stages from the outermost too (the student's last up stage is the teacher's last); within a
down stage the kept pairs are the teacher's first ones; within an up stage the student's last pair takes the
teacher's last (its skip comes from the stage input, so only there do the shapes match) and the others the
teacher's first ones. Everything else (stems, time embedding, mid block, resamplers, head) maps by name.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.models.diffusion import CAPTIONS, DiffusionBackbone, DiffusionUNet

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


# --- distillation ---------------------------------------------------------------------------------------------


def feature_pairs(student: DiffusionBackbone, teacher: DiffusionBackbone) -> list[tuple[str, str]]:
    """Candidate (student module, teacher module) pairs for feature distillation.

    U-Nets: each down block, the mid block (when both have one) and each up block, stages aligned as
    :func:`init_from_teacher` aligns them (BK-SDM's feature KD at the block outputs). Transformer backbones:
    student block ``i`` of ``d_s`` with teacher block ``ceil((i + 1) d_t / d_s) - 1``, so that the last blocks
    meet. Other combinations have no pairs."""
    if isinstance(student, DiffusionUNet) and isinstance(teacher, DiffusionUNet):
        check_compatible(student, teacher)
        n_student, n_teacher = len(student.config.block_out_channels), len(teacher.config.block_out_channels)
        pairs = [(f"unet.down_blocks.{i}",) * 2 for i in range(n_student)]
        if student.config.mid_block_type is not None and teacher.config.mid_block_type is not None:
            pairs.append(("unet.mid_block",) * 2)
        return pairs + [(f"unet.up_blocks.{i}", f"unet.up_blocks.{i + n_teacher - n_student}") for i in range(n_student)]
    ours, theirs = student.block_names(), teacher.block_names()
    if not ours or not theirs:
        return []
    return [(name, theirs[-(-(i + 1) * len(theirs) // len(ours)) - 1]) for i, name in enumerate(ours)]


class FeatureCapture:
    """``with FeatureCapture(model, names) as outputs:`` records each named module's output during the block
    (the first element when a module returns a tuple, as diffusers' down blocks do)."""

    def __init__(self, model: nn.Module, names: list[str]):
        model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
        self.modules = [model.get_submodule(name) for name in names]

    def __enter__(self) -> list[Any]:
        self.outputs: list[Any] = [None] * len(self.modules)

        def keep(index: int):
            def hook(module, args, output):
                self.outputs[index] = output[0] if isinstance(output, tuple) else output
            return hook

        self.handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(self.modules)]
        return self.outputs

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def check_teacher(student: DiffusionBackbone, teacher: DiffusionBackbone) -> None:
    """ValueError unless ``teacher`` takes the student's inputs and predicts in the same space."""
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, DiffusionBackbone):
            raise ValueError(f"the {role} must be a zoo diffusion model (unet, dit, uvit), got {type(model).__name__}")
    checks = {"sample_shape": (tuple(student.sample_shape), tuple(teacher.sample_shape)),
              "conditioning": (student.cond_kind, teacher.cond_kind), "null class": (student.null_class, teacher.null_class)}
    for what, (ours, theirs) in checks.items():
        if ours != theirs:
            raise ValueError(f"teacher {teacher.model_name} is incompatible: its {what} is {theirs}, the student's {ours}")


class Distillation:
    """Output- and feature-level knowledge distillation from a frozen teacher (BK-SDM's KD):
    ``task_weight * task loss + output_weight * MSE(student, teacher prediction)
    + feature_weight * sum over pairs MSE(student feature, teacher feature)``.

    The feature pairs are :func:`feature_pairs` whose outputs have the same shape; they are found once by
    running both models on one random input, and pairs whose shapes differ are left out with a warning
    (e.g. the last kept down stage of BK-SDM-Tiny has no downsampler where the teacher's has one)."""

    def __init__(self, student: DiffusionBackbone, teacher: DiffusionBackbone, output_weight: float = 1.0,
                 feature_weight: float = 1.0, task_weight: float = 1.0):
        check_teacher(student, teacher)
        for name, value in (("output_weight", output_weight), ("feature_weight", feature_weight),
                            ("task_weight", task_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.output_weight, self.feature_weight, self.task_weight = output_weight, feature_weight, task_weight
        self.pairs = self._matching_pairs(student) if feature_weight > 0 else []
        if feature_weight > 0 and not self.pairs:
            raise ValueError(f"feature_weight is {feature_weight} but {student.model_name} and teacher "
                             f"{teacher.model_name} have no features of the same shape to match: set feature_weight=0")

    @torch.no_grad()
    def _matching_pairs(self, student: DiffusionBackbone) -> list[tuple[str, str]]:
        candidates = feature_pairs(student, self.teacher)
        sample = torch.randn(1, *student.sample_shape)
        shapes = []
        for model, names in ((student, [s for s, _ in candidates]), (self.teacher, [t for _, t in candidates])):
            device = next(model.parameters()).device
            was_training = model.training
            model.eval()
            with FeatureCapture(model, names) as outputs:
                model(sample.to(device), torch.full((1,), 10, device=device), self.probe_cond(model, device))
            model.train(was_training)
            shapes.append([tuple(o.shape) for o in outputs])
        kept = [pair for pair, a, b in zip(candidates, *shapes) if a == b]
        dropped = [f"{s} {a} vs {t} {b}" for (s, t), a, b in zip(candidates, *shapes) if a != b]
        if dropped and kept:
            warnings.warn("feature distillation leaves out pairs of different shapes: " + "; ".join(dropped), stacklevel=3)
        return kept

    @staticmethod
    def probe_cond(model: DiffusionBackbone, device: torch.device) -> Any:
        if model.cond_kind is None:
            return None
        if model.cond_kind == CAPTIONS:
            return ["a probe caption"]
        if isinstance(model, DiffusionUNet) and model.config.cross_attention_dim is not None:
            return torch.randn(1, 4, model.config.cross_attention_dim, device=device)
        return torch.zeros(1, dtype=torch.long, device=device)

    def student_features(self, student: nn.Module) -> FeatureCapture:
        return FeatureCapture(student, [s for s, _ in self.pairs])

    def losses(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Any, prediction: torch.Tensor,
               features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(output loss, feature loss) of the student's ``prediction`` (its first channels, as the task's) and
        captured ``features`` against the teacher's on the same noisy ``sample``."""
        with torch.no_grad(), FeatureCapture(self.teacher, [t for _, t in self.pairs]) as targets:
            target = self.teacher(sample, timesteps, cond)[:, : prediction.shape[1]]
        output = F.mse_loss(prediction.float(), target.float())
        feature = sum((F.mse_loss(f.float(), t.float()) for f, t in zip(features, targets)),
                      torch.zeros((), device=prediction.device))
        return output, feature
