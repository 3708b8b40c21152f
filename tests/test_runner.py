"""plugin/runner.py: what it adds around s3prl's scripts, tested without a full training run."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import model_config, write_yaml

from s3prl_ekd import patches
from s3prl_ekd.errors import CheckpointError, UserError
from s3prl_ekd.io.resources import pretrain_config
from s3prl_ekd.plugin import runner

RUNNER = pretrain_config("tiny_cpu_runner.yaml")


def pretrain(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", "pretrain", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override, message", [
    ("config.runner.save_step=20", "runner.save_step: 20 is not below total_steps=20 (s3prl's runner requires "
                                   "total_steps > save_step); lower save_step or raise total_steps"),
    ("config.runner.total_steps=0", "runner.total_steps: 0; use a positive integer"),
    ("config.runner.log_step=-1", "runner.log_step: -1; use a positive integer"),
    ("config.pretrain_expert.datarc.train_batch_size=0", "pretrain_expert.datarc.train_batch_size: must be >= 1"),
    ("config.pretrain_expert.datarc.audio_dir=missing_folder", "audio_dir: "),
    ("config.pretrain_expert.datarc.sequnce_length=4", "datarc.sequnce_length: unknown key; did you mean "
                                                        "'sequence_length'"),
    ("config.runner.totl_steps=5", "-o config.runner.totl_steps: config.runner has no key 'totl_steps'; did you "
                                   "mean 'total_steps'?"),
])
def test_runner_config_mistakes_are_one_line_before_s3prl_starts(tmp_path, speech_dir, override, message):
    cfg = write_yaml(tmp_path / "m.yaml", model_config([{"name": "hubert_local", "ckpt": "/nowhere.pt"}],
                                                       "layerwise_average"))
    proc = pretrain(tmp_path, "-u", "ekd_distiller", "-g", str(cfg), "-c", str(RUNNER), "-n", "x", "--device", "cpu",
                    "-o", f"config.pretrain_expert.datarc.audio_dir={speech_dir},,{override}")
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "result").exists()  # s3prl never started: no experiment folder


@pytest.mark.parametrize("text, message", [
    ("  lr: 5e-2\n", "optimizer.lr: '5e-2' is text, not a number; YAML 1.1 reads 5e-2 as text: write it with a dot, "
                     "e.g. 5.0e-2"),
    ("  lr: 1.0e-3\n  lr: 2.0e-3\n", "optimizer: key 'lr' appears twice (lines"),
    ("  name: AdamW_with_shedule\n", "optimizer.name: 'AdamW_with_shedule' is not an s3prl optimizer; use one of"),
])
def test_runner_config_file_mistakes(tmp_path, speech_dir, text, message):
    lines = RUNNER.read_text().replace("  lr: 1.0e-3\n", text).replace("  name: AdamW_with_schedule\n",
                                                                       "" if "name:" in text else
                                                                       "  name: AdamW_with_schedule\n")
    assert lines != RUNNER.read_text()
    runner_yaml = tmp_path / "runner.yaml"
    runner_yaml.write_text(lines)
    cfg = write_yaml(tmp_path / "m.yaml", model_config([{"name": "hubert_local", "ckpt": "/nowhere.pt"}],
                                                       "layerwise_average"))
    proc = pretrain(tmp_path, "-g", str(cfg), "-c", str(runner_yaml), "-n", "x", "--device", "cpu",
                    "-o", f"config.pretrain_expert.datarc.audio_dir={speech_dir}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_workspace_mirrors_s3prl_pretrain_folder():
    s3prl_dir = runner.installed_s3prl_dir()
    with runner.pretrain_workspace(s3prl_dir) as workspace:
        mirror = workspace / "pretrain"
        own = {p.name for p in (s3prl_dir / "pretrain").iterdir() if p.name != "__pycache__"}
        assert {p.name for p in mirror.iterdir()} == own | {"ekd_distiller"}
        assert all((mirror / name).is_symlink() for name in own)
        task = mirror / "ekd_distiller"
        assert "s3prl_ekd.plugin.pretrain_expert" in (task / "pretrain_expert.py").read_text()
        assert (task / "config_runner.yaml").read_text() == pretrain_config("runner.yaml").read_text()
    assert not workspace.exists()
    assert not (s3prl_dir / "pretrain" / "ekd_distiller").exists()


def fake_runner_module():
    """Stands in for s3prl's pretrain/runner.py module: the globals the proxies replace."""
    import os

    return types.SimpleNamespace(torch=torch, os=os)


def test_torch_optimizers_log_the_scheduled_learning_rate():
    """s3prl's runner logs optimizer.get_lr() where it exists, else the config's constant lr."""
    model = torch.nn.Linear(2, 2)
    original = lambda params, *a, **k: torch.optim.AdamW(params, lr=1.0)  # noqa: E731
    module = types.SimpleNamespace(get_optimizer=original)
    with patches.scheduled_lr_logging(module):
        optimizer = module.get_optimizer(model.parameters())
    assert module.get_optimizer is original  # undone on leaving the block
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    assert optimizer.get_lr() == [1.0]
    optimizer.step()
    scheduler.step()
    assert optimizer.get_lr() == [0.5]

    class OwnSchedule(torch.optim.SGD):  # as s3prl's own optimizers: their get_lr is kept
        def get_lr(self):
            return ["own"]

    module = types.SimpleNamespace(get_optimizer=lambda params, *a, **k: OwnSchedule(params, lr=1.0))
    with patches.scheduled_lr_logging(module):
        assert module.get_optimizer(model.parameters()).get_lr() == ["own"]


def test_checkpoints_are_atomic_and_old_ones_go_after_the_new_one(tmp_path):
    module = fake_runner_module()
    with patches.atomic_runner_checkpoints(module):
        old = tmp_path / "states-1.ckpt"
        module.torch.save({"Step": 1}, old)
        module.os.remove(str(old))              # s3prl removes before saving the next one ...
        assert old.is_file()                    # ... the removal waits
        assert module.os.path.join("a", "b") == "a/b" and module.torch.tensor(1).item() == 1  # the rest is untouched

        class Exploding:
            def __reduce__(self):
                raise OSError(28, "No space left on device")

        with pytest.raises(UserError, match="states-2.ckpt: no space left on the device while writing it; nothing was"):
            module.torch.save({"Step": 2, "x": Exploding()}, tmp_path / "states-2.ckpt")
        assert old.is_file() and not (tmp_path / "states-2.ckpt").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["states-1.ckpt"]  # no temporary left behind
        module.os.remove(str(old))
        module.torch.save({"Step": 3}, tmp_path / "states-3.ckpt")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["states-3.ckpt"]
        assert torch.load(tmp_path / "states-3.ckpt", weights_only=True) == {"Step": 3}
    assert module.torch is torch  # undone on leaving the block


def test_auto_resume_skips_unreadable_newest(tmp_path, ekd_checkpoints, capsys):
    good = ekd_checkpoints["layerwise_average"]
    (tmp_path / "states-10.ckpt").write_bytes(good.read_bytes())
    (tmp_path / "states-20.ckpt").write_bytes(good.read_bytes()[:3000])  # cut short, as a crash leaves it
    assert runner.newest_readable_checkpoint(tmp_path) == str(tmp_path / "states-10.ckpt")
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "skipping unreadable checkpoint states-20.ckpt" in warning
    with pytest.raises(CheckpointError, match="-e .*states-20.ckpt: .*cannot read as a torch checkpoint"):
        runner.resume_checkpoint(types.SimpleNamespace(past_exp=str(tmp_path / "states-20.ckpt"), auto_resume=False,
                                                      expdir=None))
    (tmp_path / "states-10.ckpt").unlink()
    with pytest.raises(CheckpointError, match="none of its 1 checkpoint"):
        runner.newest_readable_checkpoint(tmp_path)


def test_checkpoints_load_from_many_threads_at_once(ekd_checkpoints):
    """torch's safe_globals() is process-wide state: concurrent loads must not undo each other's."""
    from concurrent.futures import ThreadPoolExecutor

    from s3prl_ekd.io.checkpoint import newest_checkpoint

    folders = [path.parent for path in ekd_checkpoints.values()] * 8
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(newest_checkpoint, folders))
    assert found == [newest_checkpoint(folder) for folder in folders]
