"""Reading speech files as 16 kHz mono float tensors, with errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from s3prl_ekd.errors import AudioError

SAMPLE_RATE = 16000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def audio_info(path: str | Path) -> sf._SoundFileInfo:
    """soundfile's header info, or AudioError if the file is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        return sf.info(str(path))
    except Exception as error:  # soundfile raises its own error types per format
        raise AudioError(f"{path}: cannot read audio ({error}); re-encode it as 16 kHz mono wav/flac") from error


def load_audio(path: str | Path, *, resample: bool = False, downmix: bool = False) -> torch.Tensor:
    """Load `path` as a float32 tensor of shape (samples,) at 16 kHz.

    Files at another rate or with several channels are an error unless
    `resample` / `downmix` allow converting them; empty files are always an error.
    """
    info = audio_info(path)
    if info.frames == 0:
        raise AudioError(f"{path}: audio file is empty (0 samples); remove it from the data list")
    if info.channels != 1 and not downmix:
        raise AudioError(f"{path}: has {info.channels} channels, expected mono; "
                         "convert it (sox in.wav -c 1 out.wav) or set downmix: true in the datarc")
    if info.samplerate != SAMPLE_RATE and not resample:
        raise AudioError(f"{path}: sample rate is {info.samplerate} Hz, expected {SAMPLE_RATE}; "
                         "convert it (sox in.wav -r 16000 out.wav) or set resample: true in the datarc")
    try:
        wav, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:
        raise AudioError(f"{path}: cannot decode audio ({error}); the file may be truncated") from error
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    check_samples(wav, path)
    if rate != SAMPLE_RATE:
        import librosa  # only needed when resampling is asked for

        wav = librosa.resample(wav, orig_sr=rate, target_sr=SAMPLE_RATE)
    return torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))


def check_samples(wav: np.ndarray, path: str | Path) -> None:
    """AudioError if `wav` holds NaN/Inf or only zeros: either would teach the student nothing
    (NaN losses are skipped by s3prl's runner without a word, silence gives degenerate targets)."""
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: holds NaN or infinite samples; re-export it from its source or "
                         "remove it from the data")
    if not np.any(wav):
        raise AudioError(f"{path}: is silent (every sample is 0); remove it from the data")


def list_audio_files(directory: str | Path) -> list[Path]:
    """Every .wav/.flac/.ogg file under `directory`, sorted; an error if there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AudioError(f"{directory}: audio_dir is not a directory")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise AudioError(f"{directory}: no {'/'.join(AUDIO_SUFFIXES)} files found under audio_dir")
    return files
