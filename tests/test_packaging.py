"""The built wheel, installed non-editable into a scratch environment and used from a folder
outside the checkout: registration on install, package data, the whole user path (prepare ->
pretrain -> superb -> export), nothing written into site-packages, and pip uninstall."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from conftest import model_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("s3prl_ekd", "upstream", "pretrain_configs", "downstream_recipes",
           "setup.py", "setup.cfg", "pyproject.toml", "README.md")
PURELIB = Path(sysconfig.get_paths()["purelib"])
S3PRL_DIR = Path(__import__("importlib.util").util.find_spec("s3prl").origin).parent


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if "__pycache__" not in p.parts}


def read_only_wrapper() -> list[str]:
    """A prefix that runs a command with s3prl's installed folder mounted read-only (root, Linux),
    or [] where this machine cannot (then only the before/after snapshots check for writes)."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {S3PRL_DIR} {S3PRL_DIR}"],
                           capture_output=True)
    if probe.returncode != 0:
        return []
    return ["unshare", "-m", "sh", "-c", f'mount --bind -o ro {S3PRL_DIR} {S3PRL_DIR} && exec "$@"', "sh"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> dict:
    """A venv with only the wheel installed; torch, s3prl and the rest come from this environment's
    site-packages as plain path entries (their .pth hooks, including ours, are not processed)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for name in SOURCES:
        src = PROJECT_ROOT / name
        (shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__"))
         if src.is_dir() else shutil.copy2(src, source / name))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(root / "dist"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("s3prl_ekd-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed.pth").write_text(f"{PURELIB}\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    work = root / "work"  # outside the checkout: nothing may be found relative to it
    work.mkdir()
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    return {"python": python, "site": site, "wheel": wheel, "work": work, "env": env,
            "cli": str(venv / "bin" / "s3prl-ekd")}


def run(scratch: dict, *args: str, read_only: bool = False, timeout: int = 600) -> str:
    command = (read_only_wrapper() if read_only else []) + list(args)
    proc = subprocess.run(command, cwd=scratch["work"], env=scratch["env"], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_installed_from_the_wheel_not_the_checkout(scratch):
    out = run(scratch, str(scratch["python"]), "-c",
              "import s3prl_ekd, s3prl_ekd.upstream.ekd_distiller.expert as e; print(s3prl_ekd.__file__); print(e.__file__)")
    assert all(line.startswith(str(scratch["site"])) for line in out.split()), out
    assert (scratch["site"] / "s3prl_ekd_hub.pth").is_file()


def test_registered_on_install_where_s3prl_upstreams_are_used(scratch, ekd_checkpoints):
    ckpt = ekd_checkpoints["layerwise_average"]
    out = run(scratch, str(scratch["python"]), "-c", f"""
import torch, s3prl.hub
from s3prl.nn import S3PRLUpstream
assert "ekd_distiller" in S3PRLUpstream.available_names()  # what ESPnet's S3prlFrontend asserts
up = S3PRLUpstream("ekd_distiller", path_or_url={str(ckpt)!r}).eval()
print("hub", s3prl.hub.ekd_distiller.__module__)
print("heads", sum(p.numel() for n, p in up.named_parameters() if "heads" in n))
with torch.no_grad():
    hs, lens = up(torch.randn(1, 16000), torch.tensor([16000]))
print("states", len(hs), tuple(hs[0].shape))
""")
    assert "hub s3prl_ekd.upstream.ekd_distiller.hubconf" in out
    assert "heads 0" in out  # backbone states asked for: no head parameter that never gets a gradient
    assert "states 3 (1, 50, 32)" in out


def test_user_path_from_any_directory_writes_nothing_into_site_packages(scratch, tiny_teachers):
    cli, work = scratch["cli"], scratch["work"]
    before = {"s3prl": snapshot(S3PRL_DIR), "site": snapshot(scratch["site"])}
    run(scratch, cli, "corpus", "synth", "synth", "--utterances", "40", "--speakers", "4")
    out = run(scratch, cli, "prepare", "all", "--manifest", "synth/manifest.jsonl", "--out", "superb_data")
    assert "pr:" in out and "er:" in out
    runner = run(scratch, cli, "configs", "tiny_cpu_runner.yaml").strip()
    assert runner.startswith(str(scratch["site"]))
    teachers = [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 2]}]
    (work / "model.yaml").write_text(yaml.safe_dump(model_config(teachers, "layerwise_average")))
    run(scratch, cli, "pretrain", "-u", "ekd_distiller", "-g", "model.yaml", "-c", runner, "-n", "tiny",
        "--device", "cpu", "-o", "config.pretrain_expert.datarc.audio_dir=synth/wav,,config.runner.total_steps=4,,"
        "config.runner.save_step=2,,config.pretrain_expert.datarc.sequence_length=16000", read_only=True)
    ckpts = sorted((work / "result" / "pretrain" / "tiny").glob("states-*.ckpt"))
    assert ckpts, "pretraining wrote no checkpoint under the working directory"
    out = run(scratch, cli, "superb", "-u", "ekd_distiller", "-k", str(ckpts[-1]), "--data", "superb_data",
              "--tasks", "er", "--steps", "2", "--out", "results", read_only=True)
    assert "| er | acc" in out
    out = run(scratch, cli, "export", str(ckpts[-1]), "submission", "--speed-seconds", "1", read_only=True)
    assert "exported step 4" in out and (work / "submission" / "model.pt").is_file()
    assert snapshot(S3PRL_DIR) == before["s3prl"], "s3prl's installed folder changed"
    assert snapshot(scratch["site"]) == before["site"], "the environment's site-packages changed"


def test_the_wheel_ships_the_demo_teachers(scratch):
    """The demo's teachers are package data: found, hashed as their README says, and loaded by the
    shipped tiny config, from the installed package."""
    out = run(scratch, str(scratch["python"]), "-c", """
import hashlib
from s3prl_ekd.core.config import load_config
from s3prl_ekd.demo.pipeline import shipped_teachers
from s3prl_ekd.io.resources import pretrain_config
for kind, path in shipped_teachers().items():
    print(kind, path, hashlib.sha256(path.read_bytes()).hexdigest())
print("tiny", *[t.ckpt for t in load_config(pretrain_config("tiny_cpu.yaml")).teachers])
""")
    readme = (PROJECT_ROOT / "pretrain_configs" / "teachers" / "README.md").read_text()
    lines = dict((line.split()[0], line.split()[1:]) for line in out.splitlines())
    for kind in ("hubert", "robust_hubert", "wavlm"):
        path, digest = lines[kind]
        assert path.startswith(str(scratch["site"])) and f"`{digest}`" in readme, (kind, path)
    assert all(p.startswith(str(scratch["site"])) for p in lines["tiny"])


def test_pip_uninstall_removes_the_start_up_hook(scratch):
    """Last in this module: it uninstalls the wheel the other tests share."""
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(scratch["python"]), "uninstall", "-y",
                           "s3prl-ekd"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (scratch["site"] / "s3prl_ekd_hub.pth").exists()
    assert not (scratch["site"] / "s3prl_ekd").exists()

