"""Typed configs for EKD pretraining, loaded strictly from YAML.

Unknown keys, wrong types and impossible values fail at load with the key's
path and the fix; every default lives in the dataclasses below.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from s3prl_ekd.errors import ConfigError
from s3prl_ekd.student import StudentConfig

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
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_layers(depth: int, count: int = 3) -> list[int]:
    """`count` evenly spaced layer indices ending at `depth` (12 -> [4, 8, 12])."""
    return sorted({max(1, round(depth * (i + 1) / count)) for i in range(count)})


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, where: str):
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(item, item_tp, f"{where}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls, data: Any, where: str = "config"):
    """Build dataclass `cls` from a plain dict; unknown or missing keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            raise ConfigError(f"{where}.{key}: unknown key; {hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: required key is missing")
    return cls(**kwargs)


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
    counts, dims = set(), {}
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
        if teacher.layers is not None:
            if not teacher.layers:
                raise ConfigError(f"{key}.layers: empty; list the hidden-state indices to predict")
            for layer in teacher.layers:
                if layer < 0 or (depth is not None and layer > depth):
                    valid = f"0..{depth}" if depth is not None else ">= 0"
                    raise ConfigError(f"{key}.layers: {layer} is out of range for {teacher.name} "
                                      f"with {depth} layers; use {valid} (0 = pre-transformer output)")
            counts.add(len(teacher.layers))
    if len(counts) > 1:
        raise ConfigError(f"{where}.teachers[*].layers: every teacher must list the same number of layers "
                          f"(the i-th entries form target i), got lengths {sorted(counts)}")
    if config.aggregation == "layerwise_average":
        check_averageable(dims, f"{where}.aggregation")
    if config.student.encoder_embed_dim % config.student.encoder_attention_heads:
        raise ConfigError(f"{where}.student.encoder_embed_dim: {config.student.encoder_embed_dim} is not "
                          f"divisible by encoder_attention_heads={config.student.encoder_attention_heads}")
    return config


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
        if not path.is_file():
            raise ConfigError(f"{path}: model config (-g) not found")
        where = str(path)
        try:
            source = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from error
        base = path.resolve().parent
    config = from_dict(EKDConfig, source, where)
    for teacher in config.teachers:
        if base and teacher.ckpt and "://" not in teacher.ckpt and not Path(teacher.ckpt).is_absolute():
            teacher.ckpt = str((base / teacher.ckpt).resolve())
    return validate(config, where)
