"""Running s3prl's own run_downstream.py (`s3prl-ekd downstream`), with what it needs here and two
opt-in savings that leave s3prl's training itself unchanged:

- `--memoize-upstream GIB`: the upstream is frozen and un-augmented in SUPERB's protocol, so each
  utterance needs one forward, not one per epoch and per evaluation: its hidden states are kept
  (up to GIB of them, in memory) and reused, also by later runs in the same process with the same
  upstream (`superb --in-process`: every task and learning rate). Each utterance is run alone, so
  its features do not depend on what it is batched with.
- `--early-stop N`: stop when N evaluations in a row did not improve the dev metric (the expert's
  own best-checkpoint decision); `early_stop.json` in the experiment folder says when and why.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import runpy
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from s3prl_ekd.errors import ConfigError
from s3prl_ekd.io.files import atomic_write_json
from s3prl_ekd.plugin.runner import installed_s3prl_dir, script_context

EARLY_STOP_NAME = "early_stop.json"


def torchcodec_usable() -> bool:
    try:
        import torchcodec.decoders  # noqa: F401  (loads FFmpeg's libraries)
    except Exception:  # not installed, or FFmpeg missing / mismatched: either way unusable
        return False
    return True


def soundfile_load(uri, frame_offset: int = 0, num_frames: int = -1, normalize: bool = True,
                   channels_first: bool = True, **_):
    """torchaudio.load's result, (waveform (C, S) float32, sample rate), read with soundfile."""
    import soundfile as sf

    stop = None if num_frames < 0 else frame_offset + num_frames
    data, rate = sf.read(str(uri), start=frame_offset, stop=stop, dtype="float32", always_2d=True)
    wave = torch.from_numpy(data)
    return (wave.T.contiguous() if channels_first else wave), rate


@contextlib.contextmanager
def downstream_environment() -> Iterator[None]:
    """What s3prl's downstream datasets need here, for the duration of the block:

    - on torchaudio >= 2.9 without a usable torchcodec, `torchaudio.load` reads with soundfile
      (s3prl's datasets only read the wav/flac files `prepare` writes, which soundfile reads);
    - the voxceleb1 expert caches its file lists in s3prl's own package folder and reuses them
      whatever the config says: a temporary folder keeps runs apart and site-packages untouched;
    - the ctc expert (PR) pops `num_workers` out of its corpus config when it builds the train
      loader, so dev and test loaders fall back to 12 worker processes whatever the recipe says
      (forked at every dev evaluation); each loader gets a copy of the config instead.
    """
    import torchaudio
    from s3prl.downstream.ctc import expert as ctc_expert
    from s3prl.downstream.voxceleb1 import dataset as voxceleb1_dataset
    from s3prl.utility import helper

    version = tuple(int(x) for x in torchaudio.__version__.split("+")[0].split(".")[:2])
    saved_load, saved_cache, saved_hack = torchaudio.load, voxceleb1_dataset.CACHE_PATH, helper.hack_isinstance
    saved_ctc_loader = ctc_expert.load_dataset
    if version >= (2, 9) and not torchcodec_usable():
        torchaudio.load = soundfile_load
    helper.hack_isinstance = lambda: _hack_isinstance_once(saved_hack)
    ctc_expert.load_dataset = lambda split, tokenizer, corpus: saved_ctc_loader(split, tokenizer, dict(corpus))
    try:
        with tempfile.TemporaryDirectory(prefix="s3prl-ekd-voxceleb1-cache-") as cache:
            voxceleb1_dataset.CACHE_PATH = cache + "/"
            yield
    finally:
        torchaudio.load, voxceleb1_dataset.CACHE_PATH, helper.hack_isinstance = saved_load, saved_cache, saved_hack
        ctc_expert.load_dataset = saved_ctc_loader


def _hack_isinstance_once(hack) -> None:
    """s3prl's main() wraps `builtins.isinstance` in a Python function on every call. Runs in one
    process (`superb --in-process`) would nest the wrappers, and every isinstance would pay one call
    per earlier run: after 8 runs s3prl's ASR test took 47 s instead of 4 s. Wrap once per process,
    as a process of its own would."""
    import builtins

    if getattr(builtins.isinstance, "__qualname__", "") != "hack_isinstance.<locals>.isinstance":
        hack()


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


class EarlyStop(Exception):
    """Raised out of s3prl's training loop when the dev metric stopped improving: at the start of
    the step after the evaluation that decided it, so that step's checkpoints are saved first."""


@contextlib.contextmanager
def downstream_savings(memoize_gib: float | None, patience: int | None, expdir_of) -> Iterator[None]:
    """Patch s3prl's downstream Runner (for this process) with memoisation and early stopping."""
    from s3prl.downstream import runner as downstream_runner

    Runner = downstream_runner.Runner
    saved = (Runner._get_upstream, Runner.evaluate, downstream_runner.SummaryWriter, Runner._get_featurizer)
    writers = []

    class TrackedWriter(downstream_runner.SummaryWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            writers.append(self)

    def get_upstream(self):
        entry = saved[0](self)
        if memoize_gib and not entry.trainable:
            identity = json.dumps([self.args.upstream, self.args.upstream_ckpt, self.args.upstream_model_config])
            entry.model = MemoizedUpstream(entry.model, int(memoize_gib * 2**30), identity)
        return entry

    history = {"evaluations": [], "stale": 0, "stop_after": None}

    def evaluate(self, split=None, logger=None, global_step=0):
        names = saved[1](self, split, logger, global_step)
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

    def get_featurizer(self):
        entry = saved[3](self)
        entry.model.register_forward_pre_hook(stop_before_next_step)
        return entry

    downstream_runner.SummaryWriter = TrackedWriter
    Runner._get_upstream = get_upstream
    Runner.evaluate = evaluate
    Runner._get_featurizer = get_featurizer
    try:
        yield
    except EarlyStop as stop:
        for writer in writers:
            writer.close()  # what the interrupted training loop would have flushed
        best = [e["step"] for e in history["evaluations"] if e["improved"]]
        atomic_write_json(Path(expdir_of()) / EARLY_STOP_NAME, {
            "stopped_at_step": int(str(stop)), "best_step": best[-1] if best else None, "patience": patience,
            "evaluations": history["evaluations"]})
        print(f"[s3prl-ekd] early stop at step {stop}: {patience} evaluations without a better dev metric")
    finally:
        Runner._get_upstream, Runner.evaluate, downstream_runner.SummaryWriter, Runner._get_featurizer = saved


def _split_own_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--memoize-upstream", type=float, metavar="GIB")
    parser.add_argument("--early-stop", type=int, metavar="N")
    own, rest = parser.parse_known_args(argv)
    if own.early_stop is not None and own.early_stop < 1:
        raise ConfigError(f"--early-stop {own.early_stop}: use a number of evaluations >= 1")
    if own.memoize_upstream is not None and own.memoize_upstream <= 0:
        raise ConfigError(f"--memoize-upstream {own.memoize_upstream}: use a positive number of GiB")
    return own, rest


def run_downstream(argv: list[str]) -> int:
    """s3prl's run_downstream.py with `argv` (it runs from any directory), plus our two flags."""
    from s3prl_ekd import _startup

    _startup.install()  # ekd_distiller in s3prl.hub even without the .pth

    own, argv = _split_own_flags(argv)
    expdir = argparse.ArgumentParser(add_help=False)
    expdir.add_argument("-p", "--expdir")
    known, _ = expdir.parse_known_args(argv)
    script = installed_s3prl_dir() / "run_downstream.py"
    with downstream_environment(), downstream_savings(own.memoize_upstream, own.early_stop, lambda: known.expdir), \
            script_context(script, argv, cwd=Path.cwd(), path=[script.parent]):
        runpy.run_path(str(script), run_name="__main__")
    return 0
