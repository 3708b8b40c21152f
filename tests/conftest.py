"""Shared fixtures: generated speech and tiny teachers in s3prl's real checkpoint formats."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import soundfile as sf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "a stitch in time saves nine",
    "every cloud has a silver lining",
    "birds of a feather flock together",
    "actions speak louder than words",
    "the early bird catches the worm",
    "practice makes perfect in the end",
]
VOICES = ["en-us+m3", "en-us+f2", "en+m1", "en+f4"]


def espeak_wav(text: str, voice: str, path: Path, rate: int = 160) -> Path:
    """Speak `text` with espeak-ng and save it as 16 kHz mono 16-bit wav at `path`."""
    import librosa

    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; run `make setup` (apt-get install espeak-ng sox)")
    raw = path.with_suffix(".22k.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(raw), text], check=True)
    wav, sr = sf.read(str(raw), dtype="float32")
    raw.unlink()
    sf.write(str(path), librosa.resample(wav, orig_sr=sr, target_sr=16000), 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory) -> Path:
    """32 short espeak-ng utterances (4 voices x 8 sentences) as 16 kHz wavs."""
    out = tmp_path_factory.mktemp("speech")
    for v, voice in enumerate(VOICES):
        for s, text in enumerate(SENTENCES):
            espeak_wav(text, voice, out / f"spk{v}_{s:02d}.wav")
    return out


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory) -> dict[str, Path]:
    """Random tiny teachers saved for s3prl's hubert_local / wavlm_local.

    hubert_a: 3 layers x 32 dims; hubert_b: 4 layers x 32 dims;
    wavlm_a: 3 layers x 32 dims; wavlm_wide: 2 layers x 48 dims.
    """
    from s3prl_ekd.plugin.teacher_formats import make_random_teacher

    out = tmp_path_factory.mktemp("teachers")
    return {
        "hubert_a": make_random_teacher("hubert", out / "hubert_a.pt", seed=1),
        "hubert_b": make_random_teacher("hubert", out / "hubert_b.pt", seed=2, encoder_layers=4),
        "wavlm_a": make_random_teacher("wavlm", out / "wavlm_a.pt", seed=3),
        "wavlm_wide": make_random_teacher("wavlm", out / "wavlm_wide.pt", seed=4, encoder_layers=2,
                                          encoder_embed_dim=48, encoder_attention_heads=4),
    }


# The tests' student: ekd_student_tiny at 32 dims, the width of the tiny teachers.
TINY_STUDENT = {
    "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 2,
    "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
}


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_student(**overrides) -> dict:
    import dataclasses

    from s3prl_ekd.core.student import ekd_student_tiny

    return dataclasses.asdict(ekd_student_tiny(**{**TINY_STUDENT, **overrides}))


def model_config(teachers: list[dict], aggregation: str, **student) -> dict:
    return {"teachers": teachers, "aggregation": aggregation, "student": tiny_student(**student)}


def run_pretrain_cli(workdir: Path, config: dict, name: str, steps: int, audio_dir: Path,
                     extra: list[str] | None = None, save_step: int | None = None,
                     overrides: list[str] = ()) -> Path:
    """`s3prl-ekd pretrain` in a subprocess from `workdir`; returns the experiment folder.
    `overrides` (s3prl's -o syntax) come after the defaults here, so they win."""
    import sys

    from s3prl_ekd.io.resources import pretrain_config

    workdir.mkdir(parents=True, exist_ok=True)
    cfg = write_yaml(workdir / f"{name}.yaml", config)
    overrides = [f"config.pretrain_expert.datarc.audio_dir={audio_dir}",
                 f"config.runner.total_steps={steps}",
                 f"config.runner.save_step={save_step or max(1, steps - 1)}",
                 "config.pretrain_expert.datarc.sequence_length=16000", *overrides]
    cmd = [sys.executable, "-m", "s3prl_ekd.cli", "pretrain", "-u", "ekd_distiller", "-g", cfg.name,
           "-c", str(pretrain_config("tiny_cpu_runner.yaml")),
           "-n", name, "--device", "cpu", "-o", ",,".join(overrides), *(extra or [])]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir / "result" / "pretrain" / name


@pytest.fixture(scope="session")
def ekd_checkpoints(tmp_path_factory, tiny_teachers, speech_dir) -> dict[str, Path]:
    """Final checkpoints of 20-step tiny pretraining runs, one per aggregation mode.

    Teachers: hubert_a (3 layers x 32) and wavlm_wide (2 layers x 48) for concat / multi_head,
    hubert_a and wavlm_a (both 32 dims) for layerwise_average; targets are layers [1, 2].
    """
    work = tmp_path_factory.mktemp("ekd_runs")
    pairs = {
        "layerwise_average": ("hubert_a", "wavlm_a"),
        "layerwise_concat": ("hubert_a", "wavlm_wide"),
        "multi_head": ("hubert_a", "wavlm_wide"),
    }
    out = {}
    for mode, (first, second) in pairs.items():
        teachers = [{"name": "hubert_local", "ckpt": str(tiny_teachers[first]), "layers": [1, 2]},
                    {"name": "wavlm_local", "ckpt": str(tiny_teachers[second]), "layers": [1, 2]}]
        expdir = run_pretrain_cli(work, model_config(teachers, mode), mode, steps=20, audio_dir=speech_dir)
        out[mode] = max(expdir.glob("states-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return out


def run_cli_here(argv: list[str]) -> tuple[int, str]:
    """`s3prl-ekd ARGV` in this process: (exit status, stdout + stderr); argparse's own exits included."""
    import contextlib
    import io

    from s3prl_ekd import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exit_:
            rc = exit_.code
    return rc, out.getvalue() + err.getvalue()
