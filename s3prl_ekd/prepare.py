"""Turn a manifest, or a real corpus, into the on-disk layout each SUPERB recipe reads.

`prepare_<task>` checks every audio file and label, writes OUT/<task>/ and OUT/<task>/prepared.json,
whose "config" part `superb` merges into the recipe config. Source data is only ever read;
re-running with unchanged inputs does nothing.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from s3prl_ekd.errors import AudioError, ConfigError, UserError
from s3prl_ekd.outputs import fingerprint, fresh_owned_dir

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = PROJECT_ROOT / "downstream_recipes"
ESPEAK_PHONES = RECIPES_DIR / "pr" / "espeak_en_phones.txt"
ARPABET_PHONES = RECIPES_DIR / "pr" / "arpabet_phones.txt"
CHAR_DICT = RECIPES_DIR / "asr" / "char.dict"

TASKS = ("pr", "asr", "sid", "er")
SPLITS = ("train", "dev", "test")
PREPARED_NAME = "prepared.json"
MARKER_NAME = ".s3prl_ekd_prepare"  # marks folders prepare made, the only ones it replaces
PREPARE_VERSION = 1
SAMPLE_RATE = 16000
MIN_SECONDS = 0.1
LIBRISPEECH_SETS = ("train-clean-100", "dev-clean", "test-clean")
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


# ---------------------------------------------------------------------------- manifest

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


# ---------------------------------------------------------------------------- audio checks

def check_audio_files(files: Sequence[tuple[str, Path]], progress: bool = False) -> list[float]:
    """Durations in seconds of `files` ((where, path) pairs), or one AudioError listing every
    file that is missing, unreadable, not 16 kHz mono, or shorter than MIN_SECONDS."""
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
        durations.append(info.duration)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AudioError(f"{len(problems)} of {len(files)} audio files cannot be used:\n  {shown}{more}")
    return durations


# ---------------------------------------------------------------------------- outputs

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


def _file_stamps(paths: Iterable[Path]) -> list:
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def _up_to_date(out: Path, key: str) -> dict | None:
    prepared = out / PREPARED_NAME
    if prepared.is_file():
        info = json.loads(prepared.read_text())
        if info.get("fingerprint") == key:
            return info
    return None


def _write_prepared(out: Path, info: dict) -> None:
    tmp = out / (PREPARED_NAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str) + "\n")
    tmp.replace(out / PREPARED_NAME)


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def _split_summary(rows: Sequence[Row], durations: Sequence[float]) -> dict[str, tuple[int, float]]:
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
    return {" " if s == "|" else s for s in read_symbols(CHAR_DICT)}


# ---------------------------------------------------------------------------- manifest -> layouts

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
            _link_or_copy(row.audio, files[row.id])
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
                               _file_stamps(r.audio for r in rows), options)
    task_out = out / task
    summary = _split_summary(rows, durations)
    if (info := _up_to_date(task_out, key)) is not None:
        return PrepareReport(task, task_out, summary, up_to_date=True, notes=info.get("notes", []))
    config, notes, extra = build(rows, fresh_owned_dir(task_out, MARKER_NAME, "s3prl-ekd prepare"))
    _write_prepared(task_out, {"task": task, "source": str(Path(manifest).resolve()),
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
                            f"dictionary {CHAR_DICT} cannot spell; write numbers as words and "
                            "drop punctuation other than the apostrophe")


def prepare_pr(manifest: str | os.PathLike, out: str | os.PathLike, vocab: str | os.PathLike | None = None,
               progress: bool = False) -> PrepareReport:
    """PR from a manifest: flac tree + exact phone transcripts + the espeak-ng phone vocabulary."""
    out, vocab = Path(out).resolve(), Path(vocab or ESPEAK_PHONES).resolve()

    def build(rows, task_out):
        tree = task_out / "librispeech"
        write_librispeech_tree(rows, tree, flac=True)
        config = {"downstream_expert": {
            "corpus": {"path": str(tree), "train": ["train"], "dev": ["dev"], "test": ["test"],
                       "lexicon": [], "transcripts": "phones"},
            "text": {"vocab_file": str(vocab)}}}
        return config, [f"phone vocabulary: {vocab} ({len(read_symbols(vocab))} phones)"], {}

    return _prepare_from_manifest("pr", manifest, out, progress,
                                  {"vocab": str(vocab), "vocab_text": vocab.read_text()},
                                  lambda rows: _check_phones(rows, vocab, manifest), build)


def prepare_asr(manifest: str | os.PathLike, out: str | os.PathLike, progress: bool = False) -> PrepareReport:
    """ASR from a manifest: LibriSpeech-style tree of the audio + transcripts + bucket CSVs."""
    out = Path(out).resolve()

    def build(rows, task_out):
        tree = task_out / "librispeech"
        files = write_librispeech_tree(rows, tree, flac=False)
        bucket = task_out / "len_for_bucket"
        _write_bucket_csvs(bucket, tree, {s: [files[r.id] for r in rows if r.split == s]
                                          for s in SPLITS})
        config = {"downstream_expert": {"datarc": {
            "libri_root": str(tree), "bucket_file": str(bucket), "dict_path": str(CHAR_DICT),
            "train": ["train"], "dev-clean": ["dev"], "test-clean": ["test"]}}}
        return config, [], {}

    return _prepare_from_manifest("asr", manifest, out, progress, {"dict": CHAR_DICT.read_text()},
                                  lambda rows: _check_text(rows, manifest), build)


def _write_bucket_csvs(bucket: Path, root: Path, sets: dict[str, list[Path]]) -> None:
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
            _link_or_copy(row.audio, task_out / "data" / "synth" / "wav" / rel)
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
            _link_or_copy(row.audio, task_out / rel)
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
                progress: bool = False) -> dict[str, PrepareReport]:
    """All four layouts from one manifest."""
    return {"pr": prepare_pr(manifest, out, vocab=pr_vocab, progress=progress),
            "asr": prepare_asr(manifest, out, progress=progress),
            "sid": prepare_sid(manifest, out, progress=progress),
            "er": prepare_er(manifest, out, progress=progress)}


# ---------------------------------------------------------------------------- real corpora

def _librispeech_files(root: Path, sets: Sequence[str]) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise UserError(f"{root}: LibriSpeech folder not found")
    files = {}
    for name in sets:
        found = sorted((root / name).rglob("*.flac"))
        if not found:
            raise UserError(f"{root / name}: no .flac files; --librispeech must hold "
                            f"{', '.join(sets)} (download them from OpenSLR resource 12)")
        files[name] = found
    return files


def _librispeech_transcripts(files: Sequence[Path]) -> dict[Path, str]:
    """flac -> its transcript line, or an error naming the flac with none."""
    tables: dict[Path, dict[str, str]] = {}
    out = {}
    for flac in files:
        utt = flac.name.split(".")[0]
        table = flac.parent / f"{utt.rsplit('-', 1)[0]}.trans.txt"
        if table not in tables:
            tables[table] = {}
            if table.is_file():
                for line in table.read_text().splitlines():
                    key, _, text = line.strip().partition(" ")
                    tables[table][key] = text
        if utt not in tables[table]:
            raise UserError(f"{flac}: no transcript line for {utt} in {table}")
        out[flac] = tables[table][utt]
    return out


def _real_report(task: str, task_out: Path, sets: dict[str, list], durations: Sequence[float],
                 split_names: Sequence[str], up_to_date: bool, notes: list[str]) -> PrepareReport:
    summary, start = {}, 0
    for split, name in zip(split_names, sets):
        n = len(sets[name])
        summary[split] = (n, float(sum(durations[start:start + n])))
        start += n
    return PrepareReport(task, task_out, summary, up_to_date=up_to_date, notes=notes)


def _finish_real(task: str, task_out: Path, key: str, config: dict, extra: dict,
                 write) -> bool:
    """Write a real-corpus task folder unless up to date; returns whether it was up to date."""
    if _up_to_date(task_out, key) is not None:
        return True
    fresh_owned_dir(task_out, MARKER_NAME, "s3prl-ekd prepare")
    write()
    _write_prepared(task_out, {"task": task, "fingerprint": key, "config": config, **extra})
    return False


def prepare_pr_librispeech(librispeech: str | os.PathLike, out: str | os.PathLike,
                           lexicon: Sequence[str | os.PathLike] = (), sets: Sequence[str] = LIBRISPEECH_SETS,
                           vocab: str | os.PathLike | None = None, progress: bool = False) -> PrepareReport:
    """PR on LibriSpeech (SUPERB): words -> ARPAbet phones through a lexicon."""
    from s3prl_ekd.recipes_ctc_corpus import read_lexicon

    root, out = Path(librispeech).resolve(), Path(out).resolve()
    vocab = Path(vocab or ARPABET_PHONES).resolve()
    lexicon = [Path(p).resolve() for p in lexicon] or sorted(root.glob("*lexicon*.txt"))
    if not lexicon:
        raise UserError(f"{root}: no lexicon given and none (*lexicon*.txt) in it; pass --lexicon "
                        "librispeech-lexicon.txt (OpenSLR resource 11)")
    files = _librispeech_files(root, sets)
    all_files = [f for name in sets for f in files[name]]
    durations = check_audio_files([(name, f) for name in sets for f in files[name]], progress)
    words = read_lexicon(lexicon)
    known = set(read_symbols(vocab))
    for word, phones in words.items():
        if set(phones) - known:
            raise UserError(f"lexicon word {word!r}: phones {sorted(set(phones) - known)} are not in "
                            f"{vocab}")
    for flac, text in _librispeech_transcripts(all_files).items():
        missing = [w for w in text.split() if w not in words]
        if missing:
            raise UserError(f"{flac}: words {missing} are not in the lexicon {[str(p) for p in lexicon]}")
    config = {"downstream_expert": {
        "corpus": {"path": str(root), "train": [sets[0]], "dev": [sets[1]], "test": [sets[2]],
                   "lexicon": [str(p) for p in lexicon], "transcripts": "words"},
        "text": {"vocab_file": str(vocab)}}}
    key = fingerprint(PREPARE_VERSION, "pr-librispeech", config, _file_stamps(lexicon), len(all_files))
    task_out = out / "pr"
    up = _finish_real("pr", task_out, key, config, {"source": str(root)}, lambda: None)
    return _real_report("pr", task_out, files, durations, SPLITS, up,
                        [f"lexicon {[str(p) for p in lexicon]}, vocabulary {vocab}"])


def prepare_asr_librispeech(librispeech: str | os.PathLike, out: str | os.PathLike,
                            sets: Sequence[str] = LIBRISPEECH_SETS, progress: bool = False) -> PrepareReport:
    """ASR on LibriSpeech (SUPERB): bucket CSVs for train-clean-100 / dev-clean / test-clean."""
    root, out = Path(librispeech).resolve(), Path(out).resolve()
    files = _librispeech_files(root, sets)
    all_files = [f for name in sets for f in files[name]]
    durations = check_audio_files([(name, f) for name in sets for f in files[name]], progress)
    allowed = asr_characters()
    for flac, text in _librispeech_transcripts(all_files).items():
        if set(text) - allowed:
            raise UserError(f"{flac}: transcript has characters {sorted(set(text) - allowed)} "
                            f"that {CHAR_DICT} cannot spell")
    task_out = out / "asr"
    bucket = task_out / "len_for_bucket"
    config = {"downstream_expert": {"datarc": {
        "libri_root": str(root), "bucket_file": str(bucket), "dict_path": str(CHAR_DICT),
        "train": [sets[0]], "dev-clean": [sets[1]], "test-clean": [sets[2]]}}}
    key = fingerprint(PREPARE_VERSION, "asr-librispeech", config, _file_stamps(all_files))
    up = _finish_real("asr", task_out, key, config, {"source": str(root)},
                      lambda: _write_bucket_csvs(bucket, root, files))
    return _real_report("asr", task_out, files, durations, SPLITS, up, [])


def prepare_sid_voxceleb1(voxceleb1: str | os.PathLike, out: str | os.PathLike,
                          split_file: str | os.PathLike | None = None,
                          progress: bool = False) -> PrepareReport:
    """SID on VoxCeleb1 (SUPERB): checks every file the identification split lists."""
    root, out = Path(voxceleb1).resolve(), Path(out).resolve()
    if split_file is None:
        candidates = [root / "iden_split.txt", root / "veri_test_class.txt"]
        split_file = next((c for c in candidates if c.is_file()), None)
        if split_file is None:
            raise UserError(f"{root}: no iden_split.txt in it; pass --split-file (VoxCeleb1's "
                            "identification split, lines like `1 id10001/1zcIwhmdeo4/00001.wav`)")
    split_file = Path(split_file).resolve()
    found = {}
    for part in sorted(p for p in root.iterdir() if (p / "wav").is_dir()):
        for wav in (part / "wav").rglob("*.wav"):
            found.setdefault(str(wav.relative_to(part / "wav")), wav)
    if not found:
        raise UserError(f"{root}: no */wav/idXXXXX/*/*.wav files; expected VoxCeleb1's dev/wav and test/wav")
    sets: dict[str, list[Path]] = {"1": [], "2": [], "3": []}
    for number, line in enumerate(split_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[0] not in sets:
            raise UserError(f"{split_file}:{number}: expected `1|2|3 idXXXXX/VIDEO/UTT.wav`")
        speaker = fields[1].split("/")[0]
        if not re.fullmatch(r"id\d{5}", speaker) or not 0 <= int(speaker[2:]) - SID_FIRST_ID < SID_CLASSES:
            raise UserError(f"{split_file}:{number}: speaker {speaker!r} is outside id10001..id11251")
        if fields[1] not in found:
            raise UserError(f"{split_file}:{number}: {fields[1]} not found under {root}/*/wav/")
        sets[fields[0]].append(found[fields[1]])
    durations = check_audio_files([(str(split_file), f) for key in "123" for f in sets[key]], progress)
    config = {"downstream_expert": {"datarc": {"file_path": str(root), "meta_data": str(split_file)}}}
    task_out = out / "sid"
    key = fingerprint(PREPARE_VERSION, "sid-voxceleb1", config, _file_stamps([split_file]), len(found))
    up = _finish_real("sid", task_out, key, config, {"source": str(root)}, lambda: None)
    return _real_report("sid", task_out, sets, durations, SPLITS, up, [f"split file {split_file}"])


def prepare_er_iemocap(iemocap: str | os.PathLike, out: str | os.PathLike,
                       progress: bool = False) -> PrepareReport:
    """ER on IEMOCAP (SUPERB): s3prl's own meta-data builder, one fold per held-out session."""
    from s3prl.downstream.emotion.IEMOCAP_preprocess import preprocess

    root, out = Path(iemocap).resolve(), Path(out).resolve()
    sessions = sorted(p.name for p in root.glob("Session*") if p.is_dir()) if root.is_dir() else []
    if not sessions:
        raise UserError(f"{root}: no Session1..Session5 folders; --iemocap must be IEMOCAP_full_release")
    if "Session" in str(root):
        # s3prl cuts every wav path at the first "Session" in it.
        raise UserError(f"{root}: the path above IEMOCAP's Session folders contains 'Session'; "
                        "move or link the corpus elsewhere")
    task_out = out / "er"
    key = fingerprint(PREPARE_VERSION, "er-iemocap", str(root), sessions)
    folds = [f"fold{s.removeprefix('Session')}" for s in sessions]
    config = {"downstream_expert": {"datarc": {
        "root": str(root), "meta_data": str(task_out / "meta_data"), "test_fold": folds[0]}}}

    def write():
        for i, session in enumerate(sessions):
            folder = task_out / "meta_data" / session
            folder.mkdir(parents=True)
            preprocess(str(root), sessions[:i] + sessions[i + 1:], str(folder / "train_meta_data.json"))
            preprocess(str(root), [session], str(folder / "test_meta_data.json"))

    up = _finish_real("er", task_out, key, config, {"source": str(root), "folds": folds}, write)
    first = json.loads((task_out / "meta_data" / sessions[0] / "train_meta_data.json").read_text())
    second = json.loads((task_out / "meta_data" / sessions[0] / "test_meta_data.json").read_text())
    items = first["meta_data"] + second["meta_data"]
    if not items:
        raise UserError(f"{root}: no labelled utterances found (dialog/EmoEvaluation + sentences/wav)")
    durations = check_audio_files([(str(task_out), root / item["path"]) for item in items], progress)
    parts = {"train": first["meta_data"], "test": second["meta_data"]}
    return _real_report("er", task_out, parts, durations, ("train", "test"), up,
                        [f"folds {folds}, labels {first['labels']}"])


# ---------------------------------------------------------------------------- CLI

def register_cli(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="make the PR/ASR/SID/ER recipe layouts from a "
                                              "manifest or the real corpora, checking every file")
    p.add_argument("task", choices=[*TASKS, "all"])
    p.add_argument("--out", required=True, help="output folder (one sub-folder per task)")
    p.add_argument("--manifest", help="manifest.jsonl (e.g. from `s3prl-ekd corpus synth`)")
    p.add_argument("--librispeech", help="LibriSpeech root (pr, asr)")
    p.add_argument("--lexicon", action="append", default=[], help="word lexicon for pr on LibriSpeech")
    p.add_argument("--voxceleb1", help="VoxCeleb1 root holding dev/wav and test/wav (sid)")
    p.add_argument("--split-file", help="VoxCeleb1 identification split (iden_split.txt)")
    p.add_argument("--iemocap", help="IEMOCAP_full_release root (er)")
    p.add_argument("--pr-vocab", help="phone vocabulary for pr (default: the recipe's)")

    def _prepare(args) -> int:
        for report in _dispatch(args):
            print(report)
        return 0

    p.set_defaults(func=_prepare)


def _dispatch(args) -> list[PrepareReport]:
    real = {"librispeech": args.librispeech, "voxceleb1": args.voxceleb1, "iemocap": args.iemocap}
    if args.manifest:
        if any(real.values()):
            raise UserError("give either --manifest or the real corpus folders, not both")
        if args.task == "all":
            return list(prepare_all(args.manifest, args.out, args.pr_vocab, progress=True).values())
        if args.task == "pr":
            return [prepare_pr(args.manifest, args.out, vocab=args.pr_vocab, progress=True)]
        builders = {"asr": prepare_asr, "sid": prepare_sid, "er": prepare_er}
        return [builders[args.task](args.manifest, args.out, progress=True)]
    wanted = TASKS if args.task == "all" else (args.task,)
    needs = {"pr": "librispeech", "asr": "librispeech", "sid": "voxceleb1", "er": "iemocap"}
    reports = []
    for task in wanted:
        source = real[needs[task]]
        if source is None:
            raise UserError(f"prepare {task}: pass --manifest or --{needs[task]} DIR")
        if task == "pr":
            reports.append(prepare_pr_librispeech(source, args.out, args.lexicon,
                                                  vocab=args.pr_vocab, progress=True))
        elif task == "asr":
            reports.append(prepare_asr_librispeech(source, args.out, progress=True))
        elif task == "sid":
            reports.append(prepare_sid_voxceleb1(source, args.out, args.split_file, progress=True))
        else:
            reports.append(prepare_er_iemocap(source, args.out, progress=True))
    return reports
