"""Every wrong input a user can give: one `error:` line on stderr, exit status 2, no traceback, and not one
file written, replaced or removed anywhere in the workspace (hashes before and after).

One table: each row is a command and the files it is given. Damage to a target store, generated
systematically, is in test_store_damage.py.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
from conftest import model_config, write_yaml

from s3prl_ekd.io.resources import pretrain_config

RUNNER = pretrain_config("tiny_cpu_runner.yaml")


@dataclass
class World:
    """The files the rows are given, made once."""

    root: Path
    audio: Path
    config: Path
    teachers: dict[str, Path]
    experiment: Path
    checkpoint: Path
    superb_data: Path
    superb_out: Path

    def p(self, name: str) -> str:
        return str(self.root / name)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _data_overrides(audio: Path, extra: str = "") -> str:
    return (f"config.pretrain_expert.datarc.audio_dir={audio},,config.pretrain_expert.datarc.sequence_length=8000,,"
            "config.pretrain_expert.datarc.train_batch_size=2,,config.runner.total_steps=4,,"
            "config.runner.save_step=2,,config.runner.log_step=1" + extra)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teachers, speech_dir) -> World:
    root = tmp_path_factory.mktemp("bad_inputs")
    audio = root / "audio"
    shutil.copytree(speech_dir, audio)
    hubert = {"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 2]}
    config = write_yaml(root / "model.yaml", model_config([hubert], "layerwise_average"))
    write_yaml(root / "model_layers.yaml", model_config([{**hubert, "layers": [1, 3]}], "layerwise_average"))
    write_yaml(root / "typo.yaml", {**model_config([hubert], "layerwise_average"), "agregation": "multi_head"})
    write_yaml(root / "wrong_type.yaml", model_config([hubert], "layerwise_average", encoder_layers="2"))
    write_yaml(root / "layer_range.yaml", model_config([{**hubert, "layers": [1, 13]}], "layerwise_average"))
    wide = {"name": "wavlm_local", "ckpt": str(tiny_teachers["wavlm_wide"]), "layers": [1, 2]}
    write_yaml(root / "widths.yaml", model_config([hubert, wide], "layerwise_average"))
    write_yaml(root / "no_teacher.yaml", model_config([{**hubert, "ckpt": str(root / "gone.pt")}], "layerwise_average"))
    (root / "runner_lr.yaml").write_text(RUNNER.read_text().replace("lr: 1.0e-3", "lr: 5.0e-3"))
    for name, rate, channels in (("audio_8k", 8000, 1), ("audio_stereo", 16000, 2)):
        (root / name).mkdir()
        sf.write(root / name / "x.wav", np.full((rate, channels), 0.1, dtype=np.float32).squeeze(), rate)
    (root / "audio_empty").mkdir()
    sf.write(root / "audio_empty" / "x.wav", np.zeros(0, dtype=np.float32), 16000)
    (root / "audio_unreadable").mkdir()
    (root / "audio_unreadable" / "x.wav").write_text("not audio")
    (root / "notes.txt").write_text("a user's text file\n")
    users = root / "users_folder"
    users.mkdir()
    (users / "thesis.tex").write_text("\\documentclass{article}\n")

    proc = _cli("pretrain", "-g", str(config), "-c", str(RUNNER), "-n", "done", "--device", "cpu", "-o",
                _data_overrides(audio), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    experiment = root / "result" / "pretrain" / "done"
    checkpoint = max(experiment.glob("states-*.ckpt"), key=lambda p: p.stat().st_mtime)
    (root / "truncated.ckpt").write_bytes(checkpoint.read_bytes()[:3000])

    from s3prl_ekd.demo.corpus import synthesize_corpus
    from s3prl_ekd.recipes.prepare import prepare_all

    manifest = synthesize_corpus(root / "corpus", utterances=40, speakers=4, seed=0, progress=False)
    prepare_all(manifest, root / "superb_data")
    proc = _cli("superb", "-u", "fbank", "--data", str(root / "superb_data"), "--tasks", "er", "--steps", "2",
                "--out", str(root / "superb_out"), "--device", "cpu", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return World(root, audio, config, tiny_teachers, experiment, checkpoint, root / "superb_data",
                 root / "superb_out")


@dataclass
class Case:
    name: str
    argv: Callable[[World], list[str]]
    expect: str  # a part of the one error line


def pretrain(w: World, *args: str, config: str | None = None, overrides: str | None = None) -> list[str]:
    return ["pretrain", "-g", config or str(w.config), "-c", str(RUNNER), "--device", "cpu", *args,
            "-o", overrides if overrides is not None else _data_overrides(w.audio)]


CASES = [
    # issue 25: runs on settings the user did not ask for
    Case("resume with another runner config", lambda w: [
        "pretrain", "-g", str(w.config), "-c", w.p("runner_lr.yaml"), "-n", "done", "-a", "--device", "cpu",
        "-o", _data_overrides(w.audio)],
        "-c: differs from the runner config of the experiment being resumed"),
    Case("resume with another model config", lambda w: pretrain(w, "-n", "done", "-a", config=w.p("model_layers.yaml")),
         "differs from the model config of the experiment being resumed"),
    Case("resume with an -o that changes the optimizer", lambda w: pretrain(
        w, "-n", "done", "-a", overrides=_data_overrides(w.audio, ",,config.optimizer.lr=0.5")),
        "differs from the runner config of the experiment being resumed"),
    Case("resume with an -o that changes the optimizer (named)", lambda w: pretrain(
        w, "-n", "done", "-a", overrides=_data_overrides(w.audio, ",,config.optimizer.lr=0.5")),
        "in optimizer.lr (0.001 -> 0.5)"),
    Case("resume with more steps, without --allow-config-change", lambda w: pretrain(
        w, "-n", "done", "-a", overrides=_data_overrides(w.audio).replace("total_steps=4", "total_steps=8")),
        "or pass --allow-config-change"),
    Case("a typo in an -o key", lambda w: pretrain(
        w, "-n", "new", overrides=_data_overrides(w.audio, ",,config.runner.totl_steps=5")),
        "-o config.runner.totl_steps: config.runner has no key 'totl_steps'; did you mean 'total_steps'?"),
    Case("an -o argument that does not exist", lambda w: pretrain(
        w, "-n", "new", overrides=_data_overrides(w.audio, ",,args.sed=3")), "-o args.sed: unknown argument"),
    Case("superb on another checkpoint into the same --out", lambda w: [
        "superb", "-u", "ekd_distiller", "-k", str(w.checkpoint), "--data", str(w.superb_data), "--tasks", "er",
        "--steps", "2", "--out", str(w.superb_out), "--device", "cpu"], "holds the results of another upstream"),
    Case("an unknown --device", lambda w: pretrain(w, "-n", "new")[:-2] + ["--device", "bogus", "-o",
                                                                         _data_overrides(w.audio)],
         "--device 'bogus': not a device; use cpu, cuda or cuda:N"),
    Case("a model config that does not exist", lambda w: pretrain(w, "-n", "new", config=w.p("nowhere.yaml")),
         "nowhere.yaml: no such model config file"),
    Case("a folder as the model config", lambda w: pretrain(w, "-n", "new", config=w.p("audio")),
         "is a folder, not a model config file"),
    Case("a downstream expert that does not exist", lambda w: [
        "downstream", "-m", "train", "-u", "fbank", "-d", "emotoin", "-n", "d1", "--device", "cpu"],
        "-d emotoin: not an s3prl downstream expert"),
    Case("superb with an upstream s3prl does not have", lambda w: [
        "superb", "-u", "fbnak", "--data", str(w.superb_data), "--tasks", "er", "--out", w.p("superb_new"),
        "--device", "cpu"], "-u fbnak: not an upstream in s3prl.hub; did you mean fbank"),
    Case("downstream with an upstream s3prl does not have", lambda w: [
        "downstream", "-m", "train", "-u", "hubert_bsae", "-d", "emotion", "-n", "d1", "--device", "cpu"],
        "-u hubert_bsae: not an upstream in s3prl.hub; did you mean"),
    # the reliability table's input cases
    Case("8 kHz audio", lambda w: pretrain(w, "-n", "new", overrides=_data_overrides(w.root / "audio_8k")),
         "sample rate is 8000 Hz, expected 16000; convert it (sox in.wav -r 16000 out.wav) or set resample: true"),
    Case("stereo audio", lambda w: pretrain(w, "-n", "new", overrides=_data_overrides(w.root / "audio_stereo")),
         "has 2 channels, expected mono"),
    Case("a 0-byte (empty) audio file", lambda w: pretrain(w, "-n", "new", overrides=_data_overrides(
        w.root / "audio_empty")), "audio file is empty (0 samples)"),
    Case("an unreadable audio file", lambda w: pretrain(w, "-n", "new", overrides=_data_overrides(
        w.root / "audio_unreadable")), "x.wav: cannot read audio"),
    Case("a missing audio folder", lambda w: pretrain(w, "-n", "new", overrides=_data_overrides(w.root / "nowhere")),
         "audio_dir: "),
    Case("a typo in a model-config key", lambda w: pretrain(w, "-n", "new", config=w.p("typo.yaml")),
         "agregation: unknown key; did you mean 'aggregation'"),
    Case("a wrong type in the model config", lambda w: pretrain(w, "-n", "new", config=w.p("wrong_type.yaml")),
         "student.encoder_layers: expected int, got '2'"),
    Case("a layer out of range", lambda w: pretrain(w, "-n", "new", config=w.p("layer_range.yaml")),
         "layers: 13 is out of range"),
    Case("teachers of different widths averaged", lambda w: pretrain(w, "-n", "new", config=w.p("widths.yaml")),
         "layerwise_average needs teachers of one hidden dimension"),
    Case("a missing teacher checkpoint", lambda w: pretrain(w, "-n", "new", config=w.p("no_teacher.yaml")),
         "gone.pt does not exist"),
    Case("save_step not below total_steps", lambda w: pretrain(w, "-n", "new", overrides=_data_overrides(
        w.audio, ",,config.runner.save_step=4")), "runner.save_step: 4 is not below total_steps=4"),
    Case("a zero batch size", lambda w: pretrain(w, "-n", "new", overrides=_data_overrides(
        w.audio, ",,config.pretrain_expert.datarc.train_batch_size=0")), "train_batch_size: must be >= 1"),
    Case("a new run into an experiment with checkpoints", lambda w: pretrain(w, "-n", "done"),
         "already holds states-"),
    Case("a teacher checkpoint as the upstream", lambda w: [
        "downstream", "-m", "train", "-u", "ekd_distiller", "-k", str(w.teachers["hubert_a"]), "-d", "emotion",
        "-n", "d1", "--device", "cpu"], "looks like a teacher model checkpoint"),
    Case("a truncated checkpoint to resume from", lambda w: pretrain(w, "-e", w.p("truncated.ckpt")),
         "truncated.ckpt: cannot read as a torch checkpoint"),
    Case("corpus synth into a user's folder", lambda w: [
        "corpus", "synth", w.p("users_folder"), "--utterances", "40", "--speakers", "4"],
        "holds files that `s3prl-ekd corpus synth` did not write"),
    Case("prepare into a user's folder", lambda w: [
        "prepare", "er", "--manifest", w.p("corpus/manifest.jsonl"), "--out", w.p("users_folder")], "users_folder"),
    Case("superb into a user's folder", lambda w: [
        "superb", "-u", "fbank", "--data", str(w.superb_data), "--tasks", "er", "--out", w.p("users_folder"),
        "--device", "cpu"], "holds files that `s3prl-ekd superb` did not write"),
    Case("targets build into a user's folder", lambda w: [
        "targets", "build", "-g", str(w.config), "--audio", str(w.audio), "--out", w.p("users_folder"),
        "--device", "cpu"], "users_folder: holds files that are not a target store"),
    Case("demo into a user's folder", lambda w: ["demo", "--out", w.p("users_folder"), "--data", w.p("demo_data")],
         "holds files that `s3prl-ekd demo` did not write"),
    Case("a file as the shared CNN-features folder", lambda w: [
        "downstream", "-m", "train", "-u", "fbank", "-d", "emotion", "-n", "d1", "--device", "cpu",
        "--share-cnn-features", w.p("notes.txt")], "notes.txt: is a file; give a folder (made if missing)"),
    Case("inspect on a text file", lambda w: ["inspect", w.p("notes.txt")],
         "notes.txt: cannot read as a torch checkpoint"),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root`: path -> sha256 (folders: 'dir')."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_wrong_input_is_one_line_and_changes_nothing(world, case):
    before = snapshot(world.root)
    proc = _cli(*case.argv(world), cwd=world.root)
    after = snapshot(world.root)
    errors = [line for line in proc.stderr.splitlines() if " error: " in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    assert case.expect in errors[0], errors[0]
    print(f"\n[{case.name}] {errors[0]}")  # the lines a user sees: `pytest -s tests/test_bad_inputs.py`
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"written, replaced or removed: {changed[:10]}"
