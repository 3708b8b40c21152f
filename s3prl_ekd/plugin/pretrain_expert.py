"""The `ekd_distiller` pretraining task for s3prl's pretrain runner.

A thin adapter: s3prl's runner owns the loop (optimizer, scheduler, fp16, gradient
accumulation, checkpoints); this class builds teachers (or reads a target store), student and
objective from core/ and speaks the runner's interface.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from s3prl_ekd.core.config import EKDConfig, load_config
from s3prl_ekd.core.distill import DistillObjective, build_student, head_set_names, init_from_teacher, target_names
from s3prl_ekd.core.loss import LossTerms
from s3prl_ekd.patches import keep_pos_conv_fp32
from s3prl_ekd.core.student import student_state
from s3prl_ekd.core.teachers import TeacherEnsemble, load_upstream
from s3prl_ekd.errors import CheckpointError
from s3prl_ekd.io.audio import SAMPLE_RATE
from s3prl_ekd.io.checkpoint import MODEL_CONFIG_KEY, STEP_KEY, STUDENT_KEY, TEACHER_DIMS_KEY
from s3prl_ekd.plugin import distributed
from s3prl_ekd.plugin.pretrain_data import load_datarc, train_dataloader
from s3prl_ekd.plugin.targets import match_store


class UpstreamPretrainExpert(nn.Module):
    """s3prl pretrain expert: `.model` is the student, the only thing the runner optimises."""

    def __init__(self, datarc: dict, upstream_config: str | dict, device: str = "cuda",
                 multi_gpu: bool = False, **kwargs):
        super().__init__()
        self.device = device
        self.datarc = load_datarc(datarc)                 # fail on data config before loading models
        self.config: EKDConfig = load_config(upstream_config)
        fp32_pos_conv = self.config.fp32_pos_conv and not multi_gpu  # DataParallel replicas would miss it
        if self.datarc.targets is not None:
            # Targets come from the store: no teacher is loaded or run (but the first one, once, for
            # the student's initialisation).
            self.stored = match_store(self.datarc.targets, self.config)
            self.teachers = None
            self.teacher_dims = [self.stored.store.teachers[k].dim for k in self.stored.teachers]
            print(f"[EKD] - targets from {self.datarc.targets} ({self.stored.store.dtype}); teachers are not run")
        else:
            self.stored = None
            self.teachers = TeacherEnsemble(self.config.teachers, self.config.teacher_dtype).to(device)
            if fp32_pos_conv:
                for upstream in self.teachers.upstreams:
                    keep_pos_conv_fp32(upstream)
            self.teachers.probe(device, self.config.aggregation)
            self.teacher_dims = list(self.teachers.dims)
            self._check_target_dtype(device)
        self.objective = DistillObjective(self.config)
        # Building teachers draws random numbers (initialisation before their weights load). Reseed so
        # that the student's initialisation, then the data order and dropout, depend on the run's seed
        # alone, not on which teachers were loaded, or whether any was (a target store).
        seed = torch.initial_seed()  # run_pretrain.py's --seed
        torch.manual_seed(seed)
        self.student = build_student(self.config, self.teacher_dims)
        if self.config.student.init_from_teacher:
            first = self.teachers.upstreams[0] if self.teachers is not None else load_upstream(self.config.teachers[0])
            report = init_from_teacher(self.student, first)
            print(f"[EKD] - {report.summary(self.config.teachers[0].name)}")
        torch.manual_seed(seed + 1)
        if fp32_pos_conv:
            keep_pos_conv_fp32(self.student)
        self.dist = distributed.current()
        if self.dist is not None:  # torchrun: DistributedDataParallel, one process per device
            self.student.to(device)
            ids = [self.dist.local_rank] if str(device).startswith("cuda") else None
            self.model = nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
            if self.dist.leader:
                print(f"distributed: world_size={self.dist.world_size} backend={torch.distributed.get_backend()} "
                      f"per_rank_batch={distributed.per_rank_batch(self.datarc.train_batch_size, self.dist)}",
                      flush=True)
        else:
            self.model = nn.DataParallel(self.student) if multi_gpu else self.student
        self.seed = seed
        self.resume_step = 0
        self.last_global_step = 0
        print(f"[EKD] - {len(self.config.teachers)} teachers, aggregation={self.config.aggregation}, "
              f"head dims {self.student.head_dims} x {self.student.num_targets} targets, "
              f"student {sum(p.numel() for p in self.student.parameters()):,} parameters")

    def _check_target_dtype(self, device: str) -> None:
        """Half-precision teachers (CUDA): their targets against float32 on speech-level noise, per layer."""
        dtype = self.teachers.compute_dtype
        if dtype == "float32":
            return
        generator = torch.Generator().manual_seed(0)
        probe = [0.1 * torch.randn(3 * SAMPLE_RATE, generator=generator).to(device) for _ in range(2)]
        errors = self.teachers.check_precision(probe, self.config.target_tolerance)
        listed = "; ".join(f"{t.name}: " + ", ".join(f"L{layer} {100 * e:.2f}%" for layer, e in zip(t.layers, errs))
                           for t, errs in zip(self.config.teachers, errors))
        print(f"[EKD] - {dtype} targets vs float32 (relative error per layer): {listed}")

    # -- s3prl runner interface --------------------------------------------------------------
    def get_train_dataloader(self):
        shard = None
        if self.dist is not None:
            distributed.per_rank_batch(self.datarc.train_batch_size, self.dist)  # divisible, or a clear error
            shard = (self.dist.rank, self.dist.world_size, self.seed, self.resume_step)
        return train_dataloader(self.datarc, min_samples=self.student.receptive_field, targets=self.stored,
                                shard=shard)

    def load_model(self, init_ckpt: dict):
        if STUDENT_KEY not in init_ckpt:
            raise CheckpointError(f"checkpoint has no '{STUDENT_KEY}' entry: not an ekd_distiller checkpoint")
        self.student.load_state_dict(init_ckpt[STUDENT_KEY]["state_dict"])
        self.resume_step = int(init_ckpt.get(STEP_KEY, 0))

    def add_state_to_save(self, all_states: dict) -> dict:
        # s3prl's runner stores Step = updates done *before* the step being saved, so a
        # resumed run would redo that step; store the number of completed updates instead.
        if self.last_global_step:
            all_states[STEP_KEY] = self.last_global_step
        all_states[STUDENT_KEY] = student_state(self.student)
        all_states[MODEL_CONFIG_KEY] = self.config.to_dict()
        all_states[TEACHER_DIMS_KEY] = list(self.teacher_dims)
        return all_states

    def on_before_zero_grad(self):
        pass

    def forward(self, data, records=None, global_step: int = 0, log_step: int = 1000, **kwargs):
        """One distillation step: teachers -> targets -> student heads -> loss. Returns (loss, records)."""
        records = defaultdict(list) if records is None else records
        self.last_global_step = global_step
        wave, lengths = (t.to(self.device, non_blocking=True) for t in data[:2])
        if self.stored is not None:  # (wave, lengths, [K] (B, L, T, D_k) stored targets, target frames (B,))
            teacher_hiddens = [t.to(self.device, non_blocking=True) for t in data[2]]
            target_frames = data[3].to(self.device, non_blocking=True)
        else:
            # lengths.tolist(): one host sync per batch instead of one per utterance on CUDA
            teacher_hiddens = self.teachers([w[:n] for w, n in zip(wave, lengths.tolist())])  # [K] (B, L, T, D_k)
            target_frames = None
        out = self.model(wave, lengths)
        loss, terms, frames = self.objective(out.predictions, out.frame_lengths,
                                             self.objective.targets(teacher_hiddens), target_frames)
        if self.dist is not None:
            loss = loss * distributed.loss_scale(frames, self.dist)
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
