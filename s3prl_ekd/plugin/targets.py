"""`s3prl-ekd targets build`: run each teacher once over the training audio into a target store
(io/target_store.py), and match a store against a student's model config.

One store serves every student distilled from its teachers: each aggregation mode (average with
any weights, concat, multi_head) is computed from the stored per-teacher layers at training time,
and a student may use a subset of the stored teachers and layers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from s3prl_ekd.core.config import EKDConfig, load_config
from s3prl_ekd.core.frames import STANDARD_CNN, hop_length, parse_conv_layers, receptive_field
from s3prl_ekd.core.precision import check_targets, check_tolerance, layer_errors
from s3prl_ekd.core.teachers import TeacherEnsemble
from s3prl_ekd.errors import ConfigError, UserError
from s3prl_ekd.io.audio import SAMPLE_RATE, load_audio
from s3prl_ekd.io.files import atomic_write_json, fingerprint
from s3prl_ekd.io.target_store import (
    DTYPES,
    INDEX_NAME,
    SHARD_DONE,
    ShardWriter,
    StoredTeacher,
    TargetStore,
    bytes_per_second,
    checkpoint_fingerprint,
    free_bytes,
    parse_shard,
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
    return [StoredTeacher(t.name, checkpoint_fingerprint(t.name, t.ckpt), list(t.layers), dim)
            for t, dim in zip(config.teachers, ensemble.dims)]


PLAN_NAME = "build.json"


def _existing_plan(out: Path, plan: dict) -> str | None:
    """None if `out` is new, empty or a store (finished or not) of this very plan; else what it holds."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not (out / PLAN_NAME).is_file():
        return "files that are not a target store"
    existing = json.loads((out / PLAN_NAME).read_text())
    differing = [key for key in plan if existing.get(key) != plan[key]]
    if differing:
        return "a target store of other " + ", ".join(differing) + (
            f" ({existing['shards']} shards, not {plan['shards']})" if "shards" in differing else "")
    return None


def build_store(model_config: str | Path, audio: str, out: str | Path, shard: str = "0/1",
                dtype: str = "bfloat16", libri_root: str | None = None, device: str = "cpu",
                tolerance: float | None = None, force: bool = False, log=print) -> dict:
    """Build (or resume) shard i/N of a store for `model_config`'s teachers over `audio`; teachers
    run in float32, targets are stored in `dtype` and checked against float32 per layer.

    Returns the index when the store is complete (every shard done), else the shard's summary.
    A folder holding anything but this very store is refused unless `force`.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    index, count = parse_shard(shard)
    out = Path(out)
    config = load_config(model_config)
    tolerance = config.target_tolerance if tolerance is None else tolerance
    utterances = sorted(read_utterances(audio_source(audio, libri_root)), key=lambda u: u.key)
    ensemble = TeacherEnsemble(config.teachers, "float32").to(device)
    ensemble.probe(device)
    teachers = stored_teachers(config, ensemble)
    plan = {"teachers": [asdict(t) for t in teachers], "dtype": dtype, "shards": count,
            "audio": fingerprint([(u.key, u.samples) for u in utterances])}
    existing = _existing_plan(out, plan)
    if existing and not force:
        raise UserError(f"{out}: holds {existing}; choose another --out or pass --force to replace it "
                        "(use the same --shard i/N for every part); nothing was changed")
    if existing:
        import shutil

        shutil.rmtree(out)
    if (out / INDEX_NAME).is_file():
        log(f"[targets] {out}: up to date (same teachers, layers, dtype and audio)")
        return json.loads((out / INDEX_NAME).read_text())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PLAN_NAME, plan)
    mine = utterances[index::count]
    seconds = sum(u.samples for u in utterances) / SAMPLE_RATE
    per_second = bytes_per_second(teachers, dtype)
    needed = int(per_second * sum(u.samples for u in mine) / SAMPLE_RATE)
    log(f"[targets] {len(utterances)} utterances, {seconds / 3600:.2f} h: the store needs {per_second:,} bytes per "
        f"audio-second = {per_second * 3600 / 2**30:.2f} GiB per hour, {per_second * seconds / 2**30:.2f} GiB in all; "
        f"this shard ({index}/{count}) {needed / 2**30:.2f} GiB")
    writer = ShardWriter(out / shard_name(index, count), teachers, dtype)
    remaining = needed - int(per_second * sum(u.samples for u in mine if u.key in writer.done) / SAMPLE_RATE)
    if remaining > free_bytes(out):
        raise UserError(f"{out}: needs {remaining / 2**30:.2f} GiB more, the disk has {free_bytes(out) / 2**30:.2f} GiB "
                        "free; free space or build shards on other disks (--shard i/N) and merge")
    if writer.done:
        log(f"[targets] resuming: {len(writer.done)} of {len(mine)} utterances already stored")
    errors = [[torch.zeros(len(t.layers), dtype=torch.float64), torch.zeros(len(t.layers), dtype=torch.float64)]
              for t in teachers]
    started = time.perf_counter()
    for n, utterance in enumerate(u for u in mine if u.key not in writer.done):
        wav = load_audio(utterance.path, resample=True, downmix=True).to(device)
        hiddens = ensemble([wav])                                       # [K] (1, L, T, D) float32
        stored = []
        for k, (teacher, hidden) in enumerate(zip(teachers, hiddens)):
            frames = hidden[0].transpose(0, 1).cpu()                    # (T, L, D)
            cast = frames.to(DTYPES[dtype])
            check_targets(f"{teacher.name} (teacher {k}) on {utterance.key}:", teacher.layers, cast, dtype)
            squared_error, squared_norm = layer_errors(frames, cast.float())
            errors[k][0] += squared_error
            errors[k][1] += squared_norm
            stored.append(cast)
        writer.add(utterance.key, utterance.samples, stored)
        if (n + 1) % FLUSH_EVERY == 0:
            writer.flush()
    for teacher, (squared_error, squared_norm) in zip(teachers, errors):
        teacher.relative_error = (squared_error / squared_norm.clamp(min=1e-30)).sqrt().tolist()
        check_tolerance(teacher.name, teacher.layers, teacher.relative_error, dtype, tolerance)
    summary = {"shard": shard, "utterances": len(writer.entries), "seconds": round(time.perf_counter() - started, 1),
               "relative_error": [t.relative_error for t in teachers]}  # over the utterances this run computed
    atomic_write_json(out / shard_name(index, count) / "errors.json", summary)
    writer.finish()
    shards = [shard_name(i, count) for i in range(count)]
    if all((out / s / SHARD_DONE).is_file() for s in shards):
        return merge_store(out, log=log)
    log(f"[targets] shard {shard} done; the store is complete once every shard is built")
    return summary


def merge_store(out: str | Path, log=print) -> dict:
    """Write index.json once every shard of the store is complete (relative errors: the largest per layer)."""
    out = Path(out)
    plan = json.loads((out / PLAN_NAME).read_text())
    shards = [shard_name(i, plan["shards"]) for i in range(plan["shards"])]
    teachers = [StoredTeacher(**t) for t in plan["teachers"]]
    for k, teacher in enumerate(teachers):
        per_shard = [json.loads((out / s / "errors.json").read_text())["relative_error"][k]
                     for s in shards if (out / s / "errors.json").is_file()]
        teacher.relative_error = [max(values) for values in zip(*per_shard)] if per_shard else []
    index = write_index(out, teachers, plan["dtype"], shards, plan)
    log(f"[targets] {out}: {index['utterances']} utterances, {index['frames']} frames, "
        f"{index['bytes'] / 2**20:.1f} MiB, {index['dtype']}")
    return index


def match_store(folder: str | Path, config: EKDConfig) -> StoredTargets:
    """The stored teachers and layers `config` needs, or one ConfigError saying what differs."""
    store = TargetStore(folder)
    chosen, layers = [], []
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
        chosen.append(found[0])
        layers.append([stored.layers.index(layer) for layer in wanted])
    return StoredTargets(store, chosen, layers, hop=hop_length(TEACHER_CNN), field=receptive_field(TEACHER_CNN))


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("targets", help="teacher-target store: run the teachers once, distil many students")
    actions = p.add_subparsers(dest="targets_command", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="store every teacher's selected layers for the training audio")
    build.add_argument("-g", "--model-config", required=True, help="EKD model config naming the teachers and layers")
    build.add_argument("--audio", required=True, help="audio folder, or s3prl bucket CSV file(s), comma-separated")
    build.add_argument("--libri-root", help="folder the CSV paths are relative to")
    build.add_argument("--out", required=True, help="store folder (an unfinished one is resumed)")
    build.add_argument("--shard", default="0/1", help="build part i of N (0-based), e.g. on N machines; merge after")
    build.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    build.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    build.add_argument("--tolerance", type=float, help="largest relative error of a stored layer vs float32 "
                                                       "(default: the model config's target_tolerance)")
    build.add_argument("--force", action="store_true", help="replace a folder that holds something else")
    build.set_defaults(func=lambda a: _print_result(build_store(a.model_config, a.audio, a.out, a.shard, a.dtype,
                                                                a.libri_root, a.device, a.tolerance, a.force)))
    merge = actions.add_parser("merge", help="write the index once every shard is built")
    merge.add_argument("out")
    merge.set_defaults(func=lambda a: _print_result(merge_store(a.out)))


def _print_result(result: dict) -> int:
    if "teachers" not in result:  # one shard of several
        print(f"shard {result['shard']}: {result['utterances']} utterances in {result['seconds']} s")
        return 0
    print(f"{result['utterances']} utterances, {result['frames']} frames, {result['bytes'] / 2**20:.1f} MiB of "
          f"{result['dtype']} targets; relative error vs float32 per layer:")
    for teacher in result["teachers"]:
        errors = ", ".join(f"L{layer} {100 * e:.3f}%" for layer, e in zip(teacher["layers"], teacher["relative_error"]))
        print(f"  {teacher['name']} ({teacher['fingerprint'][:12]}): {errors}")
    return 0
