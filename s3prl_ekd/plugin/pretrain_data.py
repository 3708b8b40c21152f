"""Training audio for EKD pretraining: s3prl's bucket CSVs or a plain folder of files, and, with a
teacher-target store, the teachers' stored layers for the same frames.

Utterances are grouped by length into batches (s3prl's bucketing: the DataLoader yields one
pre-built batch per item), randomly cropped to `sequence_length` samples and zero-padded. With
`targets: DIR` a crop starts on a frame boundary (a multiple of the 320-sample hop) and the batch
carries the stored target frames of the crop.

s3prl's own pretraining dataset (pretrain/bucket_dataset.py) reads only CSVs, loads audio with
torchaudio (which needs torchcodec from 2.9 on) and crops with the global `random`; hence this one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

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
    targets: str | None = None       # a teacher-target store (`s3prl-ekd targets build`): no teacher runs


class Utterance(NamedTuple):
    path: Path
    samples: int  # at 16 kHz
    key: str      # path relative to the data root: how a target store names it


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
    else:
        for name in config.sets:
            csv = Path(config.file_path) / f"{name}.csv"
            if not csv.is_file():
                raise ConfigError(f"pretrain_expert.datarc.sets: {csv} not found; create it with s3prl's "
                                  "preprocess/generate_len_for_bucket.py or use audio_dir")
    if config.targets is not None and not Path(config.targets).is_dir():
        raise ConfigError(f"pretrain_expert.datarc.targets: {config.targets} is not a folder; build a store "
                          "with `s3prl-ekd targets build` or drop the key to run the teachers live")


def read_bucket_csvs(file_path: str, sets: list[str], libri_root: str | None) -> list[Utterance]:
    """Every row of s3prl's `{file_path}/{set}.csv` files."""
    import pandas as pd

    rows = []
    root = Path(libri_root) if libri_root else Path()
    for name in sets:
        csv = Path(file_path) / f"{name}.csv"
        if not csv.is_file():
            raise ConfigError(f"pretrain_expert.datarc.sets: {csv} not found; create it with s3prl's "
                              "preprocess/generate_len_for_bucket.py or use audio_dir")
        table = pd.read_csv(csv)
        missing = {"file_path", "length"} - set(table.columns)
        if missing:
            raise ConfigError(f"{csv}: missing column(s) {sorted(missing)}; expected header ',file_path,length,label'")
        rows += [Utterance(root / p, int(n), str(p)) for p, n in zip(table["file_path"], table["length"])]
    return rows


def scan_audio_dir(audio_dir: str, resample: bool, downmix: bool) -> list[Utterance]:
    """Every audio file under `audio_dir` (length at 16 kHz), checking each header."""
    rows = []
    for path in list_audio_files(audio_dir):
        info = audio_info(path)
        if info.frames == 0 or (info.channels != 1 and not downmix) or (info.samplerate != SAMPLE_RATE and not resample):
            load_audio(path, resample=resample, downmix=downmix)  # raises the AudioError naming file and fix
        rows.append(Utterance(path, round(info.frames * SAMPLE_RATE / info.samplerate),
                              str(path.relative_to(audio_dir))))
    return rows


# Scans of an audio folder in this process: the check before s3prl starts and the dataset s3prl's runner
# builds in the same process read each header once.
_SCANNED: dict[tuple, list[Utterance]] = {}


def read_utterances(config: DataConfig) -> list[Utterance]:
    """Every training utterance the datarc names; an audio folder's headers are checked (rate, channels,
    empty or unreadable files are one AudioError naming the file)."""
    if config.audio_dir is None:
        return read_bucket_csvs(config.file_path, config.sets, config.libri_root)
    key = (str(Path(config.audio_dir).resolve()), config.resample, config.downmix)
    if key not in _SCANNED:
        _SCANNED[key] = scan_audio_dir(config.audio_dir, config.resample, config.downmix)
    return list(_SCANNED[key])


def drop_short(rows: list[Utterance], min_samples: int, skip: bool) -> list[Utterance]:
    """Rows of at least `min_samples` samples; a shorter one is an AudioError unless `skip`."""
    kept = [row for row in rows if row.samples >= min_samples]
    if len(kept) < len(rows):
        short = [row for row in rows if row.samples < min_samples]
        if not skip:
            raise AudioError(f"{short[0].path}: {short[0].samples} samples, shorter than the student CNN's receptive "
                             f"field ({min_samples} samples), so it yields no frame; remove it, or set "
                             f"skip_short: true in pretrain_expert.datarc ({len(short)} such file(s))")
        print(f"[EKD] - skipped {len(short)} file(s) shorter than {min_samples} samples (skip_short: true)")
    return kept


def statistics_utterances(config: DataConfig, min_samples: int, limit: int) -> list[Utterance]:
    """Up to `limit` (0 = every) training utterances of at least `min_samples`, evenly spaced over
    the key order (the same ones whatever the seed): the audio target statistics are computed over."""
    rows = sorted((r for r in read_utterances(config) if r.samples >= min_samples), key=lambda r: r.key)
    if limit <= 0 or len(rows) <= limit:
        return rows
    return [rows[i * len(rows) // limit] for i in range(limit)]


def make_buckets(rows: list[Utterance], batch_size: int, max_timestep: int = 0) -> list[list[Utterance]]:
    """Sort by length (longest first) and cut into batches, as s3prl's WaveDataset does."""
    if max_timestep > 0:
        rows = [r for r in rows if r.samples < max_timestep]
    elif max_timestep < 0:
        rows = [r for r in rows if r.samples > -max_timestep]
    rows = sorted(rows, key=lambda r: -r.samples)
    buckets = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return [b for b in buckets if len(b) > 1 or batch_size == 1]


def crop_start(samples: int, sequence_length: int, hop: int = 1) -> int:
    """A random crop start: uniform over valid starts, a multiple of `hop` (0 when no crop is needed)."""
    if not 0 < sequence_length < samples:
        return 0
    return hop * int(torch.randint(0, (samples - sequence_length) // hop + 1, ()))


def pad_batch(wavs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] (S_i,) -> zero-padded (B, S), lengths (B,)."""
    lengths = torch.tensor([len(w) for w in wavs], dtype=torch.long)
    batch = torch.zeros(len(wavs), int(lengths.max()))
    for i, wav in enumerate(wavs):
        batch[i, :len(wav)] = wav
    return batch, lengths


def crop_and_pad(wavs: list[torch.Tensor], sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop each (S_i,) wave to `sequence_length` and zero-pad: -> (B, S), lengths (B,)."""
    cropped = []
    for wav in wavs:
        start = crop_start(len(wav), sequence_length)
        cropped.append(wav[start:start + sequence_length] if sequence_length > 0 else wav)
    return pad_batch(cropped)


@dataclass
class StoredTargets:
    """Which stored teachers and layers a student reads (see plugin/targets.py: match_store)."""

    store: object            # io.target_store.TargetStore
    teachers: list[int]      # store teacher index for each config teacher
    layers: list[list[int]]  # per config teacher: indices into the stored layers
    hop: int = 320           # samples per frame of the teachers' CNN
    field: int = 400         # samples of one frame (receptive field)
    # per config teacher: LayerStats of its selected layers over the store (target_norm); None if
    # the store holds no statistics
    stats: list | None = None


class BucketDataset(Dataset):
    """Item i is batch i: (wave (B, S), lengths (B,)) or, with stored targets,
    (wave, lengths, [K] (B, L, T, D_k) targets, target frames (B,))."""

    def __init__(self, config: DataConfig, min_samples: int = 1, targets: StoredTargets | None = None,
                 part: tuple[int, int] = (0, 1)):
        self.config, self.targets = config, targets
        self.part = part  # (rank, world size): this process loads utterances rank, rank + world, ... of a batch
        rows = drop_short(read_utterances(config), min_samples, config.skip_short)
        self.buckets = [b for b in make_buckets(rows, config.train_batch_size, config.max_timestep)
                        if len(b) >= part[1]]  # every process gets at least one utterance of a batch
        if not self.buckets:
            source = config.audio_dir or config.file_path
            raise ConfigError(f"pretrain_expert.datarc: {source} gives no batch of {config.train_batch_size} "
                              "utterances; add audio or lower train_batch_size")
        if targets is not None:
            for row in rows:
                if targets.store.entry(row.key).samples != row.samples:
                    raise ConfigError(f"{targets.store.folder}: {row.key} has {targets.store.entry(row.key).samples} "
                                      f"samples in the store but {row.samples} on disk; rebuild the store")

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, index: int):
        rank, world = self.part
        rows = self.buckets[index][rank::world]
        wavs = [load_audio(r.path, resample=self.config.resample, downmix=self.config.downmix) for r in rows]
        if self.targets is None:
            return crop_and_pad(wavs, self.config.sequence_length)
        return self._with_targets(rows, wavs)

    def _with_targets(self, rows: list[Utterance], wavs: list[torch.Tensor]):
        spec, length = self.targets, self.config.sequence_length
        crops, per_teacher, frame_counts = [], [[] for _ in spec.teachers], []
        for row, wav in zip(rows, wavs):
            start = crop_start(len(wav), length, spec.hop)
            crop = wav[start:start + length] if length > 0 else wav
            crops.append(crop)
            needed = max(0, (len(crop) - spec.field) // spec.hop + 1)
            for k, (stored, layers) in enumerate(zip(spec.teachers, spec.layers)):
                per_teacher[k].append(spec.store.frames(row.key, stored, start // spec.hop, needed, layers))
            frame_counts.append(min(len(t[-1]) for t in per_teacher))
        wave, lengths = pad_batch(crops)
        frames = max(frame_counts)
        targets = []
        for hiddens in per_teacher:
            batch = torch.zeros(len(rows), frames, *hiddens[0].shape[1:])
            for i, hidden in enumerate(hiddens):
                batch[i, :frame_counts[i]] = hidden[:frame_counts[i]]
            targets.append(batch.transpose(1, 2))  # (B, L, T, D_k)
        return wave, lengths, targets, torch.tensor(frame_counts)


def _first(items):
    return items[0]  # the DataLoader's batch of one pre-built bucket


def train_dataloader(config: DataConfig, min_samples: int = 1, targets: StoredTargets | None = None,
                     shard: tuple[int, int, int, int] | None = None) -> DataLoader:
    """One process: batches in DataLoader-shuffled order. `shard` = (rank, world size, seed, batches
    already done) for a distributed run: the same batches for any world size, in a seeded order,
    each rank loading its part (plugin/distributed.py)."""
    workers = min(config.num_workers, os.cpu_count() or 1)
    common = dict(batch_size=1, num_workers=workers, collate_fn=_first, pin_memory=torch.cuda.is_available(),
                  persistent_workers=workers > 0)
    if shard is None:
        return DataLoader(BucketDataset(config, min_samples, targets), shuffle=True, **common)
    from s3prl_ekd.plugin.distributed import EpochBuckets

    rank, world, seed, start = shard
    dataset = BucketDataset(config, min_samples, targets, part=(rank, world))
    return DataLoader(dataset, sampler=EpochBuckets(len(dataset), seed, start), **common)
