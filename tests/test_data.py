"""Audio checks and the bucketing loader."""

import re

import numpy as np
import pytest
import soundfile as sf
import torch

from s3prl_ekd.errors import AudioError, ConfigError
from s3prl_ekd.io.audio import load_audio
from s3prl_ekd.plugin.pretrain_data import (
    BucketDataset,
    Utterance,
    crop_and_pad,
    crop_start,
    load_datarc,
    make_buckets,
    statistics_utterances,
)


def write(path, wav, rate):
    sf.write(str(path), wav, rate)
    return path


def test_bad_audio_gives_clear_errors(tmp_path):
    with pytest.raises(AudioError, match=r"44100 Hz, expected 16000.*resample: true"):
        load_audio(write(tmp_path / "a.wav", np.zeros(4410, "float32"), 44100))
    with pytest.raises(AudioError, match=r"2 channels, expected mono.*downmix: true"):
        load_audio(write(tmp_path / "s.wav", np.zeros((1600, 2), "float32"), 16000))
    with pytest.raises(AudioError, match="empty"):
        load_audio(write(tmp_path / "e.wav", np.zeros(0, "float32"), 16000))
    (tmp_path / "c.wav").write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(AudioError, match=r"c\.wav: cannot read audio"):
        load_audio(tmp_path / "c.wav")
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "missing.wav")


def test_resample_and_downmix_when_asked(tmp_path):
    stereo = np.stack([np.ones(8000, "float32") * 0.5, np.zeros(8000, "float32")], axis=1)
    wav = load_audio(write(tmp_path / "s.wav", stereo, 32000), resample=True, downmix=True)
    assert wav.shape == (4000,)
    assert abs(float(wav[1000:3000].mean()) - 0.25) < 1e-3


def test_audio_dir_dataset_reports_the_bad_file(tmp_path):
    for i in range(3):
        write(tmp_path / f"ok{i}.wav", np.random.randn(16000).astype("float32") * 0.1, 16000)
    write(tmp_path / "bad.wav", np.zeros(22050, "float32"), 22050)
    with pytest.raises(AudioError, match=r"bad\.wav: sample rate is 22050"):
        BucketDataset(load_datarc({"audio_dir": str(tmp_path), "train_batch_size": 2}))


def test_buckets_sorted_and_batched(tmp_path):
    rows = [Utterance(tmp_path / f"f{i}", n, f"f{i}") for i, n in enumerate([5, 50, 20, 40, 10])]

    def keys(buckets):
        return [[row.key for row in bucket] for bucket in buckets]

    assert keys(make_buckets(rows, 2)) == [["f1", "f3"], ["f2", "f4"]]  # the last lone file is dropped, as in s3prl
    assert keys(make_buckets(rows, 2, max_timestep=30)) == [["f2", "f4"]]


def test_crops_for_stored_targets_start_on_a_frame():
    torch.manual_seed(0)
    starts = {crop_start(48000, 16000, hop=320) for _ in range(200)}
    assert all(s % 320 == 0 and 0 <= s <= 32000 for s in starts) and len(starts) > 50
    assert crop_start(10000, 16000, hop=320) == 0 and crop_start(10000, 0) == 0


def test_crop_and_pad():
    torch.manual_seed(0)
    wavs = [torch.arange(100, dtype=torch.float), torch.arange(30, dtype=torch.float)]
    batch, lengths = crop_and_pad(wavs, 50)
    assert batch.shape == (2, 50) and lengths.tolist() == [50, 30]
    start = int(batch[0, 0])
    assert torch.equal(batch[0], torch.arange(start, start + 50, dtype=torch.float))  # a contiguous crop
    assert torch.equal(batch[1, 30:], torch.zeros(20))


def test_bucket_csv_source(tmp_path, speech_dir):
    files = sorted(speech_dir.glob("*.wav"))[:4]
    lines = [",file_path,length,label"] + [f"{i},{f.name},{sf.info(str(f)).frames},x" for i, f in enumerate(files)]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    dataset = BucketDataset(load_datarc({"file_path": str(tmp_path), "sets": ["train"], "libri_root": str(speech_dir),
                                         "train_batch_size": 2, "sequence_length": 8000}))
    assert len(dataset) == 2
    wave, lengths = dataset[0]
    assert wave.shape == (2, 8000) and lengths.tolist() == [8000, 8000]
    with pytest.raises(ConfigError, match=r"dev\.csv not found"):
        BucketDataset(load_datarc({"file_path": str(tmp_path), "sets": ["dev"]}))


@pytest.mark.parametrize("content, message", [
    (np.full(8000, np.nan, "float32"), "holds NaN or infinite samples"),
    (np.concatenate([np.zeros(7999, "float32"), [np.inf]]).astype("float32"), "holds NaN or infinite samples"),
    (np.zeros(8000, "float32"), "is silent (every sample is 0)"),
])
def test_poisoned_audio_is_named_at_load(tmp_path, content, message):
    path = tmp_path / "poisoned.wav"
    sf.write(str(path), content, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=rf"poisoned\.wav: {re.escape(message)}"):
        load_audio(path)


def test_files_shorter_than_the_receptive_field(tmp_path):
    for i in range(4):
        write(tmp_path / f"ok{i}.wav", np.random.randn(16000).astype("float32") * 0.1, 16000)
    write(tmp_path / "tiny.wav", np.random.randn(300).astype("float32") * 0.1, 16000)
    datarc = {"audio_dir": str(tmp_path), "train_batch_size": 2}
    with pytest.raises(AudioError, match=r"tiny\.wav: 300 samples, shorter than the student CNN's receptive field "
                                         r"\(400 samples\).*skip_short: true"):
        BucketDataset(load_datarc(datarc), min_samples=400)
    dataset = BucketDataset(load_datarc({**datarc, "skip_short": True}), min_samples=400)
    assert sum(len(b) for b in dataset.buckets) == 4


def test_statistics_utterances_evenly_spaced_whatever_the_seed(tmp_path):
    for i in range(10):
        write(tmp_path / f"u{i}.wav", np.zeros(500 if i == 3 else 4000, "float32"), 16000)
    config = load_datarc({"audio_dir": str(tmp_path)})
    keys = lambda rows: [r.key for r in rows]  # noqa: E731
    # u3 (500 samples) is shorter than min_samples and left out; of the 9 left, every third
    assert keys(statistics_utterances(config, 800, 0)) == [f"u{i}.wav" for i in range(10) if i != 3]
    torch.manual_seed(0)
    first = statistics_utterances(config, 800, 3)
    torch.manual_seed(1)
    assert keys(first) == keys(statistics_utterances(config, 800, 3)) == ["u0.wav", "u4.wav", "u7.wav"]
