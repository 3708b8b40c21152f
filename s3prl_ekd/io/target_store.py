"""The teacher-target store: every teacher's selected layers for every training utterance, computed
once and read back by any student distilled from those teachers.

Layout of a store folder:

    index.json                   written last: teachers, dtype, shards, size (a store without it is
                                 unfinished; `targets build` resumes it)
    shard-<i>-of-<N>/
        teacher<k>.bin           (frames, layers, dim) of teacher k, utterances back to back,
                                 float32 / float16 / bfloat16 (bf16 as raw 16-bit words)
        utterances.jsonl         one line per finished utterance: key, samples, frame offset, frames
        shard.json               written when the shard is complete

Frame f of an utterance is the teachers' output for samples [320 f, 320 f + 400) of the whole
utterance (HuBERT / WavLM frame arithmetic), so a crop starting at sample 320 a takes frames
a, a + 1, ... Reading is memory-mapped: a student reads only the frames of its crops.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from s3prl_ekd.errors import ConfigError, UserError
from s3prl_ekd.io.files import atomic_write_json, file_sha256

FORMAT = "ekd-targets-v1"
INDEX_NAME = "index.json"
SHARD_DONE = "shard.json"
PROGRESS_NAME = "utterances.jsonl"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NUMPY_WORDS = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16: raw words
FRAMES_PER_SECOND = 50  # 320-sample hop at 16 kHz


@dataclass
class StoredTeacher:
    """One teacher as the store knows it: what identifies it, what was stored, and how precisely."""

    name: str
    fingerprint: str             # sha256 of the checkpoint file, or "hub:<name>" for a hub download
    layers: list[int]            # hidden-state indices stored, in order
    dim: int
    # Per stored layer: relative error ||stored - float32|| / ||float32|| over the utterances checked.
    relative_error: list[float] = field(default_factory=list)


@dataclass
class UtteranceEntry:
    key: str
    samples: int
    offset: int  # first frame in the shard's .bin files
    frames: int


def checkpoint_fingerprint(name: str, ckpt: str | None) -> str:
    """What identifies a teacher's weights: the sha256 of its checkpoint file (or its hub name)."""
    if not ckpt:
        return f"hub:{name}"
    return file_sha256(ckpt)


def bytes_per_second(teachers: list[StoredTeacher], dtype: str) -> int:
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return FRAMES_PER_SECOND * itemsize * sum(len(t.layers) * t.dim for t in teachers)


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def parse_shard(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8); shards are numbered 0..N-1."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text}: write it as i/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard {text}: i must be in 0..N-1")
    return index, count


class ShardWriter:
    """Appends utterances to one shard; reopening an unfinished shard resumes after its last
    complete utterance (bytes written past it by a killed build are cut off)."""

    def __init__(self, folder: Path, teachers: list[StoredTeacher], dtype: str):
        self.folder, self.teachers, self.dtype = folder, teachers, dtype
        folder.mkdir(parents=True, exist_ok=True)
        self.entries: list[UtteranceEntry] = []
        progress = folder / PROGRESS_NAME
        if progress.is_file():
            for line in progress.read_text().splitlines():
                try:
                    self.entries.append(UtteranceEntry(**json.loads(line)))
                except (json.JSONDecodeError, TypeError):
                    break  # a line cut short by a kill: everything from here is redone
            progress.write_text("".join(json.dumps(asdict(e)) + "\n" for e in self.entries))
        end = self.entries[-1].offset + self.entries[-1].frames if self.entries else 0
        self.files = []
        for k, teacher in enumerate(teachers):
            path = folder / f"teacher{k}.bin"
            handle = open(path, "r+b" if path.exists() else "w+b")
            handle.truncate(end * self._frame_bytes(teacher))
            handle.seek(0, os.SEEK_END)
            self.files.append(handle)
        self.progress = open(progress, "a")
        self.done = {e.key for e in self.entries}
        self.frames = end

    def _frame_bytes(self, teacher: StoredTeacher) -> int:
        return len(teacher.layers) * teacher.dim * torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    def add(self, key: str, samples: int, hiddens: list[torch.Tensor]) -> None:
        """hiddens: [K] (frames, L_k, D_k) of one utterance, already in the store's dtype."""
        frames = hiddens[0].shape[0]
        try:
            for handle, hidden in zip(self.files, hiddens):
                data = hidden.contiguous()
                if data.dtype == torch.bfloat16:
                    data = data.view(torch.int16)
                handle.write(data.numpy().tobytes())
            entry = UtteranceEntry(key, samples, self.frames, frames)
            self.progress.write(json.dumps(asdict(entry)) + "\n")
        except OSError as error:
            self.progress.flush()  # the utterances finished before this one are kept
            raise UserError(f"{self.folder}: writing the target store failed ({error.strerror}); what was "
                            "written so far is kept and `targets build` resumes from it") from error
        self.entries.append(entry)
        self.done.add(key)
        self.frames += frames

    def flush(self) -> None:
        for handle in [*self.files, self.progress]:
            handle.flush()
            os.fsync(handle.fileno())

    def finish(self) -> None:
        self.flush()
        for handle in [*self.files, self.progress]:
            handle.close()
        atomic_write_json(self.folder / SHARD_DONE, {"utterances": len(self.entries), "frames": self.frames})


def write_index(out: Path, teachers: list[StoredTeacher], dtype: str, shards: list[str], config: dict) -> dict:
    """index.json for the finished shards (all must be complete)."""
    missing = [s for s in shards if not (out / s / SHARD_DONE).is_file()]
    if missing:
        raise UserError(f"{out}: shard(s) {', '.join(missing)} not finished; run `s3prl-ekd targets build` "
                        "for them (it resumes), then merge")
    utterances, frames = 0, 0
    for shard in shards:
        done = json.loads((out / shard / SHARD_DONE).read_text())
        utterances, frames = utterances + done["utterances"], frames + done["frames"]
    index = {"format": FORMAT, "dtype": dtype, "teachers": [asdict(t) for t in teachers], "shards": shards,
             "utterances": utterances, "frames": frames,
             "bytes": frames * bytes_per_second(teachers, dtype) // FRAMES_PER_SECOND, "config": config}
    atomic_write_json(out / INDEX_NAME, index)
    return index


class TargetStore:
    """A finished store, read-only and memory-mapped (opened lazily, so DataLoader workers each map it)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / INDEX_NAME
        if not path.is_file():
            raise ConfigError(f"{self.folder}: not a finished target store (no {INDEX_NAME}); build it with "
                              "`s3prl-ekd targets build`, which resumes an unfinished one")
        self.index = json.loads(path.read_text())
        if self.index.get("format") != FORMAT:
            raise ConfigError(f"{path}: format {self.index.get('format')!r}, expected {FORMAT}; rebuild the store")
        self.dtype: str = self.index["dtype"]
        self.teachers = [StoredTeacher(**t) for t in self.index["teachers"]]
        self.entries: dict[str, tuple[str, UtteranceEntry]] = {}
        for shard in self.index["shards"]:
            for line in (self.folder / shard / PROGRESS_NAME).read_text().splitlines():
                entry = UtteranceEntry(**json.loads(line))
                self.entries[entry.key] = (shard, entry)
        self._maps: dict[tuple[str, int], np.memmap] = {}

    def _map(self, shard: str, k: int) -> np.memmap:
        if (shard, k) not in self._maps:
            teacher = self.teachers[k]
            self._maps[shard, k] = np.memmap(self.folder / shard / f"teacher{k}.bin", mode="r",
                                             dtype=_NUMPY_WORDS[self.dtype]).reshape(-1, len(teacher.layers), teacher.dim)
        return self._maps[shard, k]

    def __getstate__(self):  # memory maps are not sent to DataLoader workers; each opens its own
        return {**self.__dict__, "_maps": {}}

    def frames(self, key: str, teacher: int, start: int, count: int, layers: list[int]) -> torch.Tensor:
        """Frames start..start+count-1 (fewer at the utterance's end) of `layers` (indices into the
        stored layers) of one teacher -> (frames, len(layers), D) float32."""
        shard, entry = self.entries[key]
        stop = min(entry.frames, start + count)
        rows = self._map(shard, teacher)[entry.offset + start:entry.offset + max(start, stop)][:, layers]
        data = torch.from_numpy(np.array(rows))
        if self.dtype == "bfloat16":
            data = data.view(torch.int16).view(torch.bfloat16)
        return data.float()

    def entry(self, key: str) -> UtteranceEntry:
        if key not in self.entries:
            raise ConfigError(f"{self.folder}: holds no targets for {key}; the store was built from other "
                              "audio; rebuild it for this data (`s3prl-ekd targets build`)")
        return self.entries[key][1]


def free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free
