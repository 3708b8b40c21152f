"""Shared fixtures: generated speech and tiny teachers in s3prl's real checkpoint formats."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
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
    from s3prl_ekd.teacher_zoo import make_random_teacher

    out = tmp_path_factory.mktemp("teachers")
    return {
        "hubert_a": make_random_teacher("hubert", out / "hubert_a.pt", seed=1),
        "hubert_b": make_random_teacher("hubert", out / "hubert_b.pt", seed=2, encoder_layers=4),
        "wavlm_a": make_random_teacher("wavlm", out / "wavlm_a.pt", seed=3),
        "wavlm_wide": make_random_teacher("wavlm", out / "wavlm_wide.pt", seed=4, encoder_layers=2,
                                          encoder_embed_dim=48, encoder_attention_heads=4),
    }
