"""Training audio for EKD pretraining: s3prl's bucket CSVs or a plain folder of files.

Utterances are grouped by length into batches (s3prl's bucketing: the
DataLoader yields one pre-built batch per item), randomly cropped to
`sequence_length` samples and zero-padded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from s3prl_ekd.errors import AudioError, ConfigError
from s3prl_ekd.io.audio import SAMPLE_RATE, audio_info, list_audio_files, load_audio
from s3prl_ekd.io.strict import from_dict


@dataclass
class DataConfig:
    """`pretrain_expert.datarc` of the runner config (-c)."""

    train_batch_size: int = 24
    sequence_length: int = 250000    # random crop in samples (15.6 s, as DistilHuBERT); 0 = no crop
    num_workers: int = 4
    # Either s3prl's bucket CSVs ...
    libri_root: str | None = None    # CSV paths are relative to this folder
    file_path: str | None = None     # folder holding {set}.csv (",file_path,length,label")
    sets: list[str] = field(default_factory=list)
    # ... or every .wav/.flac/.ogg file under a folder.
    audio_dir: str | None = None
    max_timestep: int = 0            # s3prl: > 0 drops longer files, < 0 drops shorter ones (samples)
    resample: bool = False           # resample other rates to 16 kHz instead of failing
    downmix: bool = False            # average channels instead of failing on multi-channel files
    skip_short: bool = False         # skip (and count) files shorter than the CNN's receptive field instead of failing


def load_datarc(datarc: dict) -> DataConfig:
    """Strictly parse the datarc and check that it names exactly one data source."""
    config = from_dict(DataConfig, dict(datarc), "pretrain_expert.datarc")
    has_csv, has_dir = config.file_path is not None, config.audio_dir is not None
    if has_csv == has_dir:
        raise ConfigError("pretrain_expert.datarc: set either file_path + sets (+ libri_root) for s3prl's "
                          "bucket CSVs or audio_dir for a folder of audio files, not both or neither")
    if has_csv and not config.sets:
        raise ConfigError("pretrain_expert.datarc.sets: list the CSV names under file_path, e.g. [train-clean-100]")
    if config.train_batch_size < 1:
        raise ConfigError("pretrain_expert.datarc.train_batch_size: must be >= 1")
    return config


def check_data_source(config: DataConfig) -> None:
    """The folder or CSV files the datarc names exist (cheap: no audio is read)."""
    if config.audio_dir is not None:
        if not Path(config.audio_dir).is_dir():
            raise ConfigError(f"pretrain_expert.datarc.audio_dir: {config.audio_dir} is not a folder; "
                              "point it at your training audio")
        return
    for name in config.sets:
        csv = Path(config.file_path) / f"{name}.csv"
        if not csv.is_file():
            raise ConfigError(f"pretrain_expert.datarc.sets: {csv} not found; create it with s3prl's "
                              "preprocess/generate_len_for_bucket.py or use audio_dir")


def read_bucket_csvs(file_path: str, sets: list[str], libri_root: str | None) -> list[tuple[Path, int]]:
    """(path, samples) of every row of s3prl's `{file_path}/{set}.csv` files."""
    import pandas as pd

    rows = []
    for name in sets:
        csv = Path(file_path) / f"{name}.csv"
        if not csv.is_file():
            raise ConfigError(f"pretrain_expert.datarc.sets: {csv} not found; create it with s3prl's "
                              "preprocess/generate_len_for_bucket.py or use audio_dir")
        table = pd.read_csv(csv)
        missing = {"file_path", "length"} - set(table.columns)
        if missing:
            raise ConfigError(f"{csv}: missing column(s) {sorted(missing)}; expected header ',file_path,length,label'")
        root = Path(libri_root) if libri_root else Path()
        rows += [(root / p, int(n)) for p, n in zip(table["file_path"], table["length"])]
    return rows


def scan_audio_dir(audio_dir: str, resample: bool, downmix: bool) -> list[tuple[Path, int]]:
    """(path, samples at 16 kHz) of every audio file under `audio_dir`, checking each header."""
    rows = []
    for path in list_audio_files(audio_dir):
        info = audio_info(path)
        if info.frames == 0 or (info.channels != 1 and not downmix) or (info.samplerate != SAMPLE_RATE and not resample):
            load_audio(path, resample=resample, downmix=downmix)  # raises the AudioError naming file and fix
        rows.append((path, round(info.frames * SAMPLE_RATE / info.samplerate)))
    return rows


def drop_short(rows: list[tuple[Path, int]], min_samples: int, skip: bool) -> list[tuple[Path, int]]:
    """Rows of at least `min_samples` samples; a shorter one is an AudioError unless `skip`."""
    kept = [row for row in rows if row[1] >= min_samples]
    if len(kept) < len(rows):
        short = [row for row in rows if row[1] < min_samples]
        if not skip:
            path, samples = short[0]
            raise AudioError(f"{path}: {samples} samples, shorter than the student CNN's receptive field "
                             f"({min_samples} samples), so it yields no frame; remove it, or set "
                             f"skip_short: true in pretrain_expert.datarc ({len(short)} such file(s))")
        print(f"[EKD] - skipped {len(short)} file(s) shorter than {min_samples} samples (skip_short: true)")
    return kept


def make_buckets(rows: list[tuple[Path, int]], batch_size: int, max_timestep: int = 0) -> list[list[Path]]:
    """Sort by length (longest first) and cut into batches, as s3prl's WaveDataset does."""
    if max_timestep > 0:
        rows = [r for r in rows if r[1] < max_timestep]
    elif max_timestep < 0:
        rows = [r for r in rows if r[1] > -max_timestep]
    rows = sorted(rows, key=lambda r: -r[1])
    buckets = [[p for p, _ in rows[i:i + batch_size]] for i in range(0, len(rows), batch_size)]
    return [b for b in buckets if len(b) > 1 or batch_size == 1]


def crop_and_pad(wavs: list[torch.Tensor], sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop each (S_i,) wave to `sequence_length` and zero-pad: -> (B, S), lengths (B,)."""
    cropped = []
    for wav in wavs:
        if 0 < sequence_length < len(wav):
            start = int(torch.randint(0, len(wav) - sequence_length + 1, ()))
            wav = wav[start:start + sequence_length]
        cropped.append(wav)
    lengths = torch.tensor([len(w) for w in cropped], dtype=torch.long)
    batch = torch.zeros(len(cropped), int(lengths.max()))
    for i, wav in enumerate(cropped):
        batch[i, :len(wav)] = wav
    return batch, lengths


class BucketDataset(Dataset):
    """Item i is batch i: (wave (B, S), lengths (B,))."""

    def __init__(self, config: DataConfig, min_samples: int = 1):
        self.config = config
        if config.audio_dir is not None:
            rows = scan_audio_dir(config.audio_dir, config.resample, config.downmix)
        else:
            rows = read_bucket_csvs(config.file_path, config.sets, config.libri_root)
        rows = drop_short(rows, min_samples, config.skip_short)
        self.buckets = make_buckets(rows, config.train_batch_size, config.max_timestep)
        if not self.buckets:
            source = config.audio_dir or config.file_path
            raise ConfigError(f"pretrain_expert.datarc: {source} gives no batch of {config.train_batch_size} "
                              "utterances; add audio or lower train_batch_size")

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        wavs = [load_audio(p, resample=self.config.resample, downmix=self.config.downmix)
                for p in self.buckets[index]]
        return crop_and_pad(wavs, self.config.sequence_length)


def _first(items):
    return items[0]  # the DataLoader's batch of one pre-built bucket


def train_dataloader(config: DataConfig, min_samples: int = 1) -> DataLoader:
    dataset = BucketDataset(config, min_samples)
    workers = min(config.num_workers, os.cpu_count() or 1)
    return DataLoader(dataset, batch_size=1, shuffle=True, num_workers=workers,
                      collate_fn=_first, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0)
