"""`s3prl-ekd targets build | merge | verify`: run each teacher once over the training audio into a
target store (io/target_store.py), check a store, and match a store against a student's model config.

One store serves every student distilled from its teachers: each aggregation mode (average with
any weights, concat, multi_head) is computed from the stored per-teacher layers at training time,
and a student may use a subset of the stored teachers and layers. The store also holds each stored
layer's per-feature statistics over every frame (`target_norm: teacher_layer`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from s3prl_ekd.core.config import EKDConfig, load_config
from s3prl_ekd.core.frames import STANDARD_CNN, hop_length, num_frames, parse_conv_layers, receptive_field
from s3prl_ekd.core.normalization import LayerStats
from s3prl_ekd.core.precision import check_targets, check_tolerance, layer_errors
from s3prl_ekd.core.teachers import MAX_FRAME_MISMATCH, TeacherEnsemble
from s3prl_ekd.devices import resolve_device
from s3prl_ekd.errors import ConfigError, UserError
from s3prl_ekd.io.audio import SAMPLE_RATE, load_audio
from s3prl_ekd.io.files import atomic_write_json, fingerprint
from s3prl_ekd.io.target_store import (
    DAMAGED,
    DTYPES,
    ERRORS_NAME,
    FORMAT,
    INDEX_NAME,
    PLAN_NAME,
    PROGRESS_NAME,
    SHARD_DONE,
    ShardWriter,
    StoredTeacher,
    StoreError,
    TargetStore,
    bytes_per_second,
    checkpoint_fingerprint,
    free_bytes,
    parse_shard,
    read_progress,
    remove_store,
    shard_finished,
    shard_name,
    write_index,
)
from s3prl_ekd.plugin.pretrain_data import DataConfig, StoredTargets, read_utterances

# The teachers' frames: HuBERT / WavLM / wav2vec2 all use the standard CNN.
TEACHER_CNN = parse_conv_layers(STANDARD_CNN)
FLUSH_EVERY = 50  # utterances between fsyncs: what a kill can cost a resumed build


def audio_source(audio: str, libri_root: str | None = None) -> DataConfig:
    """--audio: a folder of audio files, or s3prl bucket CSV file(s) (comma-separated) with --libri-root."""
    paths = [Path(p) for p in audio.split(",")]
    if len(paths) == 1 and paths[0].is_dir():
        return DataConfig(audio_dir=str(paths[0]))
    for path in paths:
        if path.suffix != ".csv" or not path.is_file():
            raise ConfigError(f"--audio {path}: give a folder of audio files or s3prl bucket CSV file(s)")
    folders = {p.parent for p in paths}
    if len(folders) > 1:
        raise ConfigError("--audio: the bucket CSVs must sit in one folder, as s3prl's file_path expects")
    return DataConfig(file_path=str(folders.pop()), sets=[p.stem for p in paths], libri_root=libri_root)


def stored_teachers(config: EKDConfig, ensemble: TeacherEnsemble) -> list[StoredTeacher]:
    return [StoredTeacher(t.name, checkpoint_fingerprint(t.name, t.ckpt), list(t.layers), dim, hop=hop)
            for t, dim, hop in zip(config.teachers, ensemble.dims, ensemble.hops)]


def _existing_plan(out: Path, plan: dict) -> str | None:
    """None if `out` is new, empty or a store (finished or not, of any format) of this very plan;
    else what it holds."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not out.is_dir():
        return "a file, not a folder"
    if not (out / PLAN_NAME).is_file():
        return "files that are not a target store"
    try:
        existing = json.loads((out / PLAN_NAME).read_text())
        if not isinstance(existing, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        return f"a target store whose {PLAN_NAME} is damaged"
    if existing.get("format") != FORMAT:
        return None  # a store of an older format: rebuilt in place
    differing = [key for key in plan if existing.get(key) != plan[key]]
    if differing:
        return "a target store of other " + ", ".join(differing) + (
            f" ({existing['shards']} shards, not {plan['shards']})" if "shards" in differing else "")
    return None


class _StorageErrors:
    """Running sums of ||stored - float32||^2 and ||float32||^2 per teacher and layer, saved with each
    flush (errors.json), so that a resumed shard reports over every utterance it checked."""

    def __init__(self, folder: Path, teachers: list[StoredTeacher], resume: bool = True):
        self.path = folder / ERRORS_NAME
        shapes = [len(t.layers) for t in teachers]
        self.utterances = 0  # the shard's first utterances that the sums cover
        self.squared_error = [torch.zeros(n, dtype=torch.float64) for n in shapes]
        self.squared_norm = [torch.zeros(n, dtype=torch.float64) for n in shapes]
        if resume and self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
                if [len(e) for e in saved["squared_error"]] == shapes == [len(n) for n in saved["squared_norm"]]:
                    self.utterances = int(saved["utterances"])
                    self.squared_error = [torch.tensor(e, dtype=torch.float64) for e in saved["squared_error"]]
                    self.squared_norm = [torch.tensor(n, dtype=torch.float64) for n in saved["squared_norm"]]
            except (ValueError, KeyError, TypeError):
                pass  # unreadable: it covers no utterance, so the shard is redone from its start

    def add(self, k: int, reference: torch.Tensor, stored: torch.Tensor) -> None:
        squared_error, squared_norm = layer_errors(reference, stored.float())
        self.squared_error[k] += squared_error
        self.squared_norm[k] += squared_norm

    def save(self) -> None:
        atomic_write_json(self.path, {"utterances": self.utterances,
                                      "squared_error": [e.tolist() for e in self.squared_error],
                                      "squared_norm": [n.tolist() for n in self.squared_norm]})


def relative_errors(squared_error: torch.Tensor, squared_norm: torch.Tensor) -> list[float]:
    return (squared_error / squared_norm.clamp(min=1e-30)).sqrt().tolist()


def build_store(upstream_config: str | Path, audio: str, out: str | Path, shard: str = "0/1",
                dtype: str = "bfloat16", libri_root: str | None = None, device: str | None = None,
                tolerance: float | None = None, force: bool = False, log=print) -> dict:
    """Build (or resume) shard i/N of a store for `upstream_config`'s teachers over `audio`; teachers
    run in float32, targets are stored in `dtype` and checked against float32 per layer.

    Returns the index when the store is complete (every shard done), else the shard's summary.
    Every input is checked before anything is written. A folder holding anything but this very
    store is refused unless `force`; so is a finished store found damaged. A store of an older
    format is rebuilt.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    index, count = parse_shard(shard)
    device = resolve_device(device)
    if tolerance is not None and not tolerance > 0:
        raise ConfigError(f"--tolerance {tolerance}: give a relative error above 0, e.g. 0.05")
    out = Path(out)
    config = load_config(upstream_config)
    tolerance = config.target_tolerance if tolerance is None else tolerance
    utterances = sorted(read_utterances(audio_source(audio, libri_root)), key=lambda u: u.key)
    ensemble = TeacherEnsemble(config.teachers, "float32").to(device)
    ensemble.probe(device)
    teachers = stored_teachers(config, ensemble)
    plan = {"format": FORMAT, "teachers": [asdict(t) for t in teachers], "dtype": dtype, "shards": count,
            "audio": fingerprint([(u.key, u.samples) for u in utterances])}
    existing = _existing_plan(out, plan)
    if existing and not force:
        raise UserError(f"{out}: holds {existing}; choose another --out or pass --force to replace it "
                        "(use the same --shard i/N for every part); nothing was changed")
    if existing:
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    elif (out / PLAN_NAME).is_file() and json.loads((out / PLAN_NAME).read_text()).get("format") != FORMAT:
        log(f"[targets] {out}: a store of an older format; rebuilding it as {FORMAT}")
        remove_store(out)
    elif (out / INDEX_NAME).is_file():
        try:
            store = TargetStore(out)
        except StoreError:
            if not force:
                raise
            log(f"[targets] {out}: damaged; --force: rebuilding it")
            remove_store(out)
        else:
            log(f"[targets] {out}: up to date (same teachers, layers, dtype and audio)")
            return store.index
    folder = out / shard_name(index, count)
    mine = utterances[index::count]
    seconds = sum(u.samples for u in utterances) / SAMPLE_RATE
    per_second = bytes_per_second(teachers, dtype)
    needed = int(per_second * sum(u.samples for u in mine) / SAMPLE_RATE)
    if not shard_finished(folder):
        done = {e.key for e in read_progress(folder)}
        remaining = needed - int(per_second * sum(u.samples for u in mine if u.key in done) / SAMPLE_RATE)
        if remaining > free_bytes(out):
            raise UserError(f"{out}: needs {remaining / 2**30:.2f} GiB more, the disk has "
                            f"{free_bytes(out) / 2**30:.2f} GiB free; free space or build shards on other disks "
                            "(--shard i/N) and merge")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PLAN_NAME, plan)
    shards = [shard_name(i, count) for i in range(count)]
    if shard_finished(folder):
        log(f"[targets] shard {shard}: already built")
        summary = {"shard": shard, "utterances": json.loads((folder / SHARD_DONE).read_text())["utterances"],
                   "seconds": 0.0}
    else:
        log(f"[targets] {len(utterances)} utterances, {seconds / 3600:.2f} h: the store needs {per_second:,} bytes "
            f"per audio-second = {per_second * 3600 / 2**30:.2f} GiB per hour, {per_second * seconds / 2**30:.2f} GiB "
            f"in all; this shard ({index}/{count}) {needed / 2**30:.2f} GiB")
        summary = _build_shard(folder, ensemble, teachers, mine, dtype, device, tolerance, log)
        summary["shard"] = shard
    if all(shard_finished(out / s) for s in shards):
        return merge_store(out, log=log)
    log(f"[targets] shard {shard} done; the store is complete once every shard is built")
    return summary


def _build_shard(folder: Path, ensemble: TeacherEnsemble, teachers: list[StoredTeacher], mine: list,
                 dtype: str, device: str, tolerance: float, log) -> dict:
    """Run the teachers over the shard's utterances not yet stored, then finish the shard."""
    # Resume after the utterances the saved error sums cover (at most FLUSH_EVERY are redone), so
    # that a resumed shard is the same, byte for byte, as one built in a single run.
    errors = _StorageErrors(folder, teachers)
    writer = ShardWriter(folder, teachers, dtype, keep=errors.utterances)
    if len(writer.entries) != errors.utterances:  # sums over utterances the shard no longer holds
        errors = _StorageErrors(folder, teachers, resume=False)
        writer = ShardWriter(folder, teachers, dtype, keep=0)
    if writer.done:
        log(f"[targets] resuming: {len(writer.done)} of {len(mine)} utterances already stored")
    started = time.perf_counter()
    for n, utterance in enumerate(u for u in mine if u.key not in writer.done):
        wav = load_audio(utterance.path, resample=True, downmix=True).to(device)
        hiddens = ensemble([wav])                                       # [K] (1, L, T, D) float32
        stored = []
        for k, (teacher, hidden) in enumerate(zip(teachers, hiddens)):
            frames = hidden[0].transpose(0, 1).cpu()                    # (T, L, D)
            cast = frames.to(DTYPES[dtype])
            check_targets(f"{teacher.name} (teacher {k}) on {utterance.key}:", teacher.layers, cast, dtype)
            errors.add(k, frames, cast)
            stored.append(cast)
        writer.add(utterance.key, utterance.samples, stored)
        errors.utterances += 1
        if (n + 1) % FLUSH_EVERY == 0:
            writer.flush()
            errors.save()  # after the flush: it never counts an utterance the shard has lost
    for k, teacher in enumerate(teachers):
        teacher.relative_error = relative_errors(errors.squared_error[k], errors.squared_norm[k])
        check_tolerance(teacher.name, teacher.layers, teacher.relative_error, dtype, tolerance)
    errors.save()
    writer.finish([LayerStats.empty(len(t.layers), t.dim) for t in teachers])
    return {"utterances": len(writer.entries), "seconds": round(time.perf_counter() - started, 1),
            "relative_error": [t.relative_error for t in teachers]}


def merge_store(out: str | Path, log=print) -> dict:
    """Write index.json once every shard of the store is complete: each teacher's statistics merged
    over the shards, and its relative errors pooled over every utterance checked."""
    out = Path(out)
    try:
        plan = json.loads((out / PLAN_NAME).read_text())
        if plan.get("format") != FORMAT:
            raise StoreError(f"{out / PLAN_NAME}: a target store of an older format; rebuild it with "
                             "`s3prl-ekd targets build` and the same -g, --audio and --out")
        shards = [shard_name(i, plan["shards"]) for i in range(plan["shards"])]
        teachers = [StoredTeacher(**t) for t in plan["teachers"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise StoreError(f"{out}: not a target store (no readable {PLAN_NAME}); build one with "
                         "`s3prl-ekd targets build`") from None
    missing = [s for s in shards if not shard_finished(out / s)]
    if missing:
        raise StoreError(f"{out}: shard(s) {', '.join(missing)} not finished; run `s3prl-ekd targets build` "
                         "for them (it resumes), then merge")
    stats = [LayerStats.empty(len(t.layers), t.dim) for t in teachers]
    squared_error = [torch.zeros(len(t.layers), dtype=torch.float64) for t in teachers]
    squared_norm = [torch.zeros(len(t.layers), dtype=torch.float64) for t in teachers]
    for shard in shards:
        try:
            done = json.loads((out / shard / SHARD_DONE).read_text())
            errors = json.loads((out / shard / ERRORS_NAME).read_text())
            for k in range(len(teachers)):
                stats[k] = stats[k].merge(LayerStats.from_dict(done["stats"][k]))
                squared_error[k] += torch.tensor(errors["squared_error"][k], dtype=torch.float64)
                squared_norm[k] += torch.tensor(errors["squared_norm"][k], dtype=torch.float64)
        except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError):
            raise StoreError(f"{out / shard}: its {SHARD_DONE} or {ERRORS_NAME} cannot be read; {DAMAGED}") from None
    for k, teacher in enumerate(teachers):
        teacher.stats = stats[k].to_dict()
        teacher.relative_error = relative_errors(squared_error[k], squared_norm[k])
    index = write_index(out, teachers, plan["dtype"], shards)
    log(f"[targets] {out}: {index['utterances']} utterances, {index['frames']} frames, "
        f"{index['bytes'] / 2**20:.1f} MiB, {index['dtype']}")
    return index


def verify_store(folder: str | Path) -> dict:
    """Everything opening a store checks, and the .bin contents: each file's sha256, every value
    finite, each utterance's frame count against its samples and the teachers' CNN, and the stored
    statistics against the frames. A StoreError (one line) names the first thing that differs."""
    store = TargetStore(folder)
    hop = hop_length(TEACHER_CNN)
    # A teacher of a coarser hop, interpolated onto 320-sample frames, may give up to its ratio more.
    above = MAX_FRAME_MISMATCH + max((-(-t.hop // hop) for t in store.teachers), default=1)
    for shard, entry in store.iter_entries():
        expected = num_frames(entry.samples, TEACHER_CNN)
        if not expected - MAX_FRAME_MISMATCH <= entry.frames <= expected + above:
            raise StoreError(f"{store.folder / shard / PROGRESS_NAME}: {entry.key} has {entry.frames} frames, but "
                             f"{entry.samples} samples give {expected} on the teachers' {hop}-sample hop; {DAMAGED}")
    per_shard = {(s, k): LayerStats.empty(len(t.layers), t.dim)
                 for s in store.shards for k, t in enumerate(store.teachers)}
    store.verify(lambda shard, k, frames: per_shard[shard, k].update(frames))
    for k, teacher in enumerate(store.teachers):
        found = LayerStats.empty(len(teacher.layers), teacher.dim)
        for shard in store.shards:
            found = found.merge(per_shard[shard, k])
        recorded = LayerStats.from_dict(teacher.stats)
        if found.count != recorded.count or not all(
                torch.allclose(a, b, rtol=1e-9, atol=1e-12 * max(1, found.count))
                for a, b in ((found.total, recorded.total), (found.squares, recorded.squares))):
            raise StoreError(f"{store.folder / INDEX_NAME}: the statistics of {teacher.name} (teacher {k}) are not "
                             f"those of its stored frames; {DAMAGED}")
    result = {"folder": str(store.folder), "verified": True, "utterances": store.index["utterances"],
              "frames": store.index["frames"], "bytes": store.index["bytes"], "shards": len(store.shards)}
    return result


def match_store(folder: str | Path, config: EKDConfig) -> StoredTargets:
    """The stored teachers and layers `config` needs, with their statistics, or one ConfigError
    saying what differs."""
    store = TargetStore(folder)
    chosen, layers, stats = [], [], []
    for i, teacher in enumerate(config.teachers):
        fingerprint = checkpoint_fingerprint(teacher.name, teacher.ckpt)
        found = [k for k, s in enumerate(store.teachers) if s.name == teacher.name and s.fingerprint == fingerprint]
        if not found:
            held = ", ".join(f"{s.name} ({s.fingerprint[:12]})" for s in store.teachers)
            raise ConfigError(f"teachers[{i}] ({teacher.name}, {teacher.ckpt or 'hub weights'}): not in the target store "
                              f"{folder}, which holds {held}; build a store for these teachers or run them live")
        stored = store.teachers[found[0]]
        wanted = teacher.layers if teacher.layers is not None else stored.layers
        missing = [layer for layer in wanted if layer not in stored.layers]
        if missing:
            raise ConfigError(f"teachers[{i}].layers: {missing} not in the target store {folder} "
                              f"(it holds layers {stored.layers} of {teacher.name}); rebuild it with those layers")
        teacher.layers = list(wanted)
        rows = [stored.layers.index(layer) for layer in wanted]
        every = LayerStats.from_dict(stored.stats)
        chosen.append(found[0])
        layers.append(rows)
        stats.append(LayerStats(every.count, every.total[rows], every.squares[rows]))
    return StoredTargets(store, chosen, layers, hop=hop_length(TEACHER_CNN), field=receptive_field(TEACHER_CNN),
                         stats=stats)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("targets", help="teacher-target store: run the teachers once, distil many students")
    actions = p.add_subparsers(dest="targets_command", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="store every teacher's selected layers for the training audio")
    build.add_argument("-g", "--upstream-config", required=True,
                       help="EKD model config naming the teachers and layers")
    build.add_argument("--audio", required=True, help="audio folder, or s3prl bucket CSV file(s), comma-separated")
    build.add_argument("--libri-root", help="folder the CSV paths are relative to")
    build.add_argument("--out", required=True, help="store folder (an unfinished one is resumed)")
    build.add_argument("--shard", default="0/1", help="build part i of N (0-based), e.g. on N machines; merge after")
    build.add_argument("--dtype", default="bfloat16", help=f"stored precision: {', '.join(DTYPES)} (default bfloat16)")
    build.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    build.add_argument("--tolerance", type=float, help="largest relative error of a stored layer vs float32 "
                                                       "(default: the model config's target_tolerance)")
    build.add_argument("--force", action="store_true",
                       help="replace a folder that holds something else, or a damaged store")
    build.set_defaults(func=lambda a: _print_result(build_store(
        a.upstream_config, a.audio, a.out, a.shard, a.dtype, a.libri_root, a.device, a.tolerance, a.force)))
    merge = actions.add_parser("merge", help="write the index once every shard is built")
    merge.add_argument("store", help="the store folder")
    merge.set_defaults(func=lambda a: _print_result(merge_store(a.store)))
    verify = actions.add_parser("verify", help="re-read a store (e.g. one copied between machines) and check "
                                               "every file, frame and statistic")
    verify.add_argument("store", help="the store folder")
    verify.set_defaults(func=lambda a: _print_result(verify_store(a.store)))


def _print_result(result: dict) -> int:
    if result.get("verified"):
        print(f"{result['folder']}: verified {result['utterances']} utterances, {result['frames']} frames, "
              f"{result['bytes'] / 2**20:.1f} MiB in {result['shards']} shard(s): sizes, checksums, frame counts, "
              "finite values and statistics")
        return 0
    if "teachers" not in result:  # one shard of several
        print(f"shard {result['shard']}: {result['utterances']} utterances in {result['seconds']} s")
        return 0
    print(f"{result['utterances']} utterances, {result['frames']} frames, {result['bytes'] / 2**20:.1f} MiB of "
          f"{result['dtype']} targets; relative error vs float32 per layer:")
    for teacher in result["teachers"]:
        errors = ", ".join(f"L{layer} {100 * e:.3f}%" for layer, e in zip(teacher["layers"], teacher["relative_error"]))
        print(f"  {teacher['name']} ({teacher['fingerprint'][:12]}): {errors}")
    return 0
