"""plugin/downstream.py: s3prl's run_downstream.py here: audio without torchcodec, a private file-list
cache, memoised upstream states and early stopping."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import soundfile as sf
import torch

from s3prl_ekd import patches
from s3prl_ekd.plugin import downstream
from s3prl_ekd.plugin.runner import installed_s3prl_dir


def test_downstream_environment_reads_audio_with_or_without_torchcodec(tmp_path):
    import torchaudio

    wave = (0.1 * np.sin(np.arange(8000) / 7)).astype(np.float32)
    sf.write(tmp_path / "a.flac", wave, 16000, subtype="PCM_16")
    expected = sf.read(tmp_path / "a.flac", dtype="float32")[0]
    loaded, rate = patches.soundfile_load(tmp_path / "a.flac")
    assert rate == 16000 and loaded.shape == (1, 8000) and loaded.dtype == torch.float32
    np.testing.assert_array_equal(loaded[0].numpy(), expected)
    part, _ = patches.soundfile_load(tmp_path / "a.flac", frame_offset=100, num_frames=50)
    np.testing.assert_array_equal(part[0].numpy(), expected[100:150])
    before = torchaudio.load
    with downstream.downstream_environment():
        through_torchaudio, rate = torchaudio.load(str(tmp_path / "a.flac"))  # what s3prl's datasets call
        from s3prl.downstream.voxceleb1 import dataset

        assert not dataset.CACHE_PATH.startswith(str(installed_s3prl_dir()))
    assert torchaudio.load is before
    np.testing.assert_allclose(through_torchaudio[0].numpy(), expected, atol=1e-6)


def test_every_ctc_loader_gets_the_recipes_num_workers(monkeypatch):
    """s3prl's ctc expert pops num_workers out of its corpus config when building the train loader, so
    its dev and test loaders fell back to 12 worker processes; in the environment each gets a copy."""
    from s3prl.downstream.ctc import expert as ctc_expert

    seen = []

    def s3prl_like(split, tokenizer, corpus):  # what s3prl's load_dataset does with the config
        seen.append((split, corpus.pop("num_workers", 12)))

    monkeypatch.setattr(ctc_expert, "load_dataset", s3prl_like)
    corpus = {"name": "libriphone", "num_workers": 0}
    with downstream.downstream_environment():
        for split in ("train", "dev", "test"):
            ctc_expert.load_dataset(split, None, corpus)
    assert seen == [("train", 0), ("dev", 0), ("test", 0)]
    assert corpus == {"name": "libriphone", "num_workers": 0} and ctc_expert.load_dataset is s3prl_like


def test_memoized_upstream_equals_each_utterance_alone_and_runs_each_once(tiny_teachers, speech_dir):
    import s3prl.hub

    from s3prl_ekd.io.audio import load_audio

    upstream = s3prl.hub.hubert_local(ckpt=str(tiny_teachers["hubert_a"])).eval()
    memo = downstream.MemoizedUpstream(upstream, max_bytes=2**30)
    wavs = [load_audio(p) for p in sorted(speech_dir.glob("*.wav"))[:3]]
    with torch.no_grad():
        batch = memo(wavs)["hidden_states"]
        alone = [upstream([w])["hidden_states"] for w in wavs]
        again = memo(list(reversed(wavs)))["hidden_states"]
    assert (memo.misses, memo.hits) == (3, 3)
    for layer in range(len(batch)):
        for i, states in enumerate(alone):
            frames = states[layer].shape[1]
            torch.testing.assert_close(batch[layer][i, :frames], states[layer][0], rtol=0, atol=0)
            assert batch[layer][i, frames:].abs().sum() == 0  # zero padding beyond the utterance
        torch.testing.assert_close(again[layer][0], batch[layer][2, :again[layer].shape[1]])
    assert memo.get_downsample_rates("hidden_states") == 320
    shared = downstream.MemoizedUpstream(upstream, max_bytes=2**30, identity="hubert_a")
    again_shared = downstream.MemoizedUpstream(upstream, max_bytes=2**30, identity="hubert_a")
    with torch.no_grad():
        shared(wavs)
        again_shared(wavs)
    assert (shared.misses, again_shared.misses, again_shared.hits) == (3, 0, 3)  # a later run reuses them
    capped = downstream.MemoizedUpstream(upstream, max_bytes=0)  # nothing fits: computed every time
    with torch.no_grad():
        capped(wavs[:1])
        capped(wavs[:1])
    assert (capped.misses, capped.hits, len(capped.cache)) == (2, 0, 0)


def test_early_stop_and_memoized_run_through_run_downstream(tmp_path):
    """ER with fbank, evaluating every step: with --early-stop 2 the run ends before total_steps,
    says when in early_stop.json, keeps its tensorboard log and dev-best checkpoint."""
    from conftest import write_yaml

    from s3prl_ekd.demo.corpus import synthesize_corpus
    from s3prl_ekd.io.events import read_scalars
    from s3prl_ekd.recipes.prepare import prepare_all
    from s3prl_ekd.recipes.superb import load_prepared, recipe_config

    manifest = synthesize_corpus(tmp_path / "corpus", utterances=40, speakers=4, seed=0, progress=False)
    prepare_all(manifest, tmp_path / "data")
    config = recipe_config("er", "cpu-small", load_prepared(tmp_path / "data", "er"), steps=200)
    config["runner"].update(eval_step=1, log_step=1, save_step=1000)
    config["optimizer"]["lr"] = 1e-6  # learns nothing: the dev accuracy cannot keep rising
    recipe = write_yaml(tmp_path / "er.yaml", config)
    expdir = tmp_path / "exp"
    proc = subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", "downstream", "-m", "train", "-u", "fbank",
                           "-d", "emotion", "-c", str(recipe), "-p", str(expdir), "--device", "cpu",
                           "--early-stop", "2", "--memoize-upstream", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stop = json.loads((expdir / downstream.EARLY_STOP_NAME).read_text())
    assert stop["stopped_at_step"] < 200 and stop["patience"] == 2
    assert [e["improved"] for e in stop["evaluations"]][-2:] == [False, False]
    dev = read_scalars(expdir)["emotion-fold1/dev-acc"]
    assert [step for step, _ in dev] == [e["step"] for e in stop["evaluations"]]  # the log was flushed
    assert (expdir / "dev-best.ckpt").is_file()
    bad = subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", "downstream", "-m", "train", "-u", "fbank",
                          "-d", "emotion", "-c", str(recipe), "-p", str(tmp_path / "exp2"), "--early-stop", "0"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.endswith("--early-stop 0: use a number of evaluations >= 1\n")


def test_in_process_runs_wrap_isinstance_once():
    """s3prl's main() wraps builtins.isinstance on every call; runs in one process must not nest it."""
    import builtins

    from s3prl.utility import helper

    original = builtins.isinstance
    try:
        for _ in range(3):
            with downstream.downstream_environment():
                helper.hack_isinstance()  # what run_downstream.py's main() calls first
        wrapped = builtins.isinstance
        assert wrapped.__qualname__ == "hack_isinstance.<locals>.isinstance"  # s3prl's hack did run, once
        with downstream.downstream_environment():
            helper.hack_isinstance()
        assert builtins.isinstance is wrapped
    finally:
        builtins.isinstance = original


def test_shared_cnn_features_are_the_computed_ones_bit_for_bit(tmp_path, monkeypatch):
    """--share-cnn-features: the first run writes a CNN's output per utterance, later runs (other
    processes, other students with the same CNN) read exactly that tensor; another CNN gets its own
    folder; a damaged file is computed and written again."""
    from s3prl_ekd.core.student import EKDStudent, ekd_student_demo

    torch.manual_seed(0)
    cnn = EKDStudent(ekd_student_demo(feature_grad_mult=0.0), [32], 1).backbone.feature_extractor.eval()
    wave = torch.randn(1, 8000)
    with torch.no_grad():
        expected = cnn(wave)
        first = downstream.SharedCNNFeatures(tmp_path)(cnn, wave)
        files = list(tmp_path.glob("*/*.npy"))
        assert torch.equal(first, expected) and len(files) == 1

        def not_again(*_):
            raise AssertionError("computed again instead of read")

        monkeypatch.setattr(type(cnn), "forward", not_again)
        assert torch.equal(downstream.SharedCNNFeatures(tmp_path)(cnn, wave), expected)  # a fresh reader
        monkeypatch.undo()
        files[0].write_bytes(files[0].read_bytes()[:100])  # cut short
        assert torch.equal(downstream.SharedCNNFeatures(tmp_path)(cnn, wave), expected)
        assert files[0].stat().st_size > 100
        other = EKDStudent(ekd_student_demo(feature_grad_mult=0.0), [32], 1).backbone.feature_extractor.eval()
        downstream.SharedCNNFeatures(tmp_path)(other, wave)
    assert len(list(tmp_path.iterdir())) == 2


def test_student_takes_shared_cnn_features_only_for_one_utterance_without_gradients():
    from s3prl_ekd.core.student import EKDStudent, ekd_student_demo

    torch.manual_seed(0)
    student = EKDStudent(ekd_student_demo(feature_grad_mult=0.0), [32], 1).eval()
    calls = []

    def lookup(cnn, wave):
        calls.append(tuple(wave.shape))
        return cnn(wave)

    one, two = torch.randn(1, 8000), torch.randn(2, 8000)
    with torch.no_grad():
        plain = student(one, torch.tensor([8000])).hidden_states
        student.cnn_features = lookup
        shared = student(one, torch.tensor([8000])).hidden_states
        student(two, torch.tensor([8000, 8000]))
    student(one, torch.tensor([8000]))  # gradients on: training, never from a lookup
    assert calls == [(1, 8000)]
    assert all(torch.equal(a, b) for a, b in zip(plain, shared))
