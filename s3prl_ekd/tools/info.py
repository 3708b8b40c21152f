"""`s3prl-ekd env`, `inspect` and `configs`: what is installed, what a checkpoint holds, what is shipped."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

DISTRIBUTIONS = ("torch", "torchaudio", "espnet-s3prl", "s3prl", "transformers", "huggingface_hub", "numpy",
                 "soundfile", "torchcodec", "s3prl-ekd")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _hook_files() -> list[str]:
    from s3prl_ekd.patches import PTH_NAME

    return sorted({str(Path(p) / PTH_NAME) for p in sys.path if p and (Path(p) / PTH_NAME).is_file()})


def _registration() -> str:
    """Whether s3prl.hub has a working ekd_distiller, or why not."""
    from s3prl_ekd.stack import stack_problem

    problem = stack_problem()
    if problem is not None:
        return f"no: {problem}"
    from s3prl_ekd.patches import known_warnings_filtered

    with known_warnings_filtered():
        try:
            import s3prl.hub
        except Exception as error:  # what a user would see from s3prl itself
            return f"no: import s3prl.hub fails ({type(error).__name__}: {error})"
    entry = getattr(s3prl.hub, "ekd_distiller", None)
    if entry is None:
        return "no: s3prl.hub has no ekd_distiller (no start-up hook ran; `s3prl-ekd register` writes one)"
    if entry.__module__ == "s3prl_ekd.patches":
        try:
            entry()
        except ImportError as error:
            return f"no: {error}"
    return f"yes ({entry.__module__}.{entry.__name__})"


def _tool(name: str, *args: str) -> str:
    path = shutil.which(name)
    if path is None:
        return "not found"
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=10)
        text = (out.stdout or out.stderr).strip().splitlines()
        return f"{path}: {text[0] if text else 'ok'}"
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{path}: {error}"


def environment() -> dict[str, str]:
    """What a bug report needs, as ordered (name, value) pairs."""
    info = {"s3prl-ekd": _version("s3prl-ekd") or "not installed as a distribution",
            "python": f"{platform.python_version()} ({sys.executable})",
            "platform": platform.platform()}
    for name in DISTRIBUTIONS[:-1]:
        info[name] = _version(name) or "not installed"
    from s3prl_ekd.stack import S3PRL_DISTRIBUTIONS

    providers = [d for d in S3PRL_DISTRIBUTIONS if _version(d)]
    info["s3prl module from"] = ", ".join(providers) or "nothing (s3prl is not installed)"
    info["start-up hook"] = ", ".join(_hook_files()) or "not installed (`s3prl-ekd register`)"
    info["ekd_distiller registered"] = _registration()
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda"] = f"{torch.version.cuda}: " + ", ".join(names)
        else:
            info["cuda"] = "no CUDA device"
    except Exception as error:  # a broken torch is itself what the report should say
        info["cuda"] = f"torch unusable ({type(error).__name__}: {error})"
    from s3prl_ekd.patches import torchcodec_usable

    info["torchcodec + FFmpeg"] = "usable" if torchcodec_usable() else "not usable (soundfile reads audio instead)"
    info["ffmpeg"] = _tool("ffmpeg", "-version")
    info["espeak-ng"] = _tool("espeak-ng", "--version")
    info["sox"] = _tool("sox", "--version")
    return info


def describe_checkpoint(path: str | Path) -> dict:
    """What an EKD checkpoint holds, read with weights_only=True."""
    from s3prl_ekd.io import checkpoint

    raw = checkpoint.load_raw(path)
    model = checkpoint.model_dict(raw, path)
    student = model["student"]
    state = student["state_dict"]
    heads = sum(v.numel() for k, v in state.items() if k.startswith("heads."))
    total = sum(v.numel() for v in state.values())
    out = {"file": str(Path(path).resolve()), "kind": "exported model.pt" if raw.get("format") else "s3prl runner "
           "checkpoint (states-*.ckpt)", "step": model["step"], "aggregation": model["aggregation"],
           "teachers": model["teachers"], "student": {"parameters": total, "backbone": total - heads, "heads": heads,
                                                      "head_dims": student["head_dims"],
                                                      "targets": student["num_targets"],
                                                      "config": student["config"]},
           "model_config": model.get("model_config")}
    if "Config" in raw:
        out["runner_config"] = raw["Config"]
    for key in (checkpoint.INIT_KEY, checkpoint.LOSS_WEIGHTS_KEY, "Merged_From"):
        if key in raw:
            out[key.lower()] = raw[key]
    if checkpoint.TARGET_NORM_KEY in raw:
        out["target_norm"] = f"standardised targets ({len(raw[checkpoint.TARGET_NORM_KEY])} teachers' statistics)"
    return out


def _print_checkpoint(info: dict) -> None:
    import yaml

    student = info["student"]
    print(f"{info['file']}: {info['kind']}, step {info['step']}")
    print(f"student: {student['parameters']:,} parameters (backbone {student['backbone']:,} + heads "
          f"{student['heads']:,}); {student['config']['encoder_layers']} x {student['config']['encoder_embed_dim']} "
          f"transformer; head sets {student['head_dims']} x {student['targets']} targets")
    print(f"aggregation: {info['aggregation']}")
    for teacher in info["teachers"]:
        print(f"teacher: {teacher['name']} layers {teacher['layers']} weight {teacher['weight']} dim {teacher['dim']}")
    for key in ("init", "loss_weights", "merged_from", "target_norm"):
        if key in info:
            print(f"{key}: {json.dumps(info[key], default=str)}")
    for key, title in (("model_config", "model config (-g)"), ("runner_config", "runner config (-c)")):
        if info.get(key):
            print(f"--- {title}")
            print(yaml.safe_dump(info[key], sort_keys=False).rstrip())


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("env", help="print the versions and set-up a bug report needs")

    def _env(args) -> int:
        for key, value in environment().items():
            print(f"{key}: {value}")
        return 0

    p.set_defaults(func=_env)

    p = subparsers.add_parser("inspect", help="print what a checkpoint holds (step, configs, teachers, size)")
    p.add_argument("ckpt", help="states-*.ckpt of `s3prl-ekd pretrain`, a merged checkpoint or an exported model.pt")
    p.add_argument("--json", action="store_true", help="print it as JSON")

    def _inspect(args) -> int:
        info = describe_checkpoint(args.ckpt)
        if args.json:
            print(json.dumps(info, indent=1, default=str))
        else:
            _print_checkpoint(info)
        return 0

    p.set_defaults(func=_inspect)

    p = subparsers.add_parser("configs", help="list the shipped pretraining configs, or print one's path")
    p.add_argument("name", nargs="?", help="e.g. tiny_cpu_runner.yaml: print its path")

    def _configs(args) -> int:
        from s3prl_ekd.io.resources import pretrain_config, pretrain_config_names

        names = [args.name] if args.name else pretrain_config_names()
        for name in names:
            print(pretrain_config(name) if args.name else f"{name}\t{pretrain_config(name)}")
        return 0

    p.set_defaults(func=_configs)
