"""Real `s3prl-ekd pretrain` runs through s3prl's own run_pretrain.py and runner."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import model_config, run_pretrain_cli, write_yaml

from s3prl_ekd import load_student
from s3prl_ekd.errors import UserError
from s3prl_ekd.io.checkpoint import runner_checkpoints_allowed
from s3prl_ekd.io.events import read_scalars
from s3prl_ekd.io.files import file_sha256
from s3prl_ekd.io.resources import pretrain_config
from s3prl_ekd.plugin.runner import installed_s3prl_dir, link, unlink

RUNNER = pretrain_config("tiny_cpu_runner.yaml")


@pytest.mark.parametrize("mode", ["layerwise_average", "layerwise_concat", "multi_head"])
def test_loss_decreases_over_20_steps(ekd_checkpoints, mode):
    scalars = read_scalars(ekd_checkpoints[mode].parent)
    losses = [v for _, v in scalars["ekd_distiller/train-loss"]]
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, losses
    # per head set and target layer, L1 and cosine are logged
    heads = ["teacher0-hubert_local", "teacher1-wavlm_local"] if mode == "multi_head" else [mode]
    for head in heads:
        for layer in ("L1", "L2"):
            assert f"ekd_distiller/train-l1/{head}/{layer}" in scalars
            assert f"ekd_distiller/train-cos/{head}/{layer}" in scalars


def test_checkpoint_layout(ekd_checkpoints):
    ckpt = ekd_checkpoints["multi_head"]
    with runner_checkpoints_allowed():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["Step"] == 20
    assert "pretrain_expert" in state["Config"]           # s3prl's runner config stays intact
    assert state["Upstream_Config"]["aggregation"] == "multi_head"
    assert state["Student"]["head_dims"] == [32, 48]
    # what the student started from and which teachers taught it; the paper's options add nothing else
    assert state["Init"]["source"].startswith("random(seed=") and len(state["Init"]["fingerprint"]) == 64
    teachers = state["Upstream_Config"]["teachers"]
    assert state["Teacher_Fingerprints"] == [file_sha256(t["ckpt"]) for t in teachers]
    assert not {"Target_Norm", "Loss_Weights"} & set(state)
    assert (state["Upstream_Config"]["target_norm"], state["Upstream_Config"]["teacher_weighting"]) == ("none", "fixed")
    student = load_student(ckpt)
    assert student.num_targets == 2
    # the student part alone is plain data: loadable with weights_only and no allow-list
    torch.save(state["Student"], ckpt.parent / "student_only.pt")
    assert torch.load(ckpt.parent / "student_only.pt", weights_only=True)["config"]["encoder_layers"] == 2


def test_resume_continues_from_saved_step(tmp_path, tiny_teachers, speech_dir):
    teachers = [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 2]}]
    expdir = run_pretrain_cli(tmp_path, model_config(teachers, "layerwise_average"), "resume", steps=8,
                              audio_dir=speech_dir, save_step=4,
                              )
    assert (expdir / "states-4.ckpt").is_file()
    (expdir / "states-epoch-1.ckpt").unlink(missing_ok=True)
    for ckpt in expdir.glob("states-8.ckpt"):
        ckpt.unlink()
    first_events = {p.name for p in expdir.glob("events.out.tfevents.*")}
    proc = subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", "pretrain", "-e", str(expdir / "states-4.ckpt"),
                           "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new_events = [p for p in expdir.glob("events.out.tfevents.*") if p.name not in first_events]
    assert new_events
    resumed_steps = sorted(step for step, _ in read_scalars_file(new_events[0], "ekd_distiller/train-loss"))
    assert resumed_steps == [5, 6, 7, 8]
    final = max(expdir.glob("states-*.ckpt"), key=lambda p: p.stat().st_mtime)
    with runner_checkpoints_allowed():
        saved = torch.load(expdir / "states-4.ckpt", weights_only=True)
        resumed = torch.load(final, weights_only=True)
    assert resumed["Step"] == 8
    # the optimizer state was loaded: its per-parameter step counters continue from 4
    steps = {int(s["step"]) for s in resumed["Optimizer"]["state"].values()}
    assert steps == {8}, steps
    assert {int(s["step"]) for s in saved["Optimizer"]["state"].values()} == {4}


def read_scalars_file(path: Path, tag: str):
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, tmp)
        return read_scalars(tmp)[tag]


def test_new_run_refuses_to_overwrite_experiment(tmp_path, tiny_teachers, speech_dir):
    teachers = [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1]}]
    run_pretrain_cli(tmp_path, model_config(teachers, "layerwise_average"), "once", steps=2, audio_dir=speech_dir)
    cfg = tmp_path / "once.yaml"
    proc = subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", "pretrain", "-u", "ekd_distiller", "-g", str(cfg),
                           "-c", str(RUNNER), "-n", "once", "--device", "cpu",
                           "-o", f"config.pretrain_expert.datarc.audio_dir={speech_dir}"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "already holds states-" in proc.stderr and "--force" in proc.stderr


def test_config_error_before_models_are_built(tmp_path, tiny_teachers, speech_dir):
    cfg = write_yaml(tmp_path / "bad.yaml", {"teachers": [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]),
                                                           "layers": [7]}], "student": {"encoder_layres": 2}})
    proc = subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", "pretrain", "-u", "ekd_distiller", "-g", str(cfg),
                           "-c", str(RUNNER), "-n", "bad", "--device", "cpu",
                           "-o", f"config.pretrain_expert.datarc.audio_dir={speech_dir}"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "student.encoder_layres: unknown key; did you mean 'encoder_layers'" in proc.stderr
    assert "Traceback" not in proc.stderr


def s3prl_checkout(root: Path) -> Path:
    """A writable stand-in for an s3prl checkout: links to the installed s3prl's files, with
    real `pretrain/` and run_pretrain.py (Python resolves a linked script's folder)."""
    installed = installed_s3prl_dir()
    checkout = root / "s3prl"
    (checkout / "pretrain").mkdir(parents=True)
    for entry in installed.iterdir():
        if entry.name not in ("pretrain", "run_pretrain.py", "__pycache__"):
            (checkout / entry.name).symlink_to(entry)
    for entry in (installed / "pretrain").iterdir():
        (checkout / "pretrain" / entry.name).symlink_to(entry)
    (checkout / "run_pretrain.py").write_text((installed / "run_pretrain.py").read_text())
    return checkout


def test_link_then_run_pretrain_from_s3prl_folder(tmp_path, tiny_teachers, speech_dir):
    s3prl_dir = s3prl_checkout(tmp_path / "checkout")
    proc = subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", "link", str(s3prl_dir)], capture_output=True, text=True)
    assert proc.returncode == 0 and "linked" in proc.stdout
    cfg = write_yaml(tmp_path / "m.yaml", model_config(
        [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 3]}], "layerwise_average"))
    overrides = f"config.pretrain_expert.datarc.audio_dir={speech_dir},,config.runner.total_steps=3,,config.runner.save_step=2"
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    proc = subprocess.run([sys.executable, "run_pretrain.py", "-u", "ekd_distiller", "-g", str(cfg), "-c", str(RUNNER),
                           "-n", "linked", "-p", str(tmp_path / "exp"), "--device", "cpu", "-o", overrides],
                          cwd=s3prl_dir, capture_output=True, text=True, env={**__import__("os").environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "exp").glob("states-*.ckpt"))


def test_link_is_idempotent_and_unlink_removes_only_ours(tmp_path):
    fake = tmp_path / "checkout" / "s3prl"
    (fake / "pretrain").mkdir(parents=True)
    (fake / "run_pretrain.py").write_text("")
    first = link(tmp_path / "checkout")
    assert first == fake / "pretrain" / "ekd_distiller"
    assert "s3prl_ekd.plugin.pretrain_expert" in (first / "pretrain_expert.py").read_text()
    assert link(fake) == first                              # again: no error, same folder
    assert (first / "config_runner.yaml").is_file() and (first / "config_model.yaml").is_file()
    assert unlink(fake) == first and not first.exists()
    assert unlink(fake) is None
    foreign = fake / "pretrain" / "ekd_distiller"
    foreign.mkdir()
    (foreign / "mine.py").write_text("x = 1")
    with pytest.raises(UserError, match="not created by `s3prl-ekd link`"):
        link(fake)
    assert (foreign / "mine.py").read_text() == "x = 1"
    with pytest.raises(UserError, match="not an s3prl folder"):
        link(tmp_path)
