"""SUPERB's SID on VoxCeleb1 (identification split), used in place."""

from __future__ import annotations

import os
import re
from pathlib import Path

from s3prl_ekd.errors import UserError
from s3prl_ekd.io.files import fingerprint
from s3prl_ekd.recipes.layout import (
    PREPARE_VERSION,
    SID_CLASSES,
    SID_FIRST_ID,
    PrepareReport,
    file_contents,
    file_stamps,
    finish_real,
    real_report,
)
from s3prl_ekd.recipes.manifest import SPLITS, check_audio_files


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
    key = fingerprint(PREPARE_VERSION, "sid-voxceleb1", config, file_contents([split_file]),
                      file_stamps(f for key in "123" for f in sets[key]))
    up = finish_real("sid", task_out, key, config, {"source": str(root)}, lambda: None)
    return real_report("sid", task_out, sets, durations, SPLITS, up, [f"split file {split_file}"])
