"""The espeak-ng corpus: phone parsing, split plan, determinism, audio format, prosody styles."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import soundfile as sf

from s3prl_ekd.demo import corpus
from s3prl_ekd.errors import UserError
from s3prl_ekd.recipes.prepare import espeak_phones, read_symbols


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """24 utterances by 4 speakers (dev and test: 4 each)."""
    return corpus.synthesize_corpus(tmp_path_factory.mktemp("corpus") / "c", utterances=24,
                                    speakers=4, seed=3, progress=False)


def rows_of(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_parse_phones_drops_stress_and_pauses():
    assert corpus.parse_phones("h_@_l_'oU w_'3:_l_d") == ["h", "@", "l", "oU", "w", "3:", "l", "d"]
    # secondary stress, a pause phoneme left as ":" by the separator, two clauses on two lines
    assert corpus.parse_phones(",oU_v_3_r-_: a#\nD_I2_;") == ["oU", "v", "3", "r-", "a#", "D", "I2", ";"]


def test_plan_splits_sentences_disjoint_and_speakers_balanced():
    plan = corpus.plan_corpus(120, 6, seed=5)
    by_split = {s: [u for u in plan if u.split == s] for s in corpus.SPLITS}
    assert [len(by_split[s]) for s in corpus.SPLITS] == [96, 12, 12]
    sentences = {s: {u.text for u in by_split[s]} for s in corpus.SPLITS}
    assert not sentences["train"] & sentences["dev"] and not sentences["train"] & sentences["test"]
    assert not sentences["dev"] & sentences["test"]
    for split, utterances in by_split.items():
        counts = {}
        for u in utterances:
            counts[u.speaker.speaker] = counts.get(u.speaker.speaker, 0) + 1
        assert len(counts) == 6 and max(counts.values()) - min(counts.values()) <= 1, split
    # every speaker speaks in every style in train
    pairs = {(u.speaker.speaker, u.style.emotion) for u in by_split["train"]}
    assert len(pairs) == 6 * len(corpus.STYLES)
    assert len({s.voice for s in corpus.speakers(30)}) == 30
    assert [u.text for u in corpus.plan_corpus(120, 6, seed=5)] == [u.text for u in plan]
    assert [u.text for u in corpus.plan_corpus(120, 6, seed=6)] != [u.text for u in plan]


def test_too_few_utterances_or_speakers_is_a_clear_error():
    with pytest.raises(UserError, match="too few for 12 speakers"):
        corpus.plan_corpus(30, 12, seed=0)
    with pytest.raises(UserError, match="--speakers 0"):
        corpus.speakers(0)


def test_missing_espeak_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get install espeak-ng"):
        corpus.synthesize_corpus(tmp_path / "c", 24, 4)


def test_corpus_files_labels_and_format(small_corpus):
    rows = rows_of(small_corpus)
    assert len(rows) == 24
    assert {r["split"] for r in rows} == {"train", "dev", "test"}
    assert {r["speaker"] for r in rows if r["split"] == "test"} == {"spk00", "spk01", "spk02", "spk03"}
    assert {r["emotion"] for r in rows} == {s.emotion for s in corpus.STYLES}
    for row in rows:
        info = sf.info(str(small_corpus.parent / row["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert info.duration == pytest.approx(row["duration"], abs=1e-3)
        assert row["text"] == row["text"].lower() and row["text"].replace(" ", "").isalpha()
        assert len(row["phones"].split()) >= len(row["text"].split())


def test_phones_round_trip_through_the_pr_vocabulary(small_corpus):
    from s3prl.downstream.ctc.text import load_text_encoder

    tokenizer = load_text_encoder("word", str(espeak_phones()))
    assert len(read_symbols(espeak_phones())) + 3 == tokenizer.vocab_size
    for row in rows_of(small_corpus):
        ids = tokenizer.encode(row["phones"])
        assert tokenizer.unk_idx not in ids, row["phones"]
        assert ids[-1] == tokenizer.eos_idx
        assert tokenizer.decode(ids) == row["phones"]


def test_styles_change_the_speech_rate(small_corpus):
    rows = rows_of(small_corpus)

    def seconds_per_phone(emotion):
        picked = [r for r in rows if r["emotion"] == emotion]
        return sum(r["duration"] for r in picked) / sum(len(r["phones"].split()) for r in picked)

    # sad is spoken at 115 words/min, angry at 205
    assert seconds_per_phone("sad") > 1.3 * seconds_per_phone("angry")


def test_same_seed_same_bytes_and_rerun_is_a_no_op(small_corpus, tmp_path):
    again = corpus.synthesize_corpus(tmp_path / "again", 24, 4, seed=3, progress=False)

    def digest(manifest):
        files = [manifest] + sorted((manifest.parent / "wav").iterdir())
        return [hashlib.md5(f.read_bytes()).hexdigest() for f in files]

    assert digest(again) == digest(small_corpus)
    stamp = (again.stat().st_mtime_ns, (again.parent / "wav" / "test_00020.wav").stat().st_mtime_ns)
    assert corpus.synthesize_corpus(tmp_path / "again", 24, 4, seed=3, progress=False) == again
    assert (again.stat().st_mtime_ns, (again.parent / "wav" / "test_00020.wav").stat().st_mtime_ns) == stamp


def test_refuses_a_folder_that_is_not_a_corpus(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files that `s3prl-ekd corpus synth` did not write; .* --force"):
        corpus.synthesize_corpus(tmp_path, 24, 4)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_another_corpus_is_not_overwritten_without_force(small_corpus, tmp_path):
    import shutil

    from s3prl_ekd import cli

    target = tmp_path / "c"
    shutil.copytree(small_corpus.parent, target)
    before = (target / "manifest.jsonl").read_bytes()
    with pytest.raises(UserError, match="holds a corpus of other parameters; .* --force"):
        corpus.synthesize_corpus(target, 24, 4, seed=4, progress=False)
    assert (target / "manifest.jsonl").read_bytes() == before
    assert cli.main(["corpus", "synth", str(target), "--utterances", "24", "--speakers", "4", "--seed", "3"]) == 0
    assert (target / "manifest.jsonl").read_bytes() == before  # the same corpus: up to date, untouched
    corpus.synthesize_corpus(target, 24, 4, seed=4, progress=False, force=True)
    assert (target / "manifest.jsonl").read_bytes() != before


def test_an_interrupted_synthesis_is_redone(tmp_path):
    info = corpus._corpus_info(24, 4, 3)
    (tmp_path / "c" / "wav").mkdir(parents=True)
    (tmp_path / "c" / "corpus.json").write_text(__import__("json").dumps({**info, "complete": False}))
    (tmp_path / "c" / "wav" / "train_00000.wav").write_bytes(b"half a file")
    assert corpus.corpus_state(tmp_path / "c", info) == "unfinished"
    manifest = corpus.synthesize_corpus(tmp_path / "c", 24, 4, seed=3, progress=False)
    assert corpus.corpus_state(tmp_path / "c", info) == "complete" and len(rows_of(manifest)) == 24
