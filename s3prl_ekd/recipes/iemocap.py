"""SUPERB's ER on IEMOCAP: s3prl's own meta-data builder, one fold per held-out session."""

from __future__ import annotations

import json
import os
from pathlib import Path

from s3prl_ekd.errors import UserError
from s3prl_ekd.io.files import fingerprint
from s3prl_ekd.recipes.layout import (
    PREPARE_VERSION,
    PrepareReport,
    file_contents,
    file_stamps,
    finish_real,
    real_report,
)
from s3prl_ekd.recipes.manifest import check_audio_files


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
    labels = sorted(root.glob("Session*/dialog/EmoEvaluation/*.txt"))
    wavs = sorted(root.glob("Session*/sentences/wav/*/*.wav"))
    key = fingerprint(PREPARE_VERSION, "er-iemocap", str(root), sessions, file_contents(labels), file_stamps(wavs))
    folds = [f"fold{s.removeprefix('Session')}" for s in sessions]
    config = {"downstream_expert": {"datarc": {
        "root": str(root), "meta_data": str(task_out / "meta_data"), "test_fold": folds[0]}}}

    def write():
        for i, session in enumerate(sessions):
            folder = task_out / "meta_data" / session
            folder.mkdir(parents=True)
            preprocess(str(root), sessions[:i] + sessions[i + 1:], str(folder / "train_meta_data.json"))
            preprocess(str(root), [session], str(folder / "test_meta_data.json"))

    up = finish_real("er", task_out, key, config, {"source": str(root), "folds": folds}, write)
    first = json.loads((task_out / "meta_data" / sessions[0] / "train_meta_data.json").read_text())
    second = json.loads((task_out / "meta_data" / sessions[0] / "test_meta_data.json").read_text())
    items = first["meta_data"] + second["meta_data"]
    if not items:
        raise UserError(f"{root}: no labelled utterances found (dialog/EmoEvaluation + sentences/wav)")
    durations = check_audio_files([(str(task_out), root / item["path"]) for item in items], progress)
    parts = {"train": first["meta_data"], "test": second["meta_data"]}
    return real_report("er", task_out, parts, durations, ("train", "test"), up,
                        [f"folds {folds}, labels {first['labels']}"])
