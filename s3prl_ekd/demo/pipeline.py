"""The paper's experiment in miniature, end to end on CPU: `make demo` / `s3prl-ekd demo`.

Stages (each cached under the output folder and skipped when its inputs are unchanged):
corpus -> prepare -> teachers -> students -> superb -> report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from s3prl_ekd.core.student import ekd_student_demo
from s3prl_ekd.errors import UserError
from s3prl_ekd.io.files import fingerprint
from s3prl_ekd.io.resources import pretrain_config

TEACHER_KINDS = ("hubert", "robust_hubert", "wavlm")
TEACHER_HUB = {"hubert": "hubert_local", "robust_hubert": "hubert_local", "wavlm": "wavlm_local"}
TASK_METRICS = {"pr": ("per", "PER", False), "sid": ("acc", "SID acc", True),
                "er": ("acc", "ER acc", True), "asr": ("wer", "WER", False)}  # (key, label, higher is better)


@dataclass
class DemoConfig:
    """Sizes of the miniature; the defaults fit `make demo` in about 20 minutes on 2 cores."""

    seed: int = 0
    utterances: int = 1000
    speakers: int = 12
    teacher_steps: int = 200
    student_steps: int = 300
    student_batch_size: int = 8
    student_crop_samples: int = 32000
    full: bool = False            # all single-teacher baselines + three EKD students, every upstream benchmarked
    profile: str = "cpu-small"
    superb_steps: int | None = None  # downstream training steps; None = the profile's own (tests use a few)
    student_dims: dict = field(default_factory=lambda: dataclasses.asdict(ekd_student_demo()))


def _key(*parts) -> str:
    return fingerprint(*parts)[:16]


class Stages:
    """Remembers finished stages in `out/stages.json` as {name: key}; a stage reruns when its key changes."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def run(self, name: str, key: str, outputs: list[Path], fn):
        if self.done.get(name) == key and all(Path(p).exists() for p in outputs):
            self.skipped.append(name)
            print(f"[demo] {name}: cached")
            return
        print(f"[demo] {name}: running")
        started = time.perf_counter()
        fn()
        missing = [str(p) for p in outputs if not Path(p).exists()]
        if missing:
            raise RuntimeError(f"demo stage {name} did not produce {missing}")
        self.done[name] = key
        self.ran.append(name)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1) + "\n")
        os.replace(tmp, self.path)
        print(f"[demo] {name}: done in {time.perf_counter() - started:.0f} s")


def student_plan(config: DemoConfig) -> dict[str, tuple[list[str], str]]:
    """Student name -> (teacher kinds, aggregation)."""
    plan = {"ekd_average": (list(TEACHER_KINDS), "layerwise_average")}
    if config.full:
        plan.update({f"distil_{kind}": ([kind], "layerwise_average") for kind in TEACHER_KINDS})
        plan.update({"ekd_concat": (list(TEACHER_KINDS), "layerwise_concat"),
                     "ekd_multihead": (list(TEACHER_KINDS), "multi_head")})
    return plan


def table_rows(config: DemoConfig, teachers: dict[str, Path], students: dict[str, Path]) -> list[tuple]:
    """(name, s3prl upstream, checkpoint, kind) per row, in the paper's order: fbank and the teachers
    (FULL only), the single-teacher students, then the EKD students."""
    rows = []
    if config.full:
        rows.append(("fbank", "fbank", None, "baseline"))
        rows += [(f"teacher_{k}", TEACHER_HUB[k], teachers[k], "teacher") for k in TEACHER_KINDS]
    rows += [(n, "ekd_distiller", c, "single-teacher student") for n, c in students.items() if not n.startswith("ekd")]
    rows += [(n, "ekd_distiller", c, "EKD student") for n, c in students.items() if n.startswith("ekd")]
    return rows


def pretrain_student(name: str, kinds: list[str], aggregation: str, teachers: dict[str, Path],
                     audio_dir: Path, work: Path, config: DemoConfig) -> Path:
    """Distil one student with `s3prl-ekd pretrain` (s3prl's runner); returns its final checkpoint."""
    model = {"teachers": [{"name": TEACHER_HUB[k], "ckpt": str(teachers[k])} for k in kinds],
             "aggregation": aggregation,
             "student": config.student_dims}
    work.mkdir(parents=True, exist_ok=True)
    model_path = work / f"{name}.yaml"
    model_path.write_text(yaml.safe_dump(model, sort_keys=False))
    steps = config.student_steps
    overrides = ",,".join([
        f"config.pretrain_expert.datarc.audio_dir={audio_dir}",
        f"config.pretrain_expert.datarc.train_batch_size={config.student_batch_size}",
        f"config.pretrain_expert.datarc.sequence_length={config.student_crop_samples}",
        f"config.runner.total_steps={steps}", f"config.runner.save_step={max(1, steps - 1)}",
        f"config.runner.log_step={max(1, steps // 50)}", "config.runner.max_keep=1",
    ])
    command = [sys.executable, "-m", "s3prl_ekd.cli", "pretrain", "-u", "ekd_distiller", "-g", str(model_path),
               "-c", str(pretrain_config("tiny_cpu_runner.yaml")), "-n", name,
               "-p", str(work / name), "--device", "cpu", "--seed", str(config.seed), "-o", overrides, "--force"]
    log = work / f"{name}.log"
    with open(log, "w") as handle:
        proc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise UserError(f"pretraining {name} failed; see {log}")
    return final_checkpoint(work / name)


def final_checkpoint(expdir: Path) -> Path:
    from s3prl_ekd.io.checkpoint import newest_checkpoint

    found = newest_checkpoint(expdir)
    if found is None:
        raise UserError(f"{expdir}: no checkpoint was written")
    return found


def count_parameters(upstream: str, ckpt: Path | None) -> int:
    """Parameters of the model that `upstream` builds from `ckpt` (0 for fbank)."""
    if ckpt is None:
        return 0
    import s3prl.hub

    import s3prl_ekd.plugin.hub  # noqa: F401  (ekd_distiller in s3prl.hub)

    model = getattr(s3prl.hub, upstream)(ckpt=str(ckpt))
    return sum(p.numel() for p in model.parameters())


def mean_ranks(rows: list[dict], tasks: list[str]) -> None:
    """Add `mean_rank` (1 = best, ties share the better rank) over the tasks each row has."""
    for row in rows:
        ranks = []
        for task in tasks:
            key, _, higher = TASK_METRICS[task]
            value = row["metrics"].get(task)
            others = [r["metrics"][task] for r in rows if r["metrics"].get(task) is not None]
            if value is not None:
                ranks.append(1 + sum((o > value) if higher else (o < value) for o in others))
        row["mean_rank"] = round(sum(ranks) / len(ranks), 2) if ranks else None


def report_markdown(report: dict) -> str:
    tasks = report["tasks"]
    head = "| upstream | kind | params | " + " | ".join(
        TASK_METRICS[t][1] + (" ↑" if TASK_METRICS[t][2] else " ↓") for t in tasks) + " | mean rank |"
    lines = [f"# EKD demo (seed {report['config']['seed']}, {report['config']['utterances']} synthetic utterances, "
             f"profile {report['config']['profile']})", "", head, "|" + "---|" * (len(tasks) + 4)]
    for row in report["rows"]:
        cells = [f"{row['metrics'][t]:.2f}" if row["metrics"].get(t) is not None else "–" for t in tasks]
        lines.append(f"| {row['name']} | {row['kind']} | {row['params'] / 1e6:.2f}M | " + " | ".join(cells)
                     + f" | {row['mean_rank']} |")
    lines += ["", "Metrics in % on the synthetic test split (PER, WER: lower is better; accuracies: higher).",
              "", report["verdict"], "", "Figures: `loss_curves.png`, `metrics.png`. Exact commands: each "
              "upstream's `superb/<name>/results.json`."]
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict]) -> str:
    """One honest sentence: does an EKD student beat the single-teacher students here?"""
    ekd = [r for r in rows if r["kind"] == "EKD student"]
    single = [r for r in rows if r["kind"] == "single-teacher student"]
    if not ekd or not single:
        return ("Only the default EKD student was distilled and benchmarked; `make demo FULL=1` adds fbank, "
                "the three teachers and the single-teacher students, which the comparison needs.")
    best_ekd = min(ekd, key=lambda r: r["mean_rank"])
    best_single = min(single, key=lambda r: r["mean_rank"])
    if best_ekd["mean_rank"] < best_single["mean_rank"]:
        return (f"On this miniature, the best EKD student ({best_ekd['name']}, mean rank {best_ekd['mean_rank']}) "
                f"ranks ahead of the best single-teacher student ({best_single['name']}, {best_single['mean_rank']}).")
    if best_ekd["mean_rank"] == best_single["mean_rank"]:
        return (f"On this miniature, EKD does NOT beat the single-teacher students; it ties: best EKD student "
                f"{best_ekd['name']} and best single-teacher student {best_single['name']} both have mean rank "
                f"{best_ekd['mean_rank']}.")
    return (f"On this miniature, EKD does NOT beat the single-teacher students: best EKD student "
            f"{best_ekd['name']} has mean rank {best_ekd['mean_rank']}, best single-teacher student "
            f"{best_single['name']} {best_single['mean_rank']}.")


def plot_figures(report: dict, out: Path, curves: dict[str, list[tuple[int, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in curves.items():
        ax = axes[0] if name.startswith("teacher") else axes[1]
        ax.plot([s for s, _ in points], [v for _, v in points], label=name)
    axes[0].set_title("teachers: masked-prediction loss")
    axes[1].set_title("students: distillation loss")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 4))
    names = [r["name"] for r in report["rows"]]
    for ax, task in zip(axes if len(tasks) > 1 else [axes], tasks):
        values = [r["metrics"].get(task) or 0.0 for r in report["rows"]]
        ax.bar(range(len(names)), values, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{TASK_METRICS[task][1]} (%)")
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)


def run_demo(config: DemoConfig, out: str | os.PathLike = "results/demo",
             data: str | os.PathLike = "data/demo", progress: bool = True) -> dict:
    """Run every stage (skipping cached ones) and write report.md / report.json; returns the report."""
    from s3prl_ekd.demo.corpus import synthesize_corpus
    from s3prl_ekd.demo.teacher_training import loss_curve_path, train_teacher
    from s3prl_ekd.io.events import read_scalars
    from s3prl_ekd.recipes.layout import prepare_all
    from s3prl_ekd.recipes.superb import run_superb

    out, data = Path(out).resolve(), Path(data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    tasks = list(TASK_METRICS)

    corpus_dir = data / f"corpus-seed{config.seed}-n{config.utterances}-s{config.speakers}"
    manifest = corpus_dir / "manifest.jsonl"
    corpus_key = _key(config.seed, config.utterances, config.speakers)
    stages.run("corpus", corpus_key, [manifest], lambda: synthesize_corpus(
        corpus_dir, config.utterances, config.speakers, seed=config.seed, progress=progress))

    superb_data = data / f"superb-{corpus_key}"
    stages.run("prepare", corpus_key, [superb_data], lambda: prepare_all(manifest, superb_data, progress=progress))

    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    train_audio = [corpus_dir / r["audio"] for r in rows if r["split"] == "train"]
    audio_dir = data / f"pretrain-audio-{corpus_key}"   # the unlabeled training split, as links

    def link_audio():
        audio_dir.mkdir(parents=True, exist_ok=True)
        for path in train_audio:
            target = audio_dir / path.name
            if not target.exists():
                target.symlink_to(path)

    stages.run("pretrain_audio", corpus_key, [audio_dir], link_audio)

    teacher_dir = out / "teachers"
    teachers = {kind: teacher_dir / f"{kind}.pt" for kind in TEACHER_KINDS}
    for kind in TEACHER_KINDS:
        key = _key(corpus_key, kind, config.teacher_steps, config.seed)
        stages.run(f"teacher_{kind}", key, [teachers[kind]], lambda kind=kind: train_teacher(
            kind, train_audio, teachers[kind], steps=config.teacher_steps, seed=config.seed, progress=progress))

    student_dir = out / "students"
    students = {}
    for name, (kinds, aggregation) in student_plan(config).items():
        key = _key(corpus_key, [stages.done.get(f"teacher_{k}") for k in kinds], aggregation,
                   config.student_steps, config.student_batch_size, config.student_crop_samples,
                   config.student_dims, config.seed)
        expdir = student_dir / name
        stages.run(f"student_{name}", key, [expdir], lambda n=name, k=kinds, a=aggregation: pretrain_student(
            n, k, a, teachers, audio_dir, student_dir, config))
        students[name] = final_checkpoint(expdir)

    upstreams = table_rows(config, teachers, students)
    report_rows = []
    for name, upstream, ckpt, kind in upstreams:
        results_dir = out / "superb" / name
        key = _key(stages.done.get(f"student_{name}") or stages.done.get(name) or str(ckpt), upstream,
                   config.profile, config.superb_steps, corpus_key)
        stages.run(f"superb_{name}", key, [results_dir / "results.json"], lambda u=upstream, c=ckpt, d=results_dir:
                   run_superb(u, c, superb_data, tasks, config.profile, d, seed=config.seed, progress=progress,
                              steps=config.superb_steps))
        results = json.loads((results_dir / "results.json").read_text())
        report_rows.append({"name": name, "upstream": upstream, "kind": kind,
                            "ckpt": str(ckpt) if ckpt else None, "params": count_parameters(upstream, ckpt),
                            "metrics": {t: results["tasks"][t][TASK_METRICS[t][0]] for t in tasks}})
    mean_ranks(report_rows, tasks)

    curves = {}
    for kind in TEACHER_KINDS:
        curves[f"teacher_{kind}"] = [tuple(p) for p in json.loads(loss_curve_path(teachers[kind]).read_text())["loss"]]
    for name in students:
        curves[name] = read_scalars(student_dir / name).get("ekd_distiller/train-loss", [])

    report = {"config": asdict(config), "tasks": tasks, "rows": report_rows, "verdict": verdict(report_rows),
              "stages_run": stages.ran, "stages_cached": stages.skipped}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    plot_figures(report, out, curves)
    return report


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the paper's experiment in miniature on a synthetic corpus (CPU)")
    p.add_argument("--full", action="store_true", help="all students and baselines, every upstream benchmarked")
    p.add_argument("--out", default="results/demo")
    p.add_argument("--data", default="data/demo")
    defaults = DemoConfig()
    for name in ("seed", "utterances", "speakers", "teacher_steps", "student_steps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    p.add_argument("--superb-steps", type=int, default=None, help="downstream steps (default: the profile's)")

    def _run(args) -> int:
        config = DemoConfig(seed=args.seed, utterances=args.utterances, speakers=args.speakers,
                            teacher_steps=args.teacher_steps, student_steps=args.student_steps,
                            superb_steps=args.superb_steps, full=args.full)
        report = run_demo(config, args.out, args.data)
        print(report_markdown(report))
        print(f"report: {Path(args.out) / 'report.md'}")
        return 0

    p.set_defaults(func=_run)
