"""`s3prl-ekd downstream`: s3prl's own run_downstream.py, checked before it starts, with two opt-in
savings that leave s3prl's training itself unchanged:

- `--memoize-upstream GIB`: the upstream is frozen and un-augmented in SUPERB's protocol, so each
  utterance needs one forward, not one per epoch and per evaluation: its hidden states are kept
  (up to GIB of them, in memory) and reused, also by later runs in the same process with the same
  upstream (`superb --in-process`: every task and learning rate). Each utterance is run alone, so
  its features do not depend on what it is batched with.
- `--early-stop N`: stop when N evaluations in a row did not improve the dev metric (the expert's
  own best-checkpoint decision); `early_stop.json` in the experiment folder says when and why.
- `--share-cnn-features DIR`: an ekd_distiller upstream's CNN output of each utterance run alone is
  kept in DIR, by the CNN's weights and the audio, and read back by any process that runs the same CNN
  on the same audio: the demo's students all copy one teacher's frozen CNN, and on CPU that CNN is
  most of an upstream pass.

Before s3prl starts: the device (default: cuda when available), the upstream name, -k / -g files,
the downstream expert, and -c (default: the recipe s3prl-ekd ships for the task, since s3prl's wheel
ships no downstream config). While it runs: the patches of s3prl_ekd.patches it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import runpy
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from s3prl_ekd import patches
from s3prl_ekd.errors import CheckpointError, ConfigError
from s3prl_ekd.io import checkpoint
from s3prl_ekd.io.files import atomic_write, atomic_write_json
from s3prl_ekd.plugin.runner import _flag, installed_s3prl_dir

EARLY_STOP_NAME = "early_stop.json"
# s3prl downstream (-d) -> the s3prl-ekd recipe folder with a SUPERB config for it
RECIPES = {"ctc": "pr", "asr": "asr", "voxceleb1": "sid", "emotion": "er"}


def _digest(wav: torch.Tensor) -> str:
    return hashlib.blake2b(wav.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


# Hidden states kept in this process: upstream identity -> utterance digest -> [L] (T, D), and their size.
_SHARED: dict[str, dict[str, list[torch.Tensor]]] = {}
_SHARED_BYTES = [0]


class MemoizedUpstream(nn.Module):
    """A frozen upstream whose hidden states are computed once per utterance (by content) and kept,
    up to `max_bytes` in the process; the rest is passed through to the wrapped upstream. Runs of
    the same upstream (`identity`) in one process share what is kept."""

    def __init__(self, upstream: nn.Module, max_bytes: int, identity: str | None = None):
        super().__init__()
        self.upstream, self.max_bytes = upstream, max_bytes
        self.cache: dict[str, list[torch.Tensor]] = _SHARED.setdefault(identity, {}) if identity else {}
        self.hits = self.misses = 0

    def get_downsample_rates(self, key: str) -> int:
        return self.upstream.get_downsample_rates(key)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.upstream, name)

    def _states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """[L] (T, D) hidden states of one utterance run alone."""
        key = _digest(wav)
        if key in self.cache:
            self.hits += 1
            return self.cache[key]
        self.misses += 1
        states = [h[0].detach() for h in self.upstream([wav])["hidden_states"]]
        size = sum(h.numel() * h.element_size() for h in states)
        if _SHARED_BYTES[0] + size <= self.max_bytes:
            self.cache[key] = states
            _SHARED_BYTES[0] += size
        return states

    def forward(self, wavs: list[torch.Tensor]) -> dict:
        """[B] (S_b,) -> {'hidden_states': [L] (B, T_max, D) zero-padded, 'last_hidden_state'}."""
        per_utterance = [self._states(wav) for wav in wavs]
        frames = max(states[0].shape[0] for states in per_utterance)
        hidden = []
        for layer in range(len(per_utterance[0])):
            batch = per_utterance[0][layer].new_zeros(len(wavs), frames, per_utterance[0][layer].shape[-1])
            for i, states in enumerate(per_utterance):
                batch[i, :states[layer].shape[0]] = states[layer]
            hidden.append(batch)
        return {"hidden_states": hidden, "last_hidden_state": hidden[-1]}


class SharedCNNFeatures:
    """(cnn, wave (1, S)) -> (1, C, T) float32: the CNN's output for one utterance, read from
    FOLDER/<digest of the CNN's layout and weights>/<digest of the audio>.npy when some process wrote it
    there, else computed and written (atomically: processes share the folder). np.save / np.load keep
    every bit, so a read is the computed tensor itself."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.subfolders: dict[int, Path] = {}

    def _subfolder(self, cnn: nn.Module) -> Path:
        if id(cnn) not in self.subfolders:  # the CNN is frozen while a run uses it: one digest per module
            h = hashlib.blake2b(repr(cnn).encode(), digest_size=16)
            for name, tensor in sorted(cnn.state_dict().items()):
                h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
                h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self.subfolders[id(cnn)] = self.folder / h.hexdigest()
            self.subfolders[id(cnn)].mkdir(parents=True, exist_ok=True)
        return self.subfolders[id(cnn)]

    def __call__(self, cnn: nn.Module, wave: torch.Tensor) -> torch.Tensor:
        import numpy as np

        path = self._subfolder(cnn) / f"{_digest(wave)}.npy"
        try:
            return torch.from_numpy(np.load(path)).to(wave.device)
        except (OSError, ValueError, EOFError):  # not written yet, or damaged: computed (and written) again
            pass
        features = cnn(wave)
        array = features.detach().cpu().numpy()

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
                np.save(f, array)

        atomic_write(path, write)
        return features


class EarlyStop(Exception):
    """Raised out of s3prl's training loop when the dev metric stopped improving: at the start of
    the step after the evaluation that decided it, so that step's checkpoints are saved first."""


@contextlib.contextmanager
def downstream_savings(memoize_gib: float | None, patience: int | None, expdir_of,
                       cnn_features: str | None = None) -> Iterator[None]:
    """Memoisation, shared CNN features and early stopping in s3prl's downstream Runner, for the block."""
    from s3prl.downstream import runner as downstream_runner

    from s3prl_ekd.core.student import EKDStudent

    writers = []

    class TrackedWriter(downstream_runner.SummaryWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            writers.append(self)

    def get_upstream(original, self):
        entry = original(self)
        student = getattr(entry.model, "student", None)
        if cnn_features and not entry.trainable and isinstance(student, EKDStudent):
            student.cnn_features = SharedCNNFeatures(cnn_features)
        if memoize_gib and not entry.trainable:
            identity = json.dumps([self.args.upstream, self.args.upstream_ckpt, self.args.upstream_model_config])
            entry.model = MemoizedUpstream(entry.model, int(memoize_gib * 2**30), identity)
        return entry

    history = {"evaluations": [], "stale": 0, "stop_after": None}

    def evaluate(original, self, split=None, logger=None, global_step=0):
        names = original(self, split, logger, global_step)
        if patience and logger is not None and global_step:  # during training, not `-m evaluate`
            improved = any("best" in name for name in names)
            history["evaluations"].append({"step": global_step, "split": split, "improved": improved})
            history["stale"] = 0 if improved else history["stale"] + 1
            if history["stale"] >= patience:
                history["stop_after"] = global_step
        return names

    def stop_before_next_step(module, _inputs):
        if module.training and history["stop_after"] is not None:  # the featurizer trains; in eval it evaluates
            raise EarlyStop(history["stop_after"])

    def get_featurizer(original, self):
        entry = original(self)
        entry.model.register_forward_pre_hook(stop_before_next_step)
        return entry

    try:
        with patches.downstream_runner_hooks(get_upstream=get_upstream, evaluate=evaluate,
                                             get_featurizer=get_featurizer, summary_writer=TrackedWriter):
            yield
    except EarlyStop as stop:
        for writer in writers:
            writer.close()  # what the interrupted training loop would have flushed
        best = [e["step"] for e in history["evaluations"] if e["improved"]]
        atomic_write_json(Path(expdir_of()) / EARLY_STOP_NAME, {
            "stopped_at_step": int(str(stop)), "best_step": best[-1] if best else None, "patience": patience,
            "evaluations": history["evaluations"]})
        print(f"[s3prl-ekd] early stop at step {stop}: {patience} evaluations without a better dev metric")


# -- the command line --------------------------------------------------------------------------

def add_downstream_arguments(parser: argparse.ArgumentParser) -> None:
    s3prl = parser.add_argument_group("passed through to s3prl's run_downstream.py")
    _flag(s3prl, "-m", "mode", choices=["train", "evaluate", "inference"], required=True)
    _flag(s3prl, "-t", "evaluate_split", default="test", help="split to evaluate (default test)")
    _flag(s3prl, "-o", "override", metavar="KEY=VALUE,,...", help="override args./config. keys")
    _flag(s3prl, None, "backend", default="nccl", help="distributed backend")
    _flag(s3prl, None, "local_rank", type=int, help="set by torch.distributed.launch")
    _flag(s3prl, "-e", "past_exp", metavar="CKPT_OR_DIR", help="resume (train) or evaluate this checkpoint")
    _flag(s3prl, "-i", "init_ckpt", metavar="CKPT", help="load parameters only, for evaluation")
    _flag(s3prl, "-c", "config", metavar="YAML", help="downstream config (default: s3prl-ekd's SUPERB recipe "
                                                      "for -d ctc/asr/voxceleb1/emotion)")
    _flag(s3prl, "-d", "downstream", help="downstream expert, e.g. ctc (PR), asr, voxceleb1 (SID), emotion (ER)")
    _flag(s3prl, "-v", "downstream_variant", help="downstream variant of the expert")
    _flag(s3prl, None, "hub", default="torch", choices=["torch", "huggingface"], help="where -u comes from")
    _flag(s3prl, "-u", "upstream", help="upstream name in s3prl.hub, e.g. fbank, hubert_local, ekd_distiller")
    _flag(s3prl, "-k", "upstream_ckpt", metavar="PATH_OR_URL", help="upstream checkpoint")
    _flag(s3prl, "-g", "upstream_model_config", metavar="YAML", help="upstream options (ekd_distiller: "
                                                                      "hidden_states: backbone|heads|backbone+heads)")
    _flag(s3prl, "-r", "upstream_refresh", action="store_true", help="re-download cached upstream files")
    _flag(s3prl, "-f", "upstream_trainable", action="store_true", help="fine-tune the upstream")
    _flag(s3prl, "-s", "upstream_feature_selection", default="hidden_states", help="feature to extract")
    _flag(s3prl, "-l", "upstream_layer_selection", type=int, help="one layer of -s")
    _flag(s3prl, None, "upstream_feature_normalize", action="store_true", help="normalise features before the sum")
    _flag(s3prl, None, "upstream_model_name", default="model.pt", help="model file in a Hugging Face repo")
    _flag(s3prl, None, "upstream_revision", help="commit of the Hugging Face repo")
    _flag(s3prl, "-n", "expname", help="experiment name: results in ./result/downstream/NAME")
    _flag(s3prl, "-p", "expdir", help="experiment folder (instead of -n)")
    _flag(s3prl, "-a", "auto_resume", action="store_true", help="resume from the experiment folder's checkpoint")
    _flag(s3prl, None, "push_to_hf_hub", default=False, help="push the experiment folder to the Hugging Face Hub")
    _flag(s3prl, None, "hf_hub_org", help="Hugging Face organisation for --push-to-hf-hub")
    _flag(s3prl, None, "seed", type=int, default=1337)
    _flag(s3prl, None, "device", help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    _flag(s3prl, None, "cache_dir", help="download cache folder")
    s3prl.add_argument("--verbose", action="store_true", help="s3prl's model information printout")
    _flag(s3prl, None, "disable_cudnn", action="store_true", help="disable cuDNN")
    own = parser.add_argument_group("s3prl-ekd's own")
    own.add_argument("--memoize-upstream", type=float, metavar="GIB",
                     help="keep up to GIB of the frozen upstream's hidden states, computed once per utterance")
    own.add_argument("--early-stop", type=int, metavar="N",
                     help="stop after N evaluations without a better dev metric")
    own.add_argument("--share-cnn-features", metavar="DIR",
                     help="keep an ekd_distiller upstream's CNN output per utterance in DIR, for every process that "
                          "runs the same CNN on the same audio (with --memoize-upstream, which runs utterances alone)")


PASSED = ("mode", "evaluate_split", "override", "backend", "local_rank", "past_exp", "init_ckpt", "config",
          "downstream", "downstream_variant", "hub", "upstream", "upstream_ckpt", "upstream_model_config",
          "upstream_refresh", "upstream_trainable", "upstream_feature_selection", "upstream_layer_selection",
          "upstream_feature_normalize", "upstream_model_name", "upstream_revision", "expname", "expdir",
          "auto_resume", "push_to_hf_hub", "hf_hub_org", "seed", "device", "cache_dir", "verbose", "disable_cudnn")


def parse_downstream_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="s3prl-ekd downstream")
    add_downstream_arguments(parser)
    return parser.parse_args(argv)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "downstream", help="train / evaluate a downstream task with s3prl's run_downstream.py",
        description="s3prl's own run_downstream.py, from any directory, checked before it starts.")
    add_downstream_arguments(p)
    p.set_defaults(func=run_downstream)


def default_config(downstream: str) -> Path:
    """-c when none is given: s3prl's own config for the task where its install has one, else the SUPERB
    recipe s3prl-ekd ships (its data paths still need filling in, `s3prl-ekd prepare` writes them)."""
    from s3prl_ekd.io.resources import recipe_file

    own = installed_s3prl_dir() / "downstream" / downstream / "config.yaml"
    if own.is_file():
        return own
    if downstream in RECIPES:
        return recipe_file(RECIPES[downstream], "superb.yaml")
    raise ConfigError(f"-c: none given, and neither the installed s3prl (whose wheel ships no downstream configs) nor "
                      f"s3prl-ekd has a config for -d {downstream}; pass -c CONFIG")


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before s3prl starts; fills in the device and the config."""
    from s3prl_ekd.devices import resolve_device

    device_given = args.device is not None
    args.device = resolve_device(args.device)
    if not device_given:
        print(f"[s3prl-ekd] device: {args.device} (default: cuda when available; --device to choose)")
    if args.early_stop is not None and args.early_stop < 1:
        raise ConfigError(f"--early-stop {args.early_stop}: use a number of evaluations >= 1")
    if args.memoize_upstream is not None and args.memoize_upstream <= 0:
        raise ConfigError(f"--memoize-upstream {args.memoize_upstream}: use a positive number of GiB")
    if args.share_cnn_features and Path(args.share_cnn_features).exists() \
            and not Path(args.share_cnn_features).is_dir():
        raise ConfigError(f"--share-cnn-features {args.share_cnn_features}: is a file; give a folder (made if missing)")
    resuming = args.past_exp is not None or args.auto_resume
    if args.past_exp is not None and not Path(args.past_exp).exists():
        raise CheckpointError(f"-e {args.past_exp}: no such checkpoint or folder")
    for flag, path in (("-k", args.upstream_ckpt), ("-g", args.upstream_model_config), ("-c", args.config),
                       ("-i", args.init_ckpt)):
        if path and not str(path).startswith(("http://", "https://")) and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: {'is a folder, not a file' if Path(path).is_dir() else 'no such file'}")
    if resuming:
        return
    if args.upstream is None or args.downstream is None:
        raise ConfigError("a new run needs -u UPSTREAM and -d DOWNSTREAM (or -e CKPT to resume or evaluate)")
    if not (installed_s3prl_dir() / "downstream" / args.downstream / "expert.py").is_file():
        experts = sorted(p.name for p in (installed_s3prl_dir() / "downstream").iterdir() if (p / "expert.py").is_file())
        raise ConfigError(f"-d {args.downstream}: not an s3prl downstream expert; e.g. {', '.join(experts[:12])}")
    check_upstream_name(args.upstream)
    if args.upstream in ("ekd_distiller", "ekd_distiller_local") and args.upstream_ckpt \
            and not str(args.upstream_ckpt).startswith(("http://", "https://")):
        checkpoint.read_checkpoint(args.upstream_ckpt)  # a teacher's or another kind of file: one line
    if args.config is None:
        args.config = str(default_config(args.downstream))
        print(f"[s3prl-ekd] -c not given: {args.config}")


def check_upstream_name(name: str) -> None:
    """`name` is an entry of s3prl.hub (ekd_distiller included), or one line naming the close ones."""
    import difflib

    import s3prl.hub

    from s3prl_ekd import _startup

    _startup.install()  # ekd_distiller in s3prl.hub even without the .pth
    if not callable(getattr(s3prl.hub, name, None)):
        names = [n for n in dir(s3prl.hub) if not n.startswith("_") and callable(getattr(s3prl.hub, n))]
        close = difflib.get_close_matches(name, names, n=3)
        raise ConfigError(f"-u {name}: not an upstream in s3prl.hub" + (f"; did you mean {', '.join(close)}?" if close
                                                                         else "; e.g. fbank, hubert_local, ekd_distiller"))


def s3prl_argv(args: argparse.Namespace) -> list[str]:
    """run_downstream.py's command line for the checked `args`."""
    defaults = parse_downstream_args(["-m", "train"])
    argv = []
    for name in PASSED:
        value = getattr(args, name)
        if value == getattr(defaults, name) and name not in ("mode", "device"):
            continue
        flag = "--" + name
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv


@contextlib.contextmanager
def downstream_environment() -> Iterator[None]:
    """The patches every run of s3prl's downstream code needs here (s3prl_ekd.patches says why)."""
    with patches.soundfile_audio(), patches.voxceleb1_cache(), patches.isinstance_hack_once(), \
            patches.ctc_loader_config_copy(), patches.asr_lstm_unpacked():
        yield


def run_downstream(args: argparse.Namespace | list[str]) -> int:
    """s3prl's run_downstream.py for `args` (parsed, or a command line), plus our own flags."""
    if isinstance(args, list):
        args = parse_downstream_args(args)
    check_args(args)
    script = installed_s3prl_dir() / "run_downstream.py"
    expdir = args.expdir or (f"result/downstream/{args.expname}" if args.expname else None)
    savings = downstream_savings(args.memoize_upstream, args.early_stop, lambda: expdir, args.share_cnn_features)
    with downstream_environment(), savings, \
            patches.script_context(script, s3prl_argv(args), cwd=Path.cwd(), path=[script.parent]), \
            checkpoint.runner_checkpoints_allowed():
        runpy.run_path(str(script), run_name="__main__")
    return 0
