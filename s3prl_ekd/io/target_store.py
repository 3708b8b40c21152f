"""The teacher-target store: every teacher's selected layers for every training utterance, computed
once and read back by any student distilled from those teachers.

Layout of a store folder:

    build.json                   the plan: teachers, dtype, shard count, audio fingerprint
    index.json                   written last: teachers (with their target statistics), dtype, shards,
                                 sizes, and the sha256 of build.json, of each shard.json and of its own
                                 content (a store without it is unfinished; `targets build` resumes it)
    shard-<i>-of-<N>/
        teacher<k>.bin           (frames, layers, dim) of teacher k, utterances back to back,
                                 float32 / float16 / bfloat16 (bf16 as raw 16-bit words)
        utterances.jsonl         one line per finished utterance: key, samples, frame offset, frames
        errors.json              running sums of the storage error against float32 (saved at each flush)
        shard.json               written when the shard is complete: counts, each file's size and sha256,
                                 and the shard's per-feature statistics of every teacher layer

Every file of a finished store is covered by a checksum rooted in index.json. Opening a store checks
all of them except the contents of the .bin files (their sizes only); `verify` also reads those.

Frame f of an utterance is the teachers' output for samples [320 f, 320 f + 400) of the whole
utterance (HuBERT / WavLM frame arithmetic), so a crop starting at sample 320 a takes frames
a, a + 1, ... Reading is memory-mapped: a student reads only the frames of its crops.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from s3prl_ekd.errors import ConfigError, UserError
from s3prl_ekd.io.files import atomic_write_json, file_sha256

FORMAT = "ekd-targets-v2"
OLDER_FORMATS = ("ekd-targets-v1",)  # refused with the advice to rebuild (`targets build` does it in place)
INDEX_NAME = "index.json"
PLAN_NAME = "build.json"
SHARD_DONE = "shard.json"
PROGRESS_NAME = "utterances.jsonl"
ERRORS_NAME = "errors.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NUMPY_WORDS = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16: raw words
FRAMES_PER_SECOND = 50  # 320-sample hop at 16 kHz
SCAN_BYTES = 1 << 24    # read a .bin back in blocks of about this size (whole frames)
DAMAGED = "the store is damaged or was changed after it was built; copy it again, or rebuild it " \
          "(`s3prl-ekd targets build` with --force replaces it)"


class StoreError(UserError):
    """A target store that cannot be used as it is: unfinished, damaged, or of an older format."""


class FrameSink(Protocol):
    """What takes a teacher's frames read back from a store (core.normalization.LayerStats)."""

    def update(self, frames: torch.Tensor) -> None: ...   # (T, L, D) float32

    def to_dict(self) -> dict: ...


@dataclass
class StoredTeacher:
    """One teacher as the store knows it: what identifies it, what was stored, and how precisely."""

    name: str
    fingerprint: str             # sha256 of the checkpoint file, or "hub:<name>" for a hub download
    layers: list[int]            # hidden-state indices stored, in order
    dim: int
    # Per stored layer: relative error ||stored - float32|| / ||float32|| over the utterances checked.
    relative_error: list[float] = field(default_factory=list)
    hop: int = 320               # the teacher's own samples per frame (its frames are stored on a 320 hop)
    # Per-feature moments of the stored layers over every stored frame: core.normalization.LayerStats
    # .to_dict() (count, total (L, D), squares (L, D)); every finished store has them.
    stats: dict | None = None


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


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def frame_bytes(teacher: StoredTeacher, dtype: str) -> int:
    return len(teacher.layers) * teacher.dim * itemsize(dtype)


def bytes_per_second(teachers: list[StoredTeacher], dtype: str) -> int:
    return FRAMES_PER_SECOND * sum(frame_bytes(t, dtype) for t in teachers)


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def teacher_file(k: int) -> str:
    return f"teacher{k}.bin"


def parse_shard(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8); shards are numbered 0..N-1."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text}: write it as i/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard {text}: i must be in 0..N-1, e.g. 0/{max(count, 1)}")
    return index, count


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def canonical_sha256(data: dict) -> str:
    """sha256 of a JSON object's content, whatever its layout (keys sorted, no spaces)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _json_text(data) -> str:
    return json.dumps(data, indent=1, default=str) + "\n"  # what atomic_write_json writes


def read_progress(folder: Path) -> list[UtteranceEntry]:
    """The complete lines of a shard's utterances.jsonl (a line cut short by a kill ends the list)."""
    entries = []
    progress = folder / PROGRESS_NAME
    if progress.is_file():
        for line in progress.read_text(errors="replace").splitlines():
            try:
                entries.append(UtteranceEntry(**json.loads(line)))
            except (json.JSONDecodeError, TypeError):
                break
    return entries


def shard_finished(folder: Path) -> bool:
    """True if `folder` holds a shard.json of this format (a complete shard)."""
    try:
        return json.loads((folder / SHARD_DONE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def scan_teacher_file(path: Path, teacher: StoredTeacher, dtype: str,
                      on_frames: Callable[[int, torch.Tensor], None] | None = None) -> str:
    """Read a teacher's .bin once: its sha256, and each block of whole frames as
    on_frames(first frame, (n, L, D) float32) in order."""
    step = frame_bytes(teacher, dtype)
    block = max(1, SCAN_BYTES // step) * step
    digest, start = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for data in iter(lambda: handle.read(block), b""):
            digest.update(data)
            if on_frames is not None:
                n = len(data) // step
                words = np.frombuffer(data[:n * step], dtype=_NUMPY_WORDS[dtype])
                frames = torch.from_numpy(words.copy()).view(n, len(teacher.layers), teacher.dim)
                if dtype == "bfloat16":
                    frames = frames.view(torch.bfloat16)
                on_frames(start, frames.float())
                start += n
    return digest.hexdigest()


class ShardWriter:
    """Appends utterances to one shard; reopening an unfinished shard resumes after its last
    complete utterance, or after the first `keep` (bytes written past them are cut off)."""

    def __init__(self, folder: Path, teachers: list[StoredTeacher], dtype: str, keep: int | None = None):
        self.folder, self.teachers, self.dtype = folder, teachers, dtype
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SHARD_DONE).unlink(missing_ok=True)  # a shard being appended to is unfinished
        # Keep the utterances whose frames every .bin holds in full: a kill may have saved a progress
        # line whose frames had not all reached the disk.
        held = min(((folder / teacher_file(k)).stat().st_size // frame_bytes(t, dtype)
                    if (folder / teacher_file(k)).is_file() else 0) for k, t in enumerate(teachers))
        self.entries = []
        for entry in read_progress(folder)[:keep]:
            if entry.offset != self.frames_written or entry.offset + entry.frames > held:
                break
            self.entries.append(entry)
        progress = folder / PROGRESS_NAME
        progress.write_text("".join(json.dumps(asdict(e)) + "\n" for e in self.entries))
        end = self.frames_written
        self.files = []
        for k, teacher in enumerate(teachers):
            path = folder / teacher_file(k)
            handle = open(path, "r+b" if path.exists() else "w+b")
            handle.truncate(end * frame_bytes(teacher, dtype))
            handle.seek(0, os.SEEK_END)
            self.files.append(handle)
        self.progress = open(progress, "a")
        self.done = {e.key for e in self.entries}
        self.frames = end

    @property
    def frames_written(self) -> int:
        return self.entries[-1].offset + self.entries[-1].frames if self.entries else 0

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

    def finish(self, stats: list[FrameSink]) -> dict:
        """Close the shard: read each .bin back once for its sha256 and for `stats` (one per teacher,
        fed every stored frame), then write shard.json. errors.json must be written by now."""
        self.flush()
        for handle in [*self.files, self.progress]:
            handle.close()
        files = {}
        for k, (teacher, sink) in enumerate(zip(self.teachers, stats)):
            path = self.folder / teacher_file(k)
            files[teacher_file(k)] = {"bytes": path.stat().st_size,
                                      "sha256": scan_teacher_file(path, teacher, self.dtype,
                                                                  lambda _, frames, s=sink: s.update(frames))}
        for name in (PROGRESS_NAME, ERRORS_NAME):
            files[name] = file_record(self.folder / name)
        done = {"format": FORMAT, "utterances": len(self.entries), "frames": self.frames, "files": files,
                "stats": [sink.to_dict() for sink in stats]}
        atomic_write_json(self.folder / SHARD_DONE, done)
        return done


def write_index(out: Path, teachers: list[StoredTeacher], dtype: str, shards: list[str]) -> dict:
    """index.json over the finished shards (all must be complete); `teachers` carry their merged
    statistics and relative errors."""
    missing = [s for s in shards if not shard_finished(out / s)]
    if missing:
        raise StoreError(f"{out}: shard(s) {', '.join(missing)} not finished; run `s3prl-ekd targets build` "
                         "for them (it resumes), then merge")
    listed, utterances, frames = [], 0, 0
    for shard in shards:
        done = json.loads((out / shard / SHARD_DONE).read_text())
        listed.append({"name": shard, "sha256": file_sha256(out / shard / SHARD_DONE),
                       "utterances": done["utterances"], "frames": done["frames"]})
        utterances, frames = utterances + done["utterances"], frames + done["frames"]
    index = {"format": FORMAT, "dtype": dtype, "teachers": [asdict(t) for t in teachers], "shards": listed,
             "utterances": utterances, "frames": frames,
             "bytes": frames * sum(frame_bytes(t, dtype) for t in teachers),
             "files": {PLAN_NAME: file_record(out / PLAN_NAME)},
             "config": json.loads((out / PLAN_NAME).read_text())}
    index["sha256"] = canonical_sha256(index)
    atomic_write_json(out / INDEX_NAME, index)
    return index


class TargetStore:
    """A finished store, read-only and memory-mapped (opened lazily, so DataLoader workers each map it).

    Opening checks, without reading the .bin contents: index.json's own checksum, build.json's and
    each shard.json's against the index, every file's size and every small file's checksum against
    its shard.json, and each utterances.jsonl against the counts. A StoreError (one line) names the
    first file that differs.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / INDEX_NAME
        if not path.is_file():
            raise StoreError(f"{self.folder}: not a finished target store (no {INDEX_NAME}); build it with "
                             "`s3prl-ekd targets build`, which resumes an unfinished one")
        self.index = _read_index(path)
        try:
            self.dtype: str = self.index["dtype"]
            self.teachers = [StoredTeacher(**t) for t in self.index["teachers"]]
            self.shards: list[str] = [s["name"] for s in self.index["shards"]]
            self.entries: dict[str, tuple[str, UtteranceEntry]] = {}
            self._check_file(PLAN_NAME, self.index["files"][PLAN_NAME])
            for listed in self.index["shards"]:
                self._open_shard(listed)
            self._check_teachers()
        except (KeyError, TypeError, ValueError, AttributeError) as error:  # content the checksums vouch for
            raise StoreError(f"{path}: unexpected content ({type(error).__name__}: {error}); {DAMAGED}") from None
        self._maps: dict[tuple[str, int], np.memmap] = {}

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.folder))

    def _check_file(self, name: str, record: dict, sha: bool = True) -> Path:
        path = self.folder / name
        if not path.is_file():
            raise StoreError(f"{path}: missing; {DAMAGED}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise StoreError(f"{path}: {size} bytes, expected {record['bytes']}; {DAMAGED}")
        if sha and file_sha256(path) != record["sha256"]:
            raise StoreError(f"{path}: its sha256 is not the one the store recorded; {DAMAGED}")
        return path

    def _open_shard(self, listed: dict) -> None:
        shard = listed["name"]
        done_path = self.folder / shard / SHARD_DONE
        if not done_path.is_file():
            raise StoreError(f"{done_path}: missing; {DAMAGED}")
        if file_sha256(done_path) != listed["sha256"]:
            raise StoreError(f"{done_path}: its sha256 is not the one {INDEX_NAME} recorded; {DAMAGED}")
        done = json.loads(done_path.read_text())
        if (done["utterances"], done["frames"]) != (listed["utterances"], listed["frames"]):
            raise StoreError(f"{done_path}: {done['utterances']} utterances, {done['frames']} frames; "
                             f"{INDEX_NAME} says {listed['utterances']}, {listed['frames']}; {DAMAGED}")
        expected = {teacher_file(k) for k in range(len(self.teachers))} | {PROGRESS_NAME, ERRORS_NAME}
        if set(done["files"]) != expected:
            raise StoreError(f"{done_path}: lists {sorted(done['files'])}, expected {sorted(expected)}; {DAMAGED}")
        for k, teacher in enumerate(self.teachers):
            name, record = teacher_file(k), done["files"][teacher_file(k)]
            path = self.folder / shard / name
            wanted = done["frames"] * frame_bytes(teacher, self.dtype)
            if not path.is_file():
                raise StoreError(f"{path}: missing; {DAMAGED}")
            size = path.stat().st_size
            if size != wanted or record["bytes"] != wanted:
                raise StoreError(f"{path}: {size} bytes, expected {wanted} ({done['frames']} frames of "
                                 f"{len(teacher.layers)} layers x {teacher.dim} {self.dtype}); {DAMAGED}")
        self._check_file(f"{shard}/{ERRORS_NAME}", done["files"][ERRORS_NAME])
        progress = self._check_file(f"{shard}/{PROGRESS_NAME}", done["files"][PROGRESS_NAME], sha=False)
        text = progress.read_bytes()
        lines = text.decode("utf-8", errors="replace").splitlines()
        frames = 0
        for number, line in enumerate(lines, 1):
            try:
                entry = UtteranceEntry(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                raise StoreError(f"{progress}: line {number} is not an utterance entry; {DAMAGED}") from None
            if entry.offset != frames or entry.frames < 0 or entry.samples <= 0:
                raise StoreError(f"{progress}: line {number} ({entry.key}) starts at frame {entry.offset} with "
                                 f"{entry.frames} frames; the lines before it end at frame {frames}; {DAMAGED}")
            if entry.key in self.entries:
                raise StoreError(f"{progress}: line {number}: {entry.key} is stored twice; {DAMAGED}")
            frames += entry.frames
            self.entries[entry.key] = (shard, entry)
        if (len(lines), frames) != (done["utterances"], done["frames"]):
            raise StoreError(f"{progress}: {len(lines)} utterances, {frames} frames; {done_path.name} says "
                             f"{done['utterances']}, {done['frames']}; {DAMAGED}")
        if hashlib.sha256(text).hexdigest() != done["files"][PROGRESS_NAME]["sha256"]:
            raise StoreError(f"{progress}: its sha256 is not the one the store recorded; {DAMAGED}")
        if len(done["stats"]) != len(self.teachers) or any(s["count"] != done["frames"] for s in done["stats"]):
            raise StoreError(f"{done_path}: its statistics do not cover the shard's {done['frames']} frames; {DAMAGED}")

    def _check_teachers(self) -> None:
        for teacher in self.teachers:
            stats = teacher.stats
            shape = [len(teacher.layers), teacher.dim]
            if (not stats or stats["count"] != self.index["frames"]
                    or list(np.shape(stats["total"])) != shape or list(np.shape(stats["squares"])) != shape):
                raise StoreError(f"{self.folder / INDEX_NAME}: {teacher.name}'s statistics do not cover the store's "
                                 f"{self.index['frames']} frames of {shape[0]} layers x {shape[1]}; {DAMAGED}")

    def verify(self, on_frames: Callable[[str, int, torch.Tensor], None] | None = None) -> None:
        """Read every .bin: its sha256 against shard.json, and every value finite; each block of
        whole frames also goes to on_frames(shard, teacher, (n, L, D) float32), shard by shard in order."""
        for shard in self.shards:
            done = json.loads((self.folder / shard / SHARD_DONE).read_text())
            starts = [(entry.offset, key) for key, (s, entry) in self.entries.items() if s == shard]
            starts.sort()
            for k, teacher in enumerate(self.teachers):
                path = self.folder / shard / teacher_file(k)

                def check(start: int, frames: torch.Tensor, k=k, path=path) -> None:
                    bad = ~torch.isfinite(frames)
                    if bad.any():
                        frame = start + int(bad.flatten(1).any(dim=1).nonzero()[0])
                        key = max((s for s in starts if s[0] <= frame), default=(0, "?"))[1]
                        raise StoreError(f"{path}: frame {frame} ({key}) holds inf or NaN; {DAMAGED}")
                    if on_frames is not None:
                        on_frames(shard, k, frames)

                if scan_teacher_file(path, teacher, self.dtype, check) != done["files"][teacher_file(k)]["sha256"]:
                    raise StoreError(f"{path}: its sha256 is not the one the store recorded; {DAMAGED}")

    def _map(self, shard: str, k: int) -> np.memmap:
        if (shard, k) not in self._maps:
            teacher = self.teachers[k]
            words = np.memmap(self.folder / shard / teacher_file(k), mode="r", dtype=_NUMPY_WORDS[self.dtype])
            self._maps[shard, k] = words.reshape(-1, len(teacher.layers), teacher.dim)
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

    def iter_entries(self) -> Iterator[tuple[str, UtteranceEntry]]:
        """(shard, entry) of every stored utterance, shard by shard in frame order."""
        for shard in self.shards:
            yield from sorted(((s, e) for s, e in self.entries.values() if s == shard), key=lambda x: x[1].offset)


def _read_index(path: Path) -> dict:
    """index.json, checked: valid JSON of this format, byte for byte as written, and its content
    matching the sha256 it carries."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        index = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"{path}: not valid JSON ({str(error).splitlines()[0]}); {DAMAGED}") from None
    found = index.get("format") if isinstance(index, dict) else None
    if found not in (FORMAT, *OLDER_FORMATS):
        raise StoreError(f"{path}: format {found!r} is not one of a target store; {DAMAGED}")
    if found != FORMAT:
        raise StoreError(f"{path}: a target store of format {found!r}; this version reads {FORMAT} (which adds "
                         "checksums and target statistics): rebuild it with `s3prl-ekd targets build` and the "
                         "same -g, --audio and --out")
    claimed = index.pop("sha256", None)
    if text != _json_text({**index, "sha256": claimed}) or claimed != canonical_sha256(index):
        raise StoreError(f"{path}: its content does not match the sha256 it carries; {DAMAGED}")
    return index


def remove_store(out: Path) -> None:
    """Remove what `targets build` wrote in `out` (plan, index, shard folders), nothing else."""
    for name in (INDEX_NAME, PLAN_NAME):
        (out / name).unlink(missing_ok=True)
    for shard in out.glob("shard-*-of-*"):
        if shard.is_dir():
            shutil.rmtree(shard)


def free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free
