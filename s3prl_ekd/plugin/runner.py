"""Running s3prl's own run_pretrain.py with the `ekd_distiller` task, without writing into the
installed s3prl (plugin/downstream.py does the same for run_downstream.py).

run_pretrain.py must run with a working directory holding `pretrain/<task>/` (it imports
top-level `pretrain.*` and lists `pretrain/` for `-u`). Each `s3prl-ekd pretrain` therefore
runs in a temporary workspace that mirrors s3prl's `pretrain/` folder with links and adds
`pretrain/ekd_distiller/` (see `pretrain_workspace`). `s3prl-ekd link DIR` writes the same
task folder into an s3prl checkout, for people who run run_pretrain.py there themselves.

What this module adds around s3prl's scripts, and nothing else:
- paths on the command line and in the runner config mean the caller's directory;
- runner-config mistakes s3prl would only assert on are reported in one line first;
- checkpoints are written atomically and old ones removed only after the new one is complete;
- `-a` resumes from the newest readable checkpoint; an experiment folder is locked while a run
  writes to it, and a new run refuses a folder that holds checkpoints (unless --force);
- torch >= 2.6 `weights_only` loading of s3prl's checkpoints (Namespace, LR schedules).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import io
import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from s3prl_ekd.errors import CheckpointError, ConfigError, UserError
from s3prl_ekd.io import checkpoint
from s3prl_ekd.io.files import atomic_torch_save, exclusive_lock
from s3prl_ekd.io.resources import pretrain_config
from s3prl_ekd.io.strict import read_yaml_mapping

TASK_NAME = "ekd_distiller"
MARKER = ".s3prl_ekd_link"  # marks a task folder `link` created, so unlink removes only ours
DEFAULT_RUNNER_CONFIG = "runner.yaml"
DEFAULT_MODEL_CONFIG = "hubert_robusthubert_wavlm_average.yaml"
# datarc keys that hold paths: made absolute so they mean the user's directory.
DATARC_PATH_KEYS = ("audio_dir", "file_path", "libri_root", "targets")
PRETRAIN_FLAGS = ("-e", "-o", "-c", "-u", "-g", "-n", "-p")

SHIM = '''"""Written by s3prl-ekd: s3prl's pretrain runner imports the EKD pretraining task from here."""
from s3prl_ekd.plugin.pretrain_expert import UpstreamPretrainExpert  # noqa: F401
from s3prl_ekd.plugin.runner import log_scheduled_learning_rate, make_checkpoints_atomic

make_checkpoints_atomic()
log_scheduled_learning_rate()
'''


def installed_s3prl_dir() -> Path:
    spec = importlib.util.find_spec("s3prl")
    if spec is None or spec.origin is None:
        raise UserError("s3prl is not installed in this environment; pip install 's3prl-ekd[espnet]' "
                        "(torch >= 2.9) or 's3prl-ekd[s3prl]' (torch <= 2.8)")
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


def write_task_folder(task_dir: Path) -> Path:
    """pretrain/ekd_distiller/: the expert shim and run_pretrain.py's default -c / -g configs."""
    task_dir.mkdir(exist_ok=True)
    (task_dir / "__init__.py").write_text("")
    (task_dir / "pretrain_expert.py").write_text(SHIM)
    for name, source in (("config_runner.yaml", DEFAULT_RUNNER_CONFIG),
                         ("config_model.yaml", DEFAULT_MODEL_CONFIG)):
        shutil.copyfile(pretrain_config(source), task_dir / name)
    return task_dir


def link(s3prl_dir: str | os.PathLike | None = None) -> Path:
    """Make `-u ekd_distiller` available to `S3PRL_DIR/run_pretrain.py`. Idempotent."""
    task_dir = resolve_s3prl_dir(s3prl_dir) / "pretrain" / TASK_NAME
    if task_dir.exists() and not (task_dir / MARKER).exists():
        raise UserError(f"{task_dir} exists and was not created by `s3prl-ekd link`; "
                        "move it away first, nothing was changed")
    try:
        write_task_folder(task_dir)
        (task_dir / MARKER).write_text("created by s3prl-ekd link; `s3prl-ekd link --unlink` removes this folder\n")
    except PermissionError as error:
        raise UserError(f"{task_dir.parent}: not writable ({error.strerror}); `s3prl-ekd pretrain` needs no link, "
                        "or link an s3prl checkout you own") from error
    return task_dir


def unlink(s3prl_dir: str | os.PathLike | None = None) -> Path | None:
    """Remove the folder `link` made; returns it, or None if there was none."""
    task_dir = resolve_s3prl_dir(s3prl_dir) / "pretrain" / TASK_NAME
    if not task_dir.exists():
        return None
    if not (task_dir / MARKER).exists():
        raise UserError(f"{task_dir} was not created by `s3prl-ekd link`; not removing it")
    shutil.rmtree(task_dir)
    return task_dir


@contextlib.contextmanager
def pretrain_workspace(s3prl_dir: Path) -> Iterator[Path]:
    """A temporary folder shaped like s3prl's package folder for run_pretrain.py: `pretrain/`
    holds links to every entry of s3prl's own `pretrain/` plus our `ekd_distiller/` task."""
    with tempfile.TemporaryDirectory(prefix="s3prl-ekd-pretrain-") as tmp:
        workspace = Path(tmp)
        mirror = workspace / "pretrain"
        mirror.mkdir()
        for entry in (s3prl_dir / "pretrain").iterdir():
            if entry.name not in (TASK_NAME, "__pycache__"):
                (mirror / entry.name).symlink_to(entry)
        write_task_folder(mirror / TASK_NAME)
        yield workspace


# -- crash-safe checkpoints of s3prl's runner -------------------------------------------------

class _Proxy:
    """Stands in for a module inside s3prl's runner: every name but the overridden ones is the module's."""

    def __init__(self, module, **overrides):
        self._module, self._overrides = module, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._module, name)


def pretrain_runner_module():
    """s3prl's pretrain/runner.py as imported in this process (run_pretrain.py's workspace on sys.path)."""
    return importlib.import_module("pretrain.runner")


def make_checkpoints_atomic(runner_module=None, writer: bool | None = None) -> None:
    """Make s3prl's pretrain runner write checkpoints atomically, and remove old ones (its
    `max_keep`) only once the new one is complete, without editing s3prl's file: its module
    globals `torch` and `os` are replaced by proxies whose `save` / `remove` do that.

    `writer=False` drops saves and removals: by default, ranks other than 0 of a torchrun job.
    """
    import torch

    if writer is None:
        writer = os.environ.get("RANK", "0") == "0"
    if runner_module is None:
        runner_module = pretrain_runner_module()
    if isinstance(runner_module.torch, _Proxy):
        return
    pending: list[str] = []

    def save(obj, path, *args, **kwargs):
        if writer:
            atomic_torch_save(obj, path)
            for old in pending:
                if os.path.abspath(old) != os.path.abspath(path):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(old)
        pending.clear()

    def remove(path):
        pending.append(path)  # s3prl removes old checkpoints *before* saving the next one

    runner_module.torch = _Proxy(torch, save=save)
    runner_module.os = _Proxy(os, remove=remove)


def log_scheduled_learning_rate(runner_module=None) -> None:
    """s3prl's pretrain runner logs `train-lr` from `optimizer.get_lr()`, which only s3prl's own
    optimizers have; for a PyTorch optimizer (`name: TorchOptim`, e.g. runner_fused_adamw.yaml) it
    logs the config's constant `lr` although the scheduler changes the rate every step. Such
    optimizers get a `get_lr` that reads the rate in use (the runner's `get_optimizer` is wrapped)."""
    if runner_module is None:
        runner_module = pretrain_runner_module()
    original = runner_module.get_optimizer
    if getattr(original, "logs_scheduled_lr", False):
        return

    def get_optimizer(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        if not hasattr(optimizer, "get_lr"):
            optimizer.get_lr = lambda: [group["lr"] for group in optimizer.param_groups]
        return optimizer

    get_optimizer.logs_scheduled_lr = True
    runner_module.get_optimizer = get_optimizer


# -- command line of run_pretrain.py ----------------------------------------------------------

def _parse_known(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    for flag in PRETRAIN_FLAGS:
        parser.add_argument(flag)
    parser.add_argument("-a", "--auto_resume", action="store_true")
    return parser.parse_known_args(argv)


def _absolute_override(option: str, user_cwd: Path) -> str:
    key, sep, value = option.partition("=")
    if sep and key.strip().split(".")[-1] in DATARC_PATH_KEYS and not os.path.isabs(value.strip()):
        return f"{key.strip()}={(user_cwd / value.strip().strip(chr(39) + chr(34))).resolve()}"
    return option


def _datarc_path_overrides(runner_config: dict, user_cwd: Path, overrides: list[str]) -> list[str]:
    """Overrides that make the runner config's relative datarc paths absolute."""
    datarc = (runner_config.get("pretrain_expert") or {}).get("datarc") or {}
    already = {o.partition("=")[0].strip().split(".")[-1] for o in overrides}
    out = []
    for key in DATARC_PATH_KEYS:
        value = datarc.get(key)
        if isinstance(value, str) and key not in already and not os.path.isabs(value):
            out.append(f"config.pretrain_expert.datarc.{key}={(user_cwd / value).resolve()}")
    return out


def absolute_pretrain_argv(argv: list[str], user_cwd: Path) -> list[str]:
    """run_pretrain.py arguments with paths made absolute against `user_cwd`, -a resolved to -e."""
    known, rest = _parse_known(argv)

    def absolute(path):
        return str((user_cwd / path).resolve()) if path is not None else None

    overrides = [known.o] if known.o and known.o.lower() != "none" else []
    overrides = [_absolute_override(o, user_cwd) for o in ",,".join(overrides).split(",,") if o]
    if known.c is not None and known.e is None:
        overrides = _datarc_path_overrides(read_yaml_mapping(user_cwd / known.c, "runner config (-c)"),
                                           user_cwd, overrides) + overrides
    if known.p is None and known.n is not None:
        known.p = f"result/pretrain/{known.n}"  # s3prl's default, but under the user's directory
    known.p = absolute(known.p)
    if known.auto_resume and known.e is None and known.p is not None:
        known.e = newest_readable_checkpoint(Path(known.p))  # None: nothing to resume, a new run
    elif known.e is not None:
        known.e = checked_resume_path(absolute(known.e))
    out = list(rest)
    for flag, value in (("-e", known.e), ("-c", absolute(known.c)), ("-u", known.u),
                        ("-g", absolute(known.g)), ("-n", known.n), ("-p", known.p)):
        if value is not None:
            out += [flag, value]
    if overrides:
        out += ["-o", ",,".join(overrides)]
    return out


def newest_readable_checkpoint(expdir: Path) -> str | None:
    """-a: the newest checkpoint that loads, with one warning line per unreadable newer one."""
    found = checkpoint.newest_checkpoint(
        expdir, warn=lambda line: print(f"[s3prl-ekd] warning: {line}", file=sys.stderr))
    return str(found) if found else None


def checked_resume_path(path: str) -> str:
    """`-e PATH`: a readable checkpoint file, or the newest readable one in a folder."""
    if os.path.isdir(path):
        found = newest_readable_checkpoint(Path(path))
        if found is None:
            raise CheckpointError(f"{path}: no states-*.ckpt to resume from")
        return found
    problem = checkpoint.readable(path)
    if problem is not None:
        raise CheckpointError(f"-e {path}: {problem}")
    return path


def check_runner_config(argv: list[str]) -> None:
    """One-line errors for what s3prl's runner would only assert on, before it starts."""
    known, _ = _parse_known(argv)
    if known.e is not None or known.c is None:
        return  # a resumed run keeps the config it started with; -c defaults to ours
    config = copy.deepcopy(read_yaml_mapping(known.c, "runner config (-c)"))
    if known.o and known.o.lower() != "none":
        from s3prl.utility.helper import override

        with contextlib.redirect_stderr(io.StringIO()):  # s3prl prints each override; it will again
            override(known.o, argparse.Namespace(), config)
    runner = config.get("runner") or {}
    where = f"{known.c}: runner"
    for key in ("total_steps", "log_step", "save_step", "max_keep", "gradient_accumulate_steps"):
        value = runner.get(key)
        if key == "total_steps" and (runner.get("n_epochs") or 0) > 0:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}.{key}: {value!r}; use a positive integer")
    if (runner.get("n_epochs") or 0) <= 0:
        for key in ("save_step", "log_step"):
            if runner["total_steps"] <= runner[key]:
                raise ConfigError(f"{where}.{key}: {runner[key]} is not below total_steps={runner['total_steps']} "
                                  f"(s3prl's runner requires total_steps > {key}); lower {key} or raise total_steps")
    from s3prl_ekd.plugin.pretrain_data import check_data_source, load_datarc

    datarc = (config.get("pretrain_expert") or {}).get("datarc")
    if not isinstance(datarc, dict):
        raise ConfigError(f"{known.c}: pretrain_expert.datarc is missing; see pretrain_configs/runner.yaml")
    check_data_source(load_datarc(datarc))


def refuse_overwrite(argv: list[str]) -> None:
    """A new run must not replace the checkpoints of an existing experiment."""
    known, _ = _parse_known(argv)
    if known.e is None and known.p is not None:
        existing = sorted(Path(known.p).glob("states-*.ckpt"))
        if existing:
            raise UserError(f"{known.p} already holds {existing[-1].name}: resume with -a (or -e CKPT), "
                            "pick another -n, or pass --force to start over in that folder")


def experiment_dir(argv: list[str]) -> Path | None:
    known, _ = _parse_known(argv)
    if known.e is not None:
        return Path(known.e).parent
    return Path(known.p) if known.p is not None else None


@contextlib.contextmanager
def script_context(script: Path, argv: list[str], cwd: Path, path: list[Path]):
    """sys.argv, sys.path and the working directory for running one of s3prl's scripts with runpy."""
    old_argv, old_cwd, old_path = sys.argv, os.getcwd(), list(sys.path)
    sys.argv = [str(script), *argv]
    sys.path[:0] = [str(p) for p in path]  # the scripts import their siblings top-level
    os.chdir(cwd)
    try:
        with checkpoint.runner_checkpoints_allowed():
            yield
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        os.chdir(old_cwd)


def _device(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", default="cuda")  # run_pretrain.py's default
    return parser.parse_known_args(argv)[0].device


def run_pretrain(argv: list[str]) -> int:
    """s3prl's run_pretrain.py with `argv`, paths relative to the caller's directory; under torchrun,
    one process of a DistributedDataParallel run (plugin/distributed.py).

    Extra flag: --force lets a new run write into an experiment folder that has checkpoints.
    """
    from s3prl_ekd.plugin import distributed

    force = "--force" in argv
    argv = absolute_pretrain_argv([a for a in argv if a != "--force"], Path.cwd())
    context = distributed.from_env()
    leader = context is None or context.leader
    if leader and not force:
        refuse_overwrite(argv)
    check_runner_config(argv)
    s3prl_dir = installed_s3prl_dir()
    script = s3prl_dir / "run_pretrain.py"
    expdir = experiment_dir(argv)
    lock = exclusive_lock(expdir, "pretraining run") if expdir and leader else contextlib.nullcontext()
    with lock, pretrain_workspace(s3prl_dir) as workspace, \
            script_context(script, argv, cwd=workspace, path=[workspace, s3prl_dir]):
        if expdir and leader:
            for partial in expdir.glob(".states-*.ckpt.tmp-*"):  # a save cut short by a kill
                partial.unlink()
        if context is None:
            runpy.run_path(str(script), run_name="__main__")
            return 0
        distributed.init(context, _device(argv))
        try:
            runner_module = pretrain_runner_module()
            with distributed.leader_writes(context, runner_module, str(expdir) if expdir else None):
                runpy.run_path(str(script), run_name="__main__")
        finally:
            distributed.leave()
    return 0



def register_cli(subparsers) -> None:
    p = subparsers.add_parser("link", help="make `run_pretrain.py -u ekd_distiller` work in an s3prl checkout")
    p.add_argument("s3prl_dir", nargs="?", help="s3prl checkout or package folder (default: the installed s3prl)")
    p.add_argument("--unlink", action="store_true", help="remove what link created")

    def _link(args) -> int:
        if args.unlink:
            removed = unlink(args.s3prl_dir)
            print(f"removed {removed}" if removed else "nothing to unlink")
        else:
            print(f"linked {link(args.s3prl_dir)}")
        return 0

    p.set_defaults(func=_link)
