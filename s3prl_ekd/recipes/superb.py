"""Benchmark one upstream on PR, SID, ER and ASR with s3prl's own run_downstream.py.

For each task: recipe config (downstream_recipes/<task>/<profile>.yaml + the paths from
`prepare`) -> train, for each learning rate of the grid (SUPERB's protocol: the best on dev
wins), optionally until the dev metric stops improving -> evaluate the chosen run's best dev
checkpoint on test (and PR also on the noisy test copy, if prepared) -> score the prediction
files s3prl writes, per utterance (recipes.scores). Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shlex
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from s3prl_ekd.errors import ConfigError, UserError
from s3prl_ekd.io import processes
from s3prl_ekd.io.events import read_scalars
from s3prl_ekd.io.files import (
    atomic_write_json,
    atomic_write_text,
    claim_out,
    file_sha256,
    fingerprint,
    fresh_owned_dir,
    refuse_foreign_out,
)
from s3prl_ekd.io.processes import s3prl_ekd_command
from s3prl_ekd.io.resources import recipe_file
from s3prl_ekd.recipes.prepare import PREPARED_NAME, TASKS
from s3prl_ekd.recipes.scores import percent, utterance_scores

MARKER_NAME = ".s3prl_ekd_superb"  # marks experiment folders superb made, the only ones it clears
RESULT_NAME = "task_result.json"
RESULT_VERSION = 2  # bump when task_result.json's fields change: older results are then re-run


@dataclass(frozen=True)
class TaskSpec:
    """How one task runs through s3prl: expert (-d), metric name, the dev and test splits' names,
    and the best-on-dev checkpoint name."""

    downstream: str
    metric: str
    dev_split: str
    test_split: str
    best_checkpoint: str
    higher_is_better: bool


TASK_SPECS = {
    "pr": TaskSpec("ctc", "per", "dev", "test", "dev-best.ckpt", False),
    "sid": TaskSpec("voxceleb1", "acc", "dev", "test", "dev-best.ckpt", True),
    "er": TaskSpec("emotion", "acc", "dev", "test", "dev-best.ckpt", True),
    "asr": TaskSpec("asr", "wer", "dev-clean", "test-clean", "dev-clean-best.ckpt", False),
}
NOISY_TASK = "pr_noisy"  # PR's model tested on the noisy copy of the test split (prepare --noisy-snr)
# The recipe profiles, and whether each runs every ER fold: the paper's protocol averages every
# held-out session; the CPU profiles run one.
ALL_FOLDS = {"cpu-small": False, "cpu-converge": False, "superb": True}
PROFILES = tuple(ALL_FOLDS)


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in names if t not in TASK_SPECS]
    if unknown or not names:
        raise ConfigError(f"--tasks {','.join(names)}: use a comma list of {','.join(TASKS)}")
    return names


def deep_merge(base: dict, update: dict) -> dict:
    """`base` with `update` merged in (nested dicts merged, anything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_prepared(data_dir: Path, task: str) -> dict:
    path = data_dir / task / PREPARED_NAME
    if not path.is_file():
        raise UserError(f"{path}: not found; run `s3prl-ekd prepare {task} ... --out {data_dir}` first")
    return json.loads(path.read_text())


def load_recipe(task: str, profile: str) -> dict:
    """The profile's recipe for `task`. A recipe file that names `base: OTHER.yaml` is that recipe
    with its own keys merged over it (cpu-converge: cpu-small with longer caps)."""
    if profile not in PROFILES:
        raise ConfigError(f"--profile {profile}: use one of {', '.join(PROFILES)}")

    def read(name: str) -> dict:
        recipe = yaml.safe_load(recipe_file(task, name).read_text()) or {}
        base = recipe.pop("base", None)
        return deep_merge(read(base), recipe) if base else recipe

    return read(f"{profile}.yaml")


def recipe_config(task: str, profile: str, prepared: dict, steps: int | None = None) -> dict:
    """The s3prl config for `task`: the profile's recipe with prepare's data paths merged in;
    `steps` replaces the training length (evaluating and saving half-way and at the end)."""
    config = deep_merge(load_recipe(task, profile), prepared["config"])
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps {steps}: use a positive number of training steps")
        every = max(1, steps // 2)
        config = deep_merge(config, {"runner": {"total_steps": steps, "eval_step": every,
                                                "save_step": every, "log_step": every}})
    return config


@dataclass(frozen=True)
class Upstream:
    """One upstream as s3prl's runners take it: hub name (-u), checkpoint (-k), upstream config (-g)."""

    name: str
    ckpt: str | None = None
    config: str | None = None

    def resolved(self) -> Upstream:
        """Local paths made absolute and checked; an unknown hub name or a missing file is one line."""
        from s3prl_ekd.plugin.downstream import check_upstream_name

        check_upstream_name(self.name)
        ckpt, config = self.ckpt, self.config
        if ckpt and not str(ckpt).startswith(("http://", "https://")):
            ckpt = str(Path(ckpt).resolve())
            if not Path(ckpt).is_file():
                raise UserError(f"{ckpt}: upstream checkpoint (-k) not found")
        if config:
            config = str(Path(config).resolve())
            if not Path(config).is_file():
                raise UserError(f"{config}: upstream config (-g) not found")
        return Upstream(self.name, str(ckpt) if ckpt else None, config)

    def argv(self) -> list[str]:
        return (["-u", self.name] + (["-k", self.ckpt] if self.ckpt else [])
                + (["-g", self.config] if self.config else []))

    def identity(self) -> dict:
        """What makes two upstreams the same: the name and the contents of the checkpoint and config."""
        def content(path):
            if not path or str(path).startswith(("http://", "https://")):
                return path
            return file_sha256(path)

        return {"name": self.name, "ckpt": self.ckpt, "ckpt_sha256": content(self.ckpt),
                "config": self.config, "config_sha256": content(self.config)}


@dataclass
class SuperbOptions:
    """How `run_superb` runs: which tasks, on what data, into which folder, and how every task trains."""

    data_dir: str | os.PathLike
    out_dir: str | os.PathLike = "results/superb"
    tasks: str | list[str] = TASKS
    profile: str = "cpu-small"
    device: str | None = None           # default: cuda when available, else cpu
    seed: int = 1337
    threads: int | None = None          # OMP threads per run (default: 1 on CPU)
    steps: int | None = None            # training steps (default: the profile's)
    lr_grid: dict[str, list[float]] = field(default_factory=dict)  # task -> rates; absent: the recipe's rate
    early_stop: int | None = None       # stop after this many evaluations without a better dev metric
    memoize_gib: float | None = None    # keep up to this many GiB of upstream states per process
    in_process: bool = False            # run_downstream.py in this process, one run after another
    jobs: int | None = None             # tasks at once (default: CPU cores / threads on CPU, 1 on GPU)
    force: bool = False                 # re-run identical tasks; replace another upstream's results (kept aside)
    progress: bool = True
    cnn_features: str | None = None     # share an ekd_distiller CNN's output per utterance through this folder


def run_logged(argv: list[str], log: Path, task: str, opts: SuperbOptions) -> str:
    """`s3prl-ekd downstream ARGV` logged to `log` (+ .err): in a fresh interpreter, or here with
    `opts.in_process` (no second import of s3prl; memoised upstream states shared by the runs).
    Returns the command line, for the record."""
    command = s3prl_ekd_command("downstream", *argv)
    if not opts.in_process:
        processes.run_logged(command, log, f"{task}: run_downstream.py", opts.threads)
        return shlex.join(command)
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        code = _run_here(argv, out, err, opts.threads)
    if code != 0:
        tail = "\n".join(log.with_suffix(".err").read_text().splitlines()[-15:])
        raise UserError(f"{task}: run_downstream.py failed (exit {code}); command: {shlex.join(command)}\n"
                        f"logs: {log}, {log.with_suffix('.err')}\n{tail}")
    return shlex.join(command)


def _run_here(argv: list[str], out, err, threads: int | None) -> int:
    import contextlib
    import traceback

    import torch

    from s3prl_ekd.plugin.downstream import run_downstream

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return run_downstream(argv)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else 1
        except Exception:
            traceback.print_exc()
            return 1
        finally:
            torch.set_num_threads(before)  # the caller's process keeps its own setting


def pick_checkpoint(expdir: Path, spec: TaskSpec) -> Path:
    """The best-on-dev checkpoint, else the last saved one (e.g. dev accuracy never rose above 0)."""
    best = expdir / spec.best_checkpoint
    if best.is_file():
        return best
    states = sorted(expdir.glob("states-*.ckpt"), key=lambda p: int(p.stem.split("-")[-1]))
    if not states:
        raise UserError(f"{expdir}: training saved no checkpoint; see {expdir / 'train.log'}")
    return states[-1]


def dev_curve(expdir: Path, spec: TaskSpec) -> list[tuple[int, float]]:
    """(step, dev metric in s3prl's unit) of every evaluation during training, from its log."""
    suffix = f"/{spec.dev_split}-{spec.metric}"
    curves = [points for tag, points in read_scalars(expdir).items() if tag.endswith(suffix)]
    if not curves:
        raise UserError(f"{expdir}: no '*{suffix}' in the training log; see {expdir / 'train.log'}")
    return curves[0]


@dataclass
class TrainRun:
    """One training run of a task at one learning rate."""

    lr: float
    expdir: str
    dev_best: float        # best dev metric of the run, in s3prl's unit
    best_step: int
    stopped_at_step: int   # total_steps, or where early stopping ended it
    seconds: float
    command: str


def train_once(task: str, config: dict, expdir: Path, upstream: Upstream, opts: SuperbOptions) -> TrainRun:
    spec = TASK_SPECS[task]
    fresh_owned_dir(expdir, MARKER_NAME, "s3prl-ekd superb")
    config_path = atomic_write_text(expdir / "recipe.yaml", yaml.safe_dump(config, sort_keys=False))
    argv = ["-m", "train", *upstream.argv(), "-d", spec.downstream, "-c", str(config_path),
            "-p", str(expdir), "--device", opts.device, "--seed", str(opts.seed)]
    if opts.early_stop:
        argv += ["--early-stop", str(opts.early_stop)]
    if opts.memoize_gib:
        argv += ["--memoize-upstream", str(opts.memoize_gib)]
    if opts.cnn_features:
        argv += ["--share-cnn-features", str(opts.cnn_features)]
    start = time.perf_counter()
    command = run_logged(argv, expdir / "train.log", task, opts)
    curve = dev_curve(expdir, spec)
    best_step, dev_best = (max if spec.higher_is_better else min)(curve, key=lambda point: point[1])
    stop_file = expdir / "early_stop.json"
    stopped = json.loads(stop_file.read_text())["stopped_at_step"] if stop_file.is_file() \
        else int(config["runner"]["total_steps"])
    return TrainRun(float(config["optimizer"]["lr"]), str(expdir), dev_best, best_step, stopped,
                    round(time.perf_counter() - start, 1), command)


def test_once(task: str, checkpoint: Path, expdir: Path, fold: str | None, opts: SuperbOptions,
              corpus_test: str | None = None) -> tuple[dict, float, str]:
    """Evaluate `checkpoint` on the test split (PR: or the prepared split `corpus_test`) into `expdir`;
    -> (per-utterance scores, seconds, command)."""
    spec = TASK_SPECS[task]
    argv = ["-m", "evaluate", "-e", str(checkpoint), "-t", spec.test_split, "--device", opts.device]
    if opts.memoize_gib:  # in one process, the tasks' test splits share one upstream pass per utterance
        argv += ["--memoize-upstream", str(opts.memoize_gib)]
    if opts.cnn_features:
        argv += ["--share-cnn-features", str(opts.cnn_features)]
    if corpus_test:
        argv += ["-o", f"args.expdir={expdir},,config.downstream_expert.corpus.test=['{corpus_test}']"]
    start = time.perf_counter()
    command = run_logged(argv, expdir / "test.log", task, opts)
    scores = {utt: list(pair) for utt, pair in utterance_scores(task, expdir, spec.test_split, fold).items()}
    return scores, round(time.perf_counter() - start, 1), command


@dataclass
class RunResult:
    """One task (one ER fold): the learning-rate sweep on dev, then the chosen run on test."""

    value: float                         # metric in percent on the test split
    lr: float                            # the learning rate that won on dev
    steps: int                           # training steps of the chosen run (early stopping included)
    best_step: int
    dev: dict[str, float]                # lr -> best dev metric (s3prl's unit)
    train_seconds: float
    test_seconds: float
    checkpoint: str
    commands: list[str]
    scores: dict[str, list[float]]       # utterance -> (numerator, denominator) for the bootstrap
    noisy: dict | None = None            # PR on the noisy test copy: {value, scores, ...}


def run_one(task: str, config: dict, expdir: Path, upstream: Upstream, opts: SuperbOptions,
            noisy_test: str | None = None) -> RunResult:
    """The learning-rate sweep (or the recipe's rate) on dev, then test with the winner."""
    spec = TASK_SPECS[task]
    rates = opts.lr_grid.get(task) or [None]
    runs = []
    expdir.mkdir(parents=True, exist_ok=True)
    (expdir / MARKER_NAME).write_text("made by s3prl-ekd superb\n")
    for lr in rates:
        run_config = config if lr is None else deep_merge(config, {"optimizer": {"lr": lr}})
        run_dir = expdir / ("train" if lr is None else f"lr{lr:g}")
        runs.append(train_once(task, run_config, run_dir, upstream, opts))
    chosen = (max if spec.higher_is_better else min)(runs, key=lambda run: run.dev_best)
    checkpoint = pick_checkpoint(Path(chosen.expdir), spec)
    fold = config["downstream_expert"]["datarc"].get("test_fold") if task == "er" else None
    # s3prl writes the test predictions into the checkpoint's experiment folder.
    scores, test_seconds, test_command = test_once(task, checkpoint, Path(chosen.expdir), fold, opts)
    commands = [run.command for run in runs] + [test_command]
    noisy = None
    if noisy_test is not None:
        noisy_dir = fresh_owned_dir(expdir / noisy_test, MARKER_NAME, "s3prl-ekd superb")
        noisy_scores, seconds, command = test_once(task, checkpoint, noisy_dir, None, opts, corpus_test=noisy_test)
        noisy = {"value": round(percent(noisy_scores), 4), "scores": noisy_scores, "test_seconds": seconds}
        test_seconds += seconds
        commands.append(command)
    return RunResult(round(percent(scores), 4), chosen.lr, chosen.stopped_at_step, chosen.best_step,
                     {f"{run.lr:g}": run.dev_best for run in runs}, round(sum(run.seconds for run in runs), 1),
                     test_seconds, str(checkpoint), commands, scores, noisy)


def run_task(task: str, upstream: Upstream, opts: SuperbOptions) -> dict:
    """Run `task` (every ER fold the profile asks for) unless an identical run is on disk."""
    spec = TASK_SPECS[task]
    data_dir, out_dir = Path(opts.data_dir), Path(opts.out_dir)
    prepared = load_prepared(data_dir, task)
    config = recipe_config(task, opts.profile, prepared, opts.steps)
    folds = [None]
    if task == "er":
        folds = prepared.get("folds") or [config["downstream_expert"]["datarc"]["test_fold"]]
        folds = folds if ALL_FOLDS[opts.profile] else folds[:1]
    noisy_test = prepared.get("noisy_test") if task == "pr" else None
    key = fingerprint(RESULT_VERSION, task, upstream.identity(), opts.profile, config, prepared.get("fingerprint"),
                      folds, noisy_test, opts.device, opts.seed, opts.lr_grid.get(task), opts.early_stop,
                      opts.memoize_gib is not None)
    task_dir = out_dir / task
    result_path = task_dir / RESULT_NAME
    if not opts.force and result_path.is_file():
        saved = json.loads(result_path.read_text())
        if saved.get("fingerprint") == key:
            print(f"[superb] {task}: up to date (same upstream, checkpoint, recipe and data): {result_path}")
            return saved
    fresh_owned_dir(task_dir, MARKER_NAME, "s3prl-ekd superb")
    runs = {}
    for fold in folds:
        if fold is None:
            runs[task] = run_one(task, config, task_dir, upstream, opts, noisy_test)
        else:
            fold_config = deep_merge(config, {"downstream_expert": {"datarc": {"test_fold": fold}}})
            runs[fold] = run_one(task, fold_config, task_dir / fold, upstream, opts)
    values = [r.value for r in runs.values()]
    result = {
        "task": task, "metric": spec.metric, "value": round(sum(values) / len(values), 4),
        "steps": [r.steps for r in runs.values()], "best_step": [r.best_step for r in runs.values()],
        "max_steps": int(config["runner"]["total_steps"]), "lr": [r.lr for r in runs.values()],
        "train_seconds": round(sum(r.train_seconds for r in runs.values()), 1),
        "test_seconds": round(sum(r.test_seconds for r in runs.values()), 1),
        "commands": [c for r in runs.values() for c in r.commands],
        "runs": {name: asdict(r) for name, r in runs.items()},
        "fingerprint": key,
    }
    atomic_write_json(result_path, result)
    return result


RESULTS_NAME = "results.json"


def _previous_upstream(out_dir: Path, upstream: Upstream) -> dict | None | bool:
    """The identity of the upstream whose results `out_dir` holds if it is another one (None: one from an
    earlier version of s3prl-ekd), False if there are none or they are `upstream`'s own."""
    results = out_dir / RESULTS_NAME
    if not results.is_file():
        return False
    previous = json.loads(results.read_text()).get("upstream_identity")
    return False if previous == upstream.identity() else previous


def check_out(out_dir: Path, upstream: Upstream, force: bool) -> None:
    """`out_dir` is ours and holds no other upstream's results (compared by name and the contents of the
    checkpoint and config), unless `force`."""
    refuse_foreign_out(out_dir, MARKER_NAME, "s3prl-ekd superb", force)
    previous = _previous_upstream(out_dir, upstream)
    if previous is not False and not force:
        held = previous["name"] + (f" ({previous['ckpt']})" if previous and previous.get("ckpt") else "") \
            if previous else "an earlier version of s3prl-ekd"
        raise UserError(f"{out_dir}: holds the results of another upstream, {held}; choose another --out, or pass "
                        "--force to run here (the old results are then kept in previous-N/ beside the new ones)")


def move_previous_aside(out_dir: Path, upstream: Upstream) -> None:
    """Another upstream's results in `out_dir` (allowed by --force) go to OUT/previous-N/, never removed."""
    previous = _previous_upstream(out_dir, upstream)
    if previous is False:
        return
    aside = next(out_dir / f"previous-{n}" for n in range(1, 10**6) if not (out_dir / f"previous-{n}").exists())
    aside.mkdir()
    for entry in list(out_dir.iterdir()):
        if entry.name != MARKER_NAME and not entry.name.startswith("previous-"):
            shutil.move(str(entry), str(aside / entry.name))
    print(f"[superb] {out_dir}: the results of {previous['name'] if previous else 'another upstream'} "
          f"were moved to {aside}")


def run_superb(upstream: Upstream, opts: SuperbOptions) -> dict:
    """Benchmark `upstream` on `opts.tasks`; write and return results.json's content.

    results["tasks"][task] holds the one test metric in percent (pr: per, sid: acc, er: acc,
    asr: wer; pr_noisy: PR's model on the noisy test copy, when prepared); results["runs"][task]
    the learning rates tried (dev metric of each) and chosen, steps, times, checkpoints, exact
    commands and per-utterance test scores. A task whose identical run (same upstream, checkpoint
    and config contents, recipe, data, options) is already in `out_dir` is not run again unless
    `force`; an `out_dir` holding another upstream's results is refused unless `force`. Each run is
    seeded on its own, so the numbers do not depend on `jobs`.
    """
    from tqdm import tqdm

    from s3prl_ekd.devices import resolve_device

    data_dir, out_dir = Path(opts.data_dir).resolve(), Path(opts.out_dir).resolve()
    refuse_foreign_out(out_dir, MARKER_NAME, "s3prl-ekd superb", opts.force)
    names = parse_tasks(opts.tasks)
    device = resolve_device(opts.device)
    upstream = upstream.resolved()
    threads = opts.threads if opts.threads is not None else (1 if device == "cpu" else None)
    jobs = opts.jobs
    if opts.in_process:
        jobs = 1  # runs share sys.argv, the working directory and the RNGs: one at a time
    if jobs is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        jobs = max(1, cores // (threads or 1)) if device == "cpu" else 1  # cores this process may use
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: use 1 or more")
    grids = dict(opts.lr_grid)
    unknown = sorted(set(grids) - set(TASKS))
    if unknown:
        raise ConfigError(f"--lr-grid: unknown task(s) {unknown}; use some of {', '.join(TASKS)}")
    if any(lr <= 0 for rates in grids.values() for lr in rates):
        raise ConfigError(f"--lr-grid {grids}: learning rates must be positive")
    grids = {task: sorted(rates) for task, rates in grids.items() if task in names and rates}
    opts = dataclasses.replace(opts, data_dir=data_dir, out_dir=out_dir, device=device, threads=threads,
                               lr_grid=grids, jobs=jobs,
                               cnn_features=str(Path(opts.cnn_features).resolve()) if opts.cnn_features else None)
    for task in names:
        recipe_config(task, opts.profile, load_prepared(data_dir, task), opts.steps)  # fail before training
    check_out(out_dir, upstream, opts.force)
    move_previous_aside(out_dir, upstream)
    claim_out(out_dir, MARKER_NAME, "s3prl-ekd superb")
    results = {"upstream": upstream.name, "tasks": {}, "upstream_ckpt": upstream.ckpt,
               "upstream_config": upstream.config, "upstream_identity": upstream.identity(),
               "upstream_ckpt_sha256": upstream.identity()["ckpt_sha256"], "profile": opts.profile,
               "data": str(data_dir), "device": device, "seed": opts.seed, "lr_grid": grids,
               "early_stop": opts.early_stop, "runs": {}}
    done = {}
    with ThreadPoolExecutor(max_workers=min(jobs, len(names))) as pool, \
            tqdm(total=len(names), desc=f"superb {upstream.name}", unit="task", disable=not opts.progress) as bar:
        futures = {pool.submit(run_task, task, upstream, opts): task for task in names}
        for future in as_completed(futures):
            if future.exception() is not None:
                pool.shutdown(wait=True, cancel_futures=True)  # tasks not started yet never start
                raise future.exception()
            done[futures[future]] = future.result()
            bar.update(1)
            ordered = [t for t in names if t in done]  # the table keeps the order asked for
            results["tasks"] = {t: {done[t]["metric"]: done[t]["value"]} for t in ordered}
            results["runs"] = {t: {k: done[t][k] for k in ("steps", "best_step", "max_steps", "lr", "train_seconds",
                                                           "test_seconds", "commands", "runs")} for t in ordered}
            if "pr" in done and done["pr"]["runs"]["pr"]["noisy"]:
                results["tasks"][NOISY_TASK] = {"per": done["pr"]["runs"]["pr"]["noisy"]["value"]}
            write_results(results, out_dir)  # a partial table survives an interrupted run
    return results


def write_results(results: dict, out_dir: Path) -> None:
    atomic_write_json(out_dir / RESULTS_NAME, results)
    atomic_write_text(out_dir / "results.md", results_markdown(results))


def results_markdown(results: dict) -> str:
    arrow = {"per": "lower is better", "wer": "lower is better", "acc": "higher is better"}
    lines = [f"# SUPERB-style results: {results['upstream']}", "",
             f"- upstream checkpoint: {results.get('upstream_ckpt') or '-'}",
             f"- profile: {results['profile']}; data: {results['data']}; device: {results['device']}",
             "", "| task | metric (test, %) | value | steps (best / ran / cap) | lr (picked on dev) | train s "
                 "| test s |",
             "|---|---|---|---|---|---|---|"]
    for task, metrics in results["tasks"].items():
        (metric, value), = metrics.items()
        run = results["runs"].get(task)
        if run is None:  # pr_noisy: PR's model, tested again
            lines.append(f"| {task} | {metric} ({arrow[metric]}) | {value:.2f} | (pr's) | | |")
            continue
        steps = ", ".join(f"{best} / {ran} / {run['max_steps']}" for best, ran in zip(run["best_step"], run["steps"]))
        lrs = ", ".join(f"{lr:g}" for lr in run["lr"])
        lines.append(f"| {task} | {metric} ({arrow[metric]}) | {value:.2f} | {steps} | {lrs} | "
                     f"{run['train_seconds']:.0f} | {run['test_seconds']:.0f} |")
    lines += ["", "## Commands", ""]
    for task, run in results["runs"].items():
        lines += [f"{task}:", "```"] + run["commands"] + ["```"]
    return "\n".join(lines) + "\n"


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("superb", help="train + test an upstream on PR/SID/ER/ASR; writes results.json/.md")
    p.add_argument("-u", "--upstream", required=True, help="s3prl upstream name, e.g. fbank, hubert_local, "
                                                           "ekd_distiller")
    p.add_argument("-k", "--upstream-ckpt", help="upstream checkpoint (for *_local / ekd_distiller)")
    p.add_argument("-g", "--upstream-config", help="upstream config (run_downstream.py -g)")
    p.add_argument("--data", required=True, help="folder `s3prl-ekd prepare` wrote")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of pr,sid,er,asr")
    p.add_argument("--profile", choices=PROFILES, default="cpu-small")
    p.add_argument("--out", required=True, help="output folder (results.json, one folder per task)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, help="CPU threads per run (default: 1 on CPU)")
    p.add_argument("--steps", type=int, help="training steps per task (default: the profile's)")
    p.add_argument("--jobs", type=int, help="tasks run at once (default: CPU cores / threads; 1 on GPU)")
    p.add_argument("--lr-grid", action="append", metavar="[TASK=]RATES",
                   help="comma list of learning rates, each trained and the best on dev kept (SUPERB's protocol), "
                        "for every task or, as TASK=RATES (repeatable), for one; default: the recipe's rate")
    p.add_argument("--early-stop", type=int, help="stop a run after N evaluations without a better dev metric")
    p.add_argument("--memoize-upstream", type=float, metavar="GIB",
                   help="keep up to GIB of the frozen upstream's states, computed once per utterance")
    p.add_argument("--share-cnn-features", metavar="DIR", help="keep an ekd_distiller upstream's CNN output per "
                   "utterance in DIR, for every run (and process) with the same CNN and audio; changes no result")
    p.add_argument("--in-process", action="store_true", help="run every task here, one after another, sharing "
                   "the memoised upstream states (instead of a fresh interpreter per run)")
    p.add_argument("--force", action="store_true", help="re-run tasks that already have a result; run into an "
                   "--out holding another upstream's results (kept in previous-N/) or files superb did not write")

    def _superb(args) -> int:
        opts = SuperbOptions(args.data, args.out, args.tasks, args.profile, args.device, args.seed, args.threads,
                             args.steps, parse_lr_grid(args.lr_grid, args.tasks) if args.lr_grid else {},
                             args.early_stop, args.memoize_upstream, args.in_process, args.jobs, args.force,
                             cnn_features=args.share_cnn_features)
        results = run_superb(Upstream(args.upstream, args.upstream_ckpt, args.upstream_config), opts)
        print(results_markdown(results).split("## Commands")[0].rstrip())
        print(f"wrote {Path(args.out).resolve() / RESULTS_NAME}")
        return 0

    p.set_defaults(func=_superb)


def parse_lr_grid(entries: list[str], tasks: str) -> dict[str, list[float]]:
    """["1e-3,1e-2", "asr=1e-3"] -> {task: rates}: a bare list for every task of `tasks`, TASK=RATES
    for that one (later entries win)."""
    grids: dict[str, list[float]] = {}
    for entry in entries:
        task, _, rates = entry.rpartition("=")
        targets = [task.strip()] if task else parse_tasks(tasks)
        for name in targets:
            grids[name] = parse_floats(rates, f"--lr-grid {entry}")
    return grids


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give comma-separated numbers, e.g. 1e-3,1e-2") from None
