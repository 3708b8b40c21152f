"""prepare: manifest and real-corpus layouts, read back with s3prl's own dataset classes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from s3prl_ekd import _startup  # s3prl.downstream.ctc.corpus.libriphone, even without the .pth
from s3prl_ekd.errors import AudioError, UserError
from s3prl_ekd.recipes import iemocap, layout, librispeech, voxceleb1

PHONES = ["h @ l oU", "w 3: l d", "D @ k aI t", "s aI n", "b r aI t", "m u: n"]
TEXTS = ["hello", "world", "the kite", "sign", "bright", "moon"]


def tone(path: Path, seconds: float = 0.5, rate: int = 16000, channels: int = 1, freq: float = 220.0) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * freq * t)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.stack([wav] * channels, axis=1) if channels > 1 else wav, rate, subtype="PCM_16")
    return path


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture
def manifest(tmp_path) -> Path:
    """3 speakers x (2 train, 1 dev, 1 test) utterances, relative audio paths."""
    rows, n = [], 0
    for s, speaker in enumerate(["ann", "bob", "cy"]):
        for split in ["train", "train", "dev", "test"]:
            audio = tone(tmp_path / "src" / "wav" / f"u{n:02d}.wav", freq=200 + 40 * n)
            rows.append({"id": f"u{n:02d}", "audio": str(audio.relative_to(tmp_path / "src")),
                         "text": TEXTS[n % 6], "phones": PHONES[n % 6], "speaker": speaker,
                         "emotion": ["neutral", "happy", "sad"][n % 3], "split": split})
            n += 1
    return write_manifest(tmp_path / "src", rows)


def rows_of(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


@pytest.fixture
def downstream_env():
    """s3prl's datasets as run_downstream.py runs them here (torchaudio.load without torchcodec on
    torchaudio >= 2.9, a private voxceleb1 file-list cache)."""
    from s3prl_ekd.plugin.downstream import downstream_environment

    with downstream_environment():
        yield


def test_layouts_read_back_with_s3prl_datasets(manifest, tmp_path, downstream_env):
    from s3prl.downstream.asr.dataset import SequenceDataset
    from s3prl.downstream.asr.dictionary import Dictionary
    from s3prl.downstream.asr.expert import token_to_word
    from s3prl.downstream.ctc.corpus.libriphone import LibriPhoneDataset
    from s3prl.downstream.ctc.text import load_text_encoder
    from s3prl.downstream.emotion.dataset import IEMOCAPDataset
    from s3prl.downstream.voxceleb1.dataset import SpeakerClassifiDataset

    reports = layout.prepare_all(manifest, tmp_path / "out")
    rows = rows_of(manifest)
    assert reports["pr"].splits["train"][0] == 6 and not reports["pr"].up_to_date

    # PR: exact phones, through the ctc expert's own tokenizer
    pr = json.loads((tmp_path / "out/pr/prepared.json").read_text())["config"]["downstream_expert"]
    tokenizer = load_text_encoder("word", pr["text"]["vocab_file"])
    dataset = LibriPhoneDataset(pr["corpus"]["test"], tokenizer, 1, **pr["corpus"])
    decoded = sorted(tokenizer.decode(dataset[i][1]) for i in range(len(dataset)))
    assert decoded == sorted(r["phones"] for r in rows if r["split"] == "test")
    assert all(str(f).endswith(".flac") for f in dataset.file_list)

    # ASR: characters through s3prl's dictionary and bucket CSVs
    datarc = json.loads((tmp_path / "out/asr/prepared.json").read_text())["config"]["downstream_expert"]["datarc"]
    dictionary = Dictionary.load(datarc["dict_path"])
    asr = SequenceDataset("train", 1, dictionary, **datarc)
    words = sorted(" ".join(token_to_word(dictionary.string(asr[i][1][0][:-1])).split())
                   for i in range(len(asr)))
    assert words == sorted(r["text"].upper() for r in rows if r["split"] == "train")

    # SID: VoxCeleb1-style ids, label = int(id[2:]) - 10001
    datarc = json.loads((tmp_path / "out/sid/prepared.json").read_text())["config"]["downstream_expert"]["datarc"]
    sid = SpeakerClassifiDataset("train", Path(datarc["file_path"]), datarc["meta_data"])
    labels = sorted((name.split("-")[0], label) for _, label, name in (sid[i] for i in range(len(sid))))
    assert labels == sorted([("id10001", 0)] * 2 + [("id10002", 1)] * 2 + [("id10003", 2)] * 2)

    # ER: one fold; train = train + dev of the manifest
    datarc = json.loads((tmp_path / "out/er/prepared.json").read_text())["config"]["downstream_expert"]["datarc"]
    session = Path(datarc["meta_data"]) / "Session1"
    train = IEMOCAPDataset(datarc["root"], session / "train_meta_data.json", pre_load=False)
    test = IEMOCAPDataset(datarc["root"], session / "test_meta_data.json", pre_load=False)
    assert (len(train), len(test)) == (9, 3)
    assert train.class_dict == {"neutral": 0, "happy": 1, "sad": 2}
    assert sorted(train[i][1] for i in range(len(train))) == sorted(
        train.class_dict[r["emotion"]] for r in rows if r["split"] != "test")


def test_rerun_is_a_no_op_and_the_source_is_never_touched(manifest, tmp_path):
    source = sorted((manifest.parent).rglob("*"))
    before = {p: hashlib.md5(p.read_bytes()).hexdigest() for p in source if p.is_file()}
    layout.prepare_all(manifest, tmp_path / "out")
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    again = layout.prepare_all(manifest, tmp_path / "out")
    assert all(report.up_to_date for report in again.values())
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()} == written
    assert {p: hashlib.md5(p.read_bytes()).hexdigest() for p in before} == before

    rows = rows_of(manifest)
    rows[0]["text"] = "changed words"
    write_manifest(manifest.parent, rows)
    report = layout.prepare_asr(manifest, tmp_path / "out")
    assert not report.up_to_date
    trans = (tmp_path / "out/asr/librispeech/train/ann/0/ann-0.trans.txt").read_text()
    assert "CHANGED WORDS" in trans


@pytest.mark.parametrize("breakage, error, message", [
    ("missing_file", AudioError, r"u00.wav: file not found"),
    ("stereo_44k", AudioError, r"44100 Hz, 2 channels, expected 16000 Hz mono"),
    ("unknown_split", UserError, r"manifest.jsonl:2: split 'validation' is not one of train, dev, test"),
    ("no_speaker", UserError, r"manifest.jsonl:3: 'speaker' is missing"),
    ("bad_phone", UserError, r"phones \['QQ'\] are not in the PR vocabulary"),
    ("digits", UserError, r"characters \['4'\]"),
    ("not_json", UserError, r"manifest.jsonl:1: not a JSON object"),
    ("bad_id", UserError, r"manifest.jsonl:1: id 'a/b' .* give an 'id' of letters"),
])
def test_bad_manifests_give_clear_errors(manifest, tmp_path, breakage, error, message):
    rows = rows_of(manifest)
    if breakage == "missing_file":
        (manifest.parent / rows[0]["audio"]).unlink()
    elif breakage == "stereo_44k":
        tone(manifest.parent / rows[1]["audio"], rate=44100, channels=2)
    elif breakage == "unknown_split":
        rows[1]["split"] = "validation"
    elif breakage == "no_speaker":
        del rows[2]["speaker"]
    elif breakage == "bad_phone":
        rows[0]["phones"] = "h QQ"
    elif breakage == "digits":
        rows[0]["text"] = "route 4"
    elif breakage == "bad_id":
        rows[0]["id"] = "a/b"
    if breakage != "missing_file" and breakage != "stereo_44k":
        write_manifest(manifest.parent, rows)
    if breakage == "not_json":
        manifest.write_text("{oops\n" + manifest.read_text())
    with pytest.raises(error, match=message):
        layout.prepare_all(manifest, tmp_path / "out")


def test_sid_speaker_without_train_utterances_is_an_error(manifest, tmp_path):
    rows = rows_of(manifest)
    rows[-1]["speaker"] = "newcomer"  # a test utterance
    write_manifest(manifest.parent, rows)
    with pytest.raises(UserError, match="speaker 'newcomer' has no train utterances"):
        layout.prepare_sid(manifest, tmp_path / "out")


def test_refuses_an_out_folder_it_did_not_make(manifest, tmp_path):
    (tmp_path / "out" / "pr").mkdir(parents=True)
    (tmp_path / "out" / "pr" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="was not made by `s3prl-ekd prepare`"):
        layout.prepare_pr(manifest, tmp_path / "out")
    assert (tmp_path / "out" / "pr" / "mine.txt").read_text() == "keep"


# ---------------------------------------------------------------------------- real corpora layouts

def fake_librispeech(root: Path) -> Path:
    for n, name in enumerate(librispeech.LIBRISPEECH_SETS):
        folder = root / name / "19" / "198"
        for i in range(2):
            tone(folder / f"19-198-{i:04d}.flac")
        (folder / "19-198.trans.txt").write_text("19-198-0000 HELLO WORLD\n19-198-0001 WORLD\n")
    (root / "librispeech-lexicon.txt").write_text("HELLO\tHH AH0 L OW1\nHELLO\tHH EH0 L OW1\nWORLD\tW ER1 L D\n")
    return root


def test_librispeech_pr_and_asr(tmp_path):
    from s3prl.downstream.asr.dataset import SequenceDataset
    from s3prl.downstream.asr.dictionary import Dictionary
    from s3prl.downstream.ctc.corpus.libriphone import LibriPhoneDataset
    from s3prl.downstream.ctc.text import load_text_encoder

    root = fake_librispeech(tmp_path / "LibriSpeech")
    report = librispeech.prepare_pr_librispeech(root, tmp_path / "out")
    assert report.splits["test"][0] == 2
    pr = json.loads((tmp_path / "out/pr/prepared.json").read_text())["config"]["downstream_expert"]
    tokenizer = load_text_encoder("word", pr["text"]["vocab_file"])
    dataset = LibriPhoneDataset(pr["corpus"]["train"], tokenizer, 1, **pr["corpus"])
    # first pronunciation wins, as in s3prl's libriphone
    assert sorted(tokenizer.decode(dataset[i][1]) for i in range(2)) == ["HH AH0 L OW1 W ER1 L D", "W ER1 L D"]

    librispeech.prepare_asr_librispeech(root, tmp_path / "out")
    datarc = json.loads((tmp_path / "out/asr/prepared.json").read_text())["config"]["downstream_expert"]["datarc"]
    assert (Path(datarc["bucket_file"]) / "dev-clean.csv").read_text().splitlines()[0] == ",file_path,length"
    test = SequenceDataset("test-clean", 1, Dictionary.load(datarc["dict_path"]), **datarc)
    assert len(test) == 2

    (root / "dev-clean/19/198/19-198.trans.txt").write_text("19-198-0000 HELLO MARS\n19-198-0001 WORLD\n")
    with pytest.raises(UserError, match=r"words \['MARS'\] are not in the lexicon"):
        librispeech.prepare_pr_librispeech(root, tmp_path / "out")


def test_voxceleb1_split_is_checked(tmp_path):
    root = tmp_path / "VoxCeleb1"
    lines = []
    for part, speaker, key in [("dev", "id10001", 1), ("dev", "id10001", 2), ("test", "id10002", 3),
                               ("dev", "id10002", 1)]:
        rel = f"{speaker}/vid{key}/{len(lines):05d}.wav"
        tone(root / part / "wav" / rel)
        lines.append(f"{key} {rel}")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    report = voxceleb1.prepare_sid_voxceleb1(root, tmp_path / "out")
    assert [report.splits[s][0] for s in ("train", "dev", "test")] == [2, 1, 1]
    (root / "iden_split.txt").write_text("\n".join(lines + ["3 id10009/x/00099.wav"]) + "\n")
    with pytest.raises(UserError, match="id10009/x/00099.wav not found"):
        voxceleb1.prepare_sid_voxceleb1(root, tmp_path / "out")


def test_iemocap_folds_use_s3prls_meta_data_builder(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    for s in (1, 2):
        dialog = f"Ses0{s}F_impro01"
        lines = []
        for i, label in enumerate(["neu", "exc", "ang", "sad", "fru"]):
            name = f"{dialog}_F00{i}"
            tone(root / f"Session{s}" / "sentences" / "wav" / dialog / f"{name}.wav")
            lines.append(f"[1.0 - 2.0]\t{name}\t{label}\t[2.5, 2.5, 2.5]")
        label_dir = root / f"Session{s}" / "dialog" / "EmoEvaluation"
        label_dir.mkdir(parents=True)
        (label_dir / f"{dialog}.txt").write_text("\n".join(lines) + "\n")
    report = iemocap.prepare_er_iemocap(root, tmp_path / "out")
    info = json.loads((tmp_path / "out/er/prepared.json").read_text())
    assert info["folds"] == ["fold1", "fold2"]
    test = json.loads((tmp_path / "out/er/meta_data/Session2/test_meta_data.json").read_text())
    # 'fru' is dropped and 'exc' merged into 'hap', as in the SUPERB protocol
    assert sorted(m["label"] for m in test["meta_data"]) == ["ang", "hap", "neu", "sad"]
    assert report.splits["train"][0] == 4 and report.splits["test"][0] == 4


def test_real_prepare_detects_label_change(tmp_path):
    """An edited label (IEMOCAP emotion, LibriSpeech transcript, VoxCeleb1 split) makes prepare redo the
    task, even when the file keeps its size and modification time."""
    import os

    root = tmp_path / "IEMOCAP_full_release"
    for s in (1, 2):
        dialog = f"Ses0{s}F_impro01"
        tone(root / f"Session{s}" / "sentences" / "wav" / dialog / f"{dialog}_F000.wav")
        tone(root / f"Session{s}" / "sentences" / "wav" / dialog / f"{dialog}_F001.wav")
        label_dir = root / f"Session{s}" / "dialog" / "EmoEvaluation"
        label_dir.mkdir(parents=True)
        (label_dir / f"{dialog}.txt").write_text(f"[1.0 - 2.0]\t{dialog}_F000\tneu\t[2.5]\n"
                                                 f"[1.0 - 2.0]\t{dialog}_F001\tang\t[2.5]\n")
    iemocap.prepare_er_iemocap(root, tmp_path / "out")
    assert iemocap.prepare_er_iemocap(root, tmp_path / "out").up_to_date
    labels = root / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt"
    stat = labels.stat()
    labels.write_text(labels.read_text().replace("\tneu\t", "\tsad\t"))  # same size
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))            # and same modification time
    report = iemocap.prepare_er_iemocap(root, tmp_path / "out")
    assert not report.up_to_date
    test = json.loads((tmp_path / "out/er/meta_data/Session1/test_meta_data.json").read_text())
    assert sorted(m["label"] for m in test["meta_data"]) == ["ang", "sad"]

    libri = fake_librispeech(tmp_path / "LibriSpeech")
    librispeech.prepare_pr_librispeech(libri, tmp_path / "out")
    assert librispeech.prepare_pr_librispeech(libri, tmp_path / "out").up_to_date
    trans = libri / "test-clean/19/198/19-198.trans.txt"
    trans.write_text(trans.read_text().replace("0001 WORLD", "0001 HELLO"))
    assert not librispeech.prepare_pr_librispeech(libri, tmp_path / "out").up_to_date
