"""LibriSpeech as a manifest (SUPERB's PR and ASR): train-clean-100 / dev-clean / test-clean, the
flac files used in place, their transcripts and, with a lexicon, each utterance's ARPAbet phones."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from s3prl_ekd.errors import UserError
from s3prl_ekd.io.resources import recipe_file
from s3prl_ekd.plugin.libriphone import read_lexicon
from s3prl_ekd.recipes.manifest import SPLITS

NAME = "librispeech"
LIBRISPEECH_SETS = ("train-clean-100", "dev-clean", "test-clean")  # SUPERB's train, dev, test


def phone_vocabulary() -> Path:
    """The ARPAbet phones (with stress, plus SIL and SPN) that LibriSpeech's lexicon spells words in."""
    return recipe_file("pr", "arpabet_phones.txt")


def find_lexicon(root: str | os.PathLike, lexicon: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The lexicon files given, else the *lexicon*.txt files in `root` (possibly none)."""
    return [Path(p).resolve() for p in lexicon] or sorted(Path(root).resolve().glob("*lexicon*.txt"))


def manifest_rows(root: str | os.PathLike, lexicon: Sequence[str | os.PathLike] = (),
                  sets: Sequence[str] = LIBRISPEECH_SETS) -> list[dict]:
    """One manifest row per flac of `sets` (SUPERB's train, dev, test in that order): `id` (the
    utterance id), absolute `audio`, `split`, `speaker`, `text` (the transcript line) and, when
    `lexicon` files are given, `phones`: each word's first pronunciation, as s3prl's libriphone."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise UserError(f"{root}: LibriSpeech folder not found")
    words = read_lexicon(lexicon) if lexicon else None
    rows: list[dict] = []
    tables: dict[Path, dict[str, tuple[int, str]]] = {}
    for split, name in zip(SPLITS, sets):
        flacs = sorted((root / name).rglob("*.flac"))
        if not flacs:
            raise UserError(f"{root / name}: no .flac files; the LibriSpeech folder must hold "
                            f"{', '.join(sets)} (OpenSLR resource 12)")
        for flac in flacs:
            utt = flac.name.split(".")[0]
            table = flac.parent / f"{utt.rsplit('-', 1)[0]}.trans.txt"
            if table not in tables:
                tables[table] = _read_transcripts(table)
            if utt not in tables[table]:
                raise UserError(f"{flac}: no transcript line for {utt} in {table}")
            number, text = tables[table][utt]
            row = {"id": utt, "audio": str(flac), "split": split, "speaker": utt.split("-")[0], "text": text}
            if words is not None:
                phones = []
                for word in text.split():
                    if word not in words:
                        raise UserError(f"{table}:{number}: word {word!r} is not in the lexicon "
                                        f"{', '.join(map(str, lexicon))}; add it there or pass another --lexicon")
                    phones += words[word]
                row["phones"] = " ".join(phones)
            rows.append(row)
    return rows


def _read_transcripts(table: Path) -> dict[str, tuple[int, str]]:
    """`UTTID WORD ...` lines -> {UTTID: (line number, words)}; a missing file holds none."""
    if not table.is_file():
        return {}
    out = {}
    for number, line in enumerate(table.read_text().splitlines(), 1):
        utt, _, text = line.strip().partition(" ")
        if utt:
            out[utt] = (number, " ".join(text.split()))
    return out
