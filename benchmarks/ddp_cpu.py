"""Wall time per distillation step on CPU: one process vs two torchrun/gloo processes, in one run.

    .venv/bin/python benchmarks/ddp_cpu.py --audio-dir data/demo/train-audio [--repeats 2]

The demo's student (2 x 192) distilled live from the three shipped teachers (layerwise average,
batch 8 x 1.5 s), through `s3prl-ekd pretrain` exactly as a user runs it. Start-up is cancelled
out: each setting runs `--short` and `--long` total steps, and the step time is the difference of
the two wall times divided by the difference of the step counts. Settings are interleaved per
repeat, so a noisy machine hits all of them alike. Writes benchmarks/ddp_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from s3prl_ekd.demo.pipeline import TEACHER_KINDS, DemoConfig, model_config, shipped_teachers
from s3prl_ekd.io.resources import pretrain_config

CLI = str(Path(sys.executable).parent / "s3prl-ekd")
CROP_SAMPLES = DemoConfig().student_crop_samples  # 1.5 s
# (label, processes, threads per process)
SETTINGS = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread (gloo)", 2, 1)]


def run(processes: int, threads: int, steps: int, model: Path, audio_dir: Path, batch: int, work: Path) -> float:
    """Seconds of wall time for one `s3prl-ekd pretrain` of `steps` steps."""
    overrides = [f"config.pretrain_expert.datarc.audio_dir={audio_dir}",
                 f"config.pretrain_expert.datarc.train_batch_size={batch}",
                 f"config.pretrain_expert.datarc.sequence_length={CROP_SAMPLES}",
                 f"config.runner.total_steps={steps}", f"config.runner.save_step={steps - 1}",
                 f"config.runner.log_step={steps - 1}", "config.runner.max_keep=1"]
    args = ["pretrain", "-u", "ekd_distiller", "-g", str(model), "-c", str(pretrain_config("tiny_cpu_runner.yaml")),
            "-n", "bench", "-p", str(work / "exp"), "--device", "cpu", "-o", ",,".join(overrides), "--force"]
    if processes == 1:
        command = [CLI, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   "--no-python", CLI, *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{command}: exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio-dir", type=Path, required=True)
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=35)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "ddp_cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = work / "model.yaml"
        model.write_text(yaml.safe_dump(model_config(list(TEACHER_KINDS), "layerwise_average", shipped_teachers())))
        per_step: dict[str, list[float]] = {label: [] for label, _, _ in SETTINGS}
        for repeat in range(args.repeats):
            for label, processes, threads in SETTINGS:
                short = run(processes, threads, args.short, model, args.audio_dir.resolve(), args.batch, work)
                long = run(processes, threads, args.long, model, args.audio_dir.resolve(), args.batch, work)
                per_step[label].append((long - short) / (args.long - args.short))
                print(f"repeat {repeat}: {label}: {per_step[label][-1]:.3f} s/step "
                      f"({short:.1f} s for {args.short} steps, {long:.1f} s for {args.long})", flush=True)

    base = per_step[SETTINGS[0][0]]
    rows = []
    for label, processes, threads in SETTINGS:
        times = per_step[label]
        ratios = [b / t for b, t in zip(base, times)]  # same repeat: measured side by side
        rows.append({"setting": label, "processes": processes, "threads": threads, "seconds_per_step": times,
                     "median": statistics.median(times), "speedup_vs_1x1": ratios})
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "batch": args.batch, "crop_samples": CROP_SAMPLES, "steps": [args.short, args.long],
              "model": "demo student 2 x 192 (frozen CNN), 3 live teachers, layerwise_average", "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# CPU step time, 1 vs 2 processes ({result['date']}, torch {result['torch']}, {result['cpus']} CPUs)",
             "", f"{result['model']}; batch {args.batch} x 1.5 s in all; per step = (T({args.long}) - T({args.short})) "
             f"/ {args.long - args.short}; {args.repeats} interleaved repeats.", "",
             "| setting | s/step (each repeat) | speed-up vs 1 x 1 (each repeat) |", "|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['setting']} | {', '.join(f'{t:.3f}' for t in row['seconds_per_step'])} | "
                     f"{', '.join(f'{r:.2f}x' for r in row['speedup_vs_1x1'])} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
