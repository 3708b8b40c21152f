"""The manifest between a corpus and every SUPERB recipe: one JSON object per utterance per line.

Every corpus becomes one: `s3prl-ekd corpus synth` writes the synthetic one, `recipes.librispeech`,
`recipes.voxceleb1` and `recipes.iemocap` turn the real corpora into one, and `recipes.prepare`
builds each recipe's layout from a manifest alone. Keys of a line:

- `audio` (always): the audio file, relative to the manifest's folder or absolute; 16 kHz mono.
- `split`: "train", "dev" or "test". PR, ASR and SID need all three.
- `fold`: a cross-validation fold, an integer >= 1 (IEMOCAP: the session number). ER holds out each
  fold in turn (s3prl's `test_fold: foldN`) and then ignores `split`; a line needs `split` or `fold`.
- `id`: letters, digits, "_" and "-", unique in the manifest; the audio file's name when absent.
- Labels, strings, as the tasks need them: `speaker` (every task), `text` (ASR: words), `phones`
  (PR: phones of the PR vocabulary, space-separated), `emotion` (ER).

Other keys (the synthetic corpus's `voice`, `duration`) are allowed and ignored.
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
from s3prl_ekd.io.files import atomic_write_text

SPLITS = ("train", "dev", "test")
MIN_SECONDS = 0.1
LABELS = ("speaker", "text", "phones", "emotion")


@dataclass(frozen=True)
class Row:
    """One manifest line; `audio` is absolute, `line` is its 1-based line number."""

    id: str
    audio: Path
    split: str | None
    speaker: str | None
    text: str | None
    phones: str | None
    emotion: str | None
    line: int
    fold: int | None = None


def read_manifest(path: str | os.PathLike, required: Iterable[str] = ("audio", "split")) -> list[Row]:
    """Parse a manifest, with an error naming the line for anything malformed.

    Every line needs `audio` and `split` or `fold`, plus the string keys in `required`.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise UserError(f"{path}: manifest not found; make one with `s3prl-ekd corpus synth` or "
                        "`s3prl-ekd prepare TASK --librispeech/--voxceleb1/--iemocap DIR`")
    required = tuple(dict.fromkeys(("audio", *required)))
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
        for key in (*required, *LABELS):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise UserError(f"{where}: {key!r} is {record[key]!r}, not a string")
        split, fold = record.get("split"), record.get("fold")
        if split is None and fold is None:
            raise UserError(f"{where}: neither 'split' ({'/'.join(SPLITS)}) nor 'fold' (1, 2, ...) given")
        if split is not None and split not in SPLITS:
            raise UserError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        if fold is not None and (type(fold) is not int or fold < 1):
            raise UserError(f"{where}: fold {fold!r} is not an integer >= 1")
        for key in required:
            if not (record.get(key) or "").strip():
                raise UserError(f"{where}: {key!r} is missing or empty; every line needs "
                                f"{', '.join(required)}")
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
                        record.get("phones"), record.get("emotion"), number, fold))
    if not rows:
        raise UserError(f"{path}: manifest is empty")
    return rows


def check_splits(rows: Sequence[Row], path: str | os.PathLike, task: str,
                 splits: Sequence[str] = SPLITS) -> None:
    """An error naming the manifest if any of `splits` holds no utterance."""
    missing = [s for s in splits if not any(r.split == s for r in rows)]
    if missing:
        raise UserError(f"{path}: no utterances in split(s) {', '.join(missing)}; "
                        f"{task.upper()} needs {', '.join(splits)}")


def write_manifest(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write `records` as a manifest at `path`, atomically; a manifest already holding exactly
    these lines is left as it is, so that its time stamp says when its content last changed."""
    path = Path(path)
    text = "".join(json.dumps(record) + "\n" for record in records)
    if path.is_file() and path.read_text() == text:
        return path
    return atomic_write_text(path, text)


def check_audio_files(files: Sequence[tuple[str, Path]], progress: bool = False) -> list[float]:
    """Durations in seconds of `files` ((where, path) pairs), or one AudioError naming every
    file that is missing, unreadable, not 16 kHz mono, shorter than MIN_SECONDS, silent, or
    holding NaN/Inf samples (one line when one file is at fault)."""
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
    if len(problems) == 1:
        raise AudioError(problems[0])
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AudioError(f"{len(problems)} of {len(files)} audio files cannot be used:\n  {shown}{more}")
    return durations
