"""IEMOCAP as a manifest (SUPERB's ER): the utterances that s3prl's IEMOCAP_preprocess keeps, used
in place, each with its emotion and its session as the fold (SUPERB holds out one session per fold)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from s3prl_ekd.errors import UserError

NAME = "iemocap"
LABEL_DIR = Path("dialog", "EmoEvaluation")
WAV_DIR = Path("sentences", "wav")
# The four classes of s3prl's IEMOCAP_preprocess, excited merged into happy; other labels
# (frustrated, surprised, ..., no agreement "xxx") are left out, as there.
EMOTIONS = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad"}


def speaker(utterance: str) -> str:
    """Ses01F_impro01_M000 -> Ses01M: the session and the gender of the actor speaking (each session
    has one actress and one actor); names of another form keep their part before the first "_"."""
    match = re.fullmatch(r"(Ses\d+)[FM]_.*_([FM])\d+", utterance)
    return match[1] + match[2] if match else utterance.split("_")[0]


def manifest_rows(root: str | os.PathLike) -> list[dict]:
    """One manifest row per labelled utterance with audio: `id` (IEMOCAP's utterance name),
    absolute `audio`, `fold` (N of SessionN), `speaker`, `emotion` (neutral, happy, angry, sad)."""
    root = Path(root).resolve()
    sessions = sorted(p for p in root.glob("Session*") if p.is_dir()) if root.is_dir() else []
    if not sessions:
        raise UserError(f"{root}: no Session1..Session5 folders; --iemocap must be IEMOCAP_full_release")
    rows = []
    for session in sessions:
        if not re.fullmatch(r"Session[1-9]\d*", session.name):
            raise UserError(f"{session}: a session folder must be named SessionN (N = 1, 2, ...), "
                            "the fold s3prl's ER recipe holds out")
        fold = int(session.name.removeprefix("Session"))
        label_dir = session / LABEL_DIR
        if not label_dir.is_dir():
            raise UserError(f"{label_dir}: folder not found; every IEMOCAP session holds its labels there")
        wavs = {wav.stem: wav for wav in sorted((session / WAV_DIR).rglob("*.wav")) if not wav.name.startswith(".")}
        for labels in sorted(p for p in label_dir.glob("*.txt") if not p.name.startswith(".")):
            for number, line in enumerate(labels.read_text().splitlines(), 1):
                if not line.startswith("["):  # the per-evaluator lines that follow each utterance
                    continue
                fields = [f for f in line.split("\t") if f]
                if len(fields) < 3:
                    raise UserError(f"{labels}:{number}: expected `[START - END] TAB UTTERANCE TAB LABEL "
                                    "TAB [V, A, D]`")
                name, label = fields[1], fields[2].strip()
                # s3prl's builder also leaves out labelled utterances without audio.
                if label in EMOTIONS and name in wavs:
                    rows.append({"id": name, "audio": str(wavs[name]), "fold": fold,
                                 "speaker": speaker(name), "emotion": EMOTIONS[label]})
    if not rows:
        raise UserError(f"{root}: no labelled utterances found ({LABEL_DIR} + {WAV_DIR} of each session)")
    return rows
