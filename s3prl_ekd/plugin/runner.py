"""`s3prl-ekd pretrain`: s3prl's own run_pretrain.py with the `ekd_distiller` task, checked before it starts.

run_pretrain.py must run with a working directory holding `pretrain/<task>/` (it imports top-level
`pretrain.*` and lists `pretrain/` for `-u`), so each run happens in a temporary workspace that
mirrors s3prl's `pretrain/` folder with links and adds `pretrain/ekd_distiller/`; nothing is
written into the installed s3prl. `s3prl-ekd link DIR` writes the same task folder into an s3prl
checkout, for people who run run_pretrain.py there themselves.

What this adapter adds, before s3prl starts (one line and exit status 2 for each mistake):
- paths on the command line and in the runner config mean the caller's directory;
- the model config (-g), runner config (-c), every -o key and the device are checked;
- a resumed run (-a / -e) refuses a -c, -g or -o that differs from the experiment's, except the
  keys of SAFE_ON_RESUME with --allow-config-change (recorded in the experiment folder);
- a new run refuses a folder that holds checkpoints (unless --force); the folder is locked while a
  run writes into it; -a resumes from the newest readable checkpoint.
While s3prl runs: the patches of s3prl_ekd.patches it needs (atomic checkpoints, scheduled lr
logging, quiet ranks under torchrun, checkpoints that name `s3prl.optimizers`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import importlib
import importlib.util
import io
import json
import os
import runpy
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from s3prl_ekd import patches
from s3prl_ekd.errors import CheckpointError, ConfigError, UserError
from s3prl_ekd.io import checkpoint
from s3prl_ekd.io.files import atomic_write_text, exclusive_lock
from s3prl_ekd.io.resources import pretrain_config
from s3prl_ekd.io.strict import read_yaml_mapping

TASK_NAME = "ekd_distiller"
MARKER = ".s3prl_ekd_link"  # marks a task folder `link` created, so unlink removes only ours
DEFAULT_RUNNER_CONFIG = "runner.yaml"
DEFAULT_MODEL_CONFIG = "hubert_robusthubert_wavlm_average.yaml"
# datarc keys that hold paths: made absolute so they mean the user's directory.
DATARC_PATH_KEYS = ("audio_dir", "file_path", "libri_root", "targets")
# Runner-config keys a resumed run may change with --allow-config-change.
SAFE_ON_RESUME = ("runner.total_steps", "runner.save_step", "runner.log_step", "runner.max_keep")
CHANGES_NAME = "config_changes.jsonl"  # what --allow-config-change changed, one line per resume

SHIM = '''"""Written by s3prl-ekd: s3prl's pretrain runner imports the EKD pretraining task from here."""
from s3prl_ekd.plugin.pretrain_expert import UpstreamPretrainExpert  # noqa: F401
'''
# In a linked s3prl checkout the user's own run_pretrain.py process is the only scope there is.
LINKED_SHIM = SHIM + '''from s3prl_ekd.plugin.runner import patch_linked_run

patch_linked_run()
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


def write_task_folder(task_dir: Path, linked: bool = False) -> Path:
    """pretrain/ekd_distiller/: the expert shim and run_pretrain.py's default -c / -g configs."""
    task_dir.mkdir(exist_ok=True)
    (task_dir / "__init__.py").write_text("")
    (task_dir / "pretrain_expert.py").write_text(LINKED_SHIM if linked else SHIM)
    for name, source in (("config_runner.yaml", DEFAULT_RUNNER_CONFIG),
                         ("config_model.yaml", DEFAULT_MODEL_CONFIG)):
        shutil.copyfile(pretrain_config(source), task_dir / name)
    return task_dir


def patch_linked_run() -> None:
    """In a user's own run_pretrain.py process (a linked checkout): atomic checkpoints and scheduled-lr
    logging for the rest of the process, which is that run."""
    stack = contextlib.ExitStack()
    module = importlib.import_module("pretrain.runner")
    if not getattr(module, "_s3prl_ekd_patched", False):
        stack.enter_context(patches.atomic_runner_checkpoints(module))
        stack.enter_context(patches.scheduled_lr_logging(module))
        module._s3prl_ekd_patched = True
        stack.pop_all()  # never undone: the process ends with the run


def link(s3prl_dir: str | os.PathLike | None = None) -> Path:
    """Make `-u ekd_distiller` available to `S3PRL_DIR/run_pretrain.py`. Idempotent."""
    task_dir = resolve_s3prl_dir(s3prl_dir) / "pretrain" / TASK_NAME
    if task_dir.exists() and not (task_dir / MARKER).exists():
        raise UserError(f"{task_dir} exists and was not created by `s3prl-ekd link`; "
                        "move it away first, nothing was changed")
    try:
        write_task_folder(task_dir, linked=True)
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


def pretrain_tasks(s3prl_dir: Path | None = None) -> list[str]:
    """The pretraining tasks `-u` accepts: ekd_distiller and s3prl's own task folders."""
    s3prl_dir = s3prl_dir or installed_s3prl_dir()
    own = [p.name for p in (s3prl_dir / "pretrain").iterdir() if (p / "pretrain_expert.py").is_file()]
    return sorted({TASK_NAME, *own})


# -- the command line --------------------------------------------------------------------------

def _flag(parser, short: str | None, name: str, **kwargs) -> None:
    """An option under its s3prl name (`--past_exp`) that also accepts the hyphen spelling (`--past-exp`)."""
    names = [short] if short else []
    hyphen = "--" + name.replace("_", "-")
    names += [hyphen] + (["--" + name] if "_" in name else [])
    parser.add_argument(*names, dest=name, **kwargs)


def add_pretrain_arguments(parser: argparse.ArgumentParser, tasks: list[str]) -> None:
    s3prl = parser.add_argument_group("passed through to s3prl's run_pretrain.py")
    _flag(s3prl, "-u", "upstream", choices=tasks, default=TASK_NAME, help=f"pretraining task (default {TASK_NAME})")
    _flag(s3prl, "-g", "upstream_config", metavar="YAML", help="model config (default: the task's config_model.yaml)")
    _flag(s3prl, "-c", "config", metavar="YAML", help="runner config (default: the task's config_runner.yaml)")
    _flag(s3prl, "-n", "expname", help="experiment name: results in ./result/pretrain/NAME")
    _flag(s3prl, "-p", "expdir", help="experiment folder (instead of -n)")
    _flag(s3prl, "-e", "past_exp", metavar="CKPT_OR_DIR", help="resume from this checkpoint (or a folder's newest)")
    _flag(s3prl, "-a", "auto_resume", action="store_true", help="resume from the experiment folder's newest "
                                                                 "readable checkpoint, if any")
    _flag(s3prl, "-o", "override", metavar="KEY=VALUE,,...",
          help="override config keys, e.g. config.runner.total_steps=100 (checked against the config)")
    _flag(s3prl, None, "seed", type=int, default=1337, help="random seed (default 1337)")
    _flag(s3prl, None, "device", help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    _flag(s3prl, None, "multi_gpu", action="store_true", help="s3prl's DataParallel (prefer torchrun)")
    own = parser.add_argument_group("s3prl-ekd's own")
    own.add_argument("--force", action="store_true", help="start a new run in a folder that holds checkpoints")
    own.add_argument("--allow-config-change", action="store_true",
                     help="on resume, let -c/-o change " + ", ".join(SAFE_ON_RESUME) + " (recorded in the folder)")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="distil a student with s3prl's run_pretrain.py (-u ekd_distiller)",
        description="Distil a student through s3prl's own pretraining runner. Relative paths mean the current "
                    "directory; everything is checked before s3prl starts. Under torchrun, one process of a "
                    "DistributedDataParallel run.")
    add_pretrain_arguments(p, pretrain_tasks())
    p.set_defaults(func=lambda args: run_pretrain(args))

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


# -- checks before s3prl starts ------------------------------------------------------------------

def split_overrides(text: str | None) -> list[tuple[str, str]]:
    """-o 'a.b=1,,c=2' -> [('a.b', '1'), ('c', '2')], as s3prl splits it."""
    if not text or text.lower() == "none":
        return []
    pairs = []
    for option in text.split(",,"):
        if not option.strip():
            continue
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-o {option.strip()!r}: write KEY=VALUE, e.g. config.runner.total_steps=100 "
                              "(several separated by ,,)")
        pairs.append((key.strip(), value.strip()))
    return pairs


def join_overrides(pairs: list[tuple[str, str]]) -> str:
    return ",,".join(f"{k}={v}" for k, v in pairs)


def apply_overrides(config: dict, pairs: list[tuple[str, str]]) -> dict:
    """`config` with s3prl's own override() applied (values as s3prl reads them); `args.*` keys skipped."""
    from s3prl.utility.helper import override

    config = copy.deepcopy(config)
    wanted = [(k, v) for k, v in pairs if k.startswith("config.")]
    if wanted:
        with contextlib.redirect_stderr(io.StringIO()):  # s3prl prints each override; it will again
            override(join_overrides(wanted), argparse.Namespace(), config)
    return config


def _nearest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(sorted(valid)[:12])}"


def check_override_keys(pairs: list[tuple[str, str]], config: dict, arg_names: list[str]) -> None:
    """Every -o key names something that exists: an argument (args.NAME), a key of the runner config,
    or a datarc option (any field of pretrain_expert.datarc, set in the file or not)."""
    from s3prl_ekd.plugin.pretrain_data import DataConfig

    datarc_fields = list(DataConfig.__dataclass_fields__)
    for key, _ in pairs:
        first, *path = key.split(".")
        if first == "args":
            if len(path) != 1 or path[0] not in arg_names:
                raise ConfigError(f"-o {key}: unknown argument; {_nearest('.'.join(path), arg_names)}")
            continue
        if first != "config" or not path:
            raise ConfigError(f"-o {key}: a key starts with config. or args., e.g. config.runner.total_steps")
        node, walked = config, []
        for i, part in enumerate(path):
            if walked == ["pretrain_expert", "datarc"]:
                if part not in datarc_fields or i != len(path) - 1:
                    raise ConfigError(f"-o {key}: unknown key; {_nearest(part, datarc_fields)}")
                break
            if not isinstance(node, dict) or part not in node:
                valid = list(node) if isinstance(node, dict) else []
                where = "config." + ".".join(walked) if walked else "the runner config"
                raise ConfigError(f"-o {key}: {where} has no key {part!r}; {_nearest(part, valid)}")
            node, walked = node[part], walked + [part]


def check_training_audio(config: dict, model_config) -> None:
    """Every training file usable and long enough for the student's CNN, before s3prl makes the
    experiment folder (an audio folder's headers; s3prl's bucket CSVs hold the lengths)."""
    from s3prl_ekd.core.frames import parse_conv_layers, receptive_field
    from s3prl_ekd.plugin.pretrain_data import drop_short, load_datarc, read_utterances

    datarc = load_datarc(config["pretrain_expert"]["datarc"])
    field = receptive_field(parse_conv_layers(model_config.student.conv_feature_layers))
    drop_short(read_utterances(datarc), field, datarc.skip_short)


def check_runner_config(config: dict, where: str) -> None:
    """One-line errors for what s3prl's runner would only assert on, or fail on mid-run."""
    runner = config.get("runner") or {}
    for key in ("total_steps", "log_step", "save_step", "max_keep", "gradient_accumulate_steps"):
        value = runner.get(key)
        if key == "total_steps" and (runner.get("n_epochs") or 0) > 0:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}: runner.{key}: {value!r}; use a positive integer")
    if (runner.get("n_epochs") or 0) <= 0:
        for key in ("save_step", "log_step"):
            if runner["total_steps"] <= runner[key]:
                raise ConfigError(f"{where}: runner.{key}: {runner[key]} is not below total_steps="
                                  f"{runner['total_steps']} (s3prl's runner requires total_steps > {key}); lower "
                                  f"{key} or raise total_steps")
    check_optimizer(config.get("optimizer"), where)
    from s3prl_ekd.plugin.pretrain_data import check_data_source, load_datarc

    datarc = (config.get("pretrain_expert") or {}).get("datarc")
    if not isinstance(datarc, dict):
        raise ConfigError(f"{where}: pretrain_expert.datarc is missing; see pretrain_configs/runner.yaml")
    check_data_source(load_datarc(datarc))


def check_optimizer(optimizer, where: str) -> None:
    """The runner config's optimizer: a name s3prl knows and numbers that are numbers."""
    import s3prl.optimizers

    if not isinstance(optimizer, dict) or "name" not in optimizer:
        raise ConfigError(f"{where}: optimizer: missing or without a name; see pretrain_configs/runner.yaml")
    names = sorted(n[len("get_"):] for n in dir(s3prl.optimizers)
                   if n.startswith("get_") and n not in ("get_optimizer", "get_grouped_parameters"))
    if optimizer["name"] not in names:  # s3prl calls get_<name>
        raise ConfigError(f"{where}: optimizer.name: {optimizer['name']!r} is not an s3prl optimizer; use one of "
                          f"{', '.join(names)}")
    for key in ("lr", "warmup_proportion", "eps", "weight_decay"):
        value = optimizer.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            hint = (f"; YAML 1.1 reads {value} as text: write it with a dot, e.g. "
                    f"{value.lower().replace('e', '.0e', 1)}" if "e" in value.lower() else "")
            raise ConfigError(f"{where}: optimizer.{key}: {value!r} is text, not a number{hint}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (key == "lr" and value == 0):
            raise ConfigError(f"{where}: optimizer.{key}: {value!r}; use a "
                              f"{'positive' if key == 'lr' else 'non-negative'} number")


def _flatten(config, prefix: str = "") -> dict[str, object]:
    if not isinstance(config, dict):
        return {prefix: config}
    out = {}
    for key, value in config.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(old: dict, new: dict) -> dict[str, tuple]:
    """Dotted key -> (old, new) for every leaf that differs."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return {key: (flat_old.get(key), flat_new.get(key)) for key in sorted(set(flat_old) | set(flat_new))
            if flat_old.get(key) != flat_new.get(key)}


def _listed(differences: dict[str, tuple]) -> str:
    shown = [f"{key} ({old!r} -> {new!r})" for key, (old, new) in list(differences.items())[:4]]
    return ", ".join(shown) + (f" and {len(differences) - 4} more" if len(differences) > 4 else "")


def _absolute_datarc_paths(config: dict, user_cwd: Path, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Overrides that make the runner config's relative datarc paths absolute (but those -o sets anyway)."""
    datarc = (config.get("pretrain_expert") or {}).get("datarc") or {}
    given = {key for key, _ in pairs}
    return [(f"config.pretrain_expert.datarc.{key}", str((user_cwd / datarc[key]).resolve()))
            for key in DATARC_PATH_KEYS if isinstance(datarc.get(key), str) and not os.path.isabs(datarc[key])
            and f"config.pretrain_expert.datarc.{key}" not in given]


def _absolute_override(key: str, value: str, user_cwd: Path) -> tuple[str, str]:
    if key.split(".")[-1] in DATARC_PATH_KEYS and value.lower() != "none" and not os.path.isabs(value.strip("'\"")):
        return key, str((user_cwd / value.strip("'\"")).resolve())
    return key, value


def resume_checkpoint(args) -> str | None:
    """The checkpoint a run resumes from: -e (a file, or a folder's newest readable), or -a's newest
    readable one in the experiment folder; None for a new run."""
    if args.past_exp is not None:
        path = args.past_exp
        if os.path.isdir(path):
            found = newest_readable_checkpoint(Path(path))
            if found is None:
                raise CheckpointError(f"-e {path}: no states-*.ckpt to resume from")
            return found
        problem = checkpoint.readable(path)
        if problem is not None:
            raise CheckpointError(f"-e {path}: {problem}")
        return path
    if args.auto_resume and args.expdir is not None:
        return newest_readable_checkpoint(Path(args.expdir))  # None: nothing to resume, a new run
    return None


def newest_readable_checkpoint(expdir: Path) -> str | None:
    """-a: the newest checkpoint that loads, with one warning line per unreadable newer one."""
    found = checkpoint.newest_checkpoint(
        expdir, warn=lambda line: print(f"[s3prl-ekd] warning: {line}", file=sys.stderr))
    return str(found) if found else None


def check_resume(args, resumed: str, user_cwd: Path, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A resumed run's -c, -g and -o against the experiment's own configs. Returns the overrides s3prl
    needs for the allowed changes (it resumes with the checkpoint's configs and applies -o on top)."""
    from s3prl_ekd.core.config import load_config

    saved = checkpoint.load_raw(resumed)
    saved_runner = saved.get("Config") or {}
    if args.config is not None:
        new_runner = read_yaml_mapping(args.config, "runner config (-c)")
        new_runner = apply_overrides(new_runner, _absolute_datarc_paths(new_runner, user_cwd, pairs) + pairs)
    else:
        new_runner = apply_overrides(saved_runner, pairs)
    runner_changes = config_differences(saved_runner, new_runner)
    if args.upstream_config is not None and checkpoint.MODEL_CONFIG_KEY in saved:
        # Both through the typed config, so that keys an older checkpoint lacks count at their defaults.
        new_model = load_config(args.upstream_config).to_dict()
        old_model = load_config(copy.deepcopy(saved[checkpoint.MODEL_CONFIG_KEY])).to_dict()
        model_changes = config_differences(old_model, new_model)
        if model_changes:
            raise ConfigError(f"-g {args.upstream_config}: differs from the model config of the experiment "
                              f"being resumed ({resumed}) in {_listed(model_changes)}; s3prl would resume with "
                              "the saved one: drop -g, or start a new experiment (-n NEW)")
    unsafe = {k: v for k, v in runner_changes.items() if k not in SAFE_ON_RESUME}
    if unsafe or (runner_changes and not args.allow_config_change):
        what = "-c" if args.config is not None else "-o"
        allowed = "" if unsafe else " or pass --allow-config-change"
        raise ConfigError(f"{what}: differs from the runner config of the experiment being resumed ({resumed}) in "
                          f"{_listed(unsafe or runner_changes)}; s3prl would resume with the saved values: drop "
                          f"the change{allowed}, or start a new experiment (-n NEW) (--allow-config-change "
                          f"accepts only {', '.join(SAFE_ON_RESUME)})")
    if runner_changes:
        expdir = Path(resumed).parent
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_from": resumed,
                  "step": int(saved.get(checkpoint.STEP_KEY, 0)),
                  "changes": {k: list(v) for k, v in runner_changes.items()}}
        previous = (expdir / CHANGES_NAME).read_text() if (expdir / CHANGES_NAME).is_file() else ""
        atomic_write_text(expdir / CHANGES_NAME, previous + json.dumps(record) + "\n")
        print(f"[s3prl-ekd] resuming with {_listed(runner_changes)} (recorded in {expdir / CHANGES_NAME})")
    return [(f"config.{key}", repr(new)) for key, (_, new) in runner_changes.items()]


def refuse_overwrite(expdir: Path) -> None:
    """A new run must not replace the checkpoints of an existing experiment."""
    existing = sorted(expdir.glob("states-*.ckpt"))
    if existing:
        raise UserError(f"{expdir} already holds {existing[-1].name}: resume with -a (or -e CKPT), "
                        "pick another -n, or pass --force to start over in that folder")


def prepare_argv(args, user_cwd: Path, leader: bool = True) -> tuple[list[str], Path]:
    """Check everything that can be checked before s3prl starts; -> (run_pretrain.py's argv, experiment
    folder). Paths become absolute against `user_cwd`; -a becomes -e CKPT (or a new run)."""
    from s3prl_ekd.devices import resolve_device

    def absolute(path):
        return str((user_cwd / path).resolve()) if path is not None else None

    args.config, args.upstream_config = absolute(args.config), absolute(args.upstream_config)
    for flag, path, what in (("-c", args.config, "runner config"), ("-g", args.upstream_config, "model config")):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: {'is a folder, not a' if Path(path).is_dir() else 'no such'} "
                              f"{what} file; pass a YAML file (`s3prl-ekd configs` lists the shipped ones)")
    if args.expdir is None and args.expname is None and args.past_exp is None:
        raise ConfigError("name the experiment with -n NAME (or -p FOLDER), or resume one with -e CKPT")
    if args.expdir is None and args.expname is not None:
        args.expdir = f"result/pretrain/{args.expname}"  # s3prl's default, but under the user's directory
    args.expdir, args.past_exp = absolute(args.expdir), absolute(args.past_exp)
    if args.expname is None and args.expdir is not None:
        args.expname = Path(args.expdir).name  # s3prl requires a name for a new run, even with -p
    device_given = args.device is not None
    args.device = resolve_device(args.device)
    if not device_given and leader:
        print(f"[s3prl-ekd] device: {args.device} (default: cuda when available; --device to choose)")
    pairs = [_absolute_override(k, v, user_cwd) for k, v in split_overrides(args.override)]
    resumed = resume_checkpoint(args)
    arg_names = sorted(k for k in vars(args) if k not in ("func", "command", "verbose", "force", "allow_config_change"))
    if resumed is None:
        runner_path = args.config or str(pretrain_config(DEFAULT_RUNNER_CONFIG))
        runner_config = read_yaml_mapping(runner_path, "runner config (-c)")
        check_override_keys(pairs, runner_config, arg_names)
        pairs = _absolute_datarc_paths(runner_config, user_cwd, pairs) + pairs
        effective = apply_overrides(runner_config, pairs)
        check_runner_config(effective, runner_path)
        if args.upstream == TASK_NAME:
            from s3prl_ekd.core.config import load_config

            # the model config's mistakes, then the audio's, before s3prl starts
            model = load_config(args.upstream_config or str(pretrain_config(DEFAULT_MODEL_CONFIG)))
            check_training_audio(effective, model)
        expdir = Path(args.expdir)
    else:
        check_override_keys(pairs, checkpoint.load_raw(resumed).get("Config") or {}, arg_names)
        pairs = pairs + check_resume(args, resumed, user_cwd, pairs)
        expdir = Path(resumed).parent
    argv = ["-u", args.upstream, "--seed", str(args.seed), "--device", args.device]
    for flag, value in (("-e", resumed), ("-c", args.config), ("-g", args.upstream_config),
                        ("-n", args.expname), ("-p", args.expdir)):
        if value is not None:
            argv += [flag, value]
    if args.multi_gpu:
        argv.append("--multi_gpu")
    if pairs:
        argv += ["-o", join_overrides(pairs)]
    if resumed is None and not args.force and leader:
        refuse_overwrite(expdir)
    return argv, expdir


def _with_expdir(argv: list[str], expdir: str) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "-p":
            skip = True
            continue
        out.append(item)
    return out + ["-p", expdir]


def run_pretrain(args) -> int:
    """s3prl's run_pretrain.py for the parsed `args` (see register_cli); under torchrun, one process of a
    DistributedDataParallel run (plugin/distributed.py)."""
    from s3prl_ekd.plugin import distributed

    context = distributed.from_env()
    leader = context is None or context.leader
    argv, expdir = prepare_argv(args, Path.cwd(), leader)
    s3prl_dir = installed_s3prl_dir()
    script = s3prl_dir / "run_pretrain.py"
    with contextlib.ExitStack() as stack:
        if leader:
            stack.enter_context(exclusive_lock(expdir, "pretraining run"))
            for partial in expdir.glob(".states-*.ckpt.tmp-*"):  # a save cut short by a kill
                partial.unlink()
        elif args.past_exp is None and "-e" not in argv:
            # run_pretrain.py copies -c and -g into the experiment folder of a new run: ranks but 0
            # point it at a scratch folder (their checkpoints and logs are dropped anyway).
            argv = _with_expdir(argv, stack.enter_context(tempfile.TemporaryDirectory(prefix="s3prl-ekd-rank-")))
        workspace = stack.enter_context(pretrain_workspace(s3prl_dir))
        stack.enter_context(patches.script_context(script, argv, cwd=workspace, path=[workspace, s3prl_dir]))
        stack.enter_context(checkpoint.runner_checkpoints_allowed())
        runner_module = importlib.import_module("pretrain.runner")
        stack.enter_context(patches.atomic_runner_checkpoints(runner_module, writer=leader))
        stack.enter_context(patches.scheduled_lr_logging(runner_module))
        if context is not None:
            distributed.init(context, args.device)
            stack.callback(distributed.leave)
            if not leader:
                stack.enter_context(patches.quiet_ranks(runner_module))
        stack.callback(_forget_script_modules)
        runpy.run_path(str(script), run_name="__main__")
    return 0


def _forget_script_modules() -> None:
    """The top-level modules run_pretrain.py imported from the (now removed) workspace: a later run in this
    process must import its own."""
    for name in [n for n in sys.modules if n == "pretrain" or n.startswith("pretrain.")]:
        del sys.modules[name]
