"""`s3prl-ekd export`: a self-contained SUPERB submission folder from an EKD checkpoint,
as s3prl's `run_downstream.py --hub huggingface` loads it (expert.py, model.pt, requirements.txt).

Also reads either checkpoint kind (pretraining states-*.ckpt, exported model.pt) into the
model.pt dict the upstream is built from.
"""

from __future__ import annotations

import importlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from s3prl_ekd.errors import UserError
from s3prl_ekd.io.audio import SAMPLE_RATE
from s3prl_ekd.io.checkpoint import read_checkpoint

if TYPE_CHECKING:
    from s3prl_ekd.core.student import EKDStudent
    from s3prl_ekd.upstream.ekd_distiller.expert import UpstreamExpert

# torch, s3prl and the expert are imported inside the functions: the CLI imports this module
# for every subcommand.

# The submission folder carries copies of the modules the upstream needs, under their own
# package names, so `from expert import UpstreamExpert` works where s3prl-ekd is not installed
# (where it is, the installed package is found first: s3prl appends the folder to sys.path).
VENDORED_MODULES = ("s3prl_ekd.errors", "s3prl_ekd.io.strict", "s3prl_ekd.io.checkpoint",
                    "s3prl_ekd.core.frames", "s3prl_ekd.core.student",
                    "s3prl_ekd.upstream.ekd_distiller.expert")
EXPERT_SHIM = '''"""SUPERB upstream entry point: the EKD student of model.pt (written by `s3prl-ekd export`)."""
from s3prl_ekd.upstream.ekd_distiller.expert import UpstreamExpert  # noqa: F401
'''
MODEL_FILE = "model.pt"
REQUIRED_DISTRIBUTIONS = ("torch", "torchaudio", "PyYAML")  # plus the s3prl distribution installed here
WRITTEN_FILES = ("expert.py", "s3prl_ekd", MODEL_FILE, "requirements.txt", "README.md")  # s3prl_ekd: a folder


def write_vendored_package(outdir: Path) -> None:
    """outdir/s3prl_ekd/...: copies of VENDORED_MODULES, with empty package __init__ files."""
    target_root = outdir / "s3prl_ekd"
    if target_root.exists():
        shutil.rmtree(target_root)
    for module_name in VENDORED_MODULES:
        parts = module_name.split(".")
        target = outdir.joinpath(*parts).with_suffix(".py")
        for depth in range(1, len(parts)):
            package = outdir.joinpath(*parts[:depth])
            package.mkdir(exist_ok=True)
            init = package / "__init__.py"
            if not init.exists():
                init.write_text('"""Copied by `s3prl-ekd export`: what the SUPERB upstream needs of s3prl-ekd."""\n')
        shutil.copyfile(importlib.import_module(module_name).__file__, target)


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
    wav = torch.randn(int(audio_seconds * SAMPLE_RATE), generator=torch.Generator().manual_seed(0)).to(device)
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
    """Pins of what the upstream imports, taken from this environment (s3prl or espnet-s3prl)."""
    import importlib.metadata

    from s3prl_ekd.stack import s3prl_distribution

    lines = []
    for name in (*REQUIRED_DISTRIBUTIONS, s3prl_distribution()):
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
    from s3prl_ekd.io.files import atomic_torch_save, atomic_write_text
    from s3prl_ekd.upstream.ekd_distiller.expert import UpstreamExpert

    state = read_checkpoint(ckpt)
    outdir.mkdir(parents=True, exist_ok=True)
    write_vendored_package(outdir)
    atomic_write_text(outdir / "expert.py", EXPERT_SHIM)
    atomic_torch_save(state, outdir / MODEL_FILE)
    atomic_write_text(outdir / "requirements.txt", requirements())

    upstream = UpstreamExpert(str(outdir / MODEL_FILE))  # also proves the written model.pt loads
    report = ExportReport(outdir, state["step"], count_parameters(upstream.student),
                          measure_speed(upstream, speed_seconds, device) if speed_seconds else None,
                          upstream.hidden_state_names, upstream.get_downsample_rates("hidden_states"))
    atomic_write_text(outdir / "README.md", model_card(state, report))
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
