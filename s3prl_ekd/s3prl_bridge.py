"""Where s3prl meets this package: registration, the `link` into an s3prl
folder, and running s3prl's own run_pretrain.py / run_downstream.py.

s3prl's legacy scripts need two things this module arranges in one place:
run_pretrain.py must run with the s3prl package folder as working directory
(it imports top-level `pretrain.*` and lists `pretrain/` for `-u`), and both
scripts `torch.load` checkpoints holding `argparse.Namespace`, which torch >= 2.6
refuses under its default `weights_only=True` unless the class is allow-listed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import sys
import sysconfig
from pathlib import Path

import yaml

from s3prl_ekd.errors import UserError

TASK_NAME = "ekd_distiller"
PTH_NAME = "s3prl_ekd_hub.pth"
MARKER = ".s3prl_ekd_link"  # marks a folder `link` created, so unlink removes only ours
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNNER_CONFIG = PROJECT_ROOT / "pretrain_configs" / "runner.yaml"
DEFAULT_MODEL_CONFIG = PROJECT_ROOT / "pretrain_configs" / "hubert_robusthubert_wavlm_average.yaml"
# datarc keys that hold paths: made absolute so they mean the user's directory.
DATARC_PATH_KEYS = ("audio_dir", "file_path", "libri_root")

SHIM = '''"""Created by `s3prl-ekd link`: s3prl's runner imports the EKD pretraining task from here."""
from s3prl_ekd.pretrain_expert import UpstreamPretrainExpert  # noqa: F401
'''


def installed_s3prl_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("s3prl")
    if spec is None or spec.origin is None:
        raise UserError("s3prl is not installed in this environment; run `make setup`")
    return Path(spec.origin).parent


def resolve_s3prl_dir(path: str | os.PathLike | None) -> Path:
    """The folder holding run_pretrain.py: the installed s3prl, a checkout root, or its s3prl/."""
    if path is None:
        return installed_s3prl_dir()
    path = Path(path).resolve()
    for candidate in (path, path / "s3prl"):
        if (candidate / "run_pretrain.py").is_file() and (candidate / "pretrain").is_dir():
            return candidate
    raise UserError(f"{path}: not an s3prl folder (no run_pretrain.py and pretrain/ in it or in "
                    f"{path / 's3prl'}); pass the s3prl checkout or its s3prl/ folder")


def link(s3prl_dir: str | os.PathLike | None = None) -> Path:
    """Make `-u ekd_distiller` available to `S3PRL_DIR/run_pretrain.py`. Idempotent."""
    task_dir = resolve_s3prl_dir(s3prl_dir) / "pretrain" / TASK_NAME
    if task_dir.exists() and not (task_dir / MARKER).exists():
        raise UserError(f"{task_dir} exists and was not created by `s3prl-ekd link`; "
                        "move it away first, nothing was changed")
    task_dir.mkdir(exist_ok=True)
    (task_dir / MARKER).write_text("created by s3prl-ekd link; `s3prl-ekd link --unlink` removes this folder\n")
    (task_dir / "__init__.py").write_text("")
    (task_dir / "pretrain_expert.py").write_text(SHIM)
    # run_pretrain.py's defaults when -c / -g are omitted.
    for name, source in (("config_runner.yaml", DEFAULT_RUNNER_CONFIG),
                         ("config_model.yaml", DEFAULT_MODEL_CONFIG)):
        if source.is_file():
            (task_dir / name).write_text(source.read_text())
    return task_dir


def unlink(s3prl_dir: str | os.PathLike | None = None) -> Path | None:
    """Remove the folder `link` made; returns it, or None if there was none."""
    import shutil

    task_dir = resolve_s3prl_dir(s3prl_dir) / "pretrain" / TASK_NAME
    if not task_dir.exists():
        return None
    if not (task_dir / MARKER).exists():
        raise UserError(f"{task_dir} was not created by `s3prl-ekd link`; not removing it")
    shutil.rmtree(task_dir)
    return task_dir


def register() -> Path:
    """Write the start-up hook that adds `ekd_distiller*` to `s3prl.hub`. Idempotent."""
    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    pth.write_text("import s3prl_ekd._hubhook\n")
    return pth


def _schedule_classes() -> list[type]:
    """s3prl's LR schedule classes, which its optimizers pickle into their state_dict.

    They are pickled under `optimizers.*` by run_pretrain.py (a top-level import
    from the s3prl folder) and under `s3prl.optimizers.*` elsewhere; allow both.
    """
    import importlib
    import inspect

    classes = []
    s3prl_dir = str(installed_s3prl_dir())
    added = s3prl_dir not in sys.path
    if added:
        sys.path.append(s3prl_dir)
    try:
        for module_name in ("s3prl.optimizers", "optimizers"):
            module = importlib.import_module(module_name)
            base = module._LRSchedule
            classes += [c for _, c in inspect.getmembers(module, inspect.isclass)
                        if issubclass(c, base) and c.__module__ == module_name]
    finally:
        if added:
            sys.path.remove(s3prl_dir)
    return classes


@contextlib.contextmanager
def allow_namespace_checkpoints():
    """Let torch.load(weights_only=True) read s3prl's checkpoints.

    They hold argparse.Namespace (Args) and s3prl's LR schedule objects inside
    the optimizer state; both are plain data classes and safe to allow-list.
    """
    import torch

    with torch.serialization.safe_globals([argparse.Namespace, *_schedule_classes()]):
        yield


@contextlib.contextmanager
def _script_context(script: Path, argv: list[str], cwd: Path):
    old_argv, old_cwd, old_path = sys.argv, os.getcwd(), list(sys.path)
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))  # the scripts import their siblings top-level
    os.chdir(cwd)
    try:
        with allow_namespace_checkpoints():
            yield
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        os.chdir(old_cwd)


def _absolute_pretrain_argv(argv: list[str], user_cwd: Path) -> list[str]:
    """run_pretrain.py arguments with paths made absolute against `user_cwd`."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("-e", "-o", "-c", "-u", "-g", "-n", "-p"):
        parser.add_argument(flag)
    known, rest = parser.parse_known_args(argv)

    def absolute(path):
        return str((user_cwd / path).resolve()) if path is not None else None

    overrides = [known.o] if known.o and known.o.lower() != "none" else []
    overrides = [_absolute_override(o, user_cwd) for o in ",,".join(overrides).split(",,") if o]
    if known.c is not None:
        overrides = _datarc_path_overrides(user_cwd / known.c, user_cwd, overrides) + overrides
    if known.p is None and known.n is not None and known.e is None:
        known.p = f"result/pretrain/{known.n}"  # s3prl's default, but under the user's directory
    out = list(rest)
    for flag, value in (("-e", absolute(known.e)), ("-c", absolute(known.c)), ("-u", known.u),
                        ("-g", absolute(known.g)), ("-n", known.n), ("-p", absolute(known.p))):
        if value is not None:
            out += [flag, value]
    if overrides:
        out += ["-o", ",,".join(overrides)]
    return out


def _absolute_override(option: str, user_cwd: Path) -> str:
    key, sep, value = option.partition("=")
    if sep and key.strip().split(".")[-1] in DATARC_PATH_KEYS and not os.path.isabs(value.strip()):
        return f"{key.strip()}={(user_cwd / value.strip().strip(chr(39) + chr(34))).resolve()}"
    return option


def _datarc_path_overrides(runner_config: Path, user_cwd: Path, overrides: list[str]) -> list[str]:
    """Overrides that make the runner config's relative datarc paths absolute."""
    if not runner_config.is_file():
        raise UserError(f"{runner_config}: runner config (-c) not found")
    config = yaml.safe_load(runner_config.read_text()) or {}
    datarc = (config.get("pretrain_expert") or {}).get("datarc") or {}
    already = {o.partition("=")[0].strip().split(".")[-1] for o in overrides}
    out = []
    for key in DATARC_PATH_KEYS:
        value = datarc.get(key)
        if isinstance(value, str) and key not in already and not os.path.isabs(value):
            out.append(f"config.pretrain_expert.datarc.{key}={(user_cwd / value).resolve()}")
    return out


def _refuse_overwrite(argv: list[str]) -> None:
    """A new run must not replace the checkpoints of an existing experiment."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-e")
    parser.add_argument("-p")
    parser.add_argument("-a", "--auto_resume", action="store_true")
    known, _ = parser.parse_known_args(argv)
    if known.e is None and not known.auto_resume and known.p is not None:
        existing = sorted(Path(known.p).glob("states-*.ckpt"))
        if existing:
            raise UserError(f"{known.p} already holds {existing[-1].name}: resume with -a (or -e CKPT), "
                            "pick another -n, or pass --force to start over in that folder")


def run_pretrain(argv: list[str]) -> int:
    """s3prl's run_pretrain.py with `argv`, paths relative to the caller's directory.

    Extra flag: --force lets a new run write into an experiment folder that has checkpoints.
    """
    force = "--force" in argv
    argv = [a for a in argv if a != "--force"]
    s3prl_dir = installed_s3prl_dir()
    link(s3prl_dir)
    argv = _absolute_pretrain_argv(argv, Path.cwd())
    if not force:
        _refuse_overwrite(argv)
    script = s3prl_dir / "run_pretrain.py"
    with _script_context(script, argv, cwd=s3prl_dir):
        runpy.run_path(str(script), run_name="__main__")
    return 0


def run_downstream(argv: list[str]) -> int:
    """s3prl's run_downstream.py with `argv` (it runs from any directory)."""
    import s3prl_ekd._hubhook  # noqa: F401  (registers ekd_distiller even without the .pth)

    script = installed_s3prl_dir() / "run_downstream.py"
    with _script_context(script, argv, cwd=Path.cwd()):
        runpy.run_path(str(script), run_name="__main__")
    return 0


PASSTHROUGH = {"pretrain": run_pretrain, "downstream": run_downstream}


def register_cli(subparsers) -> None:
    subparsers.add_parser("pretrain", add_help=False,
                          help="s3prl's run_pretrain.py (same arguments), e.g. -u ekd_distiller -g CONFIG -n NAME")
    subparsers.add_parser("downstream", add_help=False,
                          help="s3prl's run_downstream.py (same arguments)")

    p = subparsers.add_parser("link", help="make `run_pretrain.py -u ekd_distiller` work in an s3prl folder")
    p.add_argument("s3prl_dir", nargs="?", help="s3prl checkout or package folder (default: the installed s3prl)")
    p.add_argument("--unlink", action="store_true", help="remove what link created")

    def _link(args):
        if args.unlink:
            removed = unlink(args.s3prl_dir)
            print(f"removed {removed}" if removed else "nothing to unlink")
        else:
            print(f"linked {link(args.s3prl_dir)}")
        return 0

    p.set_defaults(func=_link)

    p = subparsers.add_parser("register", help="install the start-up hook that adds ekd_distiller to s3prl.hub")
    p.set_defaults(func=lambda args: print(f"wrote {register()}") or 0)
