"""`s3prl-ekd merge`: one student from several by a weighted average of their weights.

Students merge only when averaging their weights means something: one architecture (the student
config, training-only fields aside) and one initialisation (the backbone fingerprint recorded under
`Init` when training started: give the runs one `init_from` and one seed). Anything else is refused
with one line naming the difference.

Prediction heads are averaged only when every student predicts the same targets: the same teachers
(name, checkpoint fingerprint, layers, weight), aggregation and target statistics. Heads that
predict different targets have nothing to average, so otherwise the merged student is a backbone
alone: no heads, model config `{teachers: [], aggregation: none, student: ...}`; the ekd_distiller
upstream serves it with `hidden_states: backbone` and refuses `heads`. What was merged (path,
sha256, normalised weight, step, teachers of every input) is recorded under `Merged_From`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from s3prl_ekd.core.student import student_from_dict
from s3prl_ekd.errors import CheckpointError, UserError
from s3prl_ekd.io.checkpoint import (
    INIT_KEY,
    MODEL_CONFIG_KEY,
    MODEL_FORMAT,
    STEP_KEY,
    STUDENT_KEY,
    TARGET_NORM_KEY,
    TEACHER_DIMS_KEY,
    TEACHER_FINGERPRINTS_KEY,
    load_raw,
    model_dict,
)
from s3prl_ekd.io.files import atomic_torch_save, file_sha256

MERGED_FROM_KEY = "Merged_From"
# Student config fields that change training only, not the function a trained student computes.
TRAINING_ONLY = ("dropout", "attention_dropout", "activation_dropout", "feature_grad_mult", "init_from_teacher")
# Student config fields that size the prediction heads only.
HEAD_FIELDS = ("head_inter_dim", "residual_inter_dim")


@dataclass
class MergeInput:
    """One student checkpoint, read and checked."""

    path: Path
    state: dict         # the runner checkpoint's entries
    student: dict       # core.student.student_state dict
    model_config: dict

    @property
    def targets(self) -> dict:
        """What its prediction heads predict: equal for two students iff their heads can be averaged."""
        teachers = [{"name": t["name"], "layers": list(t["layers"]), "weight": t["weight"]}
                    for t in self.model_config["teachers"]]
        for teacher, fingerprint in zip(teachers, self.state.get(TEACHER_FINGERPRINTS_KEY) or []):
            teacher["fingerprint"] = fingerprint
        return {"aggregation": self.model_config["aggregation"], "teachers": teachers,
                "target_norm": self.model_config.get("target_norm", "none"),
                "statistics": self.state.get(TARGET_NORM_KEY)}

    @property
    def head_layout(self) -> dict:
        config = self.student["config"]
        return {"head_dims": list(self.student["head_dims"]), "num_targets": self.student["num_targets"],
                "residual_heads": self.student.get("residual_heads", False),
                **{key: config.get(key) for key in HEAD_FIELDS}}


def read_input(path: str | Path) -> MergeInput:
    path = Path(path)
    state = load_raw(path)
    if isinstance(state, dict) and state.get("format") == MODEL_FORMAT:
        raise CheckpointError(f"{path}: an exported model.pt does not record its initialisation; merge the "
                              "states-*.ckpt files of `s3prl-ekd pretrain` it was exported from")
    model = model_dict(state, path)  # a CheckpointError naming the file if it is no student of ours
    if INIT_KEY not in state:
        raise CheckpointError(f"{path}: trained before initialisations were recorded (no '{INIT_KEY}' entry), so "
                              "a common initialisation cannot be checked; merge students trained with this "
                              "version's `s3prl-ekd pretrain`")
    return MergeInput(path, state, model["student"], model["model_config"])


def parse_weights(text: str | None, count: int) -> list[float]:
    """'1,2,1' -> [0.25, 0.5, 0.25]: one positive weight per checkpoint, normalised to sum to 1."""
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--weights {text}: give numbers separated by commas, e.g. 1,1,2") from None
    return normalise_weights(weights, count)


def normalise_weights(weights: list[float], count: int) -> list[float]:
    if len(weights) != count:
        raise UserError(f"--weights: {len(weights)} weight(s) for {count} checkpoints; give one per checkpoint")
    if not all(w > 0 and w != float("inf") for w in weights):
        raise UserError(f"--weights {','.join(map(str, weights))}: every weight must be a positive number")
    total = sum(weights)
    return [w / total for w in weights]


def _first_difference(a: dict, b: dict, skip: tuple[str, ...] = ()) -> tuple[str, object, object] | None:
    for key in sorted(set(a) | set(b)):
        if key not in skip and a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


def check_mergeable(inputs: list[MergeInput]) -> bool:
    """A CheckpointError (one line) for students that cannot be averaged; True if their heads can be."""
    first = inputs[0]
    for other in inputs[1:]:
        where = f"{other.path}: differs from {first.path}"
        difference = _first_difference(first.student["config"], other.student["config"], TRAINING_ONLY + HEAD_FIELDS)
        if difference:
            key, mine, theirs = difference
            raise CheckpointError(f"{where} in student config {key} ({theirs!r} vs {mine!r}); merging needs students "
                                  "of one architecture")
        backbone = {k: tuple(v.shape) for k, v in first.student["state_dict"].items() if not k.startswith("heads.")}
        theirs = {k: tuple(v.shape) for k, v in other.student["state_dict"].items() if not k.startswith("heads.")}
        if backbone != theirs:
            name = sorted(set(backbone) ^ set(theirs) or {k for k in backbone if backbone[k] != theirs[k]})[0]
            raise CheckpointError(f"{where} in backbone tensor {name} ({theirs.get(name)} vs {backbone.get(name)}); "
                                  "merging needs students of one architecture")
        init, other_init = first.state[INIT_KEY], other.state[INIT_KEY]
        if init["fingerprint"] != other_init["fingerprint"]:
            raise CheckpointError(f"{where} in its initialisation ({other_init['source']}, backbone "
                                  f"{other_init['fingerprint'][:12]} vs {init['source']}, {init['fingerprint'][:12]}); "
                                  "merging needs students trained from one initialisation: give their runs one "
                                  "init_from and one seed")
    if any(other.targets != first.targets for other in inputs[1:]):
        return False
    for other in inputs[1:]:
        difference = _first_difference(first.head_layout, other.head_layout)
        if difference:
            key, mine, theirs = difference
            raise CheckpointError(f"{other.path}: predicts the same targets as {first.path} with another head layout "
                                  f"({key} {theirs!r} vs {mine!r}); merging needs one head layout")
    return True


def average_state(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * state_i for floating tensors (computed in float64); other tensors must be equal."""
    merged = {}
    for name, first in states[0].items():
        values = [state[name] for state in states]
        if first.is_floating_point():
            total = sum(w * v.double() for w, v in zip(weights, values))
            merged[name] = total.to(first.dtype)
        elif all(torch.equal(first, v) for v in values[1:]):
            merged[name] = first.clone()
        else:
            raise CheckpointError(f"student tensor {name} ({first.dtype}) differs between the checkpoints and "
                                  "cannot be averaged")
    return merged


def merge_students(paths: list[str | Path], out: str | Path, weights: list[float] | None = None,
                   force: bool = False) -> dict:
    """Average the students of `paths` (weights: one positive number each, normalised; default equal)
    into a checkpoint at `out`. Returns a summary: out, weights, heads ('averaged' or 'dropped')."""
    out = Path(out)
    if len(paths) < 2:
        raise UserError(f"merge: {len(paths)} checkpoint(s) given; merging needs two or more")
    if out.exists() and not force:
        raise UserError(f"--out {out}: exists; choose another path or pass --force to replace it")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file path for the merged checkpoint")
    weights = normalise_weights(list(weights), len(paths)) if weights is not None else [1.0 / len(paths)] * len(paths)
    inputs = [read_input(path) for path in paths]
    keep_heads = check_mergeable(inputs)
    first = inputs[0]
    names = [k for k in first.student["state_dict"] if keep_heads or not k.startswith("heads.")]
    state = average_state([{k: i.student["state_dict"][k] for k in names} for i in inputs], weights)
    student = {**first.student, "state_dict": state}
    if keep_heads:
        model_config, extra = first.model_config, {
            key: first.state[key] for key in (TEACHER_DIMS_KEY, TEACHER_FINGERPRINTS_KEY, TARGET_NORM_KEY)
            if key in first.state}
    else:
        student.update(head_dims=[], residual_heads=False)
        model_config = {"teachers": [], "aggregation": "none", "student": dict(first.student["config"])}
        extra = {TEACHER_DIMS_KEY: []}
    student_from_dict(student, heads=keep_heads)  # what is written loads (a ValueError here is a bug)
    merged_from = {
        "heads": "averaged" if keep_heads else "dropped: the students predict different targets",
        "students": [{"path": str(i.path.resolve()), "sha256": file_sha256(i.path), "weight": w,
                      "step": int(i.state.get(STEP_KEY, 0)), "aggregation": i.model_config["aggregation"],
                      "teachers": [t["name"] for t in i.model_config["teachers"]]}
                     for i, w in zip(inputs, weights)]}
    atomic_torch_save({STUDENT_KEY: student, MODEL_CONFIG_KEY: model_config, INIT_KEY: dict(first.state[INIT_KEY]),
                       MERGED_FROM_KEY: merged_from, **extra}, out)
    return {"out": str(out), "weights": weights, "heads": merged_from["heads"], "students": len(inputs),
            "init": first.state[INIT_KEY]["source"]}


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("merge", help="average students trained from one initialisation, in weight space")
    p.add_argument("ckpts", nargs="+", metavar="CKPT", help="states-*.ckpt of `s3prl-ekd pretrain` (two or more)")
    p.add_argument("--out", required=True, help="the merged checkpoint (a file)")
    p.add_argument("--weights", help="one positive weight per checkpoint, comma-separated (normalised); "
                                     "default equal")
    p.add_argument("--force", action="store_true", help="replace an existing --out")

    def _merge(args) -> int:
        weights = parse_weights(args.weights, len(args.ckpts))
        result = merge_students(args.ckpts, args.out, weights, args.force)
        listed = ", ".join(f"{w:.3g}" for w in result["weights"])
        print(f"merged {result['students']} students (weights {listed}; initialised from {result['init']}) into "
              f"{result['out']}; prediction heads {result['heads']}")
        return 0

    p.set_defaults(func=_merge)

