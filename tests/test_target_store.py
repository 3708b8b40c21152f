"""The teacher-target store: built once, read by students of every mode; equal to running the
teachers live; resumable, shardable, checked against float32, holding each layer's statistics, and
strict about what it holds. Damage to a store's files: test_store_damage.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import model_config, run_pretrain_cli, write_yaml

from s3prl_ekd.core.config import TeacherConfig, load_config
from s3prl_ekd.core.normalization import LayerStats
from s3prl_ekd.core.teachers import TeacherEnsemble
from s3prl_ekd.errors import ConfigError, UserError
from s3prl_ekd.io.audio import load_audio
from s3prl_ekd.io.events import read_scalars
from s3prl_ekd.io.target_store import FORMAT, ShardWriter, StoredTeacher, StoreError, TargetStore
from s3prl_ekd.plugin import targets
from s3prl_ekd.plugin.targets import build_store, match_store, verify_store

SAMPLES = 19200  # 1.2 s: every utterance the same length, so batched teachers see no padding


@pytest.fixture(scope="module")
def equal_audio(speech_dir, tmp_path_factory) -> Path:
    """8 espeak utterances cut to 1.2 s each."""
    out = tmp_path_factory.mktemp("equal_audio")
    for path in sorted(speech_dir.glob("*.wav"))[:8]:
        wav = load_audio(path)
        sf.write(out / path.name, np.pad(wav.numpy(), (0, max(0, SAMPLES - len(wav))))[:SAMPLES], 16000,
                 subtype="FLOAT")
    return out


def teachers_of(tiny_teachers) -> list[dict]:
    return [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 2, 3], "weight": 1.0},
            {"name": "wavlm_local", "ckpt": str(tiny_teachers["wavlm_a"]), "layers": [1, 2, 3], "weight": 2.0}]


@pytest.fixture(scope="module")
def stores(tiny_teachers, equal_audio, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("stores")
    config = write_yaml(work / "teachers.yaml", model_config(teachers_of(tiny_teachers), "layerwise_average"))
    for dtype in ("float32", "bfloat16"):
        build_store(config, str(equal_audio), work / dtype, dtype=dtype, log=lambda _: None)
    return {dtype: work / dtype for dtype in ("float32", "bfloat16")}


def losses(expdir: Path) -> list[float]:
    return [v for _, v in read_scalars(expdir)["ekd_distiller/train-loss"]]


@pytest.mark.parametrize("mode", ["layerwise_average", "multi_head"])
def test_store_run_equals_live_run_step_by_step(mode, tiny_teachers, equal_audio, stores, tmp_path):
    config = model_config(teachers_of(tiny_teachers), mode)
    whole = "config.pretrain_expert.datarc.sequence_length=0"  # no crop: live teachers see the same audio
    live = run_pretrain_cli(tmp_path, config, "live", steps=6, audio_dir=equal_audio, overrides=[whole])
    runs = {"live": losses(live)}
    for dtype, store in stores.items():
        expdir = run_pretrain_cli(tmp_path, config, f"store_{dtype}", steps=6, audio_dir=equal_audio,
                                  overrides=[whole, f"config.pretrain_expert.datarc.targets={store}"])
        runs[dtype] = losses(expdir)
    assert len(runs["live"]) == 6
    # float32 storage: the same losses up to float32 summation order in batched vs one-utterance teachers
    np.testing.assert_allclose(runs["float32"], runs["live"], rtol=1e-5)
    # bfloat16 storage (relative error of the targets ~0.2%): losses within 1%
    np.testing.assert_allclose(runs["bfloat16"], runs["live"], rtol=1e-2)
    assert runs["bfloat16"] != runs["live"]


def test_one_store_serves_a_subset_of_teachers_and_layers(tiny_teachers, stores):
    single = load_config(model_config([{**teachers_of(tiny_teachers)[1], "layers": [3, 1]}], "layerwise_average"))
    selection = match_store(stores["float32"], single)
    assert selection.teachers == [1] and selection.layers == [[2, 0]]
    key = next(iter(selection.store.entries))
    both = selection.store.frames(key, 1, 0, 5, [0, 1, 2])
    torch.testing.assert_close(selection.store.frames(key, 1, 0, 5, [2, 0]), both[:, [2, 0]])


def test_store_mismatch_is_one_clear_error(tiny_teachers, stores):
    other = load_config(model_config([{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_b"])}],
                                     "layerwise_average"))
    with pytest.raises(ConfigError, match=r"teachers\[0\] \(hubert_local, .*hubert_b.pt\): not in the target store"):
        match_store(stores["float32"], other)
    deeper = load_config(model_config([{**teachers_of(tiny_teachers)[0], "layers": [0, 3]}], "layerwise_average"))
    with pytest.raises(ConfigError, match=r"teachers\[0\].layers: \[0\] not in the target store"):
        match_store(stores["float32"], deeper)


def test_store_content_equals_each_teacher_alone(tiny_teachers, equal_audio, stores):
    store = TargetStore(stores["float32"])
    path = sorted(equal_audio.glob("*.wav"))[3]
    ensemble = TeacherEnsemble([TeacherConfig(**{k: v for k, v in t.items()}) for t in teachers_of(tiny_teachers)])
    ensemble.probe("cpu")
    expected = ensemble([load_audio(path)])
    for k, hidden in enumerate(expected):
        stored = store.frames(path.name, k, 0, 10_000, [0, 1, 2])          # (T, L, D)
        torch.testing.assert_close(stored, hidden[0].transpose(0, 1), rtol=0, atol=0)
    assert store.index["teachers"][1]["relative_error"] == [0.0, 0.0, 0.0]
    bf16 = json.loads((stores["bfloat16"] / "index.json").read_text())["teachers"]
    assert all(0.0005 < e < 0.005 for t in bf16 for e in t["relative_error"])  # bfloat16 rounding ~0.2%


def test_shards_merge_into_the_same_store(tiny_teachers, equal_audio, stores, tmp_path):
    config = write_yaml(tmp_path / "t.yaml", model_config(teachers_of(tiny_teachers), "layerwise_average"))
    first = build_store(config, str(equal_audio), tmp_path / "sharded", shard="0/2", dtype="float32", log=lambda _: None)
    assert "teachers" not in first and not (tmp_path / "sharded" / "index.json").exists()
    with pytest.raises(UserError, match=r"holds a target store of other shards \(2 shards, not 3\)"):
        build_store(config, str(equal_audio), tmp_path / "sharded", shard="1/3", dtype="float32", log=lambda _: None)
    index = build_store(config, str(equal_audio), tmp_path / "sharded", shard="1/2", dtype="float32",
                        log=lambda _: None)
    assert index["utterances"] == 8 and len(index["shards"]) == 2
    whole, parts = TargetStore(stores["float32"]), TargetStore(tmp_path / "sharded")
    assert sorted(whole.entries) == sorted(parts.entries)
    for key in whole.entries:
        torch.testing.assert_close(parts.frames(key, 0, 0, 999, [0, 1, 2]), whole.frames(key, 0, 0, 999, [0, 1, 2]))


def test_an_interrupted_shard_resumes_after_its_last_complete_utterance(tmp_path):
    teacher = StoredTeacher("t", "x", [1], 2)
    writer = ShardWriter(tmp_path, [teacher], "float32")
    writer.add("a", 800, [torch.ones(3, 1, 2)])
    writer.add("b", 800, [2 * torch.ones(2, 1, 2)])
    writer.flush()
    # A kill while writing "c": its frames half-written and its progress line cut short.
    with open(tmp_path / "teacher0.bin", "ab") as handle:
        handle.write(b"\\0" * 12)
    with open(tmp_path / "utterances.jsonl", "a") as handle:
        handle.write('{"key": "c", "samp')
    resumed = ShardWriter(tmp_path, [teacher], "float32")
    assert resumed.done == {"a", "b"} and resumed.frames == 5
    assert (tmp_path / "teacher0.bin").stat().st_size == 5 * 2 * 4
    resumed.add("c", 800, [3 * torch.ones(1, 1, 2)])
    resumed.flush()
    # A kill after "d"'s progress line reached the disk but before all of its frames did.
    with open(tmp_path / "teacher0.bin", "ab") as handle:
        handle.write(np.full(2, 4, dtype=np.float32).tobytes())   # 1 of its 2 frames
    with open(tmp_path / "utterances.jsonl", "a") as handle:
        handle.write(json.dumps({"key": "d", "samples": 960, "offset": 6, "frames": 2}) + "\n")
    resumed = ShardWriter(tmp_path, [teacher], "float32")
    assert resumed.done == {"a", "b", "c"} and (tmp_path / "teacher0.bin").stat().st_size == 6 * 2 * 4
    assert ShardWriter(tmp_path, [teacher], "float32", keep=1).done == {"a"}  # a caller's checkpoint: a only
    resumed = ShardWriter(tmp_path, [teacher], "float32")
    assert resumed.done == {"a"}
    resumed.add("b", 800, [2 * torch.ones(2, 1, 2)])
    resumed.add("c", 800, [3 * torch.ones(1, 1, 2)])
    (tmp_path / "errors.json").write_text("{}")
    stats = LayerStats.empty(1, 2)
    done = resumed.finish([stats])
    assert done["frames"] == 6 and stats.count == 6 and stats.total.tolist() == [[3 + 4 + 3] * 2]
    lines = [json.loads(line) for line in (tmp_path / "utterances.jsonl").read_text().splitlines()]
    assert [(e["key"], e["offset"], e["frames"]) for e in lines] == [("a", 0, 3), ("b", 3, 2), ("c", 5, 1)]
    data = np.fromfile(tmp_path / "teacher0.bin", dtype=np.float32).reshape(-1, 1, 2)
    assert data[:, 0, 0].tolist() == [1, 1, 1, 2, 2, 3]


def test_half_precision_that_overflows_is_refused(tiny_teachers, equal_audio, tmp_path):
    """A teacher whose layer 2 outputs exceed float16's range (65504): float16 storage is refused with
    one line naming teacher and layer; bfloat16 and float32 are accepted."""
    state = torch.load(tiny_teachers["hubert_a"], weights_only=False)
    for name in ("encoder.layers.1.final_layer_norm.weight", "encoder.layers.1.final_layer_norm.bias"):
        state["model_weight"][name] = state["model_weight"][name] * 1e6
    loud = tmp_path / "loud.pt"
    torch.save(state, loud)
    config = write_yaml(tmp_path / "loud.yaml", model_config(
        [{"name": "hubert_local", "ckpt": str(loud), "layers": [1, 2]}], "layerwise_average"))
    with pytest.raises(ConfigError, match=r"hubert_local \(teacher 0\) on .*: layer 2: targets overflow float16"):
        build_store(config, str(equal_audio), tmp_path / "fp16", dtype="float16", log=lambda _: None)
    build_store(config, str(equal_audio), tmp_path / "bf16", dtype="bfloat16", log=lambda _: None)


def test_half_precision_teachers_checked_against_float32(tiny_teachers, speech_dir):
    from s3prl_ekd.patches import keep_pos_conv_fp32

    ensemble = TeacherEnsemble([TeacherConfig(**t) for t in teachers_of(tiny_teachers)])
    for upstream in ensemble.upstreams:
        keep_pos_conv_fp32(upstream)  # as the pretrain expert does for teachers under autocast
    ensemble.probe("cpu")
    wavs = [load_audio(p) for p in sorted(speech_dir.glob("*.wav"))[:3]]
    errors = ensemble.check_precision(wavs, dtype="bfloat16")  # bfloat16 autocast runs on CPU too
    assert all(0.001 < e < 0.05 for per_teacher in errors for e in per_teacher), errors
    with pytest.raises(ConfigError, match=r"hubert_local#0 layer 1: bfloat16 targets differ from float32 by "):
        ensemble.check_precision(wavs, tolerance=1e-4, dtype="bfloat16")


def test_targets_build_cli_refuses_a_foreign_folder_and_says_up_to_date(tiny_teachers, equal_audio, stores, tmp_path):
    config = write_yaml(tmp_path / "t.yaml", model_config(teachers_of(tiny_teachers), "layerwise_average"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cli = [sys.executable, "-m", "s3prl_ekd.cli", "targets", "build", "-g", str(config), "--audio", str(equal_audio)]
    proc = subprocess.run(cli + ["--out", str(foreign)], capture_output=True, text=True)
    assert proc.returncode == 2 and "choose another --out or pass --force" in proc.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
    proc = subprocess.run(cli + ["--out", str(stores["bfloat16"])], capture_output=True, text=True)
    assert proc.returncode == 0 and "up to date" in proc.stdout + proc.stderr


def test_the_store_holds_each_layers_statistics_over_every_frame(tiny_teachers, equal_audio, stores):
    """index.json: per teacher, LayerStats of its stored layers over every frame of the training audio
    (float32 storage: the teachers' own outputs); match_store hands each config teacher its rows."""
    ensemble = TeacherEnsemble([TeacherConfig(**t) for t in teachers_of(tiny_teachers)])
    ensemble.probe("cpu")
    expected = [LayerStats.empty(3, 32) for _ in range(2)]
    for path in sorted(equal_audio.glob("*.wav")):
        for stats, hidden in zip(expected, ensemble([load_audio(path)])):
            stats.update(hidden[0].transpose(0, 1))                     # (T, L, D)
    store = TargetStore(stores["float32"])
    for teacher, stats in zip(store.teachers, expected):
        stored = LayerStats.from_dict(teacher.stats)
        assert stored.count == stats.count == store.index["frames"] == 8 * 59
        torch.testing.assert_close(stored.total, stats.total, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(stored.squares, stats.squares, rtol=1e-9, atol=1e-9)
    config = load_config(model_config([{**teachers_of(tiny_teachers)[1], "layers": [3, 1]}], "layerwise_average"))
    (selected,) = match_store(stores["float32"], config).stats
    assert selected.count == expected[1].count
    torch.testing.assert_close(selected.total, expected[1].total[[2, 0]], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(selected.squares, expected[1].squares[[2, 0]], rtol=1e-9, atol=1e-9)
    assert verify_store(stores["bfloat16"])["verified"]


def test_a_killed_build_resumes_into_the_same_store_byte_for_byte(tiny_teachers, equal_audio, stores, tmp_path,
                                                                  monkeypatch):
    """Killed after 5 of 8 utterances (error sums saved every 2): the resumed build redoes the fifth and
    ends with the very files of an uninterrupted build: frames, statistics and relative errors."""
    import gc

    config = write_yaml(tmp_path / "t.yaml", model_config(teachers_of(tiny_teachers), "layerwise_average"))
    monkeypatch.setattr(targets, "FLUSH_EVERY", 2)
    loaded = []

    def dies_on_the_sixth(path, **kwargs):
        if len(loaded) == 5:
            raise KeyboardInterrupt
        loaded.append(path)
        return load_audio(path, **kwargs)

    monkeypatch.setattr(targets, "load_audio", dies_on_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        build_store(config, str(equal_audio), tmp_path / "store", log=lambda _: None)
    gc.collect()  # the killed build's open files (a real kill closes them)
    shard = tmp_path / "store" / "shard-00000-of-00001"
    assert len((shard / "utterances.jsonl").read_text().splitlines()) == 5 and not (shard / "shard.json").exists()
    monkeypatch.setattr(targets, "load_audio", load_audio)
    lines = []
    build_store(config, str(equal_audio), tmp_path / "store", log=lines.append)
    assert "[targets] resuming: 4 of 8 utterances already stored" in lines
    whole = stores["bfloat16"]
    for path in sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file()):
        assert (tmp_path / "store" / path).read_bytes() == (whole / path).read_bytes(), path
    assert TargetStore(tmp_path / "store").teachers[0].relative_error == TargetStore(whole).teachers[0].relative_error


def test_a_store_of_the_older_format_is_refused_then_rebuilt(tiny_teachers, equal_audio, stores, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(stores["float32"], old)
    for name in ("index.json", "build.json"):
        data = json.loads((old / name).read_text())
        (old / name).write_text(json.dumps({**data, "format": "ekd-targets-v1"}, indent=1) + "\n")
    with pytest.raises(StoreError, match=r"index.json: a target store of format 'ekd-targets-v1'; this version reads "
                                         rf"{FORMAT} .*: rebuild it with `s3prl-ekd targets build` and the same -g"):
        TargetStore(old)
    normalised = load_config({**model_config(teachers_of(tiny_teachers), "layerwise_average"),
                              "target_norm": "teacher_layer"})
    with pytest.raises(StoreError, match="a target store of format 'ekd-targets-v1'"):
        match_store(old, normalised)
    config = write_yaml(tmp_path / "t.yaml", model_config(teachers_of(tiny_teachers), "layerwise_average"))
    lines = []
    build_store(config, str(equal_audio), old, dtype="float32", log=lines.append)
    assert f"[targets] {old}: a store of an older format; rebuilding it as {FORMAT}" in lines
    assert (old / "index.json").read_bytes() == (stores["float32"] / "index.json").read_bytes()
    assert match_store(old, normalised).stats[0].count == 8 * 59


@pytest.mark.parametrize("flags, message", [
    (["--shard", "3/2"], "--shard 3/2: i must be in 0..N-1"),
    (["--dtype", "float8"], "--dtype float8: use one of float32, float16, bfloat16"),
    (["--device", "gpu"], "--device 'gpu': not a device; use cpu, cuda or cuda:N"),
    (["--tolerance", "0"], "--tolerance 0.0: give a relative error above 0"),
])
def test_targets_build_bad_inputs_are_one_line_and_write_nothing(flags, message, tiny_teachers, equal_audio,
                                                                 tmp_path, capsys):
    from s3prl_ekd.cli import main

    config = write_yaml(tmp_path / "t.yaml", model_config(teachers_of(tiny_teachers), "layerwise_average"))
    out = tmp_path / "store"
    code = main(["targets", "build", "-g", str(config), "--audio", str(equal_audio), "--out", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("s3prl-ekd targets: error: " + message), err
    assert not out.exists()
