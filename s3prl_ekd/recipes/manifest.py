"""The manifest between raw speech and every SUPERB recipe: one JSON object per utterance.

A line holds `audio` (path, relative to the manifest's folder or absolute), `split`
(train/dev/test) and, as the tasks need them, `id`, `speaker`, `text`, `phones`, `emotion`.
`s3prl-ekd corpus synth` writes one; `recipes.layout` turns one into the recipes' layouts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from s3prl_ekd.errors import AudioError, UserError
from s3prl_ekd.io.audio import SAMPLE_RATE, check_samples

SPLITS = ("train", "dev", "test")
MIN_SECONDS = 0.1


@dataclass(frozen=True)
class Row:
    """One manifest line; `audio` is absolute, `line` is its 1-based line number."""

    id: str
    audio: Path
    split: str
    speaker: str | None
    text: str | None
    phones: str | None
    emotion: str | None
    line: int


def read_manifest(path: str | os.PathLike, required: Iterable[str] = ("audio", "split")) -> list[Row]:
    """Parse manifest.jsonl, with an error naming the line for anything malformed.

    Relative `audio` paths are relative to the manifest's folder.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise UserError(f"{path}: manifest not found; make one with `s3prl-ekd corpus synth`")
    required = tuple(required)
    rows, seen = [], {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: not a JSON object ({error.msg})") from error
        if not isinstance(record, dict):
            raise UserError(f"{where}: not a JSON object")
        for key in required:
            value = record.get(key)
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: {key!r} is missing or empty; every line needs "
                                f"{', '.join(required)}")
        split = record["split"]
        if split not in SPLITS:
            raise UserError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        audio = Path(record["audio"])
        audio = audio if audio.is_absolute() else path.parent / audio
        utt_id = str(record.get("id") or audio.stem)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", utt_id):
            raise UserError(f"{where}: id {utt_id!r} (the audio file name when 'id' is absent) "
                            "is used in file names; give an 'id' of letters, digits, '_' and '-'")
        if utt_id in seen:
            raise UserError(f"{where}: id {utt_id!r} already used on line {seen[utt_id]}")
        seen[utt_id] = number
        rows.append(Row(utt_id, audio, split, record.get("speaker"), record.get("text"),
                        record.get("phones"), record.get("emotion"), number))
    if not rows:
        raise UserError(f"{path}: manifest is empty")
    missing = [s for s in SPLITS if not any(r.split == s for r in rows)]
    if missing:
        raise UserError(f"{path}: no utterances in split(s) {', '.join(missing)}; "
                        "the recipes need train, dev and test")
    return rows


def check_audio_files(files: Sequence[tuple[str, Path]], progress: bool = False) -> list[float]:
    """Durations in seconds of `files` ((where, path) pairs), or one AudioError listing every
    file that is missing, unreadable, not 16 kHz mono, shorter than MIN_SECONDS, silent, or
    holding NaN/Inf samples."""
    import soundfile as sf
    from tqdm import tqdm

    problems, durations = [], []
    for where, path in tqdm(files, desc="checking audio", disable=not progress, unit="file"):
        if not path.is_file():
            problems.append(f"{where}: {path}: file not found")
            continue
        try:
            info = sf.info(str(path))
        except Exception as error:  # soundfile raises format-specific errors
            problems.append(f"{where}: {path}: unreadable ({error})")
            continue
        issues = []
        if info.samplerate != SAMPLE_RATE:
            issues.append(f"{info.samplerate} Hz")
        if info.channels != 1:
            issues.append(f"{info.channels} channels")
        if issues:
            problems.append(f"{where}: {path}: {', '.join(issues)}, expected {SAMPLE_RATE} Hz "
                            f"mono; convert it (sox IN -r {SAMPLE_RATE} -c 1 OUT)")
        elif info.duration < MIN_SECONDS:
            problems.append(f"{where}: {path}: {info.duration:.3f} s long, shorter than "
                            f"{MIN_SECONDS} s; drop it")
        else:
            try:  # NaN/Inf or all-zero samples: named here rather than as NaN losses later
                check_samples(sf.read(str(path), dtype="float32")[0], path)
            except AudioError as error:
                problems.append(f"{where}: {error}")
            except Exception as error:  # soundfile's decoding errors
                problems.append(f"{where}: {path}: cannot decode ({error}); the file may be truncated")
        durations.append(info.duration)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AudioError(f"{len(problems)} of {len(files)} audio files cannot be used:\n  {shown}{more}")
    return durations
