"""What an EKD checkpoint holds, and the one reader for both kinds.

- `states-*.ckpt`, written by s3prl's pretrain runner: the runner's entries (Optimizer, Step,
  Args, Config, Scheduler) plus ours: the student as a plain dict under STUDENT_KEY, the
  resolved model config under MODEL_CONFIG_KEY and each teacher's hidden size under
  TEACHER_DIMS_KEY.
- `model.pt`, written by `s3prl-ekd export`: a plain dict of MODEL_FORMAT (see `model_dict`).

Both load with torch.load(weights_only=True); the runner's file needs the allow-list below.
Imports only torch (and s3prl's optimizers module, for the allow-list): SUPERB submission
folders carry a copy of this module.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import threading
from pathlib import Path

from s3prl_ekd.errors import CheckpointError

STUDENT_KEY = "Student"            # core.student.student_state(...): config, head dims, tensors
# s3prl's runner hands a checkpoint's 'Upstream_Config' to the expert on resume, so the resolved
# model config (a plain dict) lives there; s3prl's 'Config' stays the runner config.
MODEL_CONFIG_KEY = "Upstream_Config"
TEACHER_DIMS_KEY = "Teacher_Dims"  # each teacher's hidden size: splits layerwise_concat heads downstream
STEP_KEY = "Step"                  # completed optimizer updates
# Written by the pretrain expert for the ways of combining teachers beyond the paper:
INIT_KEY = "Init"                  # {source: model config's init teacher, fingerprint: sha256 of the initial backbone}
TARGET_NORM_KEY = "Target_Norm"    # per teacher: LayerStats.to_dict() of the statistics targets were standardised by
LOSS_WEIGHTS_KEY = "Loss_Weights"  # uncertainty weighting: the learned per-head-set log-variances
TEACHER_FINGERPRINTS_KEY = "Teacher_Fingerprints"  # per teacher: sha256 of its checkpoint file, or "hub:<name>"

# model.pt: {format: MODEL_FORMAT, student: student_state dict, aggregation: str,
#            teachers: [{name, layers, weight, dim (int or None)}], step: int, model_config: dict,
#            and optionally runner_config: dict, teacher_fingerprints: [str]}
MODEL_FORMAT = "ekd_distiller-model-v1"
MODEL_KEYS = ("student", "aggregation", "teachers", "step")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def runner_safe_globals() -> list:
    """Classes s3prl's runner pickles into its checkpoints, for weights_only loading.

    argparse.Namespace (Args) and s3prl's LR-schedule objects inside the optimizer state. The
    latter are pickled as `optimizers.<Class>` by run_pretrain.py (a top-level import from the
    s3prl folder) and as `s3prl.optimizers.<Class>` elsewhere: both names are allowed, without
    importing a top-level `optimizers` module.
    """
    import s3prl.optimizers as optimizers

    schedules = [c for _, c in inspect.getmembers(optimizers, inspect.isclass)
                 if issubclass(c, optimizers._LRSchedule) and c.__module__ == optimizers.__name__]
    allowed: list = [argparse.Namespace]
    for cls in schedules:
        allowed += [(cls, f"optimizers.{cls.__name__}"), (cls, f"s3prl.optimizers.{cls.__name__}")]
    return allowed


# torch's safe_globals() sets and then restores one process-wide list: two threads loading at once
# (the demo's students, two at a time) could each restore the list under the other's load.
_SAFE_GLOBALS_LOCK = threading.RLock()


@contextlib.contextmanager
def runner_checkpoints_allowed():
    """Within this block, torch.load(weights_only=True) reads s3prl runner checkpoints (one thread
    at a time)."""
    import torch

    with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(runner_safe_globals()):
        yield


def load_raw(path: str | Path) -> dict:
    """torch.load of either checkpoint kind, or a CheckpointError naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with runner_checkpoints_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint; the file is corrupt, truncated or "
                              f"not a checkpoint ({type(error).__name__}: {_first_line(error)}); pass a "
                              "states-*.ckpt from `s3prl-ekd pretrain` or a model.pt from `s3prl-ekd export`") from error


def describe(state) -> str:
    """What a loaded object that is not an EKD checkpoint looks like, for error messages."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}"
    keys = sorted(map(str, state))
    if {"model_weight", "model_cfg"} <= set(keys) or {"cfg", "model"} <= set(keys):
        return f"it looks like a teacher model checkpoint, keys {keys[:8]}"
    if "Downstream" in keys:
        return "it is a downstream (run_downstream.py) checkpoint"
    return f"no '{STUDENT_KEY}' entry, keys {keys[:8]}"


def teacher_dims_from_heads(aggregation: str, num_teachers: int, head_dims: list[int]) -> list[int | None]:
    """Each teacher's hidden size as far as the head sizes tell (None: concat of several teachers)."""
    if aggregation == "layerwise_average":
        return [head_dims[0]] * num_teachers
    if aggregation == "multi_head" or num_teachers == 1:
        return list(head_dims)
    return [None] * num_teachers


def model_dict(state: dict, path: str | Path) -> dict:
    """The model.pt dict of a loaded runner checkpoint (or of a model.pt, checked)."""
    if isinstance(state, dict) and state.get("format") == MODEL_FORMAT:
        missing = [k for k in MODEL_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{path}: ekd_distiller model file lacks {missing}; re-export it")
        return state
    if not isinstance(state, dict) or STUDENT_KEY not in state:
        raise CheckpointError(f"{path}: not an ekd_distiller checkpoint ({describe(state)}); pass a "
                              "states-*.ckpt from `s3prl-ekd pretrain -u ekd_distiller` or a model.pt from "
                              "`s3prl-ekd export`")
    if MODEL_CONFIG_KEY not in state:
        raise CheckpointError(f"{path}: ekd_distiller checkpoint without '{MODEL_CONFIG_KEY}' (the model "
                              "config); it was written by an older s3prl-ekd, re-run pretraining")
    model_config, student = state[MODEL_CONFIG_KEY], state[STUDENT_KEY]
    teachers = [{"name": t["name"], "layers": list(t["layers"]), "weight": t["weight"]}
                for t in model_config["teachers"]]
    dims = state.get(TEACHER_DIMS_KEY) or teacher_dims_from_heads(
        model_config["aggregation"], len(teachers), student["head_dims"])
    for teacher, dim in zip(teachers, dims):
        teacher["dim"] = dim
    return {"format": MODEL_FORMAT, "student": student, "aggregation": model_config["aggregation"],
            "teachers": teachers, "step": int(state.get(STEP_KEY, 0)), "model_config": model_config}


def read_checkpoint(path: str | Path) -> dict:
    """A states-*.ckpt of `s3prl-ekd pretrain` or an exported model.pt, as the model.pt dict."""
    return model_dict(load_raw(path), path)


def readable(path: str | Path) -> str | None:
    """None if `path` loads as a runner checkpoint of ours, else why not (one line)."""
    try:
        state = load_raw(path)
    except CheckpointError as error:
        return str(error)
    if not isinstance(state, dict) or STUDENT_KEY not in state:
        return f"{path}: not an ekd_distiller checkpoint ({describe(state)})"
    return None


def _name_step(path: Path) -> int:
    name = path.stem.split("-")[-1]
    return int(name) if name.isdigit() else -1


def newest_checkpoint(expdir: str | Path, warn=None) -> Path | None:
    """The `states-*.ckpt` of `expdir` with the most completed steps (as stored in the file; s3prl
    names the last one by epoch) that loads; `warn(line)` is told about each unreadable one.
    None if the folder has no checkpoint; a CheckpointError if none of them loads."""
    candidates = sorted(Path(expdir).glob("states-*.ckpt"))
    if not candidates:
        return None
    steps = {}
    for path in candidates:
        problem = readable(path)
        if problem is None:
            steps[path] = int(load_raw(path).get(STEP_KEY, 0))
        elif warn is not None:
            warn(f"skipping unreadable checkpoint {path.name}: {problem}")
    if not steps:
        raise CheckpointError(f"{expdir}: none of its {len(candidates)} checkpoint(s) can be read; "
                              "start over with --force or restore a checkpoint")
    return max(steps, key=lambda p: (steps[p], _name_step(p)))
