"""torchrun / DistributedDataParallel through s3prl's runner, on CPU with gloo and 2 processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import model_config, write_yaml

from s3prl_ekd.io import checkpoint
from s3prl_ekd.io.resources import pretrain_config
from s3prl_ekd.plugin.distributed import EpochBuckets
from s3prl_ekd.plugin.pretrain_data import BucketDataset, load_datarc

RUNNER = pretrain_config("tiny_cpu_runner.yaml")
CLI = str(Path(sys.executable).parent / "s3prl-ekd")


def torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
            "--no-python", CLI, *args]


@pytest.fixture
def tiny_config(tmp_path, tiny_teachers) -> Path:
    teachers = [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 2]}]
    return write_yaml(tmp_path / "model.yaml", model_config(teachers, "layerwise_average"))


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pretrain_args(config: Path, audio: Path, steps: int, batch: int = 4) -> list[str]:
    overrides = (f"config.pretrain_expert.datarc.audio_dir={audio},,config.runner.total_steps={steps},,"
                 "config.runner.save_step=2,,config.runner.max_keep=2,,config.runner.log_step=1,,"
                 f"config.pretrain_expert.datarc.train_batch_size={batch},,"
                 "config.pretrain_expert.datarc.sequence_length=8000")
    return ["pretrain", "-u", "ekd_distiller", "-g", str(config), "-c", str(RUNNER), "-n", "ddp",
            "--device", "cpu", "-o", overrides]


def test_every_rank_reads_its_part_of_the_one_process_batches(speech_dir):
    datarc = load_datarc({"audio_dir": str(speech_dir), "train_batch_size": 4})
    whole = BucketDataset(datarc)
    parts = [BucketDataset(datarc, part=(rank, 2)) for rank in range(2)]
    for index in range(len(whole)):
        batch = {row.key for row in whole.buckets[index]}
        halves = [{row.key for row in part.buckets[index][rank::2]} for rank, part in enumerate(parts)]
        assert halves[0] | halves[1] == batch and not halves[0] & halves[1]
    sampler = EpochBuckets(8, seed=3)
    first, second = list(sampler), list(sampler)           # s3prl's runner iterates once per epoch
    assert sorted(first) == sorted(second) == list(range(8)) and first != second
    resumed = EpochBuckets(8, seed=3, start=11)              # 11 batches done: epoch 1, from its 4th batch
    assert list(resumed) == second[3:] and list(resumed) == EpochBuckets(8, seed=3).order(2)


STEP_SCRIPT = """
import json, os, sys, torch
from s3prl_ekd.plugin import distributed
from s3prl_ekd.plugin.pretrain_expert import UpstreamPretrainExpert
from s3prl_ekd.tools.bench import BenchSetting, TrainStep, runner_config

model, audio, out = sys.argv[1:4]
context = distributed.from_env()
if context:
    distributed.init(context, "cpu")
generator = torch.Generator().manual_seed(7)
wave = 0.1 * torch.randn(4, 12000, generator=generator)
lengths = torch.tensor([12000, 11000, 9000, 7000])   # unequal: ranks hold different numbers of frames
for i, n in enumerate(lengths.tolist()):
    wave[i, n:] = 0
rank, world = (context.rank, context.world_size) if context else (0, 1)
part = slice(rank, None, world)                        # what the distributed dataset gives this rank
torch.manual_seed(0)
config = runner_config("tiny_cpu_runner.yaml")
expert = UpstreamPretrainExpert({"audio_dir": audio, "train_batch_size": 4}, model, "cpu")
expert.train()
before = {k: v.clone() for k, v in expert.student.state_dict().items()}
TrainStep(expert, BenchSetting(), config)((wave[part][:, :int(lengths[part].max())], lengths[part]))
if rank == 0:
    torch.save({"before": before, "after": expert.student.state_dict()}, out)
distributed.leave()
"""


def test_one_ddp_step_equals_one_process_on_the_whole_batch(tmp_path, speech_dir):
    """fp32, CPU: 2 ranks with 2 utterances each vs 1 process with the 4, of unequal lengths: the same
    student after one step (tolerance 1e-6: only the order of float sums differs). Teacher and student
    use layer-norm CNNs, whose outputs do not depend on what an utterance is batched with (a group-norm
    CNN's do, with or without DDP)."""
    from s3prl_ekd.plugin.teacher_formats import make_random_teacher

    teacher = make_random_teacher("hubert", tmp_path / "teacher.pt", seed=1, extractor_mode="layer_norm")
    tiny_config = write_yaml(tmp_path / "model.yaml", model_config(
        [{"name": "hubert_local", "ckpt": str(teacher), "layers": [1, 2]}], "layerwise_average",
        extractor_mode="layer_norm"))
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    single = subprocess.run([sys.executable, str(script), str(tiny_config), str(speech_dir), str(tmp_path / "one.pt")],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tiny_config), str(speech_dir), str(tmp_path / "two.pt")],
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "distributed: world_size=2 backend=gloo per_rank_batch=2" in ddp.stdout
    one, two = (torch.load(tmp_path / name, weights_only=True) for name in ("one.pt", "two.pt"))
    assert all(torch.equal(one["before"][k], two["before"][k]) for k in one["before"])  # the same initialisation
    diff = max((one["after"][k] - two["after"][k]).abs().max().item() for k in one["after"])
    moved = max((one["after"][k] - one["before"][k]).abs().max().item() for k in one["after"])
    assert diff < 1e-6 and moved > 1e-4, (diff, moved)


def test_torchrun_run_is_killed_and_resumed_with_another_number_of_processes(tmp_path, tiny_config, speech_dir):
    expdir = tmp_path / "result" / "pretrain" / "ddp"
    steps = 40
    proc = subprocess.Popen(torchrun(2, *pretrain_args(tiny_config, speech_dir, steps)), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})  # killed ranks leave workspaces there
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(expdir.glob("states-*.ckpt")):
        time.sleep(0.005)
    kill_tree(proc.pid)
    output = proc.communicate()[0]
    assert output.count("distributed: world_size=2 backend=gloo per_rank_batch=2") == 1, output[-3000:]
    saved = {p: checkpoint.load_raw(p)[checkpoint.STEP_KEY] for p in expdir.glob("states-*.ckpt")}
    assert saved and max(saved.values()) < steps
    resumed = subprocess.run(torchrun(1, *pretrain_args(tiny_config, speech_dir, steps), "-a"), cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "Resume from" in resumed.stdout + resumed.stderr
    final = {p.name: checkpoint.load_raw(p)[checkpoint.STEP_KEY] for p in expdir.glob("states-*.ckpt")}
    assert max(final.values()) == steps and len(final) <= 2  # one checkpoint set, max_keep 2
    events = list(expdir.glob("events.out.tfevents.*"))
    assert len(events) == 2  # rank 0 of each of the two runs; the other rank wrote none


def test_a_failing_rank_ends_the_job_with_one_line(tmp_path, tiny_config, speech_dir):
    audio = tmp_path / "audio"
    audio.mkdir()
    for path in sorted(speech_dir.glob("*.wav"))[:7]:
        (audio / path.name).symlink_to(path)
    sf.write(audio / "poisoned.wav", np.full(16000, np.nan, "float32"), 16000, subtype="FLOAT")
    started = time.monotonic()
    proc = subprocess.run(torchrun(2, *pretrain_args(tiny_config, audio, 20)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and time.monotonic() - started < 240
    lines = [line for line in proc.stderr.splitlines() if "s3prl-ekd pretrain: rank" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    # The message may follow the other rank's unfinished progress bar on the same terminal line.
    message = lines[0][lines[0].index("s3prl-ekd pretrain: rank "):]
    assert re.match(r"s3prl-ekd pretrain: rank [01]/2: error: ", message), lines[0]
    assert f"{audio / 'poisoned.wav'}: holds NaN or infinite samples" in message
