"""Typed configs for EKD pretraining, loaded strictly from YAML.

Unknown keys, wrong types and impossible values fail at load with the key's
path and the fix; every default lives in the dataclasses below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from s3prl_ekd.core.student import StudentConfig
from s3prl_ekd.errors import ConfigError
from s3prl_ekd.io.strict import from_dict, read_yaml_mapping

# The paper's three ways of making targets, and ours on top of them (see core/aggregation.py).
PAPER_AGGREGATIONS = ("layerwise_average", "layerwise_concat", "multi_head")
AGGREGATIONS = PAPER_AGGREGATIONS + ("multi_head_residual",)

# (transformer depth, hidden dim) of well-known s3prl hub entries, so layer indices
# and dimensions are checked before anything is downloaded or built. Other
# entries are checked once loaded (see teachers.py).
_BASE, _LARGE = (12, 768), (24, 1024)
KNOWN_SHAPES = {
    "hubert": _BASE, "hubert_base": _BASE, "hubert_base_robust_mgr": _BASE, "hubert_large_ll60k": _LARGE,
    "wavlm": _BASE, "wavlm_base": _BASE, "wavlm_base_plus": _BASE, "wavlm_large": _LARGE,
    "wav2vec2": _BASE, "wav2vec2_base_960": _BASE, "wav2vec2_large_ll60k": _LARGE,
    "data2vec": _BASE, "data2vec_base_960": _BASE, "distilhubert": (2, 768), "distilhubert_base": (2, 768),
}


@dataclass
class TeacherConfig:
    """One frozen teacher: an `s3prl.hub` entry and the hidden states to predict."""

    name: str
    ckpt: str | None = None
    # Indices into the teacher's hidden_states (0 = pre-transformer, l = layer l).
    # Default: three evenly spaced layers ending at the last one (4, 8, 12 for a 12-layer model).
    layers: list[int] | None = None
    weight: float = 1.0  # weight in layerwise_average, and of this teacher's heads in the loss


@dataclass
class InitConfig:
    """Where the student's backbone is copied from: an `s3prl.hub` entry, given like a teacher."""

    name: str
    ckpt: str | None = None


@dataclass
class LossConfig:
    """Per head: l1_weight * L1 + cosine_weight * mean(-log sigmoid(cos))."""

    l1_weight: float = 1.0
    cosine_weight: float = 1.0


@dataclass
class EKDConfig:
    """The model config (`-g`) of the `ekd_distiller` pretraining task. The defaults are the paper's
    method; `multi_head_residual`, `target_norm`, `teacher_weighting: uncertainty` and `init_from`
    are ways of combining teachers beyond it (core/aggregation.py, core/loss.py).
    """

    teachers: list[TeacherConfig]
    aggregation: Literal["layerwise_average", "layerwise_concat", "multi_head",
                         "multi_head_residual"] = "layerwise_average"
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # teacher_layer: every teacher layer is standardised per feature (mean and std over the training
    # audio) before targets are made. Statistics come from the target store, or, with live teachers,
    # from running them over up to `target_norm_utterances` training utterances (evenly spaced over the
    # sorted file list; 0 = all of them) when training starts; a resumed run reuses the checkpoint's.
    target_norm: Literal["none", "teacher_layer"] = "none"
    target_norm_utterances: int = 2000
    # fixed: head set s is weighted by the teachers' `weight`s; uncertainty: by exp(-s_s), a learned
    # log-variance per head set, plus s_s (Kendall, Gal and Cipolla, 2018). Needs two or more head sets.
    teacher_weighting: Literal["fixed", "uncertainty"] = "fixed"
    # The upstream whose CNN and first layers `student.init_from_teacher` copies; default: the first
    # teacher. Students of different teachers given one `init_from` (and one seed) start alike.
    init_from: InitConfig | None = None
    # Teachers run under autocast in this dtype on CUDA (ignored on CPU); targets are cast back to float32.
    # A half dtype is checked against float32 per teacher layer when the run starts (core/precision.py).
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    target_tolerance: float = 0.05  # largest accepted ||half - float32|| / ||float32|| of a target layer
    # Positional convolutions (teachers and student) in float32 inside autocast: half-precision cuDNN
    # runs this grouped kernel-128 convolution several times slower (benchmarks/RESULTS.md, GPU section).
    fp32_pos_conv: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_layers(depth: int, count: int = 3) -> list[int]:
    """`count` evenly spaced layer indices ending at `depth` (12 -> [4, 8, 12])."""
    return sorted({max(1, round(depth * (i + 1) / count)) for i in range(count)})


def teacher_shape(teacher: TeacherConfig) -> tuple[int, int] | None:
    """(depth, hidden dim) of `teacher` read without building it, or None if unknown."""
    if teacher.name in KNOWN_SHAPES:
        return KNOWN_SHAPES[teacher.name]
    if teacher.ckpt and teacher.name in ("hubert_local", "hubert_custom", "wavlm_local"):
        import torch

        try:
            state = torch.load(teacher.ckpt, map_location="cpu", weights_only=True, mmap=True)
            cfg = state.get("model_cfg") or state.get("cfg") or {}
            return int(cfg["encoder_layers"]), int(cfg["encoder_embed_dim"])
        except Exception:  # unreadable here: the hub function reports it when loading
            return None
    return None


def validate(config: EKDConfig, where: str = "config") -> EKDConfig:
    """Checks that need more than types: teachers present, files exist, layers in range."""
    if not config.teachers:
        raise ConfigError(f"{where}.teachers: no teachers; list at least one, e.g. "
                          "[{name: hubert_base}]")
    dims = {}
    for i, teacher in enumerate(config.teachers):
        key = f"{where}.teachers[{i}]"
        check_checkpoint(teacher, key)
        if teacher.weight <= 0:
            raise ConfigError(f"{key}.weight: {teacher.weight} must be > 0")
        shape = teacher_shape(teacher)
        depth = shape[0] if shape else None
        if shape:
            dims[f"teachers[{i}] ({teacher.name})"] = shape[1]
        if teacher.layers is None and depth is not None:
            teacher.layers = default_layers(depth)
        check_layers(teacher, depth, key)
    check_layer_counts(config.teachers, where)
    if config.aggregation in ("layerwise_average", "multi_head_residual"):
        check_averageable(dims, f"{where}.aggregation", config.aggregation)
    if config.aggregation == "multi_head_residual" and len(config.teachers) < 2:
        raise ConfigError(f"{where}.aggregation: multi_head_residual predicts each teacher's difference from "
                          "the teachers' average and needs two or more teachers; with one, use layerwise_average")
    if config.student.encoder_embed_dim % config.student.encoder_attention_heads:
        raise ConfigError(f"{where}.student.encoder_embed_dim: {config.student.encoder_embed_dim} is not "
                          f"divisible by encoder_attention_heads={config.student.encoder_attention_heads}")
    check_method_options(config, where)
    return config


def check_checkpoint(source: TeacherConfig | InitConfig, where: str) -> None:
    """A local `ckpt` exists; `*_local` / `*_custom` hub entries have one."""
    if source.ckpt is not None and not source.ckpt.startswith(("http://", "https://")):
        if not Path(source.ckpt).is_file():
            raise ConfigError(f"{where}.ckpt: {source.ckpt} does not exist; "
                              "fix the path or drop `ckpt` to use the hub entry's own weights")
    if source.name.endswith(("_local", "_custom")) and source.ckpt is None:
        raise ConfigError(f"{where}.ckpt: {source.name} needs a checkpoint path in `ckpt`")


def head_set_count(aggregation: str, teachers: int) -> int:
    """Prediction-head sets of `aggregation` with `teachers` teachers (see core/aggregation.py)."""
    return {"multi_head": teachers, "multi_head_residual": 1 + teachers}.get(aggregation, 1)


def check_method_options(config: EKDConfig, where: str) -> None:
    """target_norm, teacher_weighting and init_from: values that cannot apply to this config."""
    if config.target_norm_utterances < 0:
        raise ConfigError(f"{where}.target_norm_utterances: {config.target_norm_utterances} must be >= 0 "
                          "(0 = every training utterance)")
    if config.teacher_weighting == "uncertainty":
        sets = head_set_count(config.aggregation, len(config.teachers))
        if sets < 2:
            raise ConfigError(f"{where}.teacher_weighting: uncertainty learns one weight per prediction-head set, "
                              f"and aggregation {config.aggregation} with {len(config.teachers)} teacher(s) has "
                              "one; use aggregation multi_head or multi_head_residual with two or more teachers, "
                              "or teacher_weighting: fixed")
        if config.aggregation == "multi_head":
            for i, teacher in enumerate(config.teachers):
                if teacher.weight != 1.0:
                    raise ConfigError(f"{where}.teachers[{i}].weight: {teacher.weight} has no effect with "
                                      "teacher_weighting: uncertainty, which learns each head set's weight; "
                                      "drop `weight` or use teacher_weighting: fixed")
    if config.init_from is not None:
        check_checkpoint(config.init_from, f"{where}.init_from")
        if not config.student.init_from_teacher:
            raise ConfigError(f"{where}.init_from: names {config.init_from.name} but student.init_from_teacher "
                              "is false, so nothing is copied; set student.init_from_teacher: true or drop init_from")


def check_layers(teacher: TeacherConfig, depth: int | None, where: str) -> None:
    """`teacher.layers` non-empty and within 0..depth (depth None: not known yet)."""
    if teacher.layers is None:
        return
    if not teacher.layers:
        raise ConfigError(f"{where}.layers: empty; list the hidden-state indices to predict")
    for layer in teacher.layers:
        if layer < 0 or (depth is not None and layer > depth):
            valid = f"0..{depth}" if depth is not None else ">= 0"
            raise ConfigError(f"{where}.layers: {layer} is out of range for {teacher.name} "
                              f"with {depth} layers; use {valid} (0 = pre-transformer output)")


def check_layer_counts(teachers: list[TeacherConfig], where: str) -> None:
    counts = {len(t.layers) for t in teachers if t.layers is not None}
    if len(counts) > 1:
        raise ConfigError(f"{where}.teachers[*].layers: every teacher must list the same number of layers "
                          f"(the i-th entries form target i), got lengths {sorted(counts)}")


def check_averageable(dims: dict[str, int], where: str, mode: str = "layerwise_average") -> None:
    """`layerwise_average` and `multi_head_residual` (teacher minus average) need one hidden dim across teachers."""
    if len(set(dims.values())) > 1:
        listed = ", ".join(f"{name}: {dim}" for name, dim in dims.items())
        instead = "layerwise_concat or multi_head" if mode == "layerwise_average" else "multi_head"
        raise ConfigError(f"{where}: {mode} needs teachers of one hidden dimension, got {listed}; "
                          f"use {instead}, or teachers of the same size")


def load_config(source: str | Path | dict) -> EKDConfig:
    """Load and validate an EKD model config from a YAML path or a plain dict.

    Relative `ckpt` paths (teachers, init_from) in a YAML file are relative to that file's folder.
    """
    where, base = "config", None
    if not isinstance(source, dict):
        path = Path(source)
        source = read_yaml_mapping(path, "model config (-g)")
        where, base = str(path), path.resolve().parent
    config = from_dict(EKDConfig, source, where)
    for entry in [*config.teachers, *([config.init_from] if config.init_from else [])]:
        if base and entry.ckpt and "://" not in entry.ckpt and not Path(entry.ckpt).is_absolute():
            entry.ckpt = str((base / entry.ckpt).resolve())
    return validate(config, where)
