"""`s3prl-ekd export`: a self-contained SUPERB submission folder from an EKD checkpoint,
as s3prl's `run_downstream.py --hub huggingface` loads it (expert.py, model.pt, requirements.txt).

Also reads either checkpoint kind (pretraining states-*.ckpt, exported model.pt) into the
model.pt dict the upstream is built from.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from s3prl_ekd.errors import CheckpointError, UserError

if TYPE_CHECKING:
    from s3prl_ekd.student import EKDStudent
    from s3prl_ekd.upstream.ekd_distiller.expert import UpstreamExpert

# torch, s3prl and the expert are imported inside the functions: the CLI imports this module
# for every subcommand.

# Files of the submission folder that are copies of this package's modules (the expert
# imports `ekd_student` / `ekd_errors` when it runs from the folder, see expert.py).
COPIED_MODULES = {"expert.py": "s3prl_ekd.upstream.ekd_distiller.expert",
                  "ekd_student.py": "s3prl_ekd.student", "ekd_errors.py": "s3prl_ekd.errors"}
MODEL_FILE = "model.pt"
REQUIRED_DISTRIBUTIONS = ("torch", "torchaudio", "s3prl", "PyYAML")
WRITTEN_FILES = (*COPIED_MODULES, MODEL_FILE, "requirements.txt", "README.md")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def read_checkpoint(path: str | Path) -> dict:
    """A states-*.ckpt of `s3prl-ekd pretrain` or an exported model.pt, as the model.pt dict."""
    import torch

    from s3prl_ekd.pretrain_expert import MODEL_CONFIG_KEY, STUDENT_KEY, TEACHER_DIMS_KEY
    from s3prl_ekd.s3prl_bridge import allow_namespace_checkpoints
    from s3prl_ekd.upstream.ekd_distiller.expert import MODEL_FORMAT, check_model_dict

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with allow_namespace_checkpoints():
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint, the file is corrupt, truncated or "
                              f"not a checkpoint ({type(error).__name__}: {_first_line(error)}); pass a "
                              "states-*.ckpt from `s3prl-ekd pretrain` or a model.pt from `s3prl-ekd export`") from error
    if isinstance(state, dict) and state.get("format") == MODEL_FORMAT:
        return check_model_dict(state, path)
    if not isinstance(state, dict) or STUDENT_KEY not in state:
        raise CheckpointError(f"{path}: not an ekd_distiller checkpoint ({_describe(state)}); pass a "
                              "states-*.ckpt from `s3prl-ekd pretrain -u ekd_distiller` or a model.pt from "
                              "`s3prl-ekd export`")
    if MODEL_CONFIG_KEY not in state:
        raise CheckpointError(f"{path}: ekd_distiller checkpoint without '{MODEL_CONFIG_KEY}' (the model "
                              "config); it was written by an older s3prl-ekd, re-run pretraining")
    model_config = state[MODEL_CONFIG_KEY]
    student_state = state[STUDENT_KEY]
    teachers = [{"name": t["name"], "layers": list(t["layers"]), "weight": t["weight"]}
                for t in model_config["teachers"]]
    dims = state.get(TEACHER_DIMS_KEY) or teacher_dims(model_config, student_state["head_dims"])
    for teacher, dim in zip(teachers, dims):
        teacher["dim"] = dim
    return {"format": MODEL_FORMAT, "student": student_state, "aggregation": model_config["aggregation"],
            "teachers": teachers, "step": int(state.get("Step", 0)), "model_config": model_config}


def _describe(state) -> str:
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}"
    keys = sorted(map(str, state))
    if {"model_weight", "model_cfg"} <= set(keys) or {"cfg", "model"} <= set(keys):
        return f"it looks like a teacher model checkpoint, keys {keys[:8]}"
    if "Downstream" in keys:
        return "it is a downstream (run_downstream.py) checkpoint"
    return f"no 'Student' entry, keys {keys[:8]}"


def teacher_dims(model_config: dict, head_dims: list[int]) -> list[int | None]:
    """Each teacher's hidden size: from the head sizes, or for layerwise_concat of several
    teachers from the teachers' known shapes / checkpoints (None where unknown)."""
    from s3prl_ekd.config import TeacherConfig, teacher_shape

    teachers, aggregation = model_config["teachers"], model_config["aggregation"]
    if aggregation == "layerwise_average":
        return [head_dims[0]] * len(teachers)
    if aggregation == "multi_head" or len(teachers) == 1:
        return list(head_dims)
    shapes = [teacher_shape(TeacherConfig(name=t["name"], ckpt=t.get("ckpt"))) for t in teachers]
    dims = [shape[1] if shape else None for shape in shapes]
    if None in dims or sum(dims) != head_dims[0]:
        return [None] * len(teachers)
    return dims


@dataclass
class ParameterCount:
    total: int
    backbone: int  # CNN + transformer: what `hidden_states: backbone` runs
    heads: int


def count_parameters(model: EKDStudent) -> ParameterCount:
    backbone = sum(p.numel() for p in model.backbone.parameters())
    heads = sum(p.numel() for p in model.heads.parameters())
    return ParameterCount(backbone + heads, backbone, heads)


@dataclass
class Speed:
    device: str
    audio_seconds: float
    seconds: float  # median wall time of one forward

    @property
    def real_time_factor(self) -> float:
        return self.seconds / self.audio_seconds


def measure_speed(upstream: UpstreamExpert, audio_seconds: float = 10.0, device: str | None = None,
                  repeats: int = 3) -> Speed:
    """Median time of `upstream` on one utterance of `audio_seconds` (after one warm-up run)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    upstream = upstream.to(device).eval()
    wav = torch.randn(int(audio_seconds * 16000), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            upstream([wav])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    label = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    return Speed(label, audio_seconds, sorted(times)[len(times) // 2])


@dataclass
class ExportReport:
    outdir: Path
    step: int
    parameters: ParameterCount
    speed: Speed | None
    hidden_states: list[str]
    downsample_rate: int

    def summary(self) -> str:
        p = self.parameters
        lines = [f"exported step {self.step} to {self.outdir}",
                 f"parameters: {p.total:,} ({p.total / 1e6:.2f} M): backbone {p.backbone:,} + heads {p.heads:,}",
                 f"hidden states (default): {len(self.hidden_states)} = {', '.join(self.hidden_states)}"]
        if self.speed:
            s = self.speed
            lines.append(f"inference: {s.seconds * 1000:.1f} ms for {s.audio_seconds:g} s of audio on {s.device}, "
                         f"real-time factor {s.real_time_factor:.4f}")
        return "\n".join(lines)


def requirements() -> str:
    """Pins of what expert.py imports, taken from this environment."""
    lines = []
    for name in REQUIRED_DISTRIBUTIONS:
        version = importlib.metadata.version(name).split("+")[0]  # drop local tags like +cu128
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def export(ckpt: str | Path, outdir: str | Path, force: bool = False, speed_seconds: float | None = 10.0,
           device: str | None = None) -> ExportReport:
    """Write the submission folder for `ckpt` into `outdir`; refuse a non-empty `outdir` unless `force`.

    With `force`, the files listed in WRITTEN_FILES are replaced and any others are left alone.
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"{outdir}: exists and is not a folder; pick another OUTDIR")
    if outdir.is_dir() and any(outdir.iterdir()) and not force:
        raise UserError(f"{outdir}: not empty; pick an empty or new OUTDIR, or pass --force to replace "
                        f"{', '.join(WRITTEN_FILES)} in it")
    import importlib

    import torch

    from s3prl_ekd.upstream.ekd_distiller.expert import UpstreamExpert

    state = read_checkpoint(ckpt)
    outdir.mkdir(parents=True, exist_ok=True)
    for name, module_name in COPIED_MODULES.items():
        shutil.copyfile(importlib.import_module(module_name).__file__, outdir / name)
    torch.save(state, outdir / MODEL_FILE)
    (outdir / "requirements.txt").write_text(requirements())

    upstream = UpstreamExpert(str(outdir / MODEL_FILE))  # also proves the written model.pt loads
    report = ExportReport(outdir, state["step"], count_parameters(upstream.student),
                          measure_speed(upstream, speed_seconds, device) if speed_seconds else None,
                          upstream.hidden_state_names, upstream.get_downsample_rates("hidden_states"))
    (outdir / "README.md").write_text(model_card(state, report))
    return report


def model_card(state: dict, report: ExportReport) -> str:
    config = state["student"]["config"]
    teacher_rows = "\n".join(f"| {k} | {t['name']} | {t['layers']} | {t['weight']:g} | {t['dim'] or '?'} |"
                             for k, t in enumerate(state["teachers"]))
    p, s = report.parameters, report.speed
    speed = (f"{s.seconds * 1000:.1f} ms per {s.audio_seconds:g} s utterance on {s.device} "
             f"(real-time factor {s.real_time_factor:.4f})" if s else "not measured")
    return f"""---
tags:
- library:s3prl
- benchmark:superb
- type:upstream
---

# EKD student (ensemble knowledge distillation)

A DistilHuBERT-style student distilled from an ensemble of self-supervised speech models with
s3prl-ekd (s3prl pretraining task `ekd_distiller`), exported from pretraining step {state['step']}.

## Teachers and aggregation

Aggregation: **{state['aggregation']}**

| # | teacher | predicted layers | weight | hidden size |
|---|---------|------------------|--------|-------------|
{teacher_rows}

## Student

- CNN: `{config['conv_feature_layers']}` (extractor_mode: {config['extractor_mode']}), downsample rate {report.downsample_rate} samples
- transformer: {config['encoder_layers']} layers x {config['encoder_embed_dim']} dims, {config['encoder_attention_heads']} heads, FFN {config['encoder_ffn_embed_dim']}
- parameters: **{p.total:,}** ({p.total / 1e6:.2f} M) = backbone {p.backbone:,} + prediction heads {p.heads:,}
- inference speed: {speed}

## Hidden states

By default the upstream returns {len(report.hidden_states)} hidden states ({', '.join(report.hidden_states)}):
the CNN output after the input projection and every transformer layer (the EKD paper's choice).
A `-g` YAML (or keyword) `hidden_states: heads` selects the prediction heads instead, and
`hidden_states: backbone+heads` both; s3prl's Featurizer sums them, so this works only where the
selected states share one size.

## How to load

SUPERB hidden-set style (s3prl 0.4.18, this folder as the Hugging Face repo):

```
python run_downstream.py --hub huggingface -u <org>/<this-repo> -d <task> -c <config.yaml> -n <name>
```

Or with this folder on `sys.path`:

```python
import sys; sys.path.append("path/to/this/folder")
from expert import UpstreamExpert
upstream = UpstreamExpert(ckpt="path/to/this/folder/model.pt").eval()
hidden_states = upstream([wav_16khz_1d_tensor])["hidden_states"]   # list of (1, frames, dim)
```

Requirements: see `requirements.txt`. `model.pt` holds tensors and plain Python values only
(`torch.load(..., weights_only=True)` reads it).
"""


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a SUPERB submission folder (expert.py, model.pt, "
                              "requirements.txt, README.md) from an ekd_distiller checkpoint")
    p.add_argument("ckpt", help="states-*.ckpt of `s3prl-ekd pretrain` (or a model.pt)")
    p.add_argument("outdir", help="folder to write; must be empty or new unless --force")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUTDIR, replacing our files")
    p.add_argument("--speed-seconds", type=float, default=10.0,
                   help="audio length for the inference-speed figure (0 skips it; default 10)")
    p.add_argument("--device", help="device for the speed figure (default: cuda if available, else cpu)")

    def _export(args) -> int:
        print(export(args.ckpt, args.outdir, args.force, args.speed_seconds, args.device).summary())
        return 0

    p.set_defaults(func=_export)
