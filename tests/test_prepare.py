"""prepare: the manifest format, the real corpora as manifests, and the recipe layouts built from
them, read back with s3prl's own dataset classes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from s3prl_ekd import _startup  # noqa: F401  (s3prl.downstream.ctc.corpus.libriphone, without the .pth)
from s3prl_ekd.cli import main
from s3prl_ekd.errors import AudioError, UserError
from s3prl_ekd.recipes import librispeech, prepare
from s3prl_ekd.recipes.manifest import read_manifest
from s3prl_ekd.recipes.prepare import Corpora

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

    reports = prepare.prepare_all(manifest, tmp_path / "out")
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
    prepare.prepare_all(manifest, tmp_path / "out")
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    again = prepare.prepare_all(manifest, tmp_path / "out")
    assert all(report.up_to_date for report in again.values())
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()} == written
    assert {p: hashlib.md5(p.read_bytes()).hexdigest() for p in before} == before

    rows = rows_of(manifest)
    rows[0]["text"] = "changed words"
    write_manifest(manifest.parent, rows)
    report = prepare.prepare_asr(manifest, tmp_path / "out")
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
    ("bad_fold", UserError, r"manifest.jsonl:1: fold 0 is not an integer >= 1"),
    ("no_split_or_fold", UserError, r"manifest.jsonl:2: neither 'split' \(train/dev/test\) nor 'fold'"),
    ("fold_without_split", UserError, r"manifest.jsonl:2: 'split' is missing or empty; every line needs"),
    ("number_speaker", UserError, r"manifest.jsonl:4: 'speaker' is 7, not a string"),
    ("no_dev", UserError, r"manifest.jsonl: no utterances in split\(s\) dev; PR needs train, dev, test"),
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
    elif breakage == "bad_fold":
        rows[0]["fold"] = 0
    elif breakage == "no_split_or_fold":
        del rows[1]["split"]
    elif breakage == "fold_without_split":
        rows[1]["fold"] = 1
        del rows[1]["split"]
    elif breakage == "number_speaker":
        rows[3]["speaker"] = 7
    elif breakage == "no_dev":
        rows = [r for r in rows if r["split"] != "dev"]
    if breakage != "missing_file" and breakage != "stereo_44k":
        write_manifest(manifest.parent, rows)
    if breakage == "not_json":
        manifest.write_text("{oops\n" + manifest.read_text())
    with pytest.raises(error, match=message):
        prepare.prepare_all(manifest, tmp_path / "out")


def test_sid_speaker_without_train_utterances_is_an_error(manifest, tmp_path):
    rows = rows_of(manifest)
    rows[-1]["speaker"] = "newcomer"  # a test utterance
    write_manifest(manifest.parent, rows)
    with pytest.raises(UserError, match="speaker 'newcomer' has no train utterances"):
        prepare.prepare_sid(manifest, tmp_path / "out")


def test_refuses_an_out_folder_it_did_not_make(manifest, tmp_path, capsys):
    (tmp_path / "out" / "pr").mkdir(parents=True)
    (tmp_path / "out" / "pr" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="out: holds files that `s3prl-ekd prepare` did not write; .* --force"):
        prepare.prepare_pr(manifest, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["mine.txt", "pr"]
    # --force lets prepare write beside the user's files, never replace their folder
    argv = ["prepare", "pr", "--manifest", str(manifest), "--out", str(tmp_path / "out")]
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 2
    assert "out/pr: exists, is not empty and was not made by `s3prl-ekd prepare`" in capsys.readouterr().err
    assert (tmp_path / "out" / "pr" / "mine.txt").read_text() == "keep"
    assert main(["prepare", "asr", "--manifest", str(manifest), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "asr" / "prepared.json").is_file()


# ---------------------------------------------------------------------------- the real corpora

def fake_librispeech(root: Path) -> Path:
    """Speaker 19 (train), 26 (dev), 32 (test), two utterances each; a lexicon with two
    pronunciations of HELLO."""
    for name, (spk, chap) in zip(librispeech.LIBRISPEECH_SETS, [("19", "198"), ("26", "495"), ("32", "21631")]):
        folder = root / name / spk / chap
        for i in range(2):
            tone(folder / f"{spk}-{chap}-{i:04d}.flac", freq=200 + 50 * i)
        (folder / f"{spk}-{chap}.trans.txt").write_text(f"{spk}-{chap}-0000 HELLO WORLD\n{spk}-{chap}-0001 WORLD\n")
    (root / "librispeech-lexicon.txt").write_text("HELLO\tHH AH0 L OW1\nHELLO\tHH EH0 L OW1\nWORLD\tW ER1 L D\n")
    return root


def fake_voxceleb1(root: Path, speakers=("id10001", "id10003")) -> Path:
    """Per speaker: train utterances in dev/wav (two videos), dev and test ones in test/wav."""
    lines = []
    for s, speaker in enumerate(speakers):
        for part, video, key in [("dev", "vidA", 1), ("dev", "vidB", 1), ("test", "vidC", 2), ("test", "vidD", 3)]:
            rel = f"{speaker}/{video}/{len(lines):05d}.wav"
            tone(root / part / "wav" / rel, freq=150 + 100 * s)
            lines.append(f"{key} {rel}")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    return root


def fake_iemocap(root: Path) -> Path:
    """Session1..2, one dialog each: neu, exc, ang, sad, fru, a label without audio, evaluator lines."""
    for s in (1, 2):
        dialog = f"Ses0{s}F_impro01"
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        for i, (label, gender) in enumerate(zip(["neu", "exc", "ang", "sad", "fru"], "FMFMF")):
            name = f"{dialog}_{gender}00{i}"
            tone(root / f"Session{s}" / "sentences" / "wav" / dialog / f"{name}.wav", freq=180 + 30 * i)
            lines += [f"[1.0 - 2.0]\t{name}\t{label}\t[2.5000, 2.5000, 2.5000]", "C-E1:\tNeutral;\t()", ""]
        lines.append(f"[3.0 - 4.0]\t{dialog}_M099\tang\t[2.5, 2.5, 2.5]")  # no audio: left out, as by s3prl
        label_dir = root / f"Session{s}" / "dialog" / "EmoEvaluation"
        label_dir.mkdir(parents=True)
        (label_dir / f"{dialog}.txt").write_text("\n".join(lines) + "\n")
    return root


def stamps(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def relabel(path: Path, old: str, new: str) -> None:
    """Replace `old` by `new` (as long) in `path`, keeping its size and modification time."""
    assert len(old) == len(new)
    stat = path.stat()
    path.write_text(path.read_text().replace(old, new))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def fails_in_one_line(error, message: str, task: str, corpora: Corpora, out: Path) -> None:
    """Preparing `task` stops with one line matching `message` and writes no task folder."""
    with pytest.raises(error, match=message) as caught:
        prepare.prepare_tasks((task,), corpora, out)
    assert "\n" not in str(caught.value)
    assert not (out / task).exists()


def test_librispeech_becomes_a_manifest_and_the_pr_and_asr_layouts(tmp_path, downstream_env):
    from s3prl.downstream.asr.dataset import SequenceDataset
    from s3prl.downstream.asr.dictionary import Dictionary
    from s3prl.downstream.asr.expert import token_to_word
    from s3prl.downstream.ctc.corpus.libriphone import LibriPhoneDataset
    from s3prl.downstream.ctc.text import load_text_encoder

    root, out = fake_librispeech(tmp_path / "LibriSpeech"), tmp_path / "out"
    pr, asr = prepare.prepare_tasks(("pr", "asr"), Corpora(librispeech=root), out)
    manifest = out / "manifests" / "librispeech.jsonl"
    assert pr.manifest == asr.manifest == manifest and not pr.up_to_date
    rows = {r.id: r for r in read_manifest(manifest, ("phones", "text", "speaker"))}
    assert (rows["26-495-0000"].split, rows["26-495-0000"].speaker) == ("dev", "26")
    assert rows["26-495-0000"].audio == root / "dev-clean/26/495/26-495-0000.flac"  # used in place
    # first pronunciation wins, as in s3prl's libriphone
    assert rows["26-495-0000"].phones == "HH AH0 L OW1 W ER1 L D"
    assert [pr.splits[s][0] for s in ("train", "dev", "test")] == [2, 2, 2]

    # PR: the ARPAbet phones through the ctc expert's own tokenizer, the flac files linked, not converted
    config = json.loads((out / "pr/prepared.json").read_text())["config"]["downstream_expert"]
    assert Path(config["text"]["vocab_file"]) == librispeech.phone_vocabulary()
    tokenizer = load_text_encoder("word", config["text"]["vocab_file"])
    dataset = LibriPhoneDataset(config["corpus"]["test"], tokenizer, 1, **config["corpus"])
    assert sorted(tokenizer.decode(dataset[i][1]) for i in range(2)) == ["HH AH0 L OW1 W ER1 L D", "W ER1 L D"]
    sources = {r.audio for r in rows.values()}
    assert all(any(os.path.samefile(f, s) for s in sources) for f in dataset.file_list)

    # ASR: the transcripts through s3prl's dictionary and bucket CSVs
    datarc = json.loads((out / "asr/prepared.json").read_text())["config"]["downstream_expert"]["datarc"]
    dictionary = Dictionary.load(datarc["dict_path"])
    test = SequenceDataset("test-clean", 1, dictionary, **datarc)
    assert sorted(" ".join(token_to_word(dictionary.string(test[i][1][0][:-1])).split())
                  for i in range(len(test))) == ["HELLO WORLD", "WORLD"]

    # unchanged inputs: up to date, nothing rewritten (the manifest neither)
    written = stamps(out)
    assert all(r.up_to_date for r in prepare.prepare_tasks(("pr", "asr"), Corpora(librispeech=root), out))
    assert stamps(out) == written
    # an edited transcript (same size and time stamp) redoes both; a replaced audio file too
    relabel(root / "test-clean/32/21631/32-21631.trans.txt", "0001 WORLD", "0001 HELLO")
    pr, asr = prepare.prepare_tasks(("pr", "asr"), Corpora(librispeech=root), out)
    assert not pr.up_to_date and not asr.up_to_date
    assert "32-0-0001 HH AH0 L OW1" in (out / "pr/librispeech/test/32/0/32-0.phones.txt").read_text()
    tone(root / "train-clean-100/19/198/19-198-0001.flac", freq=300)
    assert not prepare.prepare_tasks(("asr",), Corpora(librispeech=root), out)[0].up_to_date


@pytest.mark.parametrize("breakage, error, message", [
    ("no_transcript_line", UserError, r"26-495-0001.flac: no transcript line for 26-495-0001 in .*26-495.trans.txt$"),
    ("unknown_word", UserError, r"26-495.trans.txt:1: word 'MARS' is not in the lexicon .*librispeech-lexicon.txt"),
    ("8khz", AudioError, r"librispeech.jsonl:\d+: .*19-198-0000.flac: 8000 Hz, expected 16000 Hz mono"),
    ("no_lexicon", UserError, r"no lexicon given and none \(\*lexicon\*.txt\) in it; PR needs one"),
])
def test_librispeech_bad_inputs_give_one_line_naming_the_file(tmp_path, breakage, error, message):
    root = fake_librispeech(tmp_path / "LibriSpeech")
    trans = root / "dev-clean/26/495/26-495.trans.txt"
    if breakage == "no_transcript_line":
        trans.write_text("26-495-0000 HELLO WORLD\n")
    elif breakage == "unknown_word":
        trans.write_text("26-495-0000 HELLO MARS\n26-495-0001 WORLD\n")
    elif breakage == "8khz":
        tone(root / "train-clean-100/19/198/19-198-0000.flac", rate=8000)
    elif breakage == "no_lexicon":
        (root / "librispeech-lexicon.txt").unlink()
    fails_in_one_line(error, message, "pr", Corpora(librispeech=root), tmp_path / "out")


def test_voxceleb1_keeps_its_speaker_ids_as_sid_labels(tmp_path, downstream_env):
    from s3prl.downstream.voxceleb1.dataset import SpeakerClassifiDataset

    root, out = fake_voxceleb1(tmp_path / "VoxCeleb1"), tmp_path / "out"
    (report,) = prepare.prepare_tasks(("sid",), Corpora(voxceleb1=root), out)
    assert report.manifest == out / "manifests" / "voxceleb1.jsonl"
    rows = {r.id: r for r in read_manifest(report.manifest)}
    assert rows["id10003-vidD-00007"].split == "test"
    assert rows["id10003-vidD-00007"].audio == root / "test/wav/id10003/vidD/00007.wav"
    assert [report.splits[s][0] for s in ("train", "dev", "test")] == [4, 2, 2]
    datarc = json.loads((out / "sid/prepared.json").read_text())["config"]["downstream_expert"]["datarc"]
    sid = SpeakerClassifiDataset("train", Path(datarc["file_path"]), datarc["meta_data"])
    # id10003 is label 2 (int(id[2:]) - 10001), though only two speakers are present
    assert sorted(sid.label) == [0, 0, 2, 2]

    written = stamps(out)
    assert prepare.prepare_tasks(("sid",), Corpora(voxceleb1=root), out)[0].up_to_date
    assert stamps(out) == written
    relabel(root / "iden_split.txt", "2 id10001/vidC", "1 id10001/vidC")  # a dev utterance moves to train
    report = prepare.prepare_tasks(("sid",), Corpora(voxceleb1=root), out)[0]
    assert not report.up_to_date and [report.splits[s][0] for s in ("train", "dev")] == [5, 1]


@pytest.mark.parametrize("breakage, error, message", [
    ("id11252", UserError, r"iden_split.txt:9: speaker 'id11252' is outside id10001..id11251"),
    ("id09999", UserError, r"iden_split.txt:9: speaker 'id09999' is outside id10001..id11251"),
    ("missing", UserError, r"iden_split.txt:9: id10001/vidX/00099.wav not found under"),
    ("8khz", AudioError, r"voxceleb1.jsonl:2: .*id10001/vidB/00001.wav: 8000 Hz, expected 16000 Hz mono"),
    ("stereo", AudioError, r"voxceleb1.jsonl:6: .*id10003/vidB/00005.wav: 2 channels, expected 16000 Hz mono"),
])
def test_voxceleb1_bad_inputs_give_one_line_naming_the_file(tmp_path, breakage, error, message):
    root = fake_voxceleb1(tmp_path / "VoxCeleb1")
    split = root / "iden_split.txt"
    if breakage in ("id11252", "id09999"):
        tone(root / "dev" / "wav" / breakage / "v" / "00099.wav")
        split.write_text(split.read_text() + f"1 {breakage}/v/00099.wav\n")
    elif breakage == "missing":
        split.write_text(split.read_text() + "1 id10001/vidX/00099.wav\n")
    elif breakage == "8khz":
        tone(root / "dev/wav/id10001/vidB/00001.wav", rate=8000)
    elif breakage == "stereo":
        tone(root / "dev/wav/id10003/vidB/00005.wav", channels=2)
    fails_in_one_line(error, message, "sid", Corpora(voxceleb1=root), tmp_path / "out")


def test_iemocap_keeps_s3prls_classes_and_holds_out_each_session(tmp_path, downstream_env):
    from s3prl.downstream.emotion.dataset import IEMOCAPDataset

    root, out = fake_iemocap(tmp_path / "IEMOCAP_full_release"), tmp_path / "out"
    (report,) = prepare.prepare_tasks(("er",), Corpora(iemocap=root), out)
    rows = read_manifest(out / "manifests" / "iemocap.jsonl", ("emotion", "speaker"))
    # 'fru' and the label without audio are left out, 'exc' merged into happy, as by s3prl's builder
    assert [(r.id, r.fold, r.emotion, r.speaker) for r in rows if r.fold == 2] == [
        ("Ses02F_impro01_F000", 2, "neutral", "Ses02F"), ("Ses02F_impro01_M001", 2, "happy", "Ses02M"),
        ("Ses02F_impro01_F002", 2, "angry", "Ses02F"), ("Ses02F_impro01_M003", 2, "sad", "Ses02M")]
    assert all(r.split is None for r in rows)
    assert report.splits == {"fold1": (4, 2.0), "fold2": (4, 2.0)}
    info = json.loads((out / "er/prepared.json").read_text())
    assert info["folds"] == ["fold1", "fold2"] and info["config"]["downstream_expert"]["datarc"]["test_fold"] == "fold1"
    datarc = info["config"]["downstream_expert"]["datarc"]
    session = Path(datarc["meta_data"]) / "Session2"
    train = IEMOCAPDataset(datarc["root"], session / "train_meta_data.json", pre_load=False)
    test = IEMOCAPDataset(datarc["root"], session / "test_meta_data.json", pre_load=False)
    # s3prl's class indices (neu 0, hap 1, ang 2, sad 3); fold 2 tests on Session2, trains on Session1
    assert train.class_dict == {"neutral": 0, "happy": 1, "angry": 2, "sad": 3}
    assert sorted((name, label) for _, label, name in (test[i] for i in range(4))) == [
        ("Ses02F_impro01_F000", 0), ("Ses02F_impro01_F002", 2), ("Ses02F_impro01_M001", 1), ("Ses02F_impro01_M003", 3)]
    assert {name[:5] for _, _, name in (train[i] for i in range(len(train)))} == {"Ses01"}

    written = stamps(out)
    assert prepare.prepare_tasks(("er",), Corpora(iemocap=root), out)[0].up_to_date
    assert stamps(out) == written
    relabel(root / "Session1/dialog/EmoEvaluation/Ses01F_impro01.txt", "\tneu\t", "\tsad\t")
    assert not prepare.prepare_tasks(("er",), Corpora(iemocap=root), out)[0].up_to_date
    test = json.loads((out / "er/meta_data/Session1/test_meta_data.json").read_text())
    assert sorted(m["label"] for m in test["meta_data"]) == ["angry", "happy", "sad", "sad"]


def test_iemocap_stereo_audio_gives_one_line_naming_the_file(tmp_path):
    root = fake_iemocap(tmp_path / "IEMOCAP_full_release")
    tone(root / "Session2/sentences/wav/Ses02F_impro01/Ses02F_impro01_F002.wav", channels=2)
    fails_in_one_line(AudioError, r"iemocap.jsonl:7: .*Ses02F_impro01_F002.wav: 2 channels", "er",
                      Corpora(iemocap=root), tmp_path / "out")


def test_er_folds_on_some_lines_only_is_an_error(manifest, tmp_path):
    rows = rows_of(manifest)
    rows[2]["fold"] = 2
    write_manifest(manifest.parent, rows)
    with pytest.raises(UserError, match=r"manifest.jsonl:1: no 'fold', while other lines have one"):
        prepare.prepare_er(manifest, tmp_path / "out")


def test_cli_prepares_every_task_from_the_real_corpora(tmp_path, capsys):
    corpora = ["--librispeech", str(fake_librispeech(tmp_path / "LibriSpeech")),
               "--voxceleb1", str(fake_voxceleb1(tmp_path / "VoxCeleb1")),
               "--iemocap", str(fake_iemocap(tmp_path / "IEMOCAP_full_release"))]
    out = tmp_path / "out"
    # a missing corpus, or a broken one, is named before OUT is made
    assert main(["prepare", "all", *corpora[:4], "--out", str(out)]) == 2
    assert "prepare er: pass --manifest or --iemocap DIR" in capsys.readouterr().err
    (tmp_path / "LibriSpeech/dev-clean/26/495/26-495.trans.txt").write_text("26-495-0000 HELLO\n")
    assert main(["prepare", "all", *corpora, "--out", str(out)]) == 2
    assert "26-495-0001.flac: no transcript line" in capsys.readouterr().err and not out.exists()
    (tmp_path / "LibriSpeech/dev-clean/26/495/26-495.trans.txt").write_text("26-495-0000 HELLO\n26-495-0001 WORLD\n")
    assert main(["prepare", "all", *corpora, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (out / "manifests").glob("*.jsonl")) == ["iemocap.jsonl", "librispeech.jsonl",
                                                                            "voxceleb1.jsonl"]
    assert all(f"{task}: {out / task} (written) from {out / 'manifests'}" in printed for task in prepare.TASKS)
    assert main(["prepare", "all", *corpora, "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("(up to date)") == 4
    assert main(["prepare", "sid", "--manifest", str(out / "manifests/voxceleb1.jsonl"), *corpora[2:4],
                     "--out", str(out)]) == 2
    assert "give either --manifest or the real corpora (with --lexicon, --split-file), not both" in \
        capsys.readouterr().err
