"""One EKD objective: teachers' layers -> targets -> the student's heads -> loss.

Everything here is independent of s3prl's runner: the pretrain expert (plugin) calls
`DistillObjective` once per batch, bench times it, tests check it against hand-built targets.
Also here: what the runner optimises (`DistillModel`), and what identifies a student's
initialisation and teachers (`init_record`, `teacher_fingerprints`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import nn

from s3prl_ekd.core import aggregation
from s3prl_ekd.core.config import EKDConfig, InitConfig, TeacherConfig
from s3prl_ekd.core.frames import valid_frames
from s3prl_ekd.core.loss import LossTerms, UncertaintyWeights, distill_loss, head_set_losses, total_loss
from s3prl_ekd.core.normalization import LayerStats, standardise
from s3prl_ekd.core.student import EKDStudent, StudentOutput
from s3prl_ekd.io.target_store import checkpoint_fingerprint


def build_student(config: EKDConfig, teacher_dims: Sequence[int]) -> EKDStudent:
    """The student with one head set per target set of `config.aggregation`."""
    head_dims = aggregation.head_dims(config.aggregation, list(teacher_dims))
    return EKDStudent(config.student, head_dims, num_targets=len(config.teachers[0].layers),
                      residual=config.aggregation == "multi_head_residual")


class DistillModel(nn.Module):
    """What s3prl's runner optimises (`expert.model`): the student and, with
    `teacher_weighting: uncertainty`, the head sets' log-variances. Exports read the student alone."""

    def __init__(self, student: EKDStudent, loss_weights: UncertaintyWeights | None = None):
        super().__init__()
        self.student = student
        self.loss_weights = loss_weights

    def forward(self, wave: torch.Tensor, wave_lengths: torch.Tensor) -> StudentOutput:
        return self.student(wave, wave_lengths)


def init_source(config: EKDConfig) -> InitConfig:
    """The upstream the student's backbone is copied from: `init_from`, else the first teacher."""
    if config.init_from is not None:
        return config.init_from
    first = config.teachers[0]
    return InitConfig(first.name, first.ckpt)


def upstream_fingerprint(name: str, ckpt: str | None) -> str:
    """What identifies an s3prl.hub entry's weights: the sha256 of its checkpoint file, "hub:<name>"
    for the entry's own weights, "url:<address>" for a download."""
    if ckpt and ckpt.startswith(("http://", "https://")):
        return f"url:{ckpt}"
    return checkpoint_fingerprint(name, ckpt)


def teacher_fingerprints(config: EKDConfig) -> list[str]:
    return [upstream_fingerprint(t.name, t.ckpt) for t in config.teachers]


def backbone_fingerprint(student: EKDStudent) -> str:
    """sha256 over the backbone's tensors: names, shapes, dtypes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(student.backbone.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def init_record(config: EKDConfig, student: EKDStudent, seed: int) -> dict:
    """{source, fingerprint} of a freshly initialised student: where its backbone was copied from
    (name and checkpoint fingerprint), or its random initialisation's seed."""
    if config.student.init_from_teacher:
        source = init_source(config)
        described = f"{source.name}@{upstream_fingerprint(source.name, source.ckpt)}"
    else:
        described = f"random(seed={seed})"
    return {"source": described, "fingerprint": backbone_fingerprint(student)}


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
    """Names of the head sets in records and logs: 'teacher{k}-{name}' per teacher, 'average' for
    multi_head_residual's shared set, the aggregation's name for the paper's single set."""
    teachers = [f"teacher{i}-{t.name}" for i, t in enumerate(config.teachers)]
    if config.aggregation == "multi_head":
        return teachers
    if config.aggregation == "multi_head_residual":
        return ["average", *teachers]
    return [config.aggregation]


class Objective(NamedTuple):
    loss: torch.Tensor       # scalar
    terms: list[LossTerms]   # per head set: (L,) L1 and cosine terms
    frames: torch.Tensor     # scalar: valid frames the means are over


class DistillObjective:
    """The loss of one batch for `config`: build targets from per-teacher layers, compare heads.

    `target_stats` (per teacher, `LayerStats` of its selected layers) standardise the teachers'
    layers first; `config.target_norm: teacher_layer` needs them (`set_target_stats`).
    `loss_weights` (teacher_weighting: uncertainty) replace the fixed head-set weights.
    """

    def __init__(self, config: EKDConfig, loss_weights: UncertaintyWeights | None = None,
                 target_stats: Sequence[LayerStats] | None = None):
        self.config = config
        self.teacher_weights = [t.weight for t in config.teachers]
        self.head_weights = aggregation.head_weights(config.aggregation, self.teacher_weights)
        self.loss_weights = loss_weights
        self.target_stats: list[LayerStats] | None = None
        self._mean_std: list[tuple[torch.Tensor, torch.Tensor]] = []
        if target_stats is not None:
            self.set_target_stats(target_stats)

    def set_target_stats(self, stats: Sequence[LayerStats]) -> None:
        self.target_stats = list(stats)
        self._mean_std = [s.mean_std() for s in self.target_stats]

    def standardise(self, teacher_hiddens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """[K] (B, L, T, D_k) -> the same, each teacher layer standardised by its statistics."""
        if self.target_stats is None:
            raise RuntimeError("target_norm: teacher_layer, but no statistics were set (set_target_stats)")
        if len(self._mean_std) != len(teacher_hiddens):
            raise ValueError(f"statistics of {len(self._mean_std)} teachers for {len(teacher_hiddens)} teachers' layers")
        device = teacher_hiddens[0].device
        if self._mean_std[0][0].device != device:
            self._mean_std = [(mean.to(device), std.to(device)) for mean, std in self._mean_std]
        return [standardise(hidden, mean, std) for hidden, (mean, std) in zip(teacher_hiddens, self._mean_std)]

    def targets(self, teacher_hiddens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """[K] (B, L, T, D_k) -> one (B, L, T, D_h) target per head set."""
        if self.config.target_norm == "teacher_layer":
            teacher_hiddens = self.standardise(teacher_hiddens)
        return aggregation.build_targets(self.config.aggregation, teacher_hiddens, self.teacher_weights)

    def __call__(self, predictions: Sequence[torch.Tensor], frame_lengths: torch.Tensor,
                 targets: Sequence[torch.Tensor], target_frames: torch.Tensor | None = None) -> Objective:
        """predictions, targets: [head sets] (B, L, T, D_h); frame_lengths (B,) of the student;
        target_frames (B,): valid target frames where they can be fewer (a store's crops)."""
        if target_frames is not None:
            frame_lengths = torch.minimum(frame_lengths, target_frames)
        aligned = [align(pred, target, frame_lengths) for pred, target in zip(predictions, targets)]
        terms = [distill_loss(*parts) for parts in aligned]
        l1_weight, cosine_weight = self.config.loss.l1_weight, self.config.loss.cosine_weight
        if self.loss_weights is not None:
            loss = self.loss_weights(head_set_losses(terms, l1_weight, cosine_weight))
        else:
            loss = total_loss(terms, self.head_weights, l1_weight, cosine_weight)
        return Objective(loss, terms, aligned[0][2].sum())
