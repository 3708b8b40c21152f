"""Turn a manifest into the on-disk layout each SUPERB recipe reads, and the helpers every
prepare step shares (prepared.json, up-to-date checks, linking files).

`prepare_<task>` checks every audio file and label, writes OUT/<task>/ and OUT/<task>/prepared.json,
whose "config" part `superb` merges into the recipe config. Source data is only ever read;
re-running with unchanged inputs does nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from s3prl_ekd.errors import ConfigError, UserError
from s3prl_ekd.io.files import atomic_write_json, fingerprint, fresh_owned_dir
from s3prl_ekd.io.resources import recipe_file
from s3prl_ekd.recipes.manifest import SPLITS, Row, check_audio_files, read_manifest

TASKS = ("pr", "asr", "sid", "er")
PREPARED_NAME = "prepared.json"
MARKER_NAME = ".s3prl_ekd_prepare"  # marks folders prepare made, the only ones it replaces
PREPARE_VERSION = 1
# s3prl's voxceleb1 expert: label = int(id[2:]) - 10001 over 1251 hard-coded classes.
SID_FIRST_ID, SID_CLASSES = 10001, 1251
# IEMOCAP's class order in s3prl's meta data; other emotions follow, sorted.
EMOTION_ORDER = ("neutral", "happy", "angry", "sad")
REQUIRED = {
    "pr": ("audio", "phones", "speaker", "split"),
    "asr": ("audio", "text", "speaker", "split"),
    "sid": ("audio", "speaker", "split"),
    "er": ("audio", "emotion", "speaker", "split"),
}


def espeak_phones() -> Path:
    return recipe_file("pr", "espeak_en_phones.txt")


def arpabet_phones() -> Path:
    return recipe_file("pr", "arpabet_phones.txt")


def char_dict() -> Path:
    return recipe_file("asr", "char.dict")


@dataclass
class PrepareReport:
    """What prepare wrote (or found up to date) for one task."""

    task: str
    out: Path
    splits: dict[str, tuple[int, float]]  # split -> (utterances, seconds)
    up_to_date: bool = False
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        state = "up to date" if self.up_to_date else "written"
        parts = ", ".join(f"{s} {n} utts / {sec / 60:.1f} min" for s, (n, sec) in self.splits.items())
        lines = [f"{self.task}: {self.out} ({state}): {parts}"] + [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def file_stamps(paths: Iterable[Path]) -> list:
    """(path, size, mtime) of large files (audio): cheap to read, changes when a file is replaced."""
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def file_contents(paths: Iterable[Path]) -> str:
    """A digest of small files' contents (labels, transcripts, lexicons): an edit that keeps the
    size and the modification time still changes it."""
    return fingerprint([(str(p), p.read_bytes().hex()) for p in sorted(paths)])


def up_to_date(out: Path, key: str) -> dict | None:
    prepared = out / PREPARED_NAME
    if prepared.is_file():
        info = json.loads(prepared.read_text())
        if info.get("fingerprint") == key:
            return info
    return None


def write_prepared(out: Path, info: dict) -> None:
    atomic_write_json(out / PREPARED_NAME, info)


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def split_summary(rows: Sequence[Row], durations: Sequence[float]) -> dict[str, tuple[int, float]]:
    summary = {}
    for split in SPLITS:
        picked = [d for r, d in zip(rows, durations) if r.split == split]
        summary[split] = (len(picked), float(sum(picked)))
    return summary


def read_symbols(path: Path) -> list[str]:
    """One token per line (the first field), e.g. a phone vocabulary or a fairseq dict."""
    if not path.is_file():
        raise ConfigError(f"{path}: vocabulary file not found")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def asr_characters() -> set[str]:
    """Characters the ASR recipe's char.dict can spell; "|" stands for the space."""
    return {" " if s == "|" else s for s in read_symbols(char_dict())}


def _safe_names(speakers: Iterable[str]) -> dict[str, str]:
    """Speaker -> folder name usable in LibriSpeech file names (no '-', '.', '/')."""
    names = {}
    for index, speaker in enumerate(sorted(set(speakers))):
        name = speaker if re.fullmatch(r"[A-Za-z0-9_]+", speaker) else f"spk{index:04d}"
        names[speaker] = name if name not in names.values() else f"spk{index:04d}"
    return names


def write_librispeech_tree(rows: Sequence[Row], out: Path, flac: bool) -> dict[str, Path]:
    """A LibriSpeech-style tree of the manifest: {split}/{spk}/0/{spk}-0-{n}.(flac|wav) beside
    {spk}-0.trans.txt (upper-case words) and {spk}-0.phones.txt (phones).

    flac=True converts the audio (the PR loader globs *.flac only); otherwise the source files
    are linked (or copied) unchanged. Returns manifest id -> audio file in the tree.
    """
    import soundfile as sf

    names = _safe_names(r.speaker for r in rows)
    counters: dict[str, int] = {}
    tables: dict[Path, dict[str, list[str]]] = {}
    files, index_lines = {}, ["id\tutterance"]
    for row in rows:
        spk = names[row.speaker]
        counters[spk] = counters.get(spk, -1) + 1
        utt = f"{spk}-0-{counters[spk]:04d}"
        folder = out / row.split / spk / "0"
        folder.mkdir(parents=True, exist_ok=True)
        if flac:
            files[row.id] = folder / f"{utt}.flac"
            wav, rate = sf.read(str(row.audio), dtype="int16")
            sf.write(str(files[row.id]), wav, rate, format="FLAC", subtype="PCM_16")
        else:
            files[row.id] = folder / f"{utt}{row.audio.suffix.lower()}"
            link_or_copy(row.audio, files[row.id])
        table = tables.setdefault(folder / f"{spk}-0", {"trans": [], "phones": []})
        if row.text is not None:
            table["trans"].append(f"{utt} {row.text.upper()}")
        if row.phones is not None:
            table["phones"].append(f"{utt} {row.phones}")
        index_lines.append(f"{row.id}\t{utt}")
    for stem, table in tables.items():
        for kind, lines in table.items():
            if lines:
                Path(f"{stem}.{kind}.txt").write_text("\n".join(lines) + "\n")
    (out / "utterances.tsv").write_text("\n".join(index_lines) + "\n")
    return files


def _prepare_from_manifest(task: str, manifest, out: Path, progress: bool, options: dict,
                           check, build) -> PrepareReport:
    """Shared flow: read and `check` everything, skip if up to date, else write the layout with
    `build(rows, empty task folder) -> (config, notes, extra prepared.json keys)`."""
    rows = read_manifest(manifest, REQUIRED[task])
    durations = check_audio_files([(f"{manifest}:{r.line}", r.audio) for r in rows], progress)
    check(rows)
    key = fingerprint(PREPARE_VERSION, task, str(Path(manifest).resolve()), [r.__dict__ for r in rows],
                               file_stamps(r.audio for r in rows), options)
    task_out = out / task
    summary = split_summary(rows, durations)
    if (info := up_to_date(task_out, key)) is not None:
        return PrepareReport(task, task_out, summary, up_to_date=True, notes=info.get("notes", []))
    config, notes, extra = build(rows, fresh_owned_dir(task_out, MARKER_NAME, "s3prl-ekd prepare"))
    write_prepared(task_out, {"task": task, "source": str(Path(manifest).resolve()),
                               "fingerprint": key, "config": config, "splits": summary,
                               "notes": notes, **extra})
    return PrepareReport(task, task_out, summary, notes=notes)


def _check_phones(rows: Sequence[Row], vocab: Path, manifest) -> None:
    known = set(read_symbols(vocab))
    for row in rows:
        unknown = sorted(set(row.phones.split()) - known)
        if unknown:
            raise UserError(f"{manifest}:{row.line}: phones {unknown} are not in the PR vocabulary "
                            f"{vocab}; add them there or pass another vocabulary")


def _check_text(rows: Sequence[Row], manifest) -> None:
    allowed = asr_characters()
    for row in rows:
        bad = sorted(set(row.text.upper()) - allowed)
        if bad:
            raise UserError(f"{manifest}:{row.line}: text has characters {bad} that the ASR "
                            f"dictionary {char_dict()} cannot spell; write numbers as words and "
                            "drop punctuation other than the apostrophe")


NOISY_SPLIT = "test_noisy"


def add_noise(wav: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    """`wav` (samples,) plus white Gaussian noise at `snr_db` below its power, scaled (speech and
    noise together, so the SNR holds) to stay within [-1, 1]."""
    rng = np.random.default_rng(seed)
    power = float(np.mean(wav.astype(np.float64) ** 2)) or 1e-10
    noisy = wav + rng.standard_normal(len(wav)) * np.sqrt(power / 10 ** (snr_db / 10))
    peak = float(np.abs(noisy).max())
    return (noisy / peak * 0.99 if peak > 0.99 else noisy).astype(np.float32)


def write_noisy_copies(rows: Sequence[Row], folder: Path, snr_db: float) -> list[Row]:
    """The test rows again, as split NOISY_SPLIT, their audio with noise at `snr_db` (seeded per utterance)."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    noisy = []
    for row in rows:
        wav, rate = sf.read(str(row.audio), dtype="float32")
        seed = int(fingerprint("noise", row.id)[:8], 16)
        path = folder / f"{row.id}.wav"
        sf.write(str(path), add_noise(wav, snr_db, seed), rate, subtype="PCM_16")
        noisy.append(dataclasses.replace(row, id=f"{row.id}-noisy", audio=path, split=NOISY_SPLIT))
    return noisy


def prepare_pr(manifest: str | os.PathLike, out: str | os.PathLike, vocab: str | os.PathLike | None = None,
               progress: bool = False, noisy_snr_db: float | None = None) -> PrepareReport:
    """PR from a manifest: flac tree + exact phone transcripts + the espeak-ng phone vocabulary;
    with `noisy_snr_db`, also a copy of the test split with white noise at that SNR (NOISY_SPLIT)."""
    out, vocab = Path(out).resolve(), Path(vocab or espeak_phones()).resolve()

    def build(rows, task_out):
        tree = task_out / "librispeech"
        extra, notes = {}, [f"phone vocabulary: {vocab} ({len(read_symbols(vocab))} phones)"]
        if noisy_snr_db is not None:
            rows = list(rows) + write_noisy_copies([r for r in rows if r.split == "test"], task_out / "noisy_src",
                                                   noisy_snr_db)
            extra = {"noisy_test": NOISY_SPLIT, "noisy_snr_db": noisy_snr_db}
            notes.append(f"{NOISY_SPLIT}: the test split with white noise at {noisy_snr_db:g} dB SNR")
        write_librispeech_tree(rows, tree, flac=True)
        config = {"downstream_expert": {
            "corpus": {"path": str(tree), "train": ["train"], "dev": ["dev"], "test": ["test"],
                       "lexicon": [], "transcripts": "phones"},
            "text": {"vocab_file": str(vocab)}}}
        return config, notes, extra

    return _prepare_from_manifest("pr", manifest, out, progress,
                                  {"vocab": str(vocab), "vocab_text": vocab.read_text(), "noisy_snr_db": noisy_snr_db},
                                  lambda rows: _check_phones(rows, vocab, manifest), build)


def prepare_asr(manifest: str | os.PathLike, out: str | os.PathLike, progress: bool = False) -> PrepareReport:
    """ASR from a manifest: LibriSpeech-style tree of the audio + transcripts + bucket CSVs."""
    out = Path(out).resolve()

    def build(rows, task_out):
        tree = task_out / "librispeech"
        files = write_librispeech_tree(rows, tree, flac=False)
        bucket = task_out / "len_for_bucket"
        write_bucket_csvs(bucket, tree, {s: [files[r.id] for r in rows if r.split == s]
                                          for s in SPLITS})
        config = {"downstream_expert": {"datarc": {
            "libri_root": str(tree), "bucket_file": str(bucket), "dict_path": str(char_dict()),
            "train": ["train"], "dev-clean": ["dev"], "test-clean": ["test"]}}}
        return config, [], {}

    return _prepare_from_manifest("asr", manifest, out, progress, {"dict": char_dict().read_text()},
                                  lambda rows: _check_text(rows, manifest), build)


def write_bucket_csvs(bucket: Path, root: Path, sets: dict[str, list[Path]]) -> None:
    """{bucket}/{set}.csv with s3prl's columns (,file_path,length), longest first."""
    import soundfile as sf

    bucket.mkdir(parents=True, exist_ok=True)
    for name, files in sets.items():
        lengths = sorted(((sf.info(str(f)).frames, str(f.relative_to(root))) for f in files), reverse=True)
        with open(bucket / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["", "file_path", "length"])
            for index, (length, rel) in enumerate(lengths):
                writer.writerow([index, rel, length])


def sid_speaker_ids(speakers: Iterable[str]) -> dict[str, str]:
    """Speaker -> VoxCeleb1-style id (id10001, id10002, ...) in sorted order of the names."""
    speakers = sorted(set(speakers))
    if len(speakers) > SID_CLASSES:
        raise UserError(f"{len(speakers)} speakers; s3prl's SID recipe has {SID_CLASSES} classes")
    return {s: f"id{SID_FIRST_ID + i}" for i, s in enumerate(speakers)}


def prepare_sid(manifest: str | os.PathLike, out: str | os.PathLike, progress: bool = False) -> PrepareReport:
    """SID from a manifest: {out}/sid/data/synth/wav/idXXXXX/{split}/{id}.wav + iden_split.txt."""
    out = Path(out).resolve()

    def check(rows):
        in_train = {r.speaker for r in rows if r.split == "train"}
        for row in rows:
            if row.speaker not in in_train:
                raise UserError(f"{manifest}:{row.line}: speaker {row.speaker!r} has no train "
                                "utterances, so SID cannot learn it; give it some or drop it")
        sid_speaker_ids(r.speaker for r in rows)

    def build(rows, task_out):
        ids = sid_speaker_ids(r.speaker for r in rows)
        split_index = {"train": 1, "dev": 2, "test": 3}
        lines = []
        for row in rows:
            rel = f"{ids[row.speaker]}/{row.split}/{row.id}.wav"
            link_or_copy(row.audio, task_out / "data" / "synth" / "wav" / rel)
            lines.append(f"{split_index[row.split]} {rel}")
        (task_out / "iden_split.txt").write_text("\n".join(lines) + "\n")
        (task_out / "speakers.json").write_text(json.dumps(ids, indent=1) + "\n")
        config = {"downstream_expert": {"datarc": {
            "file_path": str(task_out / "data"), "meta_data": str(task_out / "iden_split.txt")}}}
        return config, [f"{len(ids)} speakers -> {min(ids.values())}..{max(ids.values())}"], {}

    return _prepare_from_manifest("sid", manifest, out, progress, {}, check, build)


def emotion_labels(emotions: Iterable[str]) -> dict[str, int]:
    present = set(emotions)
    ordered = [e for e in EMOTION_ORDER if e in present] + sorted(present - set(EMOTION_ORDER))
    return {e: i for i, e in enumerate(ordered)}


def prepare_er(manifest: str | os.PathLike, out: str | os.PathLike, progress: bool = False) -> PrepareReport:
    """ER from a manifest: one fold (Session1) testing on the test split; s3prl carves dev from
    train+dev itself (valid_ratio)."""
    out = Path(out).resolve()

    def check(rows):
        labels = emotion_labels(r.emotion for r in rows)
        if len(labels) < 2:
            raise UserError(f"{manifest}: only emotion {list(labels)}; ER needs two or more")

    def build(rows, task_out):
        labels = emotion_labels(r.emotion for r in rows)
        meta = {"train": [], "test": []}
        for row in rows:
            rel = f"wav/{row.id}.wav"
            link_or_copy(row.audio, task_out / rel)
            meta["test" if row.split == "test" else "train"].append(
                {"path": rel, "label": row.emotion, "speaker": row.speaker})
        session = task_out / "meta_data" / "Session1"
        session.mkdir(parents=True)
        for part, items in meta.items():
            (session / f"{part}_meta_data.json").write_text(
                json.dumps({"labels": labels, "meta_data": items}, indent=1) + "\n")
        config = {"downstream_expert": {"datarc": {
            "root": str(task_out), "meta_data": str(task_out / "meta_data"), "test_fold": "fold1"}}}
        return config, [f"labels {labels}; fold1 = the test split"], {"folds": ["fold1"]}

    return _prepare_from_manifest("er", manifest, out, progress, {}, check, build)


def prepare_all(manifest: str | os.PathLike, out: str | os.PathLike,
                pr_vocab: str | os.PathLike | None = None,
                progress: bool = False, noisy_snr_db: float | None = None) -> dict[str, PrepareReport]:
    """All four layouts from one manifest (PR with its noisy test copy when `noisy_snr_db` is given)."""
    return {"pr": prepare_pr(manifest, out, vocab=pr_vocab, progress=progress, noisy_snr_db=noisy_snr_db),
            "asr": prepare_asr(manifest, out, progress=progress),
            "sid": prepare_sid(manifest, out, progress=progress),
            "er": prepare_er(manifest, out, progress=progress)}


def real_report(task: str, task_out: Path, sets: dict[str, list], durations: Sequence[float],
                 split_names: Sequence[str], up_to_date: bool, notes: list[str]) -> PrepareReport:
    summary, start = {}, 0
    for split, name in zip(split_names, sets):
        n = len(sets[name])
        summary[split] = (n, float(sum(durations[start:start + n])))
        start += n
    return PrepareReport(task, task_out, summary, up_to_date=up_to_date, notes=notes)


def finish_real(task: str, task_out: Path, key: str, config: dict, extra: dict,
                 write) -> bool:
    """Write a real-corpus task folder unless up to date; returns whether it was up to date."""
    if up_to_date(task_out, key) is not None:
        return True
    fresh_owned_dir(task_out, MARKER_NAME, "s3prl-ekd prepare")
    write()
    write_prepared(task_out, {"task": task, "fingerprint": key, "config": config, **extra})
    return False
