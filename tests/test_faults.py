"""Faults lose nothing: kill -9 at any moment and resume, a full disk, two runs in one folder,
poisoned audio, a truncated checkpoint, and outputs that are not ours."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import model_config, write_yaml

from s3prl_ekd.io import checkpoint
from s3prl_ekd.io.resources import pretrain_config

RUNNER = pretrain_config("tiny_cpu_runner.yaml")
# Runs the CLI with torch.save slowed down (64 KiB chunks, 20 ms apart), as on a slow disk, so that
# a kill lands inside a checkpoint write when the test aims for one.
SLOW_DISK_CLI = """
import io, os, sys, time, torch
_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    if not isinstance(f, (str, os.PathLike)):
        return _save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    _save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    with open(f, "wb") as handle:
        for i in range(0, len(data), 65536):
            handle.write(data[i:i + 65536])
            handle.flush()
            time.sleep(0.02)
torch.save = slow_save
from s3prl_ekd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def pretrain_argv(config: Path, name: str, audio: Path, steps: int, extra: str = "") -> list[str]:
    overrides = (f"config.pretrain_expert.datarc.audio_dir={audio},,config.runner.total_steps={steps},,"
                 "config.runner.save_step=1,,config.runner.max_keep=2,,config.runner.log_step=1,,"
                 "config.pretrain_expert.datarc.train_batch_size=2,,config.pretrain_expert.datarc.sequence_length=8000"
                 + extra)
    return ["pretrain", "-u", "ekd_distiller", "-g", str(config), "-c", str(RUNNER), "-n", name,
            "--device", "cpu", "-o", overrides]


@pytest.fixture
def tiny_config(tmp_path, tiny_teachers) -> Path:
    teachers = [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 2]}]
    return write_yaml(tmp_path / "model.yaml", model_config(teachers, "layerwise_average"))


def checkpoints(expdir: Path) -> dict[Path, int | None]:
    """Every states-*.ckpt and its stored step (None: unreadable)."""
    out = {}
    for path in expdir.glob("states-*.ckpt"):
        out[path] = None if checkpoint.readable(path) else int(checkpoint.load_raw(path)[checkpoint.STEP_KEY])
    return out


def _saved_steps(expdir: Path) -> int:
    steps = [int(p.stem.split("-")[-1]) for p in expdir.glob("states-*.ckpt") if p.stem.split("-")[-1].isdigit()]
    return max(steps, default=0)


def test_kill_at_20_moments_then_resume_finishes_every_step(tmp_path, tiny_config, speech_dir):
    """kill -9 at 20 moments (half at a random point of a step, half while a checkpoint is being
    written), each 1-3 steps after the run (re)started; after each: every checkpoint on disk is
    complete, one exists once the first was saved, and no progress is lost. The last `-a` run
    finishes at the configured step count."""
    steps, expdir = 80, tmp_path / "result" / "pretrain" / "killed"
    rng = random.Random(0)
    base = [sys.executable, "-c", SLOW_DISK_CLI, *pretrain_argv(tiny_config, "killed", speech_dir, steps)]
    kills, newest, attempts = [], 0, 0
    # A killed run cannot remove its temporary s3prl workspace: keep those under tmp_path, not /tmp.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    while len(kills) < 20 and attempts < 40 and newest < steps:
        attempts += 1
        argv = base + (["-a"] if expdir.exists() else [])
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, env=env)
        aim = "save" if len(kills) % 2 else "random"
        target, deadline = newest + rng.randint(1, 3), time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and _saved_steps(expdir) < target:
            time.sleep(0.005)
        if aim == "random":
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the next step
        else:  # right after the next temporary checkpoint file appears
            while time.monotonic() < deadline and proc.poll() is None and not list(expdir.glob(".states-*.tmp-*")):
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.05))
        finished = proc.poll() is not None
        in_save = bool(list(expdir.glob(".states-*.tmp-*")))
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not finished or proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        if not finished:
            kills.append((aim, in_save))
        found = checkpoints(expdir) if expdir.exists() else {}
        assert None not in found.values(), f"kill {len(kills)} ({aim}) left an unreadable checkpoint: {found}"
        if newest:
            assert found, f"kill {len(kills)} ({aim}) left no checkpoint after step {newest} had been saved"
        steps_now = max(found.values(), default=0)
        assert steps_now >= newest  # progress is never lost
        newest = steps_now
    assert len(kills) == 20, kills
    final = subprocess.run(base + ["-a"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    found = checkpoints(expdir)
    assert max(found.values()) == steps and None not in found.values()
    assert sum(in_save for _, in_save in kills) >= 5, kills  # kills that cut a checkpoint write short
    assert not list(expdir.glob(".states-*.tmp-*"))  # partial writes of killed saves are cleaned up
    print(f"kills: {len(kills)}, of which during a checkpoint write: {sum(s for _, s in kills)}; "
          f"steps when killed reached {newest}; final step {max(found.values())} of {steps}")


def test_two_runs_in_one_experiment_folder(tmp_path, tiny_config, speech_dir):
    """Started at the same moment, the second refuses (a lock in the experiment folder)."""
    argv = [sys.executable, "-m", "s3prl_ekd.cli", *pretrain_argv(tiny_config, "twice", speech_dir, 6), "--force"]
    runs = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    codes = sorted((run.wait(timeout=600), run.stderr.read()) for run in runs)
    assert [code for code, _ in codes] == [0, 2], codes
    assert "another pretraining run is running in this folder right now" in codes[1][1]
    assert codes[1][1].count("\n") == 1
    assert max(checkpoints(tmp_path / "result" / "pretrain" / "twice").values()) == 6


@pytest.mark.parametrize("workers", [0, 1])
def test_nan_audio_stops_training_with_the_file_named(tmp_path, tiny_config, speech_dir, workers):
    audio = tmp_path / "audio"
    audio.mkdir()
    for path in sorted(speech_dir.glob("*.wav"))[:3]:
        (audio / path.name).symlink_to(path)
    sf.write(audio / "poisoned.wav", np.full(16000, np.nan, "float32"), 16000, subtype="FLOAT")
    argv = pretrain_argv(tiny_config, "nan", audio, 4, f",,config.pretrain_expert.datarc.num_workers={workers}")
    proc = subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", *argv], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (  # s3prl's own progress lines come before it
        f"s3prl-ekd pretrain: error: {audio / 'poisoned.wav'}: holds NaN or infinite samples; re-export it from "
        "its source or remove it from the data")


def test_truncated_checkpoint_resume_is_one_line(tmp_path, tiny_config, speech_dir, ekd_checkpoints):
    expdir = tmp_path / "result" / "pretrain" / "cut"
    expdir.mkdir(parents=True)
    good = ekd_checkpoints["layerwise_average"]
    (expdir / "states-3.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    proc = subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", "pretrain", "-e", str(expdir / "states-3.ckpt")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"-e {expdir / 'states-3.ckpt'}: " in proc.stderr and "truncated" in proc.stderr


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_config, speech_dir):
    """The experiment folder on a 1 MiB tmpfs: the first checkpoint (~0.6 MiB) fits, the second cannot."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.fail("needs `unshare -m` (root, Linux) to mount a small tmpfs; run the suite as CI does")
    expdir = tmp_path / "full"
    expdir.mkdir()
    argv = [sys.executable, "-m", "s3prl_ekd.cli", *pretrain_argv(tiny_config, "full", speech_dir, 6),
            "-p", str(expdir), "--force"]
    script = f'mount -t tmpfs -o size=1m tmpfs {expdir} && "$@"; code=$?; cp -a {expdir} {tmp_path}/after; exit $code'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len([line for line in lines if "error" in line]) == 1
    assert "no space left on the device while writing it; nothing was replaced or removed" in lines[-1]
    after = tmp_path / "after"
    found = checkpoints(after)
    assert found and None not in found.values(), found  # the previous checkpoint is complete
    assert not list(after.glob(".states-*.tmp-*"))


def test_outputs_that_are_not_ours_are_refused(tmp_path, ekd_checkpoints):
    from s3prl_ekd.errors import UserError
    from s3prl_ekd.recipes.superb import SuperbOptions, Upstream, run_superb

    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text("my own results\n")
    with pytest.raises(UserError, match="holds files that `s3prl-ekd superb` did not write; .* --force"):
        run_superb(Upstream("fbank"), SuperbOptions(tmp_path / "data", out, "er", progress=False))
    assert (out / "results.json").read_text() == "my own results\n"


def test_target_store_on_a_disk_without_room(tmp_path, tiny_teachers, speech_dir):
    """`targets build` refuses up front when the disk lacks the room it computed; a write that fails
    later (the disk filled meanwhile) is one UserError and leaves a resumable shard."""
    import errno

    import torch

    from s3prl_ekd.errors import UserError
    from s3prl_ekd.io.target_store import ShardWriter, StoredTeacher

    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.fail("needs `unshare -m` (root, Linux) to mount a small tmpfs; run the suite as CI does")
    config = write_yaml(tmp_path / "t.yaml", model_config(
        [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 2, 3]}], "layerwise_average"))
    store = tmp_path / "store"
    store.mkdir()
    argv = [sys.executable, "-m", "s3prl_ekd.cli", "targets", "build", "-g", str(config), "--audio", str(speech_dir),
            "--out", str(store)]
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size=64k tmpfs {store} && "$@"', "sh", *argv],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"s3prl-ekd targets: error: {store}: needs ")
    assert "GiB free; free space or build shards on other disks" in proc.stderr

    writer = ShardWriter(tmp_path / "shard", [StoredTeacher("t", "x", [1], 2)], "float32")
    writer.add("a", 800, [torch.ones(2, 1, 2)])

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    writer.files[0] = Full()
    with pytest.raises(UserError, match=r"shard: writing the target store failed \(No space left on device\); "
                                        r"what was written so far is kept and `targets build` resumes from it"):
        writer.add("b", 800, [torch.ones(3, 1, 2)])
    assert ShardWriter(tmp_path / "shard", [StoredTeacher("t", "x", [1], 2)], "float32").done == {"a"}
