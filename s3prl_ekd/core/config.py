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

AGGREGATIONS = ("layerwise_average", "layerwise_concat", "multi_head")

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
class LossConfig:
    """Per head: l1_weight * L1 + cosine_weight * mean(-log sigmoid(cos))."""

    l1_weight: float = 1.0
    cosine_weight: float = 1.0


@dataclass
class EKDConfig:
    """The model config (`-g`) of the `ekd_distiller` pretraining task."""

    teachers: list[TeacherConfig]
    aggregation: Literal["layerwise_average", "layerwise_concat", "multi_head"] = "layerwise_average"
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Teachers run under autocast in this dtype on CUDA (ignored on CPU); targets are cast back to float32.
    # A half dtype is checked against float32 per teacher layer when the run starts (core/precision.py).
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    target_tolerance: float = 0.05  # largest accepted ||half - float32|| / ||float32|| of a target layer
    # Positional convolutions (teachers and student) in float32 inside autocast: half-precision cuDNN
    # runs this grouped k=128 convolution ~10x slower on H100 (shared/GPU_PROFILE.md).
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
        if teacher.ckpt is not None and not teacher.ckpt.startswith(("http://", "https://")):
            if not Path(teacher.ckpt).is_file():
                raise ConfigError(f"{key}.ckpt: {teacher.ckpt} does not exist; "
                                  "fix the path or drop `ckpt` to use the hub entry's own weights")
        if teacher.name.endswith(("_local", "_custom")) and teacher.ckpt is None:
            raise ConfigError(f"{key}.ckpt: {teacher.name} needs a checkpoint path in `ckpt`")
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
    if config.aggregation == "layerwise_average":
        check_averageable(dims, f"{where}.aggregation")
    if config.student.encoder_embed_dim % config.student.encoder_attention_heads:
        raise ConfigError(f"{where}.student.encoder_embed_dim: {config.student.encoder_embed_dim} is not "
                          f"divisible by encoder_attention_heads={config.student.encoder_attention_heads}")
    return config


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


def check_averageable(dims: dict[str, int], where: str) -> None:
    """`layerwise_average` needs one hidden dim across teachers."""
    if len(set(dims.values())) > 1:
        listed = ", ".join(f"{name}: {dim}" for name, dim in dims.items())
        raise ConfigError(f"{where}: layerwise_average needs teachers of one hidden dimension, got {listed}; "
                          "use layerwise_concat or multi_head, or teachers of the same size")


def load_config(source: str | Path | dict) -> EKDConfig:
    """Load and validate an EKD model config from a YAML path or a plain dict.

    Relative teacher `ckpt` paths in a YAML file are relative to that file's folder.
    """
    where, base = "config", None
    if not isinstance(source, dict):
        path = Path(source)
        source = read_yaml_mapping(path, "model config (-g)")
        where, base = str(path), path.resolve().parent
    config = from_dict(EKDConfig, source, where)
    for teacher in config.teachers:
        if base and teacher.ckpt and "://" not in teacher.ckpt and not Path(teacher.ckpt).is_absolute():
            teacher.ckpt = str((base / teacher.ckpt).resolve())
    return validate(config, where)
