"""The `ekd_distiller` pretraining task for s3prl's pretrain runner.

A thin adapter: s3prl's runner owns the loop (optimizer, scheduler, fp16,
gradient accumulation, checkpoints); this class builds teachers, targets,
student and loss from our modules and speaks the runner's interface.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from s3prl_ekd import aggregation
from s3prl_ekd.config import EKDConfig, load_config
from s3prl_ekd.data import load_datarc, train_dataloader
from s3prl_ekd.errors import CheckpointError
from s3prl_ekd.loss import LossTerms, distill_loss, total_loss
from s3prl_ekd.student import EKDStudent, student_from_dict, student_state
from s3prl_ekd.teachers import TeacherEnsemble

STUDENT_KEY = "Student"        # plain-dict student (see student.student_state)
# s3prl's runner passes a checkpoint's 'Upstream_Config' to the expert on resume, so the
# resolved model config (a plain dict) is saved there; 'Config' stays the runner config.
MODEL_CONFIG_KEY = "Upstream_Config"
TEACHER_DIMS_KEY = "Teacher_Dims"  # each teacher's hidden size: splits layerwise_concat heads downstream


def init_from_teacher(student: EKDStudent, teacher: nn.Module) -> list[str]:
    """Copy the teacher's CNN, input projection, positional conv and first layers where shapes match.

    Returns the names of the copied parameter tensors.
    """
    source = getattr(teacher, "model", teacher)
    pairs = [("feature_extractor", "feature_extractor"), ("post_extract_proj", "post_extract_proj"),
             ("encoder.pos_conv", "encoder.pos_conv"), ("encoder.layer_norm", "encoder.layer_norm")]
    pairs += [(f"encoder.layers.{i}", f"encoder.layers.{i}") for i in range(student.config.encoder_layers)]
    teacher_state = source.state_dict()
    student_params = student.backbone.state_dict()
    copied = {}
    for dst_prefix, src_prefix in pairs:
        for name, value in student_params.items():
            if name.startswith(dst_prefix + "."):
                src = src_prefix + name[len(dst_prefix):]
                if src in teacher_state and teacher_state[src].shape == value.shape:
                    copied[name] = teacher_state[src]
    student.backbone.load_state_dict(copied, strict=False)
    return sorted(copied)


class UpstreamPretrainExpert(nn.Module):
    """s3prl pretrain expert: `.model` is the student, the only thing the runner optimises."""

    def __init__(self, datarc: dict, upstream_config: str | dict, device: str = "cuda",
                 multi_gpu: bool = False, **kwargs):
        super().__init__()
        self.device = device
        self.datarc = load_datarc(datarc)                 # fail on data config before loading models
        self.config: EKDConfig = load_config(upstream_config)
        self.teachers = TeacherEnsemble(self.config.teachers, self.config.teacher_dtype).to(device)
        self.teachers.probe(device, self.config.aggregation)
        num_targets = len(self.config.teachers[0].layers)
        head_dims = aggregation.head_dims(self.config.aggregation, self.teachers.dims)
        self.head_weights = aggregation.head_weights(self.config.aggregation,
                                                     [t.weight for t in self.config.teachers])
        self.student = EKDStudent(self.config.student, head_dims, num_targets)
        if self.config.student.init_from_teacher:
            copied = init_from_teacher(self.student, self.teachers.upstreams[0])
            print(f"[EKD] - initialised {len(copied)} student tensors from {self.config.teachers[0].name}")
        self.model = nn.DataParallel(self.student) if multi_gpu else self.student
        self.last_global_step = 0
        print(f"[EKD] - {len(self.config.teachers)} teachers, aggregation={self.config.aggregation}, "
              f"head dims {head_dims} x {num_targets} targets, "
              f"student {sum(p.numel() for p in self.student.parameters()):,} parameters")

    # -- s3prl runner interface --------------------------------------------------------------
    def get_train_dataloader(self):
        return train_dataloader(self.datarc)

    def load_model(self, init_ckpt: dict):
        if STUDENT_KEY not in init_ckpt:
            raise CheckpointError(f"checkpoint has no '{STUDENT_KEY}' entry: not an ekd_distiller checkpoint")
        self.student.load_state_dict(init_ckpt[STUDENT_KEY]["state_dict"])

    def add_state_to_save(self, all_states: dict) -> dict:
        # s3prl's runner stores Step = updates done *before* the step being saved, so a
        # resumed run would redo that step; store the number of completed updates instead.
        if self.last_global_step:
            all_states["Step"] = self.last_global_step
        all_states[STUDENT_KEY] = student_state(self.student)
        all_states[MODEL_CONFIG_KEY] = self.config.to_dict()
        all_states[TEACHER_DIMS_KEY] = list(self.teachers.dims)
        return all_states

    def on_before_zero_grad(self):
        pass

    def forward(self, data, records=None, global_step: int = 0, log_step: int = 1000, **kwargs):
        """One distillation step: teachers -> targets -> student heads -> loss. Returns (loss, records)."""
        records = defaultdict(list) if records is None else records
        self.last_global_step = global_step
        wave, lengths = (t.to(self.device, non_blocking=True) for t in data)
        # lengths.tolist(): one host sync per batch instead of one per utterance on CUDA
        teacher_hiddens = self.teachers([w[:n] for w, n in zip(wave, lengths.tolist())])  # [K] (B, L, T, D_k)
        targets = aggregation.build_targets(self.config.aggregation, teacher_hiddens,
                                            [t.weight for t in self.config.teachers])
        out = self.model(wave, lengths)
        terms = [distill_loss(*align(pred, target, out.frame_lengths))
                 for pred, target in zip(out.predictions, targets)]
        loss = total_loss(terms, self.head_weights, self.config.loss.l1_weight, self.config.loss.cosine_weight)
        if global_step % log_step == 0:
            self._record(terms, records)
        return loss, records

    def _record(self, terms: list[LossTerms], records) -> None:
        for head_set, term in zip(self.head_set_names(), terms):
            for i, layer_name in enumerate(self.target_names()):
                records[f"l1/{head_set}/{layer_name}"].append(term.l1[i].item())
                records[f"cos/{head_set}/{layer_name}"].append(term.cos[i].item())

    def head_set_names(self) -> list[str]:
        if self.config.aggregation == "multi_head":
            return [f"teacher{i}-{t.name}" for i, t in enumerate(self.config.teachers)]
        return [self.config.aggregation]

    def target_names(self) -> list[str]:
        """Target i is named by the layers it comes from, e.g. 'L4' or 'L4+L8' across teachers."""
        layer_lists = zip(*(t.layers for t in self.config.teachers))
        return ["L" + "+".join(dict.fromkeys(str(x) for x in layers)) for layers in layer_lists]

    def log_records(self, records, logger, prefix, global_step, **kwargs):
        for key, values in records.items():
            if values:
                logger.add_scalar(f"{prefix}{key}", sum(values) / len(values), global_step=global_step)


def align(prediction: torch.Tensor, target: torch.Tensor, frame_lengths: torch.Tensor):
    """Cut student predictions and teacher targets (B, L, T, D) to common frames; mask padding."""
    frames = min(prediction.shape[2], target.shape[2])
    prediction, target = prediction[:, :, :frames], target[:, :, :frames]
    mask = torch.arange(frames, device=prediction.device)[None, :] < frame_lengths[:, None]
    return prediction, target, mask


def load_student(path) -> EKDStudent:
    """The student of an ekd_distiller checkpoint (or exported model.pt), read with weights_only=True."""
    from s3prl_ekd.export import read_checkpoint

    return student_from_dict(read_checkpoint(path)["student"])
