"""The `ekd_distiller` pretraining task for s3prl's pretrain runner.

A thin adapter: s3prl's runner owns the loop (optimizer, scheduler, fp16, gradient
accumulation, checkpoints); this class builds teachers, student and objective from
core/ and speaks the runner's interface.
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from s3prl_ekd.core.config import EKDConfig, load_config
from s3prl_ekd.core.distill import DistillObjective, build_student, head_set_names, init_from_teacher, target_names
from s3prl_ekd.core.loss import LossTerms
from s3prl_ekd.core.student import student_state
from s3prl_ekd.core.teachers import TeacherEnsemble
from s3prl_ekd.errors import CheckpointError
from s3prl_ekd.io.checkpoint import MODEL_CONFIG_KEY, STEP_KEY, STUDENT_KEY, TEACHER_DIMS_KEY
from s3prl_ekd.plugin.pretrain_data import load_datarc, train_dataloader


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
        self.objective = DistillObjective(self.config)
        self.student = build_student(self.config, self.teachers.dims)
        if self.config.student.init_from_teacher:
            report = init_from_teacher(self.student, self.teachers.upstreams[0])
            print(f"[EKD] - {report.summary(self.config.teachers[0].name)}")
        self.model = nn.DataParallel(self.student) if multi_gpu else self.student
        self.last_global_step = 0
        print(f"[EKD] - {len(self.config.teachers)} teachers, aggregation={self.config.aggregation}, "
              f"head dims {self.student.head_dims} x {self.student.num_targets} targets, "
              f"student {sum(p.numel() for p in self.student.parameters()):,} parameters")

    # -- s3prl runner interface --------------------------------------------------------------
    def get_train_dataloader(self):
        return train_dataloader(self.datarc, min_samples=self.student.receptive_field)

    def load_model(self, init_ckpt: dict):
        if STUDENT_KEY not in init_ckpt:
            raise CheckpointError(f"checkpoint has no '{STUDENT_KEY}' entry: not an ekd_distiller checkpoint")
        self.student.load_state_dict(init_ckpt[STUDENT_KEY]["state_dict"])

    def add_state_to_save(self, all_states: dict) -> dict:
        # s3prl's runner stores Step = updates done *before* the step being saved, so a
        # resumed run would redo that step; store the number of completed updates instead.
        if self.last_global_step:
            all_states[STEP_KEY] = self.last_global_step
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
        out = self.model(wave, lengths)
        loss, terms = self.objective(out.predictions, out.frame_lengths, self.objective.targets(teacher_hiddens))
        if global_step % log_step == 0:
            self._record(terms, records)
        return loss, records

    def _record(self, terms: list[LossTerms], records) -> None:
        for head_set, term in zip(head_set_names(self.config), terms):
            for i, layer_name in enumerate(target_names(self.config.teachers)):
                records[f"l1/{head_set}/{layer_name}"].append(term.l1[i].item())
                records[f"cos/{head_set}/{layer_name}"].append(term.cos[i].item())

    def log_records(self, records, logger, prefix, global_step, **kwargs):
        for key, values in records.items():
            if values:
                logger.add_scalar(f"{prefix}{key}", sum(values) / len(values), global_step=global_step)
