"""`s3prl-ekd prepare`: the on-disk layout each SUPERB recipe reads, built from a manifest alone.

`prepare_<task>(manifest, out, ...)` checks every audio file and label the task reads, then writes
OUT/<task>/ and OUT/<task>/prepared.json: "config" (merged by `superb` into the recipe config),
"fingerprint" (of the inputs; equal inputs -> nothing is rewritten), ER's "folds" and PR's
"noisy_test". The real corpora (LibriSpeech, VoxCeleb1, IEMOCAP) first become manifests in
OUT/manifests/. Audio is linked where the recipe reads it as it is; source data is only ever read.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from s3prl_ekd.errors import ConfigError, UserError
from s3prl_ekd.io.files import (
    atomic_write_json,
    claim_out,
    fingerprint,
    fresh_owned_dir,
)
from s3prl_ekd.io.resources import recipe_file
from s3prl_ekd.recipes import iemocap, librispeech, voxceleb1
from s3prl_ekd.recipes.manifest import (
    SPLITS,
    Row,
    check_audio_files,
    check_splits,
    read_manifest,
    write_manifest,
)

TASKS = ("pr", "asr", "sid", "er")
PREPARED_NAME = "prepared.json"
MARKER_NAME = ".s3prl_ekd_prepare"  # marks folders prepare made, the only ones it replaces
PREPARE_VERSION = 2
MANIFESTS_DIR = "manifests"  # OUT/manifests/<corpus>.jsonl: the real corpora's manifests
# The string keys each task needs on every manifest line; ER takes `fold` in place of `split`.
REQUIRED = {
    "pr": ("audio", "split", "phones", "speaker"),
    "asr": ("audio", "split", "text", "speaker"),
    "sid": ("audio", "split", "speaker"),
    "er": ("audio", "emotion", "speaker"),
}
# IEMOCAP's class order in s3prl's meta data; other emotions follow, sorted.
EMOTION_ORDER = ("neutral", "happy", "angry", "sad")
# s3prl's SID dataset finds files as {file_path}/*/wav/<listed path>: this folder's name is not read.
SID_PART = "synth"
NOISY_SPLIT = "test_noisy"


def espeak_phones() -> Path:
    """The synthetic corpus's phones (espeak-ng's), PR's vocabulary for a manifest by default."""
    return recipe_file("pr", "espeak_en_phones.txt")


def char_dict() -> Path:
    return recipe_file("asr", "char.dict")


def read_symbols(path: Path) -> list[str]:
    """One token per line (the first field), e.g. a phone vocabulary or a fairseq dict."""
    if not path.is_file():
        raise ConfigError(f"{path}: vocabulary file not found")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def asr_characters() -> set[str]:
    """Characters the ASR recipe's char.dict can spell; "|" stands for the space."""
    return {" " if s == "|" else s for s in read_symbols(char_dict())}


@dataclass
class PrepareReport:
    """What prepare wrote (or found up to date) for one task."""

    task: str
    out: Path
    splits: dict[str, tuple[int, float]]  # split (or ER's foldN) -> (utterances, seconds)
    up_to_date: bool = False
    notes: list[str] = field(default_factory=list)
    manifest: Path | None = None

    def __str__(self) -> str:
        state = "up to date" if self.up_to_date else "written"
        source = f" from {self.manifest}" if self.manifest else ""
        parts = ", ".join(f"{s} {n} utts / {sec / 60:.1f} min" for s, (n, sec) in self.splits.items())
        lines = [f"{self.task}: {self.out} ({state}){source}: {parts}"] + [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def file_stamps(paths: Iterable[Path]) -> list:
    """(path, size, mtime) of large files (audio): cheap to read, changes when a file is replaced."""
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def link(source: Path, target: Path) -> None:
    """Make `target` show `source` without copying it: a hard link, or a symbolic one where a hard
    link cannot be made (another file system, a file of another owner)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        os.symlink(source, target)


def split_summary(rows: Sequence[Row], durations: Sequence[float], by_fold: bool = False
                  ) -> dict[str, tuple[int, float]]:
    """split (or foldN) -> (utterances, seconds)."""
    groups = ([f"fold{f}" for f in sorted({r.fold for r in rows})] if by_fold else list(SPLITS))
    keys = [f"fold{r.fold}" if by_fold else r.split for r in rows]
    summary = {}
    for group in groups:
        picked = [d for key, d in zip(keys, durations) if key == group]
        summary[group] = (len(picked), float(sum(picked)))
    return summary


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

    flac=True gives every utterance a .flac file (the PR loader globs *.flac only): flac sources
    are linked, others converted to 16-bit flac; otherwise every source is linked as it is.
    Returns manifest id -> audio file in the tree.
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
        if flac and row.audio.suffix.lower() != ".flac":
            files[row.id] = folder / f"{utt}.flac"
            wav, rate = sf.read(str(row.audio), dtype="int16")
            sf.write(str(files[row.id]), wav, rate, format="FLAC", subtype="PCM_16")
        else:
            files[row.id] = folder / f"{utt}{row.audio.suffix.lower()}"
            link(row.audio, files[row.id])
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


Build = Callable[[Sequence[Row], Path], tuple[dict, list[str], dict]]


def check_prepare_out(out: Path, force: bool = False) -> None:
    """Refuse an OUT that holds what prepare did not write, unless `force`. OUT is prepare's when
    new, empty, marked, or holding only folders prepare made (task folders and manifests/ carry
    the marker)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and not force and not (out / MARKER_NAME).is_file() and \
            not all(p.is_dir() and (p / MARKER_NAME).is_file() for p in out.iterdir()):
        raise UserError(f"{out}: holds files that `s3prl-ekd prepare` did not write; choose another --out "
                        "or pass --force to write into it; nothing was changed")


def claim_prepare_out(out: Path, force: bool = False) -> None:
    """`check_prepare_out`, then mark OUT as prepare's."""
    check_prepare_out(out, force)
    if not (out / MARKER_NAME).is_file():
        claim_out(out, MARKER_NAME, "s3prl-ekd prepare")


def _prepare(task: str, manifest: str | os.PathLike, out: Path, progress: bool, options: dict,
             check: Callable[[Sequence[Row]], None], build: Build) -> PrepareReport:
    """The one flow of every task and corpus: read the manifest, `check` its labels and check its
    audio, and unless the task folder already holds these inputs' layout, write it with
    `build(rows, empty task folder) -> (config, notes, extra prepared.json keys)`.

    The fingerprint covers what the task reads of each line (so a label another task needs can
    change without rebuilding this one), each audio file's size and time stamp, and `options`.
    """
    manifest = Path(manifest).resolve()
    rows = read_manifest(manifest, REQUIRED[task])
    check(rows)
    durations = check_audio_files([(f"{manifest}:{r.line}", r.audio) for r in rows], progress)
    read = dict.fromkeys(("id", "audio", "split", "fold", *REQUIRED[task]))
    key = fingerprint(PREPARE_VERSION, task, str(manifest),
                      [{name: getattr(r, name) for name in read} for r in rows],
                      file_stamps(r.audio for r in rows), options)
    claim_prepare_out(out)
    task_out = out / task
    summary = split_summary(rows, durations, by_fold=task == "er" and _has_folds(rows))
    prepared = task_out / PREPARED_NAME
    if prepared.is_file() and (info := json.loads(prepared.read_text())).get("fingerprint") == key:
        return PrepareReport(task, task_out, summary, up_to_date=True, notes=info.get("notes", []),
                             manifest=manifest)
    config, notes, extra = build(rows, fresh_owned_dir(task_out, MARKER_NAME, "s3prl-ekd prepare"))
    atomic_write_json(prepared, {"task": task, "source": str(manifest), "fingerprint": key, "config": config,
                                 "splits": summary, "notes": notes, **extra})
    return PrepareReport(task, task_out, summary, notes=notes, manifest=manifest)


def _check_phones(rows: Sequence[Row], vocab: Path, manifest) -> None:
    known = set(read_symbols(vocab))
    for row in rows:
        unknown = sorted(set(row.phones.split()) - known)
        if unknown:
            raise UserError(f"{manifest}:{row.line}: phones {unknown} are not in the PR vocabulary "
                            f"{vocab}; add them there or pass another vocabulary (--pr-vocab)")


def _check_text(rows: Sequence[Row], manifest) -> None:
    allowed = asr_characters()
    for row in rows:
        bad = sorted(set(row.text.upper()) - allowed)
        if bad:
            raise UserError(f"{manifest}:{row.line}: text has characters {bad} that the ASR "
                            f"dictionary {char_dict()} cannot spell; write numbers as words and "
                            "drop punctuation other than the apostrophe")


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
    """PR: a flac tree with exact phone transcripts and the phone vocabulary (default: espeak-ng's);
    with `noisy_snr_db`, also a copy of the test split with white noise at that SNR (NOISY_SPLIT)."""
    out, vocab = Path(out).resolve(), Path(vocab or espeak_phones()).resolve()

    def check(rows):
        check_splits(rows, manifest, "pr")
        _check_phones(rows, vocab, manifest)

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

    return _prepare("pr", manifest, out, progress,
                    {"vocab": str(vocab), "vocab_text": vocab.read_text(), "noisy_snr_db": noisy_snr_db},
                    check, build)


def prepare_asr(manifest: str | os.PathLike, out: str | os.PathLike, progress: bool = False) -> PrepareReport:
    """ASR: a LibriSpeech-style tree of the audio (linked) and transcripts, and bucket CSVs."""
    out = Path(out).resolve()

    def check(rows):
        check_splits(rows, manifest, "asr")
        _check_text(rows, manifest)

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

    return _prepare("asr", manifest, out, progress, {"dict": char_dict().read_text()}, check, build)


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
    """Speaker -> VoxCeleb1 id, from which s3prl derives the label (int(id[2:]) - 10001).

    When every speaker is a VoxCeleb1 id, each keeps its own (VoxCeleb1's labels); otherwise the
    names are numbered id10001, id10002, ... in sorted order."""
    speakers = sorted(set(speakers))
    if all(voxceleb1.is_speaker_id(s) for s in speakers):
        return {s: s for s in speakers}
    if len(speakers) > voxceleb1.CLASSES:
        raise UserError(f"{len(speakers)} speakers; s3prl's SID recipe has {voxceleb1.CLASSES} classes")
    return {s: f"id{voxceleb1.FIRST_ID + i}" for i, s in enumerate(speakers)}


def prepare_sid(manifest: str | os.PathLike, out: str | os.PathLike, progress: bool = False) -> PrepareReport:
    """SID: {out}/sid/data/synth/wav/idXXXXX/{split}/{id}.wav (linked) and iden_split.txt."""
    out = Path(out).resolve()

    def check(rows):
        check_splits(rows, manifest, "sid")
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
            rel = f"{ids[row.speaker]}/{row.split}/{row.id}{row.audio.suffix.lower()}"
            link(row.audio, task_out / "data" / SID_PART / "wav" / rel)
            lines.append(f"{split_index[row.split]} {rel}")
        (task_out / "iden_split.txt").write_text("\n".join(lines) + "\n")
        (task_out / "speakers.json").write_text(json.dumps(ids, indent=1) + "\n")
        config = {"downstream_expert": {"datarc": {
            "file_path": str(task_out / "data"), "meta_data": str(task_out / "iden_split.txt")}}}
        return config, [f"{len(ids)} speakers -> {min(ids.values())}..{max(ids.values())}"], {}

    return _prepare("sid", manifest, out, progress, {}, check, build)


def emotion_labels(emotions: Iterable[str]) -> dict[str, int]:
    present = set(emotions)
    ordered = [e for e in EMOTION_ORDER if e in present] + sorted(present - set(EMOTION_ORDER))
    return {e: i for i, e in enumerate(ordered)}


def _has_folds(rows: Sequence[Row]) -> bool:
    return any(r.fold is not None for r in rows)


def prepare_er(manifest: str | os.PathLike, out: str | os.PathLike, progress: bool = False) -> PrepareReport:
    """ER: s3prl's meta data, meta_data/SessionN/{train,test}_meta_data.json, per fold N.

    A manifest with folds (IEMOCAP: sessions) gives one fold per value, testing on its lines and
    training on all others; one without gives fold1, testing on the test split and training on
    train and dev. Either way s3prl carves its dev set out of the training lines (valid_ratio).
    """
    out = Path(out).resolve()

    def check(rows):
        if _has_folds(rows):
            without = next((r for r in rows if r.fold is None), None)
            if without is not None:
                raise UserError(f"{manifest}:{without.line}: no 'fold', while other lines have one; "
                                "ER needs a fold on every line or on none")
            if len({r.fold for r in rows}) < 2:
                raise UserError(f"{manifest}: every line is in fold {rows[0].fold}; ER holds out each "
                                "fold in turn and needs two or more")
        else:
            check_splits(rows, manifest, "er", ("train", "test"))
        labels = emotion_labels(r.emotion for r in rows)
        if len(labels) < 2:
            raise UserError(f"{manifest}: only emotion {list(labels)}; ER needs two or more")

    def build(rows, task_out):
        labels = emotion_labels(r.emotion for r in rows)
        items = {}
        for row in rows:
            rel = f"wav/{row.id}{row.audio.suffix.lower()}"
            link(row.audio, task_out / rel)
            items[row.id] = {"path": rel, "label": row.emotion, "speaker": row.speaker}
        if _has_folds(rows):
            folds = sorted({r.fold for r in rows})
            held_out = {n: {r.id for r in rows if r.fold == n} for n in folds}
            note = f"{len(folds)} folds, fold N testing on the lines of fold N"
        else:
            folds, held_out = [1], {1: {r.id for r in rows if r.split == "test"}}
            note = "fold1 = the test split"
        for n in folds:
            session = task_out / "meta_data" / f"Session{n}"
            session.mkdir(parents=True)
            parts = {"train": [items[r.id] for r in rows if r.id not in held_out[n]],
                     "test": [items[r.id] for r in rows if r.id in held_out[n]]}
            for part, meta in parts.items():
                (session / f"{part}_meta_data.json").write_text(
                    json.dumps({"labels": labels, "meta_data": meta}, indent=1) + "\n")
        names = [f"fold{n}" for n in folds]
        config = {"downstream_expert": {"datarc": {
            "root": str(task_out), "meta_data": str(task_out / "meta_data"), "test_fold": names[0]}}}
        return config, [f"labels {labels}; {note}"], {"folds": names}

    return _prepare("er", manifest, out, progress, {}, check, build)


def prepare_all(manifest: str | os.PathLike, out: str | os.PathLike,
                pr_vocab: str | os.PathLike | None = None,
                progress: bool = False, noisy_snr_db: float | None = None) -> dict[str, PrepareReport]:
    """All four layouts from one manifest (PR with its noisy test copy when `noisy_snr_db` is given)."""
    return {"pr": prepare_pr(manifest, out, vocab=pr_vocab, progress=progress, noisy_snr_db=noisy_snr_db),
            "asr": prepare_asr(manifest, out, progress=progress),
            "sid": prepare_sid(manifest, out, progress=progress),
            "er": prepare_er(manifest, out, progress=progress)}


@dataclass(frozen=True)
class Corpora:
    """Where the utterances come from: one manifest for every task, or the real corpora
    (LibriSpeech for PR and ASR, VoxCeleb1 for SID, IEMOCAP for ER)."""

    manifest: Path | None = None
    librispeech: Path | None = None
    lexicon: tuple[Path, ...] = ()  # LibriSpeech's word -> phones lexicon(s); default: *lexicon*.txt in it
    voxceleb1: Path | None = None
    split_file: Path | None = None  # VoxCeleb1's identification split; default: iden_split.txt in it
    iemocap: Path | None = None

    def real(self) -> dict[str, Path | None]:
        return {"librispeech": self.librispeech, "voxceleb1": self.voxceleb1, "iemocap": self.iemocap}


CORPUS_OF_TASK = {"pr": "librispeech", "asr": "librispeech", "sid": "voxceleb1", "er": "iemocap"}


def corpus_manifests(tasks: Sequence[str], corpora: Corpora, out: str | os.PathLike,
                     force: bool = False) -> dict[str, Path]:
    """task -> the manifest to prepare it from. The real corpora the tasks need are each turned
    into OUT/manifests/<corpus>.jsonl (rewritten only when its lines change), all of them read and
    checked before the first is written; `force` as for `prepare_tasks`."""
    if corpora.manifest is not None:
        if any(corpora.real().values()) or corpora.lexicon or corpora.split_file:
            raise UserError("give either --manifest or the real corpora (with --lexicon, --split-file), "
                            "not both")
        return {task: Path(corpora.manifest) for task in tasks}
    needed = []
    for task in tasks:
        name = CORPUS_OF_TASK[task]
        if corpora.real()[name] is None:
            raise UserError(f"prepare {task}: pass --manifest or --{name} DIR")
        needed += [name] if name not in needed else []
    rows = {}
    if "librispeech" in needed:
        lexicon = librispeech.find_lexicon(corpora.librispeech, corpora.lexicon)
        if "pr" in tasks and not lexicon:
            raise UserError(f"{corpora.librispeech}: no lexicon given and none (*lexicon*.txt) in it; PR "
                            "needs one: pass --lexicon librispeech-lexicon.txt (OpenSLR resource 11)")
        rows["librispeech"] = librispeech.manifest_rows(corpora.librispeech, lexicon)
    if "voxceleb1" in needed:
        rows["voxceleb1"] = voxceleb1.manifest_rows(corpora.voxceleb1, corpora.split_file)
    if "iemocap" in needed:
        rows["iemocap"] = iemocap.manifest_rows(corpora.iemocap)
    folder = Path(out).resolve() / MANIFESTS_DIR
    claim_prepare_out(folder.parent, force)
    claim_prepare_out(folder)
    paths = {name: write_manifest(folder / f"{name}.jsonl", records) for name, records in rows.items()}
    return {task: paths[CORPUS_OF_TASK[task]] for task in tasks}


def prepare_tasks(tasks: Sequence[str], corpora: Corpora, out: str | os.PathLike,
                  pr_vocab: str | os.PathLike | None = None, noisy_snr_db: float | None = None,
                  progress: bool = False, force: bool = False) -> list[PrepareReport]:
    """Prepare `tasks` from a manifest or from the real corpora (through their manifests). PR's
    vocabulary defaults to the corpus's phones: espeak-ng's for a manifest, ARPAbet for LibriSpeech.
    `force` allows an OUT holding other files (prepare then writes only its own folders there)."""
    out = Path(out).resolve()
    check_prepare_out(out, force)
    manifests = corpus_manifests(tasks, corpora, out, force)
    if force:  # marked, so that each task's own check lets it write beside the other files
        claim_prepare_out(out, force)
    if pr_vocab is None and corpora.manifest is None:
        pr_vocab = librispeech.phone_vocabulary()
    reports = []
    for task in tasks:
        if task == "pr":
            reports.append(prepare_pr(manifests[task], out, vocab=pr_vocab, progress=progress,
                                      noisy_snr_db=noisy_snr_db))
        else:
            prepare = {"asr": prepare_asr, "sid": prepare_sid, "er": prepare_er}[task]
            reports.append(prepare(manifests[task], out, progress=progress))
    return reports


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="make the PR/ASR/SID/ER recipe layouts from a "
                                              "manifest or the real corpora, checking every file")
    p.add_argument("task", choices=[*TASKS, "all"])
    p.add_argument("--out", required=True, help="output folder (one sub-folder per task; the real "
                                                "corpora's manifests in manifests/)")
    p.add_argument("--manifest", help="manifest.jsonl (e.g. from `s3prl-ekd corpus synth`)")
    p.add_argument("--librispeech", help="LibriSpeech root holding train-clean-100, dev-clean, test-clean (pr, asr)")
    p.add_argument("--lexicon", action="append", default=[], help="word lexicon for pr on LibriSpeech "
                                                                  "(default: *lexicon*.txt in its root)")
    p.add_argument("--voxceleb1", help="VoxCeleb1 root holding dev/wav and test/wav (sid)")
    p.add_argument("--split-file", help="VoxCeleb1 identification split (default: iden_split.txt in its root)")
    p.add_argument("--iemocap", help="IEMOCAP_full_release root (er)")
    p.add_argument("--pr-vocab", help="phone vocabulary for pr (default: the corpus's phone set)")
    p.add_argument("--force", action="store_true", help="write into an --out that holds other files "
                                                         "(only prepare's own folders there are replaced)")
    p.add_argument("--noisy-snr", type=float, help="pr: also a test copy with white noise at this SNR in dB "
                                                   "(superb then reports pr_noisy)")

    def _prepare(args) -> int:
        def path(value):
            return None if value is None else Path(value)

        corpora = Corpora(manifest=path(args.manifest), librispeech=path(args.librispeech),
                          lexicon=tuple(map(Path, args.lexicon)), voxceleb1=path(args.voxceleb1),
                          split_file=path(args.split_file), iemocap=path(args.iemocap))
        tasks = TASKS if args.task == "all" else (args.task,)
        for report in prepare_tasks(tasks, corpora, args.out, args.pr_vocab, args.noisy_snr, progress=True,
                                     force=args.force):
            print(report)
        return 0

    p.set_defaults(func=_prepare)
