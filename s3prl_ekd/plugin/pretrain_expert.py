"""The `ekd_distiller` pretraining task for s3prl's pretrain runner.

A thin adapter: s3prl's runner owns the loop (optimizer, scheduler, fp16, gradient
accumulation, checkpoints); this class builds teachers (or reads a target store), student and
objective from core/ and speaks the runner's interface.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from s3prl_ekd.core.config import EKDConfig, InitConfig, TeacherConfig, load_config
from s3prl_ekd.core.distill import (
    DistillModel,
    DistillObjective,
    build_student,
    head_set_names,
    init_from_teacher,
    init_record,
    init_source,
    target_names,
    teacher_fingerprints,
)
from s3prl_ekd.core.frames import hop_length, parse_conv_layers
from s3prl_ekd.core.loss import LossTerms, UncertaintyWeights
from s3prl_ekd.core.normalization import LayerStats
from s3prl_ekd.core.student import student_state
from s3prl_ekd.core.teachers import TeacherEnsemble, load_upstream
from s3prl_ekd.errors import CheckpointError, ConfigError
from s3prl_ekd.io.audio import SAMPLE_RATE, load_audio
from s3prl_ekd.io.checkpoint import (
    INIT_KEY,
    LOSS_WEIGHTS_KEY,
    MODEL_CONFIG_KEY,
    STEP_KEY,
    STUDENT_KEY,
    TARGET_NORM_KEY,
    TEACHER_DIMS_KEY,
    TEACHER_FINGERPRINTS_KEY,
)
from s3prl_ekd.patches import keep_pos_conv_fp32
from s3prl_ekd.plugin import distributed
from s3prl_ekd.plugin.pretrain_data import load_datarc, statistics_utterances, train_dataloader
from s3prl_ekd.plugin.targets import match_store


class UpstreamPretrainExpert(nn.Module):
    """s3prl pretrain expert. `.model` (a core.distill.DistillModel: the student, plus the learned
    loss weights of teacher_weighting: uncertainty) is the only thing the runner optimises."""

    def __init__(self, datarc: dict, upstream_config: str | dict, device: str = "cuda",
                 multi_gpu: bool = False, **kwargs):
        super().__init__()
        self.device = device
        self.datarc = load_datarc(datarc)                 # fail on data config before loading models
        self.config: EKDConfig = load_config(upstream_config)
        fp32_pos_conv = self.config.fp32_pos_conv and not multi_gpu  # DataParallel replicas would miss it
        student_hop = hop_length(parse_conv_layers(self.config.student.conv_feature_layers))
        norm = self.config.target_norm == "teacher_layer"
        if self.datarc.targets is not None:
            # Targets come from the store: no teacher is loaded or run (but the initialisation's
            # source, once, for init_from_teacher).
            self.stored = match_store(self.datarc.targets, self.config)
            self._check_store(student_hop, norm)
            self.teachers = None
            self.teacher_dims = [self.stored.store.teachers[k].dim for k in self.stored.teachers]
            self.teacher_fingerprints = [self.stored.store.teachers[k].fingerprint for k in self.stored.teachers]
            print(f"[EKD] - targets from {self.datarc.targets} ({self.stored.store.dtype}); teachers are not run")
        else:
            self.stored = None
            self.teachers = TeacherEnsemble(self.config.teachers, self.config.teacher_dtype, student_hop).to(device)
            if fp32_pos_conv:
                for upstream in self.teachers.upstreams:
                    keep_pos_conv_fp32(upstream)
            self.teachers.probe(device, self.config.aggregation)
            self.teacher_dims = list(self.teachers.dims)
            self.teacher_fingerprints = teacher_fingerprints(self.config)
            self._check_target_dtype(device)
        # Building teachers draws random numbers (initialisation before their weights load). Reseed so
        # that the student's initialisation, then the data order and dropout, depend on the run's seed
        # alone, not on which teachers were loaded, or whether any was (a target store).
        seed = torch.initial_seed()  # run_pretrain.py's --seed
        torch.manual_seed(seed)
        self.student = build_student(self.config, self.teacher_dims)
        if self.config.student.init_from_teacher:
            source = init_source(self.config)
            report = init_from_teacher(self.student, self._init_upstream(source))
            print(f"[EKD] - {report.summary(source.name)}")
        torch.manual_seed(seed + 1)
        # What the student started from; a resumed run keeps the first run's (load_model).
        self.init: dict | None = init_record(self.config, self.student, seed)
        self.loss_weights = (UncertaintyWeights(head_set_names(self.config))
                             if self.config.teacher_weighting == "uncertainty" else None)
        self.objective = DistillObjective(self.config, self.loss_weights,
                                          self.stored.stats if norm and self.stored is not None else None)
        if fp32_pos_conv:
            keep_pos_conv_fp32(self.student)
        trained = DistillModel(self.student, self.loss_weights)
        self.dist = distributed.current()
        if self.dist is not None:  # torchrun: DistributedDataParallel, one process per device
            trained.to(device)
            ids = [self.dist.local_rank] if str(device).startswith("cuda") else None
            self.model = nn.parallel.DistributedDataParallel(trained, device_ids=ids)
            if self.dist.leader:
                print(f"distributed: world_size={self.dist.world_size} backend={torch.distributed.get_backend()} "
                      f"per_rank_batch={distributed.per_rank_batch(self.datarc.train_batch_size, self.dist)}",
                      flush=True)
        else:
            self.model = nn.DataParallel(trained) if multi_gpu else trained
        self.seed = seed
        self.resume_step = 0
        self.last_global_step = 0
        options = [f"{key}={value}" for key, value, default in (
            ("target_norm", self.config.target_norm, "none"),
            ("teacher_weighting", self.config.teacher_weighting, "fixed")) if value != default]
        print(f"[EKD] - {len(self.config.teachers)} teachers, aggregation={self.config.aggregation}, "
              f"head dims {self.student.head_dims} x {self.student.num_targets} targets, "
              f"student {sum(p.numel() for p in self.student.parameters()):,} parameters"
              + "".join(f", {option}" for option in options))

    def _check_store(self, student_hop: int, norm: bool) -> None:
        folder = self.datarc.targets
        if self.stored.hop != student_hop:
            raise ConfigError(f"pretrain_expert.datarc.targets: {folder} holds frames {self.stored.hop} samples apart "
                              f"and the student's CNN makes frames {student_hop} apart; run the teachers live "
                              "(drop targets), which resamples them onto the student's frames")
        if norm and self.stored.stats is None:
            raise ConfigError(f"pretrain_expert.datarc.targets: {folder} holds no per-teacher statistics, which "
                              "target_norm: teacher_layer needs; rebuild it with `s3prl-ekd targets build`, run the "
                              "teachers live (drop targets), or set target_norm: none")

    def _init_upstream(self, source: InitConfig) -> nn.Module:
        """The upstream to copy the student's backbone from: a live teacher if it is one, else loaded once."""
        if self.teachers is not None:
            for config, upstream in zip(self.config.teachers, self.teachers.upstreams):
                if (config.name, config.ckpt) == (source.name, source.ckpt):
                    return upstream
        return load_upstream(TeacherConfig(source.name, source.ckpt))

    def _ensure_target_stats(self) -> None:
        """target_norm with live teachers: the statistics over the training audio, once (a resumed run
        has the checkpoint's)."""
        if self.config.target_norm != "teacher_layer" or self.objective.target_stats is not None:
            return
        rows = statistics_utterances(self.datarc, self.student.receptive_field, self.config.target_norm_utterances)
        wavs = (load_audio(r.path, resample=self.datarc.resample, downmix=self.datarc.downmix).to(self.device)
                for r in rows)
        self.objective.set_target_stats(self.teachers.layer_stats(wavs))
        print(f"[EKD] - target_norm: per-feature statistics of every teacher layer over {len(rows)} utterances "
              f"({self.objective.target_stats[0].count} frames)")

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
        self._ensure_target_stats()
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
        self.init = init_ckpt.get(INIT_KEY)  # None: a run from before initialisations were recorded
        if TARGET_NORM_KEY in init_ckpt:
            self.objective.set_target_stats([LayerStats.from_dict(d) for d in init_ckpt[TARGET_NORM_KEY]])
        if self.loss_weights is not None and LOSS_WEIGHTS_KEY in init_ckpt:
            saved = init_ckpt[LOSS_WEIGHTS_KEY]
            if saved["head_sets"] != self.loss_weights.head_sets:
                raise CheckpointError(f"checkpoint's loss weights are for head sets {saved['head_sets']}, the model "
                                      f"config has {self.loss_weights.head_sets}; resume with the checkpoint's config")
            with torch.no_grad():
                self.loss_weights.log_variances.copy_(torch.tensor(saved["log_variances"]))

    def add_state_to_save(self, all_states: dict) -> dict:
        # s3prl's runner stores Step = updates done *before* the step being saved, so a
        # resumed run would redo that step; store the number of completed updates instead.
        if self.last_global_step:
            all_states[STEP_KEY] = self.last_global_step
        all_states[STUDENT_KEY] = student_state(self.student)
        all_states[MODEL_CONFIG_KEY] = self.config.to_dict()
        all_states[TEACHER_DIMS_KEY] = list(self.teacher_dims)
        all_states[TEACHER_FINGERPRINTS_KEY] = list(self.teacher_fingerprints)
        if self.init is not None:
            all_states[INIT_KEY] = dict(self.init)
        if self.objective.target_stats is not None:
            all_states[TARGET_NORM_KEY] = [stats.to_dict() for stats in self.objective.target_stats]
        if self.loss_weights is not None:
            all_states[LOSS_WEIGHTS_KEY] = {"head_sets": list(self.loss_weights.head_sets),
                                            "log_variances": self.loss_weights.log_variances.detach().cpu().tolist()}
        return all_states

    def on_before_zero_grad(self):
        pass

    def forward(self, data, records=None, global_step: int = 0, log_step: int = 1000, **kwargs):
        """One distillation step: teachers -> targets -> student heads -> loss. Returns (loss, records)."""
        records = defaultdict(list) if records is None else records
        self.last_global_step = global_step
        self._ensure_target_stats()
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
        if self.loss_weights is not None:
            for head_set, weight in self.loss_weights.weights().items():
                records[f"weight/{head_set}"].append(weight)

    def log_records(self, records, logger, prefix, global_step, **kwargs):
        for key, values in records.items():
            if values:
                logger.add_scalar(f"{prefix}{key}", sum(values) / len(values), global_step=global_step)
