"""Benchmark of EKD pretraining (`s3prl-ekd bench`): does a training step cost what its parts must?

Live step: K frozen teachers forward + the student forward/backward. Cached step (`--targets DIR`,
a teacher-target store): the student alone. Everything runs in one process with random-weight
teachers of the real architectures, the real pretrain expert and the optimizer s3prl's runner
builds from the runner config. Each timed step is cut into synchronised segments (teachers,
student forward, targets + loss, backward, optimizer), so the overhead of a step over its parts
is measured inside that very step and cannot come out below 1; repetitions are interleaved and
reported as median and spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from s3prl_ekd.core.config import AGGREGATIONS, PAPER_AGGREGATIONS
from s3prl_ekd.core.frames import parse_conv_layers
from s3prl_ekd.core.student import EKDStudent, distilhubert_base, ekd_student_tiny
from s3prl_ekd.errors import UserError
from s3prl_ekd.io.audio import SAMPLE_RATE
from s3prl_ekd.io.files import atomic_write_json, atomic_write_text
from s3prl_ekd.io.resources import pretrain_config

# The three teachers of the paper (HuBERT Base, RobustHuBERT, WavLM Base+) as random-weight
# models of the same architectures: (label, checkpoint kind, s3prl hub entry, seed). K uses the first K.
TEACHERS = (("hubert", "hubert", "hubert_local", 0),
            ("hubert_robust", "hubert", "hubert_local", 1),
            ("wavlm", "wavlm", "wavlm_local", 2))
# Hidden states the heads predict: DistilHuBERT's 4, 8, 12 for Base; all 3 layers of the tiny teachers.
TEACHER_LAYERS = {"base": [4, 8, 12], "tiny": [1, 2, 3]}
# Student of each size: DistilHuBERT (2 layers x 768, CNN + layers copied from the first teacher),
# or the tiny student of pretrain_configs/tiny_cpu.yaml.
STUDENTS = {"base": distilhubert_base, "tiny": ekd_student_tiny}
# The runner config whose optimizer, total steps and clipping the timed step uses (DistilHuBERT's recipe).
RUNNER_CONFIG = "runner.yaml"
LOG_STEP = 50  # steps are numbered so that none logs (as 49 of 50 runner steps)
# Dense bfloat16 peak of the GPUs this project is lent (tensor cores, no sparsity), FLOP/s.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
SEGMENTS = ("teachers", "student_forward", "targets_loss", "backward", "optimizer")


@dataclass
class BenchSetting:
    """What is measured: sizes, batch, repetitions."""

    size: str = "tiny"                  # "tiny" | "base" (HuBERT Base / WavLM Base+ architectures)
    device: str = "cpu"                 # "cpu" | "cuda"
    ks: tuple[int, ...] = (1, 2, 3)
    modes: tuple[str, ...] = PAPER_AGGREGATIONS  # any of AGGREGATIONS
    batch_size: int = 4
    seconds: float = 1.0                # length of every utterance of the timed batch
    reps: int = 3                       # timed repetitions (median reported) after `warmup` ones
    warmup: int = 1
    inference_seconds: float = 10.0     # input of the student vs HuBERT inference comparison
    loader_steps: int = 4               # training steps of the data-loader run
    loader_workers: int = 2
    teacher_dtype: str = "float32"      # autocast dtype of the teachers (CUDA only)
    amp: bool = False                   # the runner's fp16 autocast + GradScaler (CUDA only)
    fp32_pos_conv: bool = True          # the model config's fp32_pos_conv (off: what autocast picks)
    threads: int | None = None          # torch intra-op threads (None: torch's default)
    runner_config: str = RUNNER_CONFIG  # a shipped runner config (its optimizer) or a path
    targets: str | None = None          # target store folder for the cached step (built here if absent)


def default_setting(size: str = "tiny", device: str = "cpu", **overrides) -> BenchSetting:
    """Batch and repetitions fit for `size` on `device` (4 x 4 s on CPU, the paper's 24 x 15.6 s on GPU)."""
    if size not in TEACHER_LAYERS:
        raise UserError(f"--size {size!r}: use one of {', '.join(TEACHER_LAYERS)}")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: use cpu or cuda")
    if device == "cuda":
        base = dict(batch_size=24, seconds=250000 / SAMPLE_RATE, reps=10, warmup=3, loader_steps=10,
                    loader_workers=min(8, os.cpu_count() or 1), teacher_dtype="bfloat16", amp=True)
    elif size == "base":
        base = dict(batch_size=4, seconds=4.0, reps=5, warmup=1, loader_steps=5)
    else:
        base = dict(batch_size=4, seconds=2.0, reps=3, warmup=1, loader_steps=4)
    return BenchSetting(size=size, device=device, **{**base, **overrides})


# -- measuring ---------------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of fn(), synchronised."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


class PeakMemory:
    """Peak memory since `reset()`: resident set size on CPU, allocated tensor bytes on CUDA.

    On Linux the RSS high-water mark is reset through /proc/self/clear_refs; where that is
    not possible the process-lifetime peak (getrusage) is reported and `kind` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "rss_since_reset"

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)
        except OSError:
            self.kind = "rss_process_lifetime_peak"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "rss_since_reset":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def timed_batch(setting: BenchSetting, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The live step's batch: (B, S) noise at speech level, the last utterance 3/4 long (padding, as in a bucket)."""
    samples = int(round(setting.seconds * SAMPLE_RATE))
    generator = torch.Generator().manual_seed(seed)
    wave = 0.1 * torch.randn(setting.batch_size, samples, generator=generator)
    lengths = torch.full((setting.batch_size,), samples, dtype=torch.long)
    if setting.batch_size > 1:
        lengths[-1] = samples * 3 // 4
        wave[-1, lengths[-1]:] = 0.0
    return wave.to(device), lengths.to(device)


def runner_config(name: str = RUNNER_CONFIG) -> dict:
    import yaml

    path = Path(name) if Path(name).is_file() else pretrain_config(name)
    return yaml.safe_load(path.read_text())


class Segments:
    """Synchronised timestamps inside one training step, from hooks on the teachers and the student."""

    def __init__(self, expert, device: torch.device):
        self.device, self.marks, self.handles = device, {}, []
        modules = {"student": expert.model}
        if expert.teachers is not None:
            modules["teachers"] = expert.teachers
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(lambda *_, n=name: self.mark(f"{n}_start")))
            self.handles.append(module.register_forward_hook(lambda *_, n=name: self.mark(f"{n}_end")))

    def mark(self, name: str) -> None:
        _synchronize(self.device)
        self.marks[name] = time.perf_counter()

    def seconds(self) -> dict[str, float]:
        m = self.marks
        teachers = m["teachers_end"] - m["teachers_start"] if "teachers_start" in m else 0.0
        student = m["student_end"] - m["student_start"]
        return {"teachers": teachers, "student_forward": student,
                "targets_loss": m["forward_end"] - m["step_start"] - teachers - student,
                "backward": m["backward_end"] - m["forward_end"], "optimizer": m["step_end"] - m["backward_end"]}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class TrainStep:
    """The s3prl pretrain runner's step on an expert (forward, backward, unscale, clip, optimizer step,
    zero_grad), with the optimizer s3prl builds from the runner config. tests/test_bench.py checks
    that it updates the student exactly as s3prl's own Runner.train does."""

    def __init__(self, expert, setting: BenchSetting, config: dict | None = None):
        from s3prl.optimizers import get_optimizer

        config = config or runner_config(setting.runner_config)
        self.expert = expert
        self.clipping = config["runner"]["gradient_clipping"]
        self.optimizer = get_optimizer([expert.model], config["runner"]["total_steps"], config["optimizer"])
        self.amp = setting.amp and setting.device == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.global_step = 1

    def __call__(self, data, segments: Segments | None = None) -> float:
        mark = segments.mark if segments else (lambda _: None)
        mark("step_start")
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            loss, _ = self.expert(data, records=None, global_step=self.global_step, log_step=LOG_STEP)
        mark("forward_end")
        self.global_step += 1 if (self.global_step + 1) % LOG_STEP else 2
        if self.amp:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        mark("backward_end")
        value = loss.item()
        if self.amp:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.expert.model.parameters(), self.clipping)
        if self.amp:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not math.isnan(grad_norm):
            self.optimizer.step()
        self.expert.on_before_zero_grad()
        self.optimizer.zero_grad()
        mark("step_end")
        return value


def student_step(expert, data, amp: bool) -> None:
    """Student forward + loss against the batch's targets + backward: what a cached step cannot avoid."""
    wave, lengths, targets, frames = data
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        out = expert.model(wave, lengths)
        loss = expert.objective(out.predictions, out.frame_lengths, expert.objective.targets(targets), frames).loss
    loss.backward()


def _drop_grads(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def teacher_checks(expert, step: TrainStep, data) -> dict:
    """One extra (untimed) step that records how often each teacher runs and what it returns."""
    calls = [0] * len(expert.teachers.upstreams)
    handles = [upstream.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, upstream in enumerate(expert.teachers.upstreams)]
    try:
        step(data)
    finally:
        for handle in handles:
            handle.remove()
    wave, lengths = data
    hiddens = expert.teachers([w[:n] for w, n in zip(wave, lengths.tolist())])
    return {
        "teacher_calls_per_step": calls,
        "teacher_params_requiring_grad": sum(p.requires_grad for p in expert.teachers.parameters()),
        "teacher_outputs_inference_mode": all(h.is_inference() and not h.requires_grad for h in hiddens),
        # Only the selected layers come back: (B, L, T, D) with L = len(layers), per teacher.
        "teacher_layers_kept": [h.shape[1] for h in hiddens],
    }


def step_flops(step: TrainStep, data) -> float:
    """FLOPs of one step (forward and backward; the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(data)
    return float(counter.get_total_flops())


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def measure(expert, setting: BenchSetting, data, alone: dict[str, Callable[[], object]], memory: PeakMemory) -> dict:
    """Interleaved repetitions of the instrumented step and of the parts timed alone; medians and spread."""
    device = torch.device(setting.device)
    step = TrainStep(expert, setting)
    memory.reset()
    parts = {"t_step": lambda: None, **alone}
    times = {name: [] for name in parts}
    segments_per_rep = []
    names = list(parts)
    for rep in range(setting.warmup + setting.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # no part always follows the same one
        for name in order:
            if name == "t_step":
                segments = Segments(expert, device)
                try:
                    seconds = _timed(lambda: step(data, segments), device)
                finally:
                    segments.remove()
                if rep >= setting.warmup:
                    segments_per_rep.append(segments.seconds())
            else:
                seconds = _timed(parts[name], device)
            _drop_grads(expert.model)
            if rep >= setting.warmup:
                times[name].append(seconds)
    result = {name: statistics.median(values) for name, values in times.items()}
    inner = {name: statistics.median(s[name] for s in segments_per_rep) for name in SEGMENTS}
    ratios = [sum(s.values()) / (s["teachers"] + s["student_forward"] + s["backward"]) for s in segments_per_rep]
    result.update({"segments": inner, "overhead_ratio": statistics.median(ratios), "overhead_ratio_spread": _spread(ratios),
                   "peak_mem_bytes": memory.peak_bytes(),
                   "samples": {name: [round(v, 6) for v in values] for name, values in times.items()}})
    wave = data[0]
    result["audio_seconds_per_second"] = wave.shape[0] * wave.shape[1] / SAMPLE_RATE / result["t_step"]
    result["flops_per_step"] = step_flops(step, data)
    _drop_grads(expert.model)
    result["tflops_per_second"] = result["flops_per_step"] / result["t_step"] / 1e12
    peak = next((v for k, v in BF16_PEAK.items() if k in device_name(device)), None)
    result["fraction_of_bf16_peak"] = result["flops_per_step"] / result["t_step"] / peak if peak else None
    return result


def measure_live(expert, setting: BenchSetting, wave: torch.Tensor, lengths: torch.Tensor, memory: PeakMemory) -> dict:
    wavs = [w[:n] for w, n in zip(wave, lengths.tolist())]
    # Targets for the student-alone timing, built once and outside inference mode like the step's.
    targets = [t.clone() for t in expert.teachers(wavs)]
    frames = torch.full_like(lengths, 10**9)
    amp = setting.amp and setting.device == "cuda"
    result = measure(expert, setting, (wave, lengths), {
        "t_teachers": lambda: expert.teachers(wavs),
        "t_student": lambda: student_step(expert, (wave, lengths, targets, frames), amp)}, memory)
    result["separate_timing_ratio"] = result["t_step"] / (result["t_teachers"] + result["t_student"])
    result["checks"] = teacher_checks(expert, TrainStep(expert, setting), (wave, lengths))
    return result


def measure_cached(expert, setting: BenchSetting, memory: PeakMemory) -> dict:
    device = torch.device(setting.device)
    data = next(iter(expert.get_train_dataloader()))
    data = (data[0].to(device), data[1].to(device), [t.to(device) for t in data[2]], data[3].to(device))
    amp = setting.amp and setting.device == "cuda"
    result = measure(expert, setting, data, {"t_student": lambda: student_step(expert, data, amp)}, memory)
    result["cached_step_over_student"] = result["t_step"] / result["t_student"]
    result["teachers_loaded"] = expert.teachers is not None
    return result


# -- one (mode, K) run ---------------------------------------------------------------------------

def model_config(setting: BenchSetting, teacher_paths: dict[str, Path], k: int, mode: str) -> dict:
    layers = TEACHER_LAYERS[setting.size]
    teachers = [{"name": hub, "ckpt": str(teacher_paths[label]), "layers": list(layers)}
                for label, _, hub, _ in TEACHERS[:k]]
    teacher_dtype = setting.teacher_dtype if setting.device == "cuda" else "float32"
    student = STUDENTS[setting.size](init_from_teacher=setting.size == "base")
    return {"teachers": teachers, "aggregation": mode, "student": asdict(student), "teacher_dtype": teacher_dtype,
            "fp32_pos_conv": setting.fp32_pos_conv}


def build_expert(setting: BenchSetting, teacher_paths: dict[str, Path], k: int, mode: str, audio_dir: Path,
                 targets: Path | None = None):
    from s3prl_ekd.plugin.pretrain_expert import UpstreamPretrainExpert

    datarc = {"train_batch_size": setting.batch_size, "sequence_length": int(round(setting.seconds * SAMPLE_RATE)),
              "num_workers": setting.loader_workers, "audio_dir": str(audio_dir)}
    if targets is not None:
        datarc.update(targets=str(targets), num_workers=0)
    expert = UpstreamPretrainExpert(datarc, model_config(setting, teacher_paths, k, mode), setting.device)
    expert.to(setting.device)
    expert.train()  # as s3prl's runner: student in train mode, teachers stay in eval
    return expert


# -- whole-program measurements ------------------------------------------------------------------

def loader_share(expert, setting: BenchSetting) -> dict:
    """Fraction of wall time spent waiting for the DataLoader over a short real run.

    The first batch (worker start-up, paid once per run) is reported apart and not counted.
    """
    device = torch.device(setting.device)
    step = TrainStep(expert, setting)
    loader = expert.get_train_dataloader()
    iterator = iter(loader)

    def next_batch():
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:
            iterator = iter(loader)
            return next(iterator)

    start = time.perf_counter()
    data = next_batch()
    first_batch_s = time.perf_counter() - start
    waited, start = 0.0, time.perf_counter()
    for index in range(setting.loader_steps):
        step(data)
        _synchronize(device)
        if index + 1 < setting.loader_steps:
            before = time.perf_counter()
            data = next_batch()
            waited += time.perf_counter() - before
    wall = time.perf_counter() - start
    _drop_grads(expert.model)
    return {"loader_share": waited / wall, "loader_wait_s": waited, "loader_wall_s": wall,
            "loader_steps": setting.loader_steps, "loader_first_batch_s": first_batch_s,
            "loader_workers": loader.num_workers, "loader_batches": len(loader)}


def slim_cnn(conv_feature_layers: str, factor: int = 2) -> str:
    """The same CNN with `factor` times fewer channels per layer (same kernels and strides)."""
    layers = parse_conv_layers(conv_feature_layers)
    return "[" + ", ".join(f"({max(1, dim // factor)},{kernel},{stride})" for dim, kernel, stride in layers) + "]"


@torch.inference_mode()
def inference_speedup(expert, setting: BenchSetting) -> dict:
    """Student (backbone, as a SUPERB upstream) vs the HuBERT teacher on one 10 s utterance; also the
    student's CNN alone (the student keeps HuBERT's CNN, so t_hubert / t_cnn bounds its speed-up) and
    the same student with a CNN of half the channels (random weights: its speed, not its quality)."""
    device = torch.device(setting.device)
    samples = int(round(setting.inference_seconds * SAMPLE_RATE))
    wav = 0.1 * torch.randn(samples, generator=torch.Generator().manual_seed(1)).to(device)
    hubert = expert.teachers.upstreams[0]
    student = expert.student
    config = dataclasses.replace(student.config, init_from_teacher=False,
                                 conv_feature_layers=slim_cnn(student.config.conv_feature_layers))
    slim = EKDStudent(config, [], 0).to(device).eval()
    student.eval()
    lengths = torch.tensor([samples], device=device)
    try:
        parts = {"student": lambda: student(wav[None], lengths, predict=False), "hubert": lambda: hubert([wav]),
                 "student_cnn": lambda: student.backbone.feature_extractor(wav[None]),
                 "slim": lambda: slim(wav[None], lengths, predict=False)}
        times = {name: [] for name in parts}
        for rep in range(setting.warmup + setting.reps):
            for name, fn in parts.items():
                seconds = _timed(fn, device)
                if rep >= setting.warmup:
                    times[name].append(seconds)
    finally:
        student.train()
    t = {name: statistics.median(values) for name, values in times.items()}
    return {"inference_speedup_vs_hubert_base": t["hubert"] / t["student"],
            "inference_t_student": t["student"], "inference_t_hubert": t["hubert"],
            "inference_t_student_cnn": t["student_cnn"],
            "inference_speedup_bound_same_cnn": t["hubert"] / t["student_cnn"],
            "inference_slim_cnn": config.conv_feature_layers,
            "inference_speedup_slim_cnn": t["hubert"] / t["slim"],
            "inference_seconds": setting.inference_seconds,
            "inference_reference": f"hubert ({setting.size} architecture, random weights)"}


def make_teachers(setting: BenchSetting, folder: Path) -> dict[str, Path]:
    """Random-weight teachers (reused if already in `folder`) for the largest K."""
    from s3prl_ekd.plugin.teacher_formats import make_random_teacher

    paths = {}
    for label, kind, _, seed in TEACHERS[:max(setting.ks)]:
        path = folder / f"{label}_{setting.size}_seed{seed}.pt"
        if not path.is_file():
            make_random_teacher(kind, path, size=setting.size, seed=seed)
        paths[label] = path
    return paths


def make_audio(setting: BenchSetting, folder: Path) -> Path:
    """Noise files at speech level for the loader and cached runs (their cost does not depend on the
    content): 16 kHz wavs 0.5-2.5 s longer than the crop, enough for every step's batch."""
    import soundfile as sf

    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(setting.batch_size * (setting.loader_steps + 2)):
        path = folder / f"noise{i:04d}.wav"
        if path.is_file():
            continue
        samples = int(SAMPLE_RATE * (setting.seconds + 0.5 + 2 * torch.rand((), generator=generator).item()))
        sf.write(str(path), (0.1 * torch.randn(samples, generator=generator)).numpy(), SAMPLE_RATE, subtype="PCM_16")
    return folder


def make_store(setting: BenchSetting, teacher_paths: dict[str, Path], audio: Path, folder: Path) -> Path:
    """A bfloat16 target store of all K teachers over `audio` (reused when up to date)."""
    import yaml

    from s3prl_ekd.plugin.targets import build_store

    config = folder.parent / f"{folder.name}.model.yaml"
    config.write_text(yaml.safe_dump(model_config(setting, teacher_paths, max(setting.ks), "multi_head")))
    build_store(config, str(audio), folder, dtype="bfloat16", device=setting.device, log=lambda _: None)
    return folder


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def _check(setting: BenchSetting) -> None:
    if setting.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch here; use --device cpu")
    bad = [k for k in setting.ks if not 1 <= k <= len(TEACHERS)]
    if bad or not setting.ks:
        raise UserError(f"--k {bad or ''}: use values in 1..{len(TEACHERS)}, e.g. --k 1,2,3")
    unknown = [m for m in setting.modes if m not in AGGREGATIONS]
    if unknown or not setting.modes:
        raise UserError(f"--modes {unknown or ''}: use some of {', '.join(AGGREGATIONS)}")
    if "multi_head_residual" in setting.modes and min(setting.ks) < 2:
        raise UserError("--modes multi_head_residual: needs two or more teachers; use --k values >= 2")
    if setting.threads is not None and setting.threads < 1:
        raise UserError(f"--threads {setting.threads}: use 1 or more")
    if setting.reps < 1 or setting.warmup < 0 or setting.batch_size < 2 or setting.loader_steps < 2:
        raise UserError("--reps >= 1, --warmup >= 0, --batch-size >= 2 and --loader-steps >= 2 are needed")
    runner_config(setting.runner_config)  # exists and parses


def run_benchmark(setting: BenchSetting, workdir: str | os.PathLike | None = None,
                  audio_dir: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> dict:
    """Measure every (mode, K) of `setting` live (and cached, with `setting.targets`), the loader share
    and the inference speed-up. Teachers, audio and the store go under `workdir` (a temporary folder
    by default; a given one is reused across calls)."""
    _check(setting)
    threads = torch.get_num_threads()
    if setting.threads is not None:
        torch.set_num_threads(setting.threads)
    try:
        return _run_benchmark(setting, workdir, audio_dir, log)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(setting: BenchSetting, workdir, audio_dir, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="ekd_bench_") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        log(f"[bench] building {setting.size} teachers in {work}")
        teacher_paths = make_teachers(setting, work / "teachers")
        audio = Path(audio_dir) if audio_dir is not None else make_audio(setting, work / "audio")
        device = torch.device(setting.device)
        memory = PeakMemory(device)
        wave, lengths = timed_batch(setting, device)
        load_before = os.getloadavg()
        runs = []
        for k in sorted(setting.ks):
            for mode in setting.modes:
                expert = build_expert(setting, teacher_paths, k, mode, audio)
                measured = measure_live(expert, setting, wave, lengths, memory)
                runs.append({"step": "live", "mode": mode, "k": k, **measured})
                log(f"[bench] live {mode} K={k}: step {measured['t_step']:.3f} s (teachers "
                    f"{measured['segments']['teachers']:.3f}, student fwd {measured['segments']['student_forward']:.3f}, "
                    f"backward {measured['segments']['backward']:.3f}), overhead ratio {measured['overhead_ratio']:.3f}")
                del expert
                gc.collect()
        if setting.targets is not None:
            store = make_store(setting, teacher_paths, audio, Path(setting.targets))
            for mode in setting.modes:
                expert = build_expert(setting, teacher_paths, max(setting.ks), mode, audio, targets=store)
                measured = measure_cached(expert, setting, memory)
                runs.append({"step": "cached", "mode": mode, "k": max(setting.ks), **measured})
                log(f"[bench] cached {mode} K={max(setting.ks)}: step {measured['t_step']:.3f} s, student alone "
                    f"{measured['t_student']:.3f} s, ratio {measured['cached_step_over_student']:.3f}")
                del expert
                gc.collect()
        # The loader run and the inference comparison use the largest K of the first mode.
        expert = build_expert(setting, teacher_paths, max(setting.ks), setting.modes[0], audio)
        loader = loader_share(expert, setting)
        log(f"[bench] data loader share of wall time: {loader['loader_share']:.3f}")
        inference = inference_speedup(expert, setting)
        log(f"[bench] student vs HuBERT inference on {setting.inference_seconds:g} s: "
            f"{inference['inference_speedup_vs_hubert_base']:.2f}x faster")
        result = {
            "device": setting.device,
            "device_name": device_name(device),
            "size": setting.size,
            "setting": {**asdict(setting), "ks": list(setting.ks), "modes": list(setting.modes)},
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "torch_version": torch.__version__,
            "peak_mem_kind": memory.kind,
            "student_params": _count(expert.student.backbone),
            "teacher_params": {label: _count(u) for (label, *_), u in zip(TEACHERS, expert.teachers.upstreams)},
            **loader,
            **inference,
            "runs": runs,
        }
        del expert
    return result


# -- reporting ------------------------------------------------------------------------------------

def markdown_table(result: dict) -> str:
    """The runs as a markdown table, with the whole-program figures below it."""
    setting = result["setting"]
    lines = ["| step | mode | K | t_step (s) | teachers | student fwd | targets+loss | backward | optimizer "
             "| overhead (min-max) | student alone (s) | audio s/s | TFLOP/s | peak mem (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        s, spread = run["segments"], run["overhead_ratio_spread"]
        lines.append(f"| {run['step']} | {run['mode']} | {run['k']} | {run['t_step']:.3f} | {s['teachers']:.3f} | "
                     f"{s['student_forward']:.3f} | {s['targets_loss']:.3f} | {s['backward']:.3f} | "
                     f"{s['optimizer']:.3f} | {run['overhead_ratio']:.3f} ({spread['min']:.3f}-{spread['max']:.3f}) | "
                     f"{run['t_student']:.3f} | {run['audio_seconds_per_second']:.1f} | "
                     f"{run['tflops_per_second']:.2f} | {run['peak_mem_bytes'] / 2**30:.2f} |")
    cached = [r for r in result["runs"] if r["step"] == "cached"]
    params = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in result["teacher_params"].items())
    lines += [
        "",
        f"- device: {result['device']} ({result['device_name']}, {result['cpu_count']} CPUs, "
        f"{result['torch_threads']} torch threads), torch {result['torch_version']}; "
        f"load average before/after: {result['load_average_before'][0]:.2f} / {result['load_average_after'][0]:.2f}",
        f"- size: {result['size']}; batch {setting['batch_size']} x {setting['seconds']:g} s; optimizer of "
        f"{setting['runner_config']}; positional convolutions in "
        f"{'float32' if setting.get('fp32_pos_conv', True) else 'the autocast dtype'}; "
        f"median of {setting['reps']} interleaved repetitions after {setting['warmup']} warm-up",
        "- segments are synchronised timestamps inside each timed step; overhead = t_step / (teachers + student "
        "forward + backward) within the same step (>= 1 by construction), median and range over repetitions",
        f"- peak memory: {result['peak_mem_kind']}",
        f"- data loader share of wall time: {result['loader_share']:.3f} "
        f"({result['loader_steps']} steps, {result['loader_workers']} workers)",
        f"- parameters: student {result['student_params'] / 1e6:.2f}M (without heads); teachers {params}",
        f"- inference on {result['inference_seconds']:g} s: student {result['inference_t_student']:.3f} s, "
        f"HuBERT {result['inference_t_hubert']:.3f} s, speed-up {result['inference_speedup_vs_hubert_base']:.2f}x; "
        f"the student's CNN (HuBERT's) alone {result['inference_t_student_cnn']:.3f} s, so no student with this CNN "
        f"can exceed {result['inference_speedup_bound_same_cnn']:.2f}x; the same student with half the CNN channels "
        f"({result['inference_slim_cnn']}, not distilled here): {result['inference_speedup_slim_cnn']:.2f}x",
    ]
    if cached:
        lines.append("- cached step / student forward+backward alone: " + ", ".join(
            f"{r['mode']} {r['cached_step_over_student']:.3f}" for r in cached))
    fractions = [r["fraction_of_bf16_peak"] for r in result["runs"] if r["fraction_of_bf16_peak"] is not None]
    if fractions:
        lines.append("- fraction of the GPU's dense bf16 peak: " + ", ".join(
            f"{r['step']} {r['mode']} K={r['k']} {100 * r['fraction_of_bf16_peak']:.1f}%" for r in result["runs"]))
    return "\n".join(lines) + "\n"


def write_results(result: dict, json_path: str | os.PathLike, md_path: str | os.PathLike | None = None) -> Path:
    """Write the JSON and the markdown table (default: the JSON path with .md); return the .md path."""
    atomic_write_json(json_path, result)
    md_path = Path(md_path) if md_path is not None else Path(json_path).with_suffix(".md")
    atomic_write_text(md_path, markdown_table(result))
    return md_path


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as error:
        raise UserError(f"--k {text!r}: give comma-separated integers, e.g. 1,2,3") from error


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time EKD training steps (live and cached) against their parts")
    p.add_argument("--json", required=True, help="output JSON (a markdown table is written beside it)")
    p.add_argument("--md", default=None, help="markdown output (default: the --json path with .md)")
    p.add_argument("--size", default="tiny", choices=sorted(TEACHER_LAYERS))
    p.add_argument("--k", default="1,2,3", help="numbers of teachers, comma-separated (1..3)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--modes", default=",".join(PAPER_AGGREGATIONS),
                   help=f"aggregation modes, comma-separated, of {', '.join(AGGREGATIONS)}")
    p.add_argument("--targets", default=None, help="target store folder: also time the cached step "
                                                   "(built there for the benchmark's teachers if absent)")
    p.add_argument("--runner-config", default=RUNNER_CONFIG, help="runner config whose optimizer the step uses, "
                                                                  "e.g. runner_fused_adamw.yaml")
    p.add_argument("--fp32-pos-conv", default=True, action=argparse.BooleanOptionalAction,
                   help="run the positional convolutions in float32 inside autocast (the model config's "
                        "default); --no-fp32-pos-conv measures what autocast alone picks")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default by size/device)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None, help="utterance length of the timed batch")
    p.add_argument("--loader-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--audio-dir", default=None, help="audio for the loader and cached runs (default: noise files)")
    p.add_argument("--workdir", default=None, help="keep teachers and audio here and reuse them")

    def _bench(args) -> int:
        overrides = {name: getattr(args, name) for name in ("reps", "warmup", "batch_size", "seconds",
                                                            "loader_steps", "threads") if getattr(args, name) is not None}
        setting = default_setting(args.size, args.device, ks=_int_list(args.k),
                                  modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
                                  targets=args.targets, runner_config=args.runner_config,
                                  fp32_pos_conv=args.fp32_pos_conv, **overrides)
        result = run_benchmark(setting, workdir=args.workdir, audio_dir=args.audio_dir)
        md_path = write_results(result, args.json, args.md)
        print(markdown_table(result), end="")
        print(f"wrote {args.json} and {md_path}")
        return 0

    p.set_defaults(func=_bench)
