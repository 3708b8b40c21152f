"""The paper's experiment in miniature, end to end on CPU: `make demo` / `s3prl-ekd demo`.

corpus -> prepare (with a noisy PR test copy) -> teachers (shipped, or --retrain-teachers) ->
one teacher-target store -> single-teacher and EKD students (two at a time) -> SUPERB tasks for
every upstream (learning rates picked on dev, early stopping, memoised upstream states) ->
report with bootstrap intervals and paired-bootstrap verdicts.

Every stage is an idempotent call keyed by its own inputs (the corpus by its parameters, prepare
and superb by the content of their inputs and recipes, the store by teachers and audio, a student
by its whole model and runner config): re-running answers from disk what has not changed, and
an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from s3prl_ekd.core.student import ekd_student_demo
from s3prl_ekd.errors import UserError
from s3prl_ekd.io.files import atomic_write_json, atomic_write_text, claim_out, fingerprint, refuse_foreign_out
from s3prl_ekd.io.resources import pretrain_config
from s3prl_ekd.recipes.manifest import read_manifest

TEACHER_KINDS = ("hubert", "robust_hubert", "wavlm")
TEACHER_HUB = {"hubert": "hubert_local", "robust_hubert": "hubert_local", "wavlm": "wavlm_local"}
SHIPPED_TEACHERS = "teachers"  # pretrain_configs/teachers/<kind>.pt, see its README.md
# (metric key, column label, higher is better) per reported column; pr_noisy: PR's model, noisy test audio.
TASK_METRICS = {"pr": ("per", "PER", False), "pr_noisy": ("per", "PER noisy", False),
                "sid": ("acc", "SID acc", True), "er": ("acc", "ER acc", True), "asr": ("wer", "WER", False)}
TRAINED_TASKS = ("pr", "sid", "er", "asr")
MARKER_NAME = ".s3prl_ekd_demo"


@dataclass
class DemoConfig:
    """Sizes of the miniature; the defaults fit `make demo` in about 20 minutes on 2 cores."""

    seed: int = 0
    utterances: int = 1200
    speakers: int = 12
    held_out: tuple[float, float] = (1 / 12, 1 / 3)  # dev and test fractions: 100 dev, 400 test utterances
    noisy_snr_db: float = 5.0        # PR's noisy test copy
    retrain_teachers: bool = False   # train the teachers here instead of using the shipped ones
    teachers_dir: str | None = None  # or use hubert.pt, robust_hubert.pt, wavlm.pt from this folder
    teacher_steps: int | None = None  # with retrain_teachers: override the recipe's steps
    student_steps: int = 300
    student_batch_size: int = 8
    student_crop_samples: int = 24000
    # The paper's table: three single-teacher students and the layerwise-average EKD student (FULL adds
    # the concat and multi-head ones).
    students: list[str] = field(default_factory=lambda: ["distil_hubert", "distil_robust_hubert", "distil_wavlm",
                                                         "ekd_average"])
    baselines: bool = True          # the fbank and teacher rows (tests leave them out)
    profile: str = "cpu-small"
    superb_steps: int | None = None  # downstream training steps; None = the profile's own (tests use a few)
    # Downstream learning rates tried per task, the best on dev kept (FULL sweeps). Here one per task, so
    # that SID and ER can train until dev stops improving within the budget; each is the rate that won
    # on dev in trials on the demo corpus (2026-11-26): ASR 3e-3 beat 1e-3 by 4-8 dev WER points at 600
    # steps of 16 (fbank, HuBERT teacher; 5e-3 and 1e-2 were worse); trained to early stopping at 1e-3
    # and 1e-2, SID picked 1e-3 for 4 of 5 upstreams (three teachers, distil_hubert, a longer-trained
    # WavLM) and ER 1e-2 for 3; at PR's 300 steps 1e-2 won for 5 of the 8 upstreams of an earlier demo.
    lr_grid: dict[str, list[float]] = field(default_factory=lambda: {
        "pr": [1e-2], "sid": [1e-3], "er": [1e-2], "asr": [3e-3]})
    early_stop: int = 3
    memoize_gib: float = 2.0
    bootstrap: int = 2000            # resamples of the test utterances
    jobs: int = 2                    # students trained at once, and threads for the teacher pass
    # Upstreams benchmarked at once, one thread each. More processes than cores: with one per core, the
    # last upstream ran alone for minutes while the other core idled; shared, the cores stay busy to the end.
    superb_jobs: int = 4
    full: bool = False


def full_config(**overrides) -> DemoConfig:
    """`make demo FULL=1`: the larger version: more data, all three EKD variants, longer student
    training, a wider learning-rate grid and more patience downstream."""
    return DemoConfig(**{"utterances": 3000, "held_out": (0.1, 0.2), "student_steps": 1000,
                         "students": ["distil_hubert", "distil_robust_hubert", "distil_wavlm", "ekd_average",
                                      "ekd_concat", "ekd_multihead"],
                         "lr_grid": {"pr": [1e-4, 1e-3, 1e-2], "sid": [1e-3, 1e-2], "er": [1e-3, 1e-2],
                                     "asr": [1e-3, 3e-3]},
                         "early_stop": 5, "full": True, **overrides})


def student_plan(config: DemoConfig) -> dict[str, tuple[list[str], str]]:
    """Student name -> (teacher kinds, aggregation)."""
    every = {f"distil_{kind}": ([kind], "layerwise_average") for kind in TEACHER_KINDS}
    every.update({"ekd_average": (list(TEACHER_KINDS), "layerwise_average"),
                  "ekd_concat": (list(TEACHER_KINDS), "layerwise_concat"),
                  "ekd_multihead": (list(TEACHER_KINDS), "multi_head")})
    unknown = [name for name in config.students if name not in every]
    if unknown:
        raise UserError(f"--students {','.join(unknown)}: use some of {', '.join(every)}")
    return {name: every[name] for name in config.students}


def student_kind(name: str) -> str:
    return "EKD student" if name.startswith("ekd") else "single-teacher student"


def table_rows(config: DemoConfig, teachers: dict[str, Path], students: dict[str, Path]) -> list[tuple]:
    """(name, s3prl upstream, checkpoint, kind) per row, in the paper's order: fbank and the teachers,
    the single-teacher students, then the EKD students."""
    rows = []
    if config.baselines:
        rows.append(("fbank", "fbank", None, "baseline"))
        rows += [(f"teacher_{k}", TEACHER_HUB[k], teachers[k], "teacher") for k in TEACHER_KINDS]
    rows += [(n, "ekd_distiller", c, student_kind(n)) for n, c in students.items() if not n.startswith("ekd")]
    rows += [(n, "ekd_distiller", c, student_kind(n)) for n, c in students.items() if n.startswith("ekd")]
    return rows


# -- stages ---------------------------------------------------------------------------------------

def shipped_teachers(folder: str | None = None) -> dict[str, Path]:
    """The shipped teachers (pretrain_configs/teachers/), or those of `folder`."""
    if folder is None:
        return {kind: pretrain_config(f"{SHIPPED_TEACHERS}/{kind}.pt") for kind in TEACHER_KINDS}
    paths = {kind: Path(folder).resolve() / f"{kind}.pt" for kind in TEACHER_KINDS}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise UserError(f"--teachers {folder}: {', '.join(missing)} not found; the folder needs "
                        f"{', '.join(f'{k}.pt' for k in TEACHER_KINDS)}")
    return paths


def retrained_teachers(config: DemoConfig, data: Path, folder: Path, progress: bool) -> dict[str, Path]:
    """The three teachers trained here by the shipped ones' recipe: their corpus, seed and steps
    (`teacher_steps` overrides the steps). Idempotent per recipe."""
    from s3prl_ekd.demo.corpus import synthesize_corpus
    from s3prl_ekd.demo.teacher_training import RECIPE, RECIPE_CORPUS, RECIPE_SEED, train_teacher

    corpus = data / "teacher-corpus-seed{seed}-n{utterances}-s{speakers}".format(**RECIPE_CORPUS)
    manifest = synthesize_corpus(corpus, RECIPE_CORPUS["utterances"], RECIPE_CORPUS["speakers"],
                                 seed=RECIPE_CORPUS["seed"], progress=progress)
    train_audio = [row.audio for row in read_manifest(manifest) if row.split == "train"]
    out, keys = {}, {}
    for name, kind, recipe in RECIPE:  # in order: a continued run follows the one it starts from
        settings = {k: v for k, v in recipe.items() if k != "init"}
        if config.teacher_steps:
            settings["steps"] = config.teacher_steps
        if "init" in recipe:
            settings["init_from"] = out[recipe["init"]]
        path = folder / f"{name}.pt"
        key = fingerprint(kind, RECIPE_CORPUS, RECIPE_SEED, {**settings, "init_from": keys.get(recipe.get("init"))})
        key_file = path.with_suffix(".key")
        if not (path.is_file() and key_file.is_file() and key_file.read_text() == key):
            train_teacher(kind, train_audio, path, seed=RECIPE_SEED, progress=progress, **settings)
            atomic_write_text(key_file, key)
        out[name], keys[name] = path, key
    return {kind: out[kind] for kind in TEACHER_KINDS}


def model_config(kinds: list[str], aggregation: str, teachers: dict[str, Path]) -> dict:
    """Teachers' layers left to the default (three evenly spaced, ending at the last), as in the store.
    The student's CNN is copied from the first teacher and frozen (feature_grad_mult 0): the demo's
    budget goes to the transformer layers and heads."""
    return {"teachers": [{"name": TEACHER_HUB[k], "ckpt": str(teachers[k])} for k in kinds],
            "aggregation": aggregation, "student": asdict(ekd_student_demo(feature_grad_mult=0.0))}


def build_store(config: DemoConfig, teachers: dict[str, Path], audio_dir: Path, work: Path) -> Path:
    """One bfloat16 store of the three teachers over the training audio: every student reads it."""
    from s3prl_ekd.plugin.targets import build_store as build

    work.mkdir(parents=True, exist_ok=True)
    model = work / "store_teachers.yaml"
    atomic_write_text(model, yaml.safe_dump(model_config(list(TEACHER_KINDS), "multi_head", teachers)))
    store = work / "targets"
    build(model, str(audio_dir), store, dtype="bfloat16", log=lambda line: print(line))
    return store


def pretrain_student(name: str, kinds: list[str], aggregation: str, teachers: dict[str, Path], audio_dir: Path,
                     store: Path, work: Path, config: DemoConfig) -> Path:
    """Distil one student from the store with `s3prl-ekd pretrain` (s3prl's runner); idempotent per its
    whole configuration. Returns its final checkpoint."""
    from s3prl_ekd.io.checkpoint import newest_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    model = model_config(kinds, aggregation, teachers)
    steps = config.student_steps
    overrides = [f"config.pretrain_expert.datarc.audio_dir={audio_dir}",
                 f"config.pretrain_expert.datarc.targets={store}",
                 f"config.pretrain_expert.datarc.train_batch_size={config.student_batch_size}",
                 f"config.pretrain_expert.datarc.sequence_length={config.student_crop_samples}",
                 f"config.runner.total_steps={steps}", f"config.runner.save_step={max(1, steps - 1)}",
                 f"config.runner.log_step={max(1, steps // 50)}", "config.runner.max_keep=1"]
    expdir = work / name
    store_index = json.loads((store / "index.json").read_text())
    key = fingerprint(model, overrides, config.seed, store_index["teachers"], store_index["utterances"])
    key_file = work / f"{name}.key"
    found = newest_checkpoint(expdir) if expdir.is_dir() else None
    if found is not None and key_file.is_file() and key_file.read_text() == key:
        return found
    model_path = atomic_write_text(work / f"{name}.yaml", yaml.safe_dump(model, sort_keys=False))
    command = [sys.executable, "-m", "s3prl_ekd.cli", "pretrain", "-u", "ekd_distiller", "-g", str(model_path),
               "-c", str(pretrain_config("tiny_cpu_runner.yaml")), "-n", name, "-p", str(expdir), "--device", "cpu",
               "--seed", str(config.seed), "-o", ",,".join(overrides), "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise UserError(f"pretraining {name} failed; see {work / f'{name}.log'}")
    atomic_write_text(key_file, key)
    return newest_checkpoint(expdir)


def lr_grids(grid: list[float] | dict[str, list[float]]) -> dict[str, list[float]]:
    """Task -> learning rates (a plain list means: the same for every task)."""
    return {task: list(grid[task] if isinstance(grid, dict) else grid) for task in TRAINED_TASKS}


def superb_upstream(upstream: str, ckpt: Path | None, data: Path, out: Path, config: DemoConfig) -> dict:
    """`s3prl-ekd superb` for one upstream in its own process, every task and learning rate run there one
    after another, sharing the memoised upstream states (idempotent per task: superb's own keys)."""
    command = [sys.executable, "-m", "s3prl_ekd.cli", "superb", "-u", upstream, "--data", str(data),
               "--tasks", ",".join(TRAINED_TASKS), "--profile", config.profile, "--out", str(out),
               "--seed", str(config.seed), "--threads", "1", "--in-process", "--device", "cpu",
               "--early-stop", str(config.early_stop), "--memoize-upstream", str(config.memoize_gib)]
    for task, rates in lr_grids(config.lr_grid).items():
        command += ["--lr-grid", f"{task}=" + ",".join(f"{lr:g}" for lr in rates)]
    if ckpt is not None:
        command += ["-k", str(ckpt)]
    if config.superb_steps is not None:
        command += ["--steps", str(config.superb_steps)]
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as handle:
        proc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise UserError(f"superb for {upstream} ({ckpt or 'no checkpoint'}) failed; see {log}")
    return json.loads((out / "results.json").read_text())


def count_parameters(upstream: str, ckpt: Path | None) -> int:
    """Parameters of the model `upstream` builds from `ckpt` for downstream use (0 for fbank)."""
    if ckpt is None:
        return 0
    import s3prl.hub

    from s3prl_ekd import _startup

    _startup.install()  # ekd_distiller in s3prl.hub even without the .pth

    model = getattr(s3prl.hub, upstream)(ckpt=str(ckpt))
    return sum(p.numel() for p in model.parameters())


# -- report ---------------------------------------------------------------------------------------

def task_scores(results: dict, task: str) -> dict:
    """Per-utterance test scores of `task` in a superb results dir's runs (pr_noisy: PR's noisy test)."""
    if task == "pr_noisy":
        return results["runs"]["pr"]["runs"]["pr"]["noisy"]["scores"]
    (run,) = results["runs"][task]["runs"].values()  # the demo runs one ER fold
    return run["scores"]


def report_rows(rows: list[tuple], superb: dict[str, dict], tasks: list[str], config: DemoConfig) -> list[dict]:
    from s3prl_ekd.recipes.scores import bootstrap_interval, percent

    out = []
    for name, upstream, ckpt, kind in rows:
        results = superb[name]
        metrics, intervals, steps, rates = {}, {}, {}, {}
        for task in tasks:
            scores = task_scores(results, task)
            metrics[task] = round(percent(scores), 2)
            intervals[task] = [round(v, 2) for v in bootstrap_interval(scores, config.bootstrap, config.seed)]
            if task in results["runs"]:
                run = results["runs"][task]
                steps[task] = {"best": run["best_step"][0], "ran": run["steps"][0], "cap": run["max_steps"]}
                rates[task] = run["lr"][0]
        out.append({"name": name, "upstream": upstream, "kind": kind, "ckpt": str(ckpt) if ckpt else None,
                    "params": count_parameters(upstream, ckpt), "metrics": metrics, "interval95": intervals,
                    "downstream_steps": steps, "downstream_lr": rates})
    return out


def paired(a: str, b: str, task: str, superb: dict[str, dict], config: DemoConfig) -> dict:
    """`a` against `b` on `task` over the same test utterances: the paired bootstrap advantage of `a`
    in points (positive = `a` is better, for errors too) and whether its 95% interval holds 0."""
    from s3prl_ekd.recipes.scores import paired_difference

    diff, low, high = paired_difference(task_scores(superb[a], task), task_scores(superb[b], task),
                                        config.bootstrap, config.seed)
    sign = 1 if TASK_METRICS[task][2] else -1  # errors: lower is better
    better, lo, hi = sign * diff, *sorted((sign * low, sign * high))
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "not separable"
    return {"task": task, "advantage": round(better, 2), "interval95": [round(lo, 2), round(hi, 2)],
            "verdict": verdict}


def comparisons(rows: list[dict], superb: dict[str, dict], tasks: list[str], config: DemoConfig) -> list[dict]:
    """Every EKD student against every single-teacher student and every teacher, per task."""
    ekd = [r["name"] for r in rows if r["kind"] == "EKD student"]
    others = [r["name"] for r in rows if r["kind"] in ("single-teacher student", "teacher")]
    return [{"ekd": a, "other": b, **paired(a, b, task, superb, config)} for a in ekd for b in others for task in tasks]


def teachers_vs_fbank(rows: list[dict], superb: dict[str, dict], config: DemoConfig) -> list[dict]:
    """Each teacher against fbank on the content tasks: a teacher that does not beat filterbanks on PR
    and ASR has little to teach."""
    if not any(r["name"] == "fbank" for r in rows):
        return []
    return [{"teacher": r["name"], **paired(r["name"], "fbank", task, superb, config)}
            for r in rows if r["kind"] == "teacher" for task in ("pr", "asr")]


# Where each real teacher leads in SUPERB: RobustHuBERT on noisy speech, WavLM Base+ on speaker and emotion.
TEACHER_ROLES = (("robust_hubert", "pr_noisy"), ("wavlm", "sid"), ("wavlm", "er"))


def teacher_roles(rows: list[dict], superb: dict[str, dict], config: DemoConfig) -> list[dict]:
    """Each teacher against the other teachers on the tasks where its real counterpart leads: whether
    the mini teachers differ as the real ones do."""
    names = [r["name"] for r in rows if r["kind"] == "teacher"]
    return [{"teacher": f"teacher_{kind}", "other": other, **paired(f"teacher_{kind}", other, task, superb, config)}
            for kind, task in TEACHER_ROLES if f"teacher_{kind}" in names
            for other in names if other != f"teacher_{kind}"]


def verdict(rows: list[dict], pairs: list[dict]) -> str:
    """What the table says about EKD vs single-teacher distillation, counting only separable differences."""
    ekd = [r["name"] for r in rows if r["kind"] == "EKD student"]
    single = [r["name"] for r in rows if r["kind"] == "single-teacher student"]
    if not ekd or not single:
        return "The comparison needs at least one EKD and one single-teacher student."
    lines = []
    for name in ekd:
        against = [p for p in pairs if p["ekd"] == name and p["other"] in single]
        counts = {v: sum(p["verdict"] == v for p in against) for v in ("better", "worse", "not separable")}
        lines.append(f"{name} vs the single-teacher students, over {len(against)} (student, task) pairs: better in "
                     f"{counts['better']}, worse in {counts['worse']}, not separable in {counts['not separable']} "
                     "(paired bootstrap, 95%)")
    beat_all = [n for n in ekd if all(p["verdict"] == "better" for p in pairs if p["ekd"] == n and p["other"] in single)]
    if beat_all:
        lines.append(f"{', '.join(beat_all)} beat every single-teacher student on every task.")
    else:
        lines.append("No EKD student beats every single-teacher student on every task: EKD is not shown better than "
                     "single-teacher distillation on this miniature, where differences are not separable it is not "
                     "shown worse either.")
    return "\n".join(f"- {line}" for line in lines)


def report_markdown(report: dict) -> str:
    tasks, config = report["tasks"], report["config"]
    head = "| upstream | kind | params | " + " | ".join(
        TASK_METRICS[t][1] + (" ↑" if TASK_METRICS[t][2] else " ↓") for t in tasks) + " |"
    lines = [f"# EKD demo (seed {config['seed']}, {config['utterances']} synthetic utterances, "
             f"profile {config['profile']})", "", head, "|" + "---|" * (len(tasks) + 3)]
    for row in report["rows"]:
        cells = [f"{row['metrics'][t]:.1f} [{row['interval95'][t][0]:.1f}, {row['interval95'][t][1]:.1f}]"
                 for t in tasks]
        lines.append(f"| {row['name']} | {row['kind']} | {row['params'] / 1e6:.2f}M | " + " | ".join(cells) + " |")
    lines += ["", f"Test split, % with 95% bootstrap intervals over the {report['test_utterances']} test utterances "
              f"({config['bootstrap']} resamples). PER noisy: the PR model on the test audio with white noise at "
              f"{config['noisy_snr_db']:g} dB SNR. Downstream learning rates picked on dev from "
              f"{'; '.join(f'{t} {rates}' for t, rates in lr_grids(config['lr_grid']).items())}, "
              f"training stopped after {config['early_stop']} evaluations without a better dev metric.", "",
              "## Verdict", "", report["verdict"], "",
              "## EKD students vs single-teacher students (paired bootstrap)", "",
              "| EKD | vs | task | advantage (points) | 95% interval | verdict |", "|---|---|---|---|---|---|"]
    for p in report["comparisons"]:
        if p["other"].startswith("distil_"):
            lines.append(f"| {p['ekd']} | {p['other']} | {p['task']} | {p['advantage']:+.2f} | "
                         f"[{p['interval95'][0]:+.2f}, {p['interval95'][1]:+.2f}] | {p['verdict']} |")
    if report.get("teachers_vs_fbank"):
        lines += ["", "## Teachers vs fbank on content (paired bootstrap)", "",
                  "| teacher | task | advantage (points) | 95% interval | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {p['teacher']} | {p['task']} | {p['advantage']:+.2f} | [{p['interval95'][0]:+.2f}, "
                  f"{p['interval95'][1]:+.2f}] | {p['verdict']} |" for p in report["teachers_vs_fbank"]]
    if report.get("teacher_roles"):
        lines += ["", "## Teachers against each other where the real ones differ (paired bootstrap)", "",
                  "RobustHuBERT leads SUPERB on noisy speech, WavLM Base+ on speaker and emotion.", "",
                  "| teacher | vs | task | advantage (points) | 95% interval | verdict |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['teacher']} | {p['other']} | {p['task']} | {p['advantage']:+.2f} | "
                  f"[{p['interval95'][0]:+.2f}, {p['interval95'][1]:+.2f}] | {p['verdict']} |"
                  for p in report["teacher_roles"]]
    lines += ["", "## Downstream training", "", "Per task: the step of the best dev metric / steps run / the recipe's cap, "
              "@ the learning rate chosen on dev.", "",
              "| upstream | " + " | ".join(TRAINED_TASKS) + " |", "|---|" + "---|" * len(TRAINED_TASKS)]
    for row in report["rows"]:
        lines.append(f"| {row['name']} | " + " | ".join(
            "{best} / {ran} / {cap}".format(**row["downstream_steps"][t]) + f" @ {row['downstream_lr'][t]:g}"
            for t in TRAINED_TASKS) + " |")
    runs = [row["downstream_steps"][t] for row in report["rows"] for t in TRAINED_TASKS]
    still = sum(run["best"] == run["cap"] for run in runs)
    lines += ["", f"{sum(run['ran'] < run['cap'] for run in runs)} of {len(runs)} runs stopped early; {still} had "
              "their best dev metric at the cap's step (still improving when stopped)."]
    lines += ["", "## Stage times of the run that wrote this report (s)", "",
              "A stage whose outputs were already on disk and up to date is answered from there and shows its "
              "reading time, not what computing it took.", ""]
    lines += [f"- {k}: {v:.0f}" for k, v in report["stage_seconds"].items()]
    lines += ["", "Figures: `metrics.png` (every upstream per task, with intervals), `loss_curves.png`. Exact "
              "commands: each upstream's `superb/<name>/results.json`."]
    return "\n".join(lines) + "\n"


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
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)

    tasks, rows = report["tasks"], report["rows"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 4.2))
    colors = {"baseline": "tab:gray", "teacher": "tab:green", "single-teacher student": "tab:blue",
              "EKD student": "tab:red"}
    for ax, task in zip(axes, tasks):
        values = [r["metrics"][task] for r in rows]
        low = [v - r["interval95"][task][0] for v, r in zip(values, rows)]
        high = [r["interval95"][task][1] - v for v, r in zip(values, rows)]
        ax.bar(range(len(rows)), values, yerr=[low, high], capsize=2, color=[colors[r["kind"]] for r in rows])
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=70, ha="right", fontsize=7)
        ax.set_title(f"{TASK_METRICS[task][1]} (%, 95% CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)


# -- the pipeline ---------------------------------------------------------------------------------

def _parallel(jobs: int, calls: dict):
    """Run {name: fn} with `jobs` at a time; results by name; the first error stops what has not started."""
    results = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {name: pool.submit(fn) for name, fn in calls.items()}
        try:
            for name, future in futures.items():
                results[name] = future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def run_demo(config: DemoConfig, out: str | os.PathLike = "results/demo", data: str | os.PathLike = "data/demo",
             progress: bool = True, force: bool = False) -> dict:
    """Run every stage (answering from disk what is up to date) and write report.md / report.json."""
    import torch

    from s3prl_ekd.demo.corpus import synthesize_corpus
    from s3prl_ekd.demo.teacher_training import loss_curve_path
    from s3prl_ekd.io.events import read_scalars
    from s3prl_ekd.recipes.layout import prepare_all

    out, data = Path(out).resolve(), Path(data).resolve()
    refuse_foreign_out(out, MARKER_NAME, "s3prl-ekd demo", force)
    # One thread here: the stages that run beside this process (students, superb) take one each, and
    # torch's threads slow each other down badly on contended cores.
    torch.set_num_threads(1)
    plan = student_plan(config)
    claim_out(out, MARKER_NAME, "s3prl-ekd demo")
    seconds: dict[str, float] = {}

    def stage(name: str, fn):
        print(f"[demo] {name} ...", flush=True)
        started = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"[demo] {name}: {seconds[name]:.0f} s", flush=True)
        return result

    corpus_dir = data / f"corpus-seed{config.seed}-n{config.utterances}-s{config.speakers}"
    manifest = stage("corpus", lambda: synthesize_corpus(corpus_dir, config.utterances, config.speakers,
                                                         seed=config.seed, progress=progress, held_out=config.held_out))
    superb_data = data / "superb"
    stage("prepare", lambda: prepare_all(manifest, superb_data, progress=progress, noisy_snr_db=config.noisy_snr_db))
    rows = read_manifest(manifest)
    train_audio = [row.audio for row in rows if row.split == "train"]
    test_utterances = sum(row.split == "test" for row in rows)
    audio_dir = data / "train-audio"  # the unlabeled training split, as links
    audio_dir.mkdir(parents=True, exist_ok=True)
    for path in train_audio:
        if not (audio_dir / path.name).exists():
            (audio_dir / path.name).symlink_to(path)

    if config.retrain_teachers:
        teachers = stage("teachers", lambda: retrained_teachers(config, data, out / "teachers", progress))
    else:
        teachers = shipped_teachers(config.teachers_dir)
    torch.set_num_threads(config.jobs)  # nothing else runs during the teacher pass
    try:
        store = stage("target_store", lambda: build_store(config, teachers, audio_dir, data / "store"))
    finally:
        torch.set_num_threads(1)
    students = stage("students", lambda: _parallel(config.jobs, {
        name: (lambda n=name, k=kinds, a=aggregation: pretrain_student(
            n, k, a, teachers, audio_dir, store, out / "students", config))
        for name, (kinds, aggregation) in plan.items()}))

    upstreams = table_rows(config, teachers, students)
    superb = stage("superb", lambda: _parallel(config.superb_jobs, {
        name: (lambda n=name, u=upstream, c=ckpt: superb_upstream(u, c, superb_data, out / "superb" / n, config))
        for name, upstream, ckpt, _ in upstreams}))

    columns = ["pr", "pr_noisy", "sid", "er", "asr"]
    report_rows_ = stage("report", lambda: report_rows(upstreams, superb, columns, config))
    pairs = comparisons(report_rows_, superb, columns, config)
    curves = {f"teacher_{k}": [tuple(p) for p in json.loads(loss_curve_path(teachers[k]).read_text())["loss"]]
              for k in TEACHER_KINDS if loss_curve_path(teachers[k]).is_file()}
    for name in students:
        curves[name] = read_scalars(out / "students" / name).get("ekd_distiller/train-loss", [])
    report = {"config": asdict(config), "tasks": columns, "test_utterances": test_utterances, "rows": report_rows_,
              "comparisons": pairs, "verdict": verdict(report_rows_, pairs),
              "teachers_vs_fbank": teachers_vs_fbank(report_rows_, superb, config),
              "teacher_roles": teacher_roles(report_rows_, superb, config), "stage_seconds": seconds,
              "teachers": {k: str(v) for k, v in teachers.items()}}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    plot_figures(report, out, curves)
    return report


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the paper's experiment in miniature on a synthetic corpus (CPU)")
    p.add_argument("--full", action="store_true", help="the larger version: more data, steps and learning rates")
    p.add_argument("--converge", action="store_true", help="PR and ASR too train until dev stops improving "
                   "(downstream profile cpu-converge; the default stops them at 300 and 600 steps)")
    p.add_argument("--out", help="default results/demo (--full: results/demo_full, --converge: "
                   "results/demo_converge)")
    p.add_argument("--data", help="default data/demo (--full: data/demo_full)")
    p.add_argument("--retrain-teachers", action="store_true",
                   help="train the three teachers here (the recipe of the shipped ones) instead of using those")
    p.add_argument("--teachers", help="use hubert.pt, robust_hubert.pt and wavlm.pt from this folder instead")
    defaults = DemoConfig()
    for name in ("seed", "utterances", "speakers", "student_steps", "jobs", "superb_jobs"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {getattr(defaults, name)}")
    p.add_argument("--superb-steps", type=int, default=None, help="downstream steps (default: the profile's)")
    p.add_argument("--students", default=None, help=f"comma list (default: {','.join(defaults.students)})")
    p.add_argument("--force", action="store_true", help="write into an --out folder the demo did not make")

    def _run(args) -> int:
        overrides = {name: getattr(args, name) for name in ("seed", "utterances", "speakers", "student_steps",
                                                            "jobs", "superb_jobs", "superb_steps")
                     if getattr(args, name) is not None}
        if args.students:
            overrides["students"] = [s.strip() for s in args.students.split(",") if s.strip()]
        overrides["retrain_teachers"] = args.retrain_teachers
        overrides["teachers_dir"] = args.teachers
        if args.converge:
            overrides["profile"] = "cpu-converge"
        config = full_config(**overrides) if args.full else dataclasses.replace(DemoConfig(), **overrides)
        # FULL and --converge keep their own results: the default report stays. --converge shares the
        # data folder (same corpus, SUPERB data and teacher targets).
        suffix = "_full" if args.full else ""
        out = args.out or f"results/demo{suffix}{'_converge' if args.converge else ''}"
        data = args.data or f"data/demo{suffix}"
        report = run_demo(config, out, data, force=args.force)
        print(report_markdown(report))
        print(f"report: {Path(out) / 'report.md'}")
        return 0

    p.set_defaults(func=_run)
