"""VoxCeleb1 as a manifest (SUPERB's SID): the identification split's utterances, used in place,
with splits 1/2/3 -> train/dev/test and VoxCeleb1's speaker ids (id10001..id11251)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from s3prl_ekd.errors import UserError
from s3prl_ekd.recipes.manifest import SPLITS

NAME = "voxceleb1"
# s3prl's voxceleb1 expert: label = int(id[2:]) - 10001 over 1251 hard-coded classes.
FIRST_ID, CLASSES = 10001, 1251
SPLIT_FILE_NAMES = ("iden_split.txt", "veri_test_class.txt")
SPLIT_NUMBERS = {"1": SPLITS[0], "2": SPLITS[1], "3": SPLITS[2]}


def is_speaker_id(speaker: str) -> bool:
    """Whether `speaker` is one of VoxCeleb1's ids, id10001..id11251."""
    return re.fullmatch(r"id\d{5}", speaker) is not None and 0 <= int(speaker[2:]) - FIRST_ID < CLASSES


def find_split_file(root: str | os.PathLike, split_file: str | os.PathLike | None = None) -> Path:
    """The split file given, else iden_split.txt (or veri_test_class.txt) in `root`."""
    if split_file is not None:
        return Path(split_file).resolve()
    root = Path(root).resolve()
    found = next((root / name for name in SPLIT_FILE_NAMES if (root / name).is_file()), None)
    if found is None:
        raise UserError(f"{root}: no iden_split.txt in it; pass --split-file (VoxCeleb1's "
                        "identification split, lines like `1 id10001/1zcIwhmdeo4/00001.wav`)")
    return found


def manifest_rows(root: str | os.PathLike, split_file: str | os.PathLike | None = None) -> list[dict]:
    """One manifest row per line of the identification split: `id` (the listed path with "-" for
    "/"), absolute `audio` (found under root/*/wav/, as s3prl looks for it), `split`, `speaker`."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise UserError(f"{root}: VoxCeleb1 folder not found")
    split_file = find_split_file(root, split_file)
    if not split_file.is_file():
        raise UserError(f"{split_file}: split file not found")
    parts = sorted(p / "wav" for p in root.iterdir() if (p / "wav").is_dir())
    if not parts:
        raise UserError(f"{root}: no */wav folders; expected VoxCeleb1's dev/wav and test/wav")
    rows, seen = [], {}
    for number, line in enumerate(split_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{split_file}:{number}"
        if len(fields) != 2 or fields[0] not in SPLIT_NUMBERS or not fields[1].endswith(".wav"):
            raise UserError(f"{where}: expected `1|2|3 idXXXXX/VIDEO/UTT.wav`")
        speaker = fields[1].split("/")[0]
        if not is_speaker_id(speaker):
            raise UserError(f"{where}: speaker {speaker!r} is outside id10001..id11251, the 1251 "
                            "classes of s3prl's SID recipe")
        if fields[1] in seen:
            raise UserError(f"{where}: {fields[1]} is already listed on line {seen[fields[1]]}")
        seen[fields[1]] = number
        audio = next((part / fields[1] for part in parts if (part / fields[1]).is_file()), None)
        if audio is None:
            raise UserError(f"{where}: {fields[1]} not found under {root}/*/wav/")
        rows.append({"id": fields[1].removesuffix(".wav").replace("/", "-"), "audio": str(audio),
                     "split": SPLIT_NUMBERS[fields[0]], "speaker": speaker})
    if not rows:
        raise UserError(f"{split_file}: lists no utterances")
    return rows
