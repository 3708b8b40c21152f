"""SUPERB's PR and ASR on LibriSpeech (train-clean-100 / dev-clean / test-clean), used in place."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from s3prl_ekd.errors import UserError
from s3prl_ekd.io.files import fingerprint
from s3prl_ekd.plugin.libriphone import read_lexicon
from s3prl_ekd.recipes.layout import (
    PREPARE_VERSION,
    PrepareReport,
    arpabet_phones,
    asr_characters,
    char_dict,
    file_contents,
    file_stamps,
    finish_real,
    read_symbols,
    real_report,
    write_bucket_csvs,
)
from s3prl_ekd.recipes.manifest import SPLITS, check_audio_files

LIBRISPEECH_SETS = ("train-clean-100", "dev-clean", "test-clean")


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


def _transcript_files(flacs) -> set[Path]:
    return {flac.parent / f"{flac.name.split('.')[0].rsplit('-', 1)[0]}.trans.txt" for flac in flacs}


def prepare_pr_librispeech(librispeech: str | os.PathLike, out: str | os.PathLike,
                           lexicon: Sequence[str | os.PathLike] = (), sets: Sequence[str] = LIBRISPEECH_SETS,
                           vocab: str | os.PathLike | None = None, progress: bool = False) -> PrepareReport:
    """PR on LibriSpeech (SUPERB): words -> ARPAbet phones through a lexicon."""
    root, out = Path(librispeech).resolve(), Path(out).resolve()
    vocab = Path(vocab or arpabet_phones()).resolve()
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
    key = fingerprint(PREPARE_VERSION, "pr-librispeech", config, file_contents(lexicon), file_stamps(all_files),
                      file_contents(_transcript_files(all_files)))
    task_out = out / "pr"
    up = finish_real("pr", task_out, key, config, {"source": str(root)}, lambda: None)
    return real_report("pr", task_out, files, durations, SPLITS, up,
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
                            f"that {char_dict()} cannot spell")
    task_out = out / "asr"
    bucket = task_out / "len_for_bucket"
    config = {"downstream_expert": {"datarc": {
        "libri_root": str(root), "bucket_file": str(bucket), "dict_path": str(char_dict()),
        "train": [sets[0]], "dev-clean": [sets[1]], "test-clean": [sets[2]]}}}
    key = fingerprint(PREPARE_VERSION, "asr-librispeech", config, file_stamps(all_files),
                      file_contents(_transcript_files(all_files)))
    up = finish_real("asr", task_out, key, config, {"source": str(root)},
                      lambda: write_bucket_csvs(bucket, root, files))
    return real_report("asr", task_out, files, durations, SPLITS, up, [])
