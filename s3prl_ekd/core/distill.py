"""One EKD objective: teachers' layers -> targets -> the student's heads -> loss.

Everything here is independent of s3prl's runner: the pretrain expert (plugin) calls
`DistillObjective` once per batch, bench times it, tests check it against hand-built targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import nn

from s3prl_ekd.core import aggregation
from s3prl_ekd.core.config import EKDConfig, TeacherConfig
from s3prl_ekd.core.frames import valid_frames
from s3prl_ekd.core.loss import LossTerms, distill_loss, total_loss
from s3prl_ekd.core.student import EKDStudent


def build_student(config: EKDConfig, teacher_dims: Sequence[int]) -> EKDStudent:
    """The student with one head set per target set of `config.aggregation`."""
    head_dims = aggregation.head_dims(config.aggregation, list(teacher_dims))
    return EKDStudent(config.student, head_dims, num_targets=len(config.teachers[0].layers))


@dataclass
class InitReport:
    """What `init_from_teacher` copied and what it left at its random initialisation."""

    copied: list[str]        # student backbone tensors copied from the teacher
    uncopied: list[str]      # student tensors of the copied parts that the teacher has no match for
    teacher_only: list[str]  # teacher tensors of the copied parts the student has no place for

    def summary(self, teacher: str) -> str:
        def listed(names):
            return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")

        text = f"initialised {len(self.copied)} student tensors from {teacher}"
        if self.uncopied:
            text += f"; {len(self.uncopied)} kept their random init ({listed(self.uncopied)})"
        if self.teacher_only:
            text += (f"; {len(self.teacher_only)} teacher tensors have no place in the student and were not "
                     f"copied ({listed(self.teacher_only)})")
        return text


# Student backbone parts DistilHuBERT copies from its teacher: the CNN, the input projection,
# the positional convolution, the encoder's layer norm and the first transformer layers.
_COPIED_PARTS = ("feature_extractor", "post_extract_proj", "encoder.pos_conv", "encoder.layer_norm")


def init_from_teacher(student: EKDStudent, teacher: nn.Module) -> InitReport:
    """Copy the teacher's tensors into the student's backbone where name and shape match.

    A WavLM teacher's attention also has a gated relative position bias, which the student's
    attention lacks: its projections are copied, the bias is not (`InitReport.teacher_only`).
    """
    source = getattr(teacher, "model", teacher)
    teacher_state = source.state_dict()
    parts = _COPIED_PARTS + tuple(f"encoder.layers.{i}" for i in range(student.config.encoder_layers))
    copied, uncopied = {}, []
    for name, value in student.backbone.state_dict().items():
        if not any(name.startswith(part + ".") for part in parts):
            continue
        if name in teacher_state and teacher_state[name].shape == value.shape:
            copied[name] = teacher_state[name]
        else:
            uncopied.append(name)
    student_names = set(student.backbone.state_dict())
    teacher_only = [name for name in teacher_state
                    if any(name.startswith(part + ".") for part in parts) and name not in student_names]
    student.backbone.load_state_dict(copied, strict=False)
    return InitReport(sorted(copied), sorted(uncopied), sorted(teacher_only))


def align(prediction: torch.Tensor, target: torch.Tensor, frame_lengths: torch.Tensor):
    """Cut predictions and targets (B, L, T, D) to their common frames; mask padded frames.

    -> (prediction, target, mask (B, T) bool, True on valid frames)
    """
    frames = min(prediction.shape[2], target.shape[2])
    return prediction[:, :, :frames], target[:, :, :frames], valid_frames(frame_lengths, frames)


def target_names(teachers: Sequence[TeacherConfig]) -> list[str]:
    """Target i is named by the layers it comes from, e.g. 'L4' or 'L4+L8' across teachers."""
    layer_lists = zip(*(t.layers for t in teachers))
    return ["L" + "+".join(dict.fromkeys(str(x) for x in layers)) for layers in layer_lists]


def head_set_names(config: EKDConfig) -> list[str]:
    if config.aggregation == "multi_head":
        return [f"teacher{i}-{t.name}" for i, t in enumerate(config.teachers)]
    return [config.aggregation]


class Objective(NamedTuple):
    loss: torch.Tensor       # scalar
    terms: list[LossTerms]   # per head set: (L,) L1 and cosine terms
    frames: torch.Tensor     # scalar: valid frames the means are over


class DistillObjective:
    """The loss of one batch for `config`: build targets from per-teacher layers, compare heads."""

    def __init__(self, config: EKDConfig):
        self.config = config
        self.teacher_weights = [t.weight for t in config.teachers]
        self.head_weights = aggregation.head_weights(config.aggregation, self.teacher_weights)

    def targets(self, teacher_hiddens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """[K] (B, L, T, D_k) -> one (B, L, T, D_h) target per head set."""
        return aggregation.build_targets(self.config.aggregation, teacher_hiddens, self.teacher_weights)

    def __call__(self, predictions: Sequence[torch.Tensor], frame_lengths: torch.Tensor,
                 targets: Sequence[torch.Tensor], target_frames: torch.Tensor | None = None) -> Objective:
        """predictions, targets: [head sets] (B, L, T, D_h); frame_lengths (B,) of the student;
        target_frames (B,): valid target frames where they can be fewer (a store's crops)."""
        if target_frames is not None:
            frame_lengths = torch.minimum(frame_lengths, target_frames)
        aligned = [align(pred, target, frame_lengths) for pred, target in zip(predictions, targets)]
        terms = [distill_loss(*parts) for parts in aligned]
        loss = total_loss(terms, self.head_weights, self.config.loss.l1_weight, self.config.loss.cosine_weight)
        return Objective(loss, terms, aligned[0][2].sum())
