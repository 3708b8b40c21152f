"""Every run-time change s3prl-ekd makes to s3prl, torchaudio, torch or the standard library.

Nowhere else does the package replace a function, class, module attribute or global of code that
is not its own. Each change is a small named function or context manager, listed in PATCHES with
what it replaces, why, which stacks need it and the test that covers it. `reason_holds()` probes
the installed stack for the behaviour a patch works around: tests/test_patches.py runs every probe
on both supported stacks, so when an s3prl release fixes one, the suite says that its patch can go.
Context managers restore what they changed on exit; nothing is changed process-wide where a scoped
change does the job.

Heavy modules (torch, s3prl) are imported inside the functions: `_startup.py` imports this module
in every process that imports `s3prl.hub`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class Patch:
    name: str
    replaces: str       # what is changed, fully qualified
    why: str
    needed_on: str      # which s3prl distributions / versions / set-ups need it
    test: str           # the test that shows it works
    applies: Callable[[], bool]                 # does the installed stack need it
    reason_holds: Callable[[], bool] | None     # is the worked-around behaviour still there (None: a feature)


PATCHES: dict[str, Patch] = {}


def _always() -> bool:
    return True


def _patch(name: str, replaces: str, why: str, needed_on: str, test: str,
           applies: Callable[[], bool] = _always, reason_holds: Callable[[], bool] | None = None):
    """Record a patch; used as a decorator on the function that applies it."""
    def record(fn):
        PATCHES[name] = Patch(name, replaces, why, needed_on, test, applies, reason_holds)
        return fn
    return record


@contextlib.contextmanager
def _replaced(owner, **values) -> Iterator[None]:
    """`owner`'s attributes set to `values` for the block, then restored whatever happens."""
    saved = {name: getattr(owner, name) for name in values}
    for name, value in values.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


def _same_quotes(source: str) -> str:
    """Source text with double quotes as single ones: espnet-s3prl reformatted s3prl's code."""
    return source.replace('"', "'")


def _source(module_name: str, attribute: str | None = None) -> str:
    import inspect

    module = importlib.import_module(module_name)
    return _same_quotes(inspect.getsource(getattr(module, attribute) if attribute else module))


def _s3prl_dir():
    from pathlib import Path

    spec = importlib.util.find_spec("s3prl")
    return Path(spec.origin).parent


def _script_source(name: str) -> str:
    return _same_quotes((_s3prl_dir() / name).read_text())


# -- s3prl.hub: the upstream entries and the modules the wheel lacks -------------------------------

HUB_ENTRIES = ("ekd_distiller", "ekd_distiller_local", "ekd_distiller_url")


def _hub_has_no_plugin_registry() -> bool:
    return "entry_points" not in _source("s3prl.hub")


@_patch("hub_entries", "s3prl.hub: adds the attributes ekd_distiller, ekd_distiller_local, ekd_distiller_url",
        "s3prl.hub star-imports a fixed list of upstreams and has no plugin registry; run_downstream.py -u, "
        "S3PRLUpstream and ESPnet's S3prlFrontend look upstream names up there",
        "every stack (s3prl 0.4.18, espnet-s3prl 2026.5.14)",
        "tests/test_upstream.py::test_hub_entries_found_in_a_fresh_interpreter, "
        "tests/test_patches.py::test_broken_plugin",
        reason_holds=_hub_has_no_plugin_registry)
def add_hub_entries(hub_module) -> None:
    """Set the ekd_distiller entries on `hub_module`. If the plugin cannot load here, each entry is a
    function raising one line that says why, so `-u ekd_distiller` never just vanishes."""
    from s3prl_ekd.stack import stack_problem

    problem = stack_problem()
    if problem is None:
        try:
            from s3prl_ekd.upstream.ekd_distiller import hubconf

            for name in HUB_ENTRIES:
                setattr(hub_module, name, getattr(hubconf, name))
            return
        except Exception as error:  # any import failure of the plugin becomes the entries' message
            problem = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    for name in HUB_ENTRIES:
        setattr(hub_module, name, _unavailable(name, problem))


def _unavailable(name: str, problem: str):
    def entry(*args, **kwargs):
        raise ImportError(f"{name}: s3prl-ekd cannot load in this environment ({problem}); "
                          "`s3prl-ekd env` shows what is installed")

    entry.__name__ = name
    return entry


# s3prl module name -> our module providing it (None: an empty package)
MISSING_MODULES = {
    "s3prl.downstream.ctc.corpus": None,
    "s3prl.downstream.ctc.corpus.libriphone": "s3prl_ekd.plugin.libriphone",
}


def _wheel_lacks_libriphone() -> bool:
    return not (_s3prl_dir() / "downstream" / "ctc" / "corpus" / "libriphone.py").is_file()


class _ProvidedModule:
    """Loader of a MISSING_MODULES entry: a fresh module named as s3prl expects, filled from ours."""

    def __init__(self, provider: str | None):
        self.provider = provider

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if self.provider is not None:
            source = importlib.import_module(self.provider)
            module.__dict__.update({k: v for k, v in vars(source).items() if not k.startswith("__")})


@_patch("missing_modules", "import system: provides s3prl.downstream.ctc.corpus(.libriphone)",
        "s3prl's ctc expert (PR) imports its LibriPhone corpus loader from a folder the wheel does not ship",
        "every stack (s3prl 0.4.18, espnet-s3prl 2026.5.14)",
        "tests/test_patches.py::test_missing_module",
        reason_holds=_wheel_lacks_libriphone)
def missing_module_spec(fullname: str):
    import importlib.machinery

    from s3prl_ekd import _startup

    assert set(MISSING_MODULES) == _startup.MISSING, "_startup.MISSING and patches.MISSING_MODULES differ"
    provider = MISSING_MODULES[fullname]
    return importlib.machinery.ModuleSpec(fullname, _ProvidedModule(provider), is_package=provider is None)


PTH_NAME = "s3prl_ekd_hub.pth"


def register(site_dir=None):
    """Write the start-up hook into `site_dir` (default: this environment's site-packages). Idempotent."""
    import sysconfig
    from pathlib import Path

    pth = Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    pth.write_text((Path(__file__).parent / "plugin" / PTH_NAME).read_text())
    return pth


def unregister(site_dir=None):
    """Remove the start-up hook; returns its path, or None if there was none."""
    import sysconfig
    from pathlib import Path

    pth = Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    if not pth.is_file():
        return None
    pth.unlink()
    return pth


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("register", help="write (or --unregister: remove) the start-up hook that adds "
                                               "ekd_distiller to s3prl.hub (a wheel install ships it already)")
    p.add_argument("--unregister", action="store_true")

    def _register(args):
        if args.unregister:
            removed = unregister()
            print(f"removed {removed}" if removed else "no start-up hook to remove")
        else:
            print(f"wrote {register()}")
        return 0

    p.set_defaults(func=_register)


# -- running s3prl's scripts ------------------------------------------------------------------------

def _scripts_need_their_folder() -> bool:
    source = _script_source("run_pretrain.py")
    return "os.listdir('pretrain/')" in source and "from pretrain.runner import" in source


@_patch("script_context", "sys.argv, sys.path, the working directory; sys.modules['optimizers'] and "
        "['schedulers'] (aliases of s3prl.optimizers / s3prl.schedulers)",
        "s3prl's scripts parse sys.argv, import their siblings as top-level modules (pretrain.runner, "
        "optimizers, utility.helper) and list pretrain/ relative to the working directory; the aliases make "
        "the LR schedules they pickle into checkpoints `s3prl.optimizers.*`, loadable wherever s3prl is installed",
        "every stack", "tests/test_patches.py::test_checkpoint_names_s3prl_optimizers",
        reason_holds=_scripts_need_their_folder)
@contextlib.contextmanager
def script_context(script, argv: list[str], cwd, path: list) -> Iterator[None]:
    """sys.argv, sys.path and the working directory for running one of s3prl's scripts with runpy."""
    import s3prl.optimizers
    import s3prl.schedulers

    old_argv, old_cwd, old_path = sys.argv, os.getcwd(), list(sys.path)
    aliases = {"optimizers": s3prl.optimizers, "schedulers": s3prl.schedulers}
    old_modules = {name: sys.modules.get(name) for name in aliases}
    sys.argv = [str(script), *argv]
    sys.path[:0] = [str(p) for p in path]
    sys.modules.update(aliases)
    os.chdir(cwd)
    try:
        yield
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        for name, module in old_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        os.chdir(old_cwd)


# -- s3prl's pretrain runner ------------------------------------------------------------------------

def _pretrain_runner_source() -> str:
    """s3prl's pretrain/runner.py, read (it imports `optimizers` as a top-level module: not importable here)."""
    return _same_quotes((_s3prl_dir() / "pretrain" / "runner.py").read_text())


def _runner_saves_in_place() -> bool:
    source = _pretrain_runner_source()
    return "torch.save(all_states, save_path)" in source and "os.remove(ckpt_pth)" in source


class _Proxy:
    """Stands in for a module inside s3prl's runner: every name but the overridden ones is the module's."""

    def __init__(self, module, **overrides):
        self._module, self._overrides = module, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._module, name)


@_patch("atomic_runner_checkpoints", "pretrain.runner's module globals `torch` (save) and `os` (remove)",
        "s3prl's pretrain runner removes old checkpoints before writing the next one, with torch.save straight "
        "to its final name: a kill or a full disk loses checkpoints or leaves a truncated one",
        "every stack", "tests/test_runner.py::test_checkpoints_are_atomic_and_old_ones_go_after_the_new_one, "
        "tests/test_faults.py::test_kill_at_20_moments_then_resume_finishes_every_step",
        reason_holds=_runner_saves_in_place)
@contextlib.contextmanager
def atomic_runner_checkpoints(runner_module, writer: bool = True) -> Iterator[None]:
    """Within the block, the runner writes checkpoints atomically and removes old ones (its `max_keep`)
    only once the new one is complete. `writer=False` drops saves and removals (torchrun ranks but 0)."""
    import torch

    from s3prl_ekd.io.files import atomic_torch_save

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
        pending.append(path)

    with _replaced(runner_module, torch=_Proxy(torch, save=save), os=_Proxy(os, remove=remove)):
        yield


def _runner_logs_constant_lr() -> bool:
    import torch

    return "self.config['optimizer']['lr']" in _pretrain_runner_source() \
        and not hasattr(torch.optim.AdamW, "get_lr")


@_patch("scheduled_lr_logging", "pretrain.runner.get_optimizer (wrapped: PyTorch optimizers get a get_lr)",
        "s3prl's pretrain runner logs train-lr from optimizer.get_lr(), which only s3prl's own optimizers have; "
        "for `name: TorchOptim` (runner_fused_adamw.yaml) it logs the config's constant lr",
        "every stack", "tests/test_runner.py::test_torch_optimizers_log_the_scheduled_learning_rate",
        reason_holds=_runner_logs_constant_lr)
@contextlib.contextmanager
def scheduled_lr_logging(runner_module) -> Iterator[None]:
    original = runner_module.get_optimizer

    def get_optimizer(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        if not hasattr(optimizer, "get_lr"):
            optimizer.get_lr = lambda: [group["lr"] for group in optimizer.param_groups]
        return optimizer

    with _replaced(runner_module, get_optimizer=get_optimizer):
        yield


def _runner_has_no_ranks() -> bool:
    source = _pretrain_runner_source()
    return "get_rank" not in source and "is_leader_process" not in source


class _NullWriter:
    """tensorboardX.SummaryWriter that logs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@_patch("quiet_ranks", "pretrain.runner.SummaryWriter and pretrain.runner.tqdm, on torchrun ranks other than 0",
        "s3prl's pretrain runner has no notion of ranks: every process would write tensorboard logs and "
        "draw progress bars", "every stack",
        "tests/test_distributed.py::test_torchrun_run_is_killed_and_resumed_with_another_number_of_processes",
        reason_holds=_runner_has_no_ranks)
@contextlib.contextmanager
def quiet_ranks(runner_module) -> Iterator[None]:
    from tqdm import tqdm

    class QuietTqdm(tqdm):
        """Counts as tqdm does (s3prl's loop reads pbar.n) but prints nothing."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": open(os.devnull, "w")})

        @staticmethod
        def write(*args, **kwargs):
            pass

    with _replaced(runner_module, SummaryWriter=_NullWriter, tqdm=QuietTqdm):
        yield


# -- s3prl's downstream runner and datasets ---------------------------------------------------------

def _torchaudio_version() -> tuple[int, int]:
    import torchaudio

    return tuple(int(x) for x in torchaudio.__version__.split("+")[0].split(".")[:2])


def torchcodec_usable() -> bool:
    try:
        import torchcodec.decoders  # noqa: F401  (loads FFmpeg's libraries)
    except Exception:  # not installed, or FFmpeg missing / mismatched: either way unusable
        return False
    return True


def _needs_soundfile() -> bool:
    return _torchaudio_version() >= (2, 9) and not torchcodec_usable()


def _s3prl_datasets_call_torchaudio_load() -> bool:
    return "torchaudio.load(" in _source("s3prl.downstream.voxceleb1.dataset") \
        and "torchaudio.load(" in _source("s3prl.downstream.emotion.dataset")


def soundfile_load(uri, frame_offset: int = 0, num_frames: int = -1, normalize: bool = True,
                   channels_first: bool = True, **_):
    """torchaudio.load's result, (waveform (C, S) float32, sample rate), read with soundfile."""
    import soundfile as sf
    import torch

    stop = None if num_frames < 0 else frame_offset + num_frames
    data, rate = sf.read(str(uri), start=frame_offset, stop=stop, dtype="float32", always_2d=True)
    wave = torch.from_numpy(data)
    return (wave.T.contiguous() if channels_first else wave), rate


@_patch("soundfile_audio", "torchaudio.load (read with soundfile instead)",
        "s3prl's downstream datasets read audio with torchaudio.load, which from torchaudio 2.9 on needs "
        "torchcodec and FFmpeg; the files `prepare` writes are wav/flac, which soundfile reads",
        "torchaudio >= 2.9 without a usable torchcodec (espnet-s3prl stack)",
        "tests/test_downstream.py::test_downstream_environment_reads_audio_with_or_without_torchcodec",
        applies=_needs_soundfile, reason_holds=_s3prl_datasets_call_torchaudio_load)
@contextlib.contextmanager
def soundfile_audio() -> Iterator[None]:
    import torchaudio

    with _replaced(torchaudio, **({"load": soundfile_load} if _needs_soundfile() else {})):
        yield


def _voxceleb1_caches_in_package() -> bool:
    from s3prl.downstream.voxceleb1 import dataset

    return os.path.abspath(dataset.CACHE_PATH).startswith(str(_s3prl_dir()))


@_patch("voxceleb1_cache", "s3prl.downstream.voxceleb1.dataset.CACHE_PATH (a temporary folder per run)",
        "s3prl's SID dataset caches its file lists inside its own package folder and reuses them whatever "
        "the config says: runs on other data would read stale lists, and site-packages may be read-only",
        "every stack",
        "tests/test_downstream.py::test_downstream_environment_reads_audio_with_or_without_torchcodec",
        reason_holds=_voxceleb1_caches_in_package)
@contextlib.contextmanager
def voxceleb1_cache() -> Iterator[None]:
    import tempfile

    from s3prl.downstream.voxceleb1 import dataset

    with tempfile.TemporaryDirectory(prefix="s3prl-ekd-voxceleb1-cache-") as cache, \
            _replaced(dataset, CACHE_PATH=cache + "/"):
        yield


def _hack_nests() -> bool:
    import builtins

    from s3prl.utility import helper

    original = builtins.isinstance
    try:
        helper.hack_isinstance()
        once = builtins.isinstance
        helper.hack_isinstance()
        return builtins.isinstance is not once
    finally:
        builtins.isinstance = original


@_patch("isinstance_hack_once", "s3prl.utility.helper.hack_isinstance (wraps builtins.isinstance once per process)",
        "run_downstream.py's main() wraps builtins.isinstance in a Python function every time it runs: runs "
        "in one process (`superb --in-process`) nest the wrappers, and after 8 runs every isinstance costs 8 calls",
        "every stack", "tests/test_downstream.py::test_in_process_runs_wrap_isinstance_once",
        reason_holds=_hack_nests)
@contextlib.contextmanager
def isinstance_hack_once() -> Iterator[None]:
    import builtins

    from s3prl.utility import helper

    saved = helper.hack_isinstance

    def once():
        if getattr(builtins.isinstance, "__qualname__", "") != "hack_isinstance.<locals>.isinstance":
            saved()

    with _replaced(helper, hack_isinstance=once):
        yield


def _ctc_loader_pops_workers() -> bool:
    from s3prl.downstream.ctc import data

    class Stop(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Stop

    corpus = {"num_workers": 0}
    with _replaced(data, create_dataset=refuse), contextlib.suppress(Stop):
        data.load_dataset("train", None, corpus)
    return "num_workers" not in corpus


@_patch("ctc_loader_config_copy", "s3prl.downstream.ctc.expert.load_dataset (called with a copy of the corpus config)",
        "s3prl's ctc expert (PR) pops num_workers out of the shared corpus config when it builds the train "
        "loader, so dev and test loaders fall back to 12 worker processes whatever the recipe says",
        "every stack", "tests/test_downstream.py::test_every_ctc_loader_gets_the_recipes_num_workers",
        reason_holds=_ctc_loader_pops_workers)
@contextlib.contextmanager
def ctc_loader_config_copy() -> Iterator[None]:
    from s3prl.downstream.ctc import expert

    saved = expert.load_dataset
    with _replaced(expert, load_dataset=lambda split, tokenizer, corpus: saved(split, tokenizer, dict(corpus))):
        yield


def _downstream_has_no_early_stop() -> bool:
    return "patience" not in _script_source("run_downstream.py") and "early" not in _script_source("run_downstream.py")


@_patch("downstream_savings", "s3prl.downstream.runner.Runner._get_upstream, .evaluate, ._get_featurizer and "
        "the module's SummaryWriter", "`--memoize-upstream` (a frozen upstream runs once per utterance), "
        "`--share-cnn-features` (an ekd_distiller CNN's output per utterance shared by processes) and "
        "`--early-stop` (stop when dev stops improving), which s3prl's downstream runner does not offer",
        "every stack (opt-in flags of `s3prl-ekd downstream`)",
        "tests/test_downstream.py::test_early_stop_and_memoized_run_through_run_downstream",
        reason_holds=_downstream_has_no_early_stop)
@contextlib.contextmanager
def downstream_runner_hooks(get_upstream=None, evaluate=None, get_featurizer=None,
                            summary_writer=None) -> Iterator[None]:
    """Replace the given Runner methods (each called with the original as its first argument) and the
    SummaryWriter class for the block."""
    from s3prl.downstream import runner

    Runner = runner.Runner
    methods = {"_get_upstream": get_upstream, "evaluate": evaluate, "_get_featurizer": get_featurizer}

    def wrap(method, replacement):
        return lambda self, *a, **k: replacement(method, self, *a, **k)

    wrapped = {name: wrap(getattr(Runner, name), fn) for name, fn in methods.items() if fn is not None}
    with _replaced(Runner, **wrapped), \
            _replaced(runner, **({"SummaryWriter": summary_writer} if summary_writer is not None else {})):
        yield


def _asr_lstm_runs_packed() -> bool:
    return "pack_padded_sequence(input_x" in "".join(_source("s3prl.downstream.asr.model", "RNNLayer").split())


def _reversed_within(x, lengths):
    """(B, T, D) -> the same with each sequence's first lengths[b] frames in reverse order (the rest kept)."""
    import torch

    steps = torch.arange(x.shape[1], device=x.device)[None, :]
    ends = lengths.to(x.device)[:, None]
    order = torch.where(steps < ends, ends - 1 - steps, steps)
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[2]))


def bilstm_on_padded(lstm, x, lengths):
    """A one-layer bidirectional batch-first nn.LSTM over zero-padded `x` (B, T, D) with `lengths` (B,),
    computed as two unidirectional passes on padded input, the reverse one on each sequence reversed
    within its length: what the packed call computes, -> (B, T, 2H) zero beyond each length. On CPU this
    runs oneDNN's fused LSTM; packed sequences run one autograd step per frame."""
    import torch

    state = x.new_zeros(1, x.shape[0], lstm.hidden_size)
    forward = torch._VF.lstm(x, (state, state), [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0,
                                                  lstm.bias_hh_l0], True, 1, 0.0, lstm.training, False, True)[0]
    backward = torch._VF.lstm(_reversed_within(x, lengths), (state, state),
                              [lstm.weight_ih_l0_reverse, lstm.weight_hh_l0_reverse, lstm.bias_ih_l0_reverse,
                               lstm.bias_hh_l0_reverse], True, 1, 0.0, lstm.training, False, True)[0]
    valid = torch.arange(x.shape[1], device=x.device)[None, :, None] < lengths.to(x.device)[:, None, None]
    return torch.cat([forward, _reversed_within(backward, lengths)], dim=-1) * valid


def _bilstm_packed(lstm, packed, hx=None):
    """nn.LSTM's call on a PackedSequence, through `bilstm_on_padded`: -> (PackedSequence, None)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    x, lengths = pad_packed_sequence(packed, batch_first=True)
    out = bilstm_on_padded(lstm, x, lengths)
    return pack_padded_sequence(out, lengths, batch_first=True, enforce_sorted=False), None


@_patch("asr_lstm_unpacked", "the LSTM call inside s3prl.downstream.asr.model.RNNLayer.forward (CPU, one-layer "
        "bidirectional LSTM)", "s3prl's ASR downstream runs its BLSTM on packed sequences, which PyTorch's CPU "
        "implementation computes one autograd step per frame; two unidirectional passes on padded input (the "
        "reverse one on each sequence reversed within its length) compute the same outputs with oneDNN's fused "
        "kernel, 5-6x faster per training step (benchmarks/RESULTS.md, \"Demo recipes\"). Outputs and gradients "
        "equal the packed call's within float32 rounding", "every stack, on CPU",
        "tests/test_patches.py::test_unpacked_blstm_equals_the_packed_one", reason_holds=_asr_lstm_runs_packed)
@contextlib.contextmanager
def asr_lstm_unpacked() -> Iterator[None]:
    import functools

    import torch
    from s3prl.downstream.asr import model

    original = model.RNNLayer.forward

    def forward(self, input_x, x_len):
        lstm = self.layer
        if not (isinstance(lstm, torch.nn.LSTM) and lstm.bidirectional and lstm.num_layers == 1
                and lstm.batch_first and input_x.device.type == "cpu" and input_x.dtype == torch.float32):
            return original(self, input_x, x_len)
        lstm.forward = functools.partial(_bilstm_packed, lstm)
        try:
            return original(self, input_x, x_len)
        finally:
            del lstm.forward

    with _replaced(model.RNNLayer, forward=forward):
        yield


# -- models -------------------------------------------------------------------------------------------

@_patch("pos_conv_float32", "forward of each `pos_conv` module instance (s3prl's HuBERT, WavLM, DistillerModel)",
        "under half-precision autocast cuDNN runs this grouped kernel-128 convolution several times slower than "
        "in float32 (benchmarks/RESULTS.md, GPU section); parameter names are unchanged",
        "CUDA with teacher_dtype or fp16 in half precision (fp32_pos_conv: true)",
        "tests/test_bench.py::test_bench_fp32_pos_conv_flag_reaches_the_models")
def keep_pos_conv_fp32(model) -> int:
    """Make every `pos_conv` under `model` run in float32 with autocast off. Returns how many. Not for
    nn.DataParallel, whose replicas would call the original module."""
    import torch
    from torch import nn

    wrapped = 0
    for module in list(model.modules()):
        conv = getattr(module, "pos_conv", None)
        if isinstance(conv, nn.Module) and not getattr(conv, "runs_in_float32", False):
            original = conv.forward

            def forward(x: torch.Tensor, _original=original) -> torch.Tensor:
                with torch.autocast(x.device.type, enabled=False):
                    return _original(x.float())

            conv.forward = forward
            conv.runs_in_float32 = True
            wrapped += 1
    return wrapped


# -- what a user sees -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class KnownWarning:
    """A warning (by category and start of message) that a user cannot act on, and who emits it."""

    category: type
    message: str     # regular expression matched against the start of the message
    emitted_by: str  # the package and versions seen emitting it


def _known_warnings() -> list[KnownWarning]:
    return [
        KnownWarning(UserWarning, r"torchaudio\._backend\.set_audio_backend has been deprecated",
                     "torchaudio 2.8, called by s3prl 0.4.18 (byol_s, s3prl.dataio) when s3prl.hub is imported"),
        KnownWarning(UserWarning, r"In 2\.9, this function's implementation will be changed",
                     "torchaudio 2.8 (torchaudio.load / info, called by s3prl's datasets)"),
        KnownWarning(FutureWarning, r"`torch\.cuda\.amp\.(GradScaler|autocast)\(args\.\.\.\)` is deprecated",
                     "torch >= 2.4, called by s3prl's runners"),
        KnownWarning(FutureWarning, r"`?torch\.nn\.utils\.weight_norm`? is deprecated",
                     "torch >= 2.1, called by s3prl's HuBERT / WavLM / DistillerModel constructors"),
        KnownWarning(UserWarning, r"This overload of add_ is deprecated",
                     "torch >= 1.5, called by s3prl's AdamW_with_schedule (s3prl/optimizers.py)"),
        KnownWarning(UserWarning, r"This overload of nonzero is deprecated", "torch, called by fairseq-style masking"),
        KnownWarning(FutureWarning, r"You are using `torch\.load` with `weights_only=False`",
                     "torch 2.4-2.5, called by s3prl"),
        KnownWarning(UserWarning, r"Support for mismatched key_padding_mask and attn_mask is deprecated",
                     "torch >= 2.0 (nn.functional.multi_head_attention_forward), called by s3prl's HuBERT / WavLM "
                     "attention on padded batches"),
    ]


# (logger, start of message) of log lines s3prl writes on import that say nothing about this package's work.
KNOWN_LOG_LINES = (("s3prl.upstream.espnet_hubert.expert", "ESPnet is not installed, cannot use espnet_hubert"),)


class _DropKnown:
    """logging filter dropping one known message."""

    def __init__(self, start: str):
        self.start = start

    def filter(self, record) -> bool:
        return not record.getMessage().startswith(self.start)


@_patch("known_warnings", "warnings filters and logging filters (inside `s3prl-ekd` commands, not with -v)",
        "s3prl, torchaudio and torch warn about deprecations a user of this package cannot act on, and s3prl "
        "logs that ESPnet is missing whenever s3prl.hub is imported", "the versions in KnownWarning.emitted_by",
        "tests/test_patches.py::test_known_warnings_are_filtered_only_inside, "
        "tests/test_patches.py::test_tiny_pretrain_is_quiet")
@contextlib.contextmanager
def known_warnings_filtered() -> Iterator[None]:
    import logging

    filters = [(logging.getLogger(name), _DropKnown(start)) for name, start in KNOWN_LOG_LINES]
    with warnings.catch_warnings():
        for known in _known_warnings():
            warnings.filterwarnings("ignore", message=known.message, category=known.category)
        for logger, drop in filters:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger, drop in filters:
                logger.removeFilter(drop)


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Within our entry points: the known harmless warnings and log lines filtered, and progress bars as
    plain periodic lines when stderr is not a terminal. `verbose` leaves everything as it is."""
    if verbose:
        yield
        return
    with known_warnings_filtered(), plain_progress_bars():
        yield


def _runner_draws_bars() -> bool:
    return "tqdm(" in _source("s3prl.downstream.runner") and "tqdm(" in _pretrain_runner_source()


PROGRESS_EVERY_SECONDS = 30.0


class _Lines:
    """A bar's output stream that drops what tqdm writes around a frame (empty writes, the newline after
    the last one), since each frame already is a whole line."""

    def __init__(self, stream):
        self.stream, self.at_line_start = stream, True

    def write(self, text: str):
        if text in ("", "\r") or (text == "\n" and self.at_line_start):
            return
        self.stream.write(text)
        self.at_line_start = text.endswith("\n")

    def __getattr__(self, name):
        return getattr(self.stream, name)


@_patch("plain_progress_bars", "tqdm.tqdm.display / its defaults, while stderr is not a terminal",
        "s3prl's runners draw tqdm bars with carriage returns: log files fill with thousands of frames",
        "every stack", "tests/test_patches.py::test_progress_lines_without_a_terminal",
        reason_holds=_runner_draws_bars)
@contextlib.contextmanager
def plain_progress_bars(every: float = PROGRESS_EVERY_SECONDS) -> Iterator[None]:
    """While stderr is not a terminal, every tqdm bar prints its state as one plain line at most every
    `every` seconds, and once when it closes."""
    if sys.stderr.isatty():
        yield
        return
    from tqdm import tqdm

    saved_init = tqdm.__init__

    def __init__(self, *args, **kwargs):
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), every)
        kwargs["dynamic_ncols"] = False
        kwargs.setdefault("ncols", 100)
        saved_init(self, *args, **kwargs)
        if getattr(self, "fp", None) is not None:
            self.fp = _Lines(self.fp)
        self.display = types.MethodType(display, self)  # a bar made here stays plain after the block

    def display(self, msg=None, pos=None):
        if getattr(self, "_plain_last", None) == self.n:
            return True
        self._plain_last = self.n
        self.fp.write((msg if msg is not None else self.__str__()).strip() + "\n")
        self.fp.flush()
        return True

    with _replaced(tqdm, __init__=__init__, display=display):
        yield
