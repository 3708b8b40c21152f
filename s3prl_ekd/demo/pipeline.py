"""The paper's experiment in miniature, end to end on CPU: `make demo` / `s3prl-ekd demo`.

corpus -> prepare (with a noisy PR test copy) -> teachers (shipped, or --retrain-teachers) -> one
teacher-target store -> students, every one from one common initialisation, for each seed -> SUPERB
tasks for every row and seed -> report (report.py: intervals over seeds and test utterances, paired
verdicts with Holm's correction).

Students train while the baselines' SUPERB runs, and each student's SUPERB starts as soon as it is
trained: the two cores never wait for a stage boundary. Every step is keyed by its own inputs (the
corpus by its parameters, prepare and superb by the content of their inputs and recipes, the store
by teachers and audio, a student by its whole model and runner config and seed): re-running
answers from disk what has not changed, and an interrupted run resumes. A student that another --out
folder already trained from the same data folder with identical inputs is reused from there, with its
SUPERB runs (`make demo COMPARE=1` after `make demo`: the five seed-0 students); the report names them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from s3prl_ekd.core.student import ekd_student_demo
from s3prl_ekd.demo import report as reporting
from s3prl_ekd.errors import UserError
from s3prl_ekd.io.files import atomic_write_json, atomic_write_text, claim_out, fingerprint, refuse_foreign_out
from s3prl_ekd.io.processes import run_logged, s3prl_ekd_command
from s3prl_ekd.io.resources import pretrain_config
from s3prl_ekd.recipes.manifest import read_manifest
from s3prl_ekd.recipes.superb import Upstream

TEACHER_KINDS = ("hubert", "robust_hubert", "wavlm")
TEACHER_HUB = {"hubert": "hubert_local", "robust_hubert": "hubert_local", "wavlm": "wavlm_local"}
SHIPPED_TEACHERS = "teachers"  # pretrain_configs/teachers/<kind>.pt, see its README.md
MARKER_NAME = ".s3prl_ekd_demo"


@dataclass(frozen=True)
class StudentSpec:
    """How one student of the table is made: its teachers and model-config options, or a weight-space
    merge of other students (trained from the same initialisation)."""

    teachers: tuple[str, ...] = ()
    aggregation: str = "layerwise_average"
    options: tuple[tuple[str, object], ...] = ()  # further model-config keys
    merge_of: tuple[str, ...] = ()
    description: str = ""

    @property
    def kind(self) -> str:
        return reporting.SINGLE if len(self.teachers) == 1 else reporting.COMBINATION


SINGLES = {f"distil_{k}": StudentSpec((k,), description=f"distilled from the {k} teacher alone")
           for k in TEACHER_KINDS}
COMBINATIONS = {
    "ekd_average": StudentSpec(TEACHER_KINDS, "layerwise_average", description="layerwise average (the paper)"),
    "ekd_concat": StudentSpec(TEACHER_KINDS, "layerwise_concat", description="layerwise concatenation (the paper)"),
    "ekd_multihead": StudentSpec(TEACHER_KINDS, "multi_head",
                                 description="one head set per teacher (the paper's proposal)"),
    "ekd_residual": StudentSpec(TEACHER_KINDS, "multi_head_residual",
                                description="a shared head set for the average plus a small residual head set per "
                                            "teacher (ours, after the ISCSLP 2024 follow-up)"),
    "ekd_average_norm": StudentSpec(TEACHER_KINDS, "layerwise_average", (("target_norm", "teacher_layer"),),
                                    description="layerwise average of per-teacher standardised layers"),
    "ekd_multihead_uncertainty": StudentSpec(TEACHER_KINDS, "multi_head", (("teacher_weighting", "uncertainty"),),
                                             description="one head set per teacher, loss weights learned "
                                                         "(uncertainty weighting, Kendall et al. 2018)"),
    "merged_singles": StudentSpec(merge_of=tuple(SINGLES),
                                  description="the three single-teacher students averaged in weight space"),
}
STUDENTS = {**SINGLES, **COMBINATIONS}
DEFAULT_STUDENTS = [*SINGLES, "ekd_average", "ekd_multihead"]
FULL_STUDENTS = [*SINGLES, "ekd_average", "ekd_concat", "ekd_multihead", "merged_singles"]
COMPARE_STUDENTS = list(STUDENTS)


@dataclass
class DemoConfig:
    """Sizes of the miniature; the defaults fit `make demo` in about 20 minutes on 2 cores."""

    seed: int = 0
    seeds: int = 1                   # runs per row: training and downstream seeds seed, seed + 1, ...
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
    students: list[str] = field(default_factory=lambda: list(DEFAULT_STUDENTS))
    # Every student copies this teacher's CNN (frozen) and first layers, so that the table compares ways of
    # combining teachers from one start, not initialisations.
    init_teacher: str = "robust_hubert"
    baselines: bool = True           # the fbank and teacher rows
    profile: str = "cpu-small"
    superb_steps: int | None = None  # downstream training steps; None = the profile's own (tests use a few)
    # Downstream learning rates tried per task, the best on dev kept (FULL sweeps); one per task here, each
    # the rate that won on dev on the demo corpus (benchmarks/RESULTS.md, "demo recipes").
    lr_grid: dict[str, list[float]] = field(default_factory=lambda: {
        "pr": [1e-2], "sid": [1e-3], "er": [1e-2], "asr": [3e-3]})
    early_stop: int = 3
    memoize_gib: float = 2.0
    bootstrap: int = 10000           # resamples; the p-values of Holm's correction need many
    jobs: int = 2                    # students trained at once, and threads for the teacher pass
    # SUPERB processes at once, one thread each: more processes than cores keep both cores busy to the end.
    superb_jobs: int = 4
    mode: str = "default"            # default | full | compare (names the report)


def full_config(**overrides) -> DemoConfig:
    """`make demo FULL=1`: more data, the paper's three EKD students and the merged one, longer student
    training, a wider learning-rate grid and more patience downstream."""
    return DemoConfig(**{"utterances": 3000, "held_out": (0.1, 0.2), "student_steps": 1000,
                         "students": list(FULL_STUDENTS),
                         "lr_grid": {"pr": [1e-4, 1e-3, 1e-2], "sid": [1e-3, 1e-2], "er": [1e-3, 1e-2],
                                     "asr": [1e-3, 3e-3]},
                         "early_stop": 5, "mode": "full", **overrides})


def compare_config(**overrides) -> DemoConfig:
    """`make demo COMPARE=1`: the three single-teacher students and every way of combining teachers, three
    seeds each, on the default corpus (the baselines are the default demo's)."""
    return DemoConfig(**{"seeds": 3, "students": list(COMPARE_STUDENTS), "baselines": False, "mode": "compare",
                         **overrides})


def student_plan(config: DemoConfig) -> dict[str, StudentSpec]:
    unknown = [name for name in config.students if name not in STUDENTS]
    if unknown:
        raise UserError(f"--students {','.join(unknown)}: use some of {', '.join(STUDENTS)}")
    plan = {name: STUDENTS[name] for name in config.students}
    for name, spec in plan.items():
        missing = [m for m in spec.merge_of if m not in plan]
        if missing:
            raise UserError(f"--students: {name} merges {', '.join(spec.merge_of)}; add {', '.join(missing)}")
    if config.init_teacher not in TEACHER_KINDS:
        raise UserError(f"--init-teacher {config.init_teacher}: use one of {', '.join(TEACHER_KINDS)}")
    if config.seeds < 1:
        raise UserError(f"--seeds {config.seeds}: use 1 or more")
    return plan


def seeds(config: DemoConfig) -> list[int]:
    return [config.seed + i for i in range(config.seeds)]


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
    from s3prl_ekd.demo.teacher_training import (
        RECIPE,
        RECIPE_CORPUS,
        RECIPE_SEED,
        TeacherTrainingOptions,
        train_teacher,
    )

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
            train_teacher(kind, train_audio, path, TeacherTrainingOptions(seed=RECIPE_SEED, progress=progress,
                                                                          **settings))
            atomic_write_text(key_file, key)
        out[name], keys[name] = path, key
    return {kind: out[kind] for kind in TEACHER_KINDS}


def model_config(spec: StudentSpec, teachers: dict[str, Path], init_teacher: str) -> dict:
    """Teachers' layers left to the default (three evenly spaced, ending at the last), as in the store.
    The CNN is copied from `init_teacher` and frozen (feature_grad_mult 0): the demo's budget goes to the
    transformer layers and heads."""
    return {"teachers": [{"name": TEACHER_HUB[k], "ckpt": str(teachers[k])} for k in spec.teachers],
            "aggregation": spec.aggregation, "student": asdict(ekd_student_demo(feature_grad_mult=0.0)),
            "init_from": {"name": TEACHER_HUB[init_teacher], "ckpt": str(teachers[init_teacher])},
            **dict(spec.options)}


def build_store(teachers: dict[str, Path], audio_dir: Path, work: Path) -> Path:
    """One bfloat16 store of the three teachers over the training audio: every student reads it."""
    from s3prl_ekd.plugin.targets import build_store as build

    work.mkdir(parents=True, exist_ok=True)
    model = work / "store_teachers.yaml"
    store_spec = StudentSpec(TEACHER_KINDS, "multi_head")
    atomic_write_text(model, yaml.safe_dump(model_config(store_spec, teachers, TEACHER_KINDS[0])))
    store = work / "targets"
    build(model, str(audio_dir), store, dtype="bfloat16", log=lambda line: print(line))
    return store


def _keyed(key_file: Path, key: str) -> bool:
    return key_file.is_file() and key_file.read_text() == key


def trained_elsewhere(ledger: Path, key: str) -> Path | None:
    """The checkpoint of a student with this key that a demo with another --out trained (from the same
    data folder), if it is still there and unchanged: its key file still holds `key`."""
    entry = ledger / f"{key}.json"
    if not entry.is_file():
        return None
    saved = json.loads(entry.read_text())
    checkpoint = Path(saved["checkpoint"])
    return checkpoint if checkpoint.is_file() and _keyed(Path(saved["key_file"]), key) else None


def adopt_superb(checkpoint: Path, run: str, out: Path) -> None:
    """For a student reused from another --out folder: copy that folder's SUPERB results of the run into
    `out` (if `out` has none), so that `s3prl-ekd superb` there finds its tasks done. It checks every task
    against the upstream, recipe, data and options, and runs again whatever differs."""
    import shutil

    earlier = checkpoint.parents[2] / "superb" / run  # <out>/students/<run>/<checkpoint>
    if earlier.is_dir() and not out.exists():
        shutil.copytree(earlier, out, symlinks=True)


def pretrain_student(run: str, spec: StudentSpec, seed: int, teachers: dict[str, Path], audio_dir: Path,
                     store: Path, work: Path, config: DemoConfig, ledger: Path) -> Path:
    """Distil one student from the store with `s3prl-ekd pretrain` (s3prl's runner); idempotent per its
    whole configuration and seed, in `work` and across demos that share `ledger` (the data folder's list of
    trained students). Returns its final checkpoint."""
    from s3prl_ekd.io.checkpoint import newest_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    model = model_config(spec, teachers, config.init_teacher)
    steps = config.student_steps
    overrides = [f"config.pretrain_expert.datarc.audio_dir={audio_dir}",
                 f"config.pretrain_expert.datarc.targets={store}",
                 f"config.pretrain_expert.datarc.train_batch_size={config.student_batch_size}",
                 f"config.pretrain_expert.datarc.sequence_length={config.student_crop_samples}",
                 f"config.runner.total_steps={steps}", f"config.runner.save_step={max(1, steps - 1)}",
                 f"config.runner.log_step={max(1, steps // 50)}", "config.runner.max_keep=1"]
    expdir = work / run
    store_index = json.loads((store / "index.json").read_text())
    key = fingerprint(model, overrides, seed, store_index["teachers"], store_index["utterances"])
    found = newest_checkpoint(expdir) if expdir.is_dir() else None
    if found is None or not _keyed(work / f"{run}.key", key):
        earlier = trained_elsewhere(ledger, key)
        if earlier is not None:
            print(f"[demo] {run}: the same student was trained for another --out; reusing {earlier}", flush=True)
            return earlier
        model_path = atomic_write_text(work / f"{run}.yaml", yaml.safe_dump(model, sort_keys=False))
        command = s3prl_ekd_command("pretrain", "-g", str(model_path), "-c",
                                    str(pretrain_config("tiny_cpu_runner.yaml")), "-p", str(expdir), "--device", "cpu",
                                    "--seed", str(seed), "-o", ",,".join(overrides), "--force")
        run_logged(command, work / f"{run}.log", f"pretraining {run}", threads=1)
        atomic_write_text(work / f"{run}.key", key)
        found = newest_checkpoint(expdir)
    atomic_write_json(ledger / f"{key}.json", {"checkpoint": str(found), "key_file": str(work / f"{run}.key")})
    return found


def merge_students(run: str, inputs: list[Path], work: Path) -> Path:
    """`s3prl-ekd merge` of `inputs` (equal weights) into work/RUN.ckpt; idempotent per its inputs."""
    from s3prl_ekd.io.files import file_sha256

    out = work / f"{run}.ckpt"
    key = fingerprint([file_sha256(p) for p in inputs])
    if out.is_file() and _keyed(work / f"{run}.key", key):
        return out
    run_logged(s3prl_ekd_command("merge", *map(str, inputs), "--out", str(out), "--force"), work / f"{run}.log",
               f"merging {run}")
    atomic_write_text(work / f"{run}.key", key)
    return out


def superb_run(upstream: Upstream, seed: int, data: Path, out: Path, config: DemoConfig) -> dict:
    """`s3prl-ekd superb` for one upstream and downstream seed in its own process, every task and learning
    rate run there one after another, sharing the memoised upstream states (idempotent per task). Every
    student's CNN is the init teacher's, frozen: its output per utterance is computed by the first SUPERB
    run that needs it and read by the others (DATA/../cnn-features)."""
    args = ["superb", *upstream.argv(), "--data", str(data), "--tasks", ",".join(reporting.TRAINED_TASKS),
            "--profile", config.profile, "--out", str(out), "--seed", str(seed), "--threads", "1", "--in-process",
            "--device", "cpu", "--early-stop", str(config.early_stop), "--memoize-upstream", str(config.memoize_gib),
            "--share-cnn-features", str(data.parent / "cnn-features")]
    for task, rates in config.lr_grid.items():
        args += ["--lr-grid", f"{task}=" + ",".join(f"{lr:g}" for lr in rates)]
    if config.superb_steps is not None:
        args += ["--steps", str(config.superb_steps)]
    run_logged(s3prl_ekd_command(*args), out.parent / f"{out.name}.log", f"superb for {out.name}", threads=1)
    return json.loads((out / "results.json").read_text())


def count_parameters(upstream: Upstream) -> int:
    """Parameters of the model `upstream` builds for downstream use (0 for fbank)."""
    if upstream.ckpt is None:
        return 0
    import s3prl.hub

    from s3prl_ekd import _startup

    _startup.install()  # ekd_distiller in s3prl.hub even without the .pth
    model = getattr(s3prl.hub, upstream.name)(ckpt=upstream.ckpt)
    return sum(p.numel() for p in model.parameters())


class Jobs:
    """Jobs on thread pools, each started when the jobs it depends on are done (their results are its
    arguments). After the first failure nothing more starts; `wait` lets the running ones finish and
    raises it."""

    def __init__(self, **pools: int):
        self.pools = {name: ThreadPoolExecutor(max_workers=max(1, size)) for name, size in pools.items()}
        self.futures: dict[str, Future] = {}
        self.seconds: dict[str, float] = {}
        self.lock = threading.Lock()
        self.started: set[str] = set()
        self.failed: BaseException | None = None

    def add(self, name: str, pool: str, fn, after: tuple[str, ...] = ()) -> Future:
        result: Future = Future()
        self.futures[name] = result

        def start(_=None):
            with self.lock:
                if name in self.started or not all(self.futures[d].done() for d in after):
                    return
                self.started.add(name)
                error = self.failed or next((self.futures[d].exception() for d in after
                                             if self.futures[d].exception() is not None), None)
                if error is None:
                    inputs = [self.futures[d].result() for d in after]
                    self.pools[pool].submit(self._run, name, fn, inputs, result)
                    return
            result.set_exception(error)

        for dependency in after:
            self.futures[dependency].add_done_callback(start)
        start()
        return result

    def _run(self, name, fn, inputs, result: Future) -> None:
        started = time.perf_counter()
        try:
            if self.failed is not None:
                raise self.failed
            value = fn(*inputs)
        except BaseException as error:  # handed to whoever waits on it
            with self.lock:
                self.failed = self.failed or error
            result.set_exception(error)
            return
        self.seconds[name] = round(time.perf_counter() - started, 1)
        result.set_result(value)

    def wait(self) -> dict:
        """Every job's result by name, once all are done; the first failure is raised."""
        futures_wait(list(self.futures.values()), return_when=FIRST_EXCEPTION)
        for pool in self.pools.values():
            pool.shutdown(wait=True)
        if self.failed is not None:
            raise self.failed
        return {name: future.result() for name, future in self.futures.items()}


# -- the pipeline ---------------------------------------------------------------------------------

def run_demo(config: DemoConfig, out: str | os.PathLike = "results/demo", data: str | os.PathLike = "data/demo",
             progress: bool = True, force: bool = False) -> dict:
    """Run every stage (answering from disk what is up to date) and write report.md / report.json."""
    import torch

    from s3prl_ekd.demo.corpus import synthesize_corpus
    from s3prl_ekd.demo.teacher_training import loss_curve_path
    from s3prl_ekd.io.events import read_scalars
    from s3prl_ekd.recipes.prepare import prepare_all

    out, data = Path(out).resolve(), Path(data).resolve()
    plan = student_plan(config)
    refuse_foreign_out(out, MARKER_NAME, "s3prl-ekd demo", force)
    # One thread here: the stages that run beside this process (students, superb) take one each, and
    # torch's threads slow each other down badly on contended cores.
    torch.set_num_threads(1)
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
    test_utterances = sum(row.split == "test" for row in rows)
    audio_dir = data / "train-audio"  # the unlabeled training split, as links
    audio_dir.mkdir(parents=True, exist_ok=True)
    for path in (row.audio for row in rows if row.split == "train"):
        if not (audio_dir / path.name).exists():
            (audio_dir / path.name).symlink_to(path)
    if config.retrain_teachers:
        teachers = stage("teachers", lambda: retrained_teachers(config, data, out / "teachers", progress))
    else:
        teachers = shipped_teachers(config.teachers_dir)

    # The teacher pass alone, on every core (torch's threads contend badly with other processes); then
    # students, the baselines' SUPERB and each student's SUPERB share the cores as they become ready.
    torch.set_num_threads(config.jobs)
    try:
        store = stage("target store", lambda: build_store(teachers, audio_dir, data / "store"))
    finally:
        torch.set_num_threads(1)
    baselines = {"fbank": Upstream("fbank")} if config.baselines else {}
    if config.baselines:
        baselines.update({f"teacher_{k}": Upstream(TEACHER_HUB[k], str(teachers[k])) for k in TEACHER_KINDS})
    ledger = data / "students"  # every student trained from this data folder, by key, whatever its --out
    ledger.mkdir(parents=True, exist_ok=True)
    jobs = Jobs(students=config.jobs, superb=config.superb_jobs)
    for name, upstream in baselines.items():
        for seed in seeds(config):
            jobs.add(f"superb {name}-seed{seed}", "superb",
                     lambda u=upstream, s=seed, r=f"{name}-seed{seed}": superb_run(u, s, superb_data,
                                                                                    out / "superb" / r, config))
    for name, spec in plan.items():
        for seed in seeds(config):
            run = f"{name}-seed{seed}"
            if spec.merge_of:
                inputs = tuple(f"student {m}-seed{seed}" for m in spec.merge_of)
                jobs.add(f"student {run}", "superb", lambda *ckpts, r=run: merge_students(r, list(ckpts),
                                                                                         out / "students"),
                         after=inputs)
            else:
                jobs.add(f"student {run}", "students",
                         lambda r=run, sp=spec, s=seed: pretrain_student(r, sp, s, teachers, audio_dir, store,
                                                                         out / "students", config, ledger))

            def superb_student(ckpt: Path, r=run, s=seed):
                if not ckpt.is_relative_to(out):
                    adopt_superb(ckpt, r, out / "superb" / r)
                return superb_run(Upstream("ekd_distiller", str(ckpt)), s, superb_data, out / "superb" / r, config)

            jobs.add(f"superb {run}", "superb", superb_student, after=(f"student {run}",))
    results = stage("students and SUPERB", jobs.wait)

    upstreams = {**baselines}
    table_rows = [reporting.Row(name, reporting.BASELINE if name == "fbank" else reporting.TEACHER,
                                [results[f"superb {name}-seed{s}"] for s in seeds(config)]) for name in baselines]
    for name, spec in plan.items():
        upstreams[name] = Upstream("ekd_distiller", str(results[f"student {name}-seed{config.seed}"]))
        table_rows.append(reporting.Row(name, spec.kind, [results[f"superb {name}-seed{s}"] for s in seeds(config)],
                                        description=spec.description))
    for row in table_rows:
        row.params = count_parameters(upstreams[row.name])
    reused = sorted(str(ckpt) for name, ckpt in results.items()
                    if name.startswith("student ") and not Path(ckpt).is_relative_to(out))
    report = stage("report", lambda: make_report(config, table_rows, test_utterances, teachers, reused))
    report["stage_seconds"] = seconds
    report["job_seconds"] = dict(sorted(jobs.seconds.items()))
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", reporting.markdown(report))
    curves = {f"teacher_{k}": [tuple(p) for p in json.loads(loss_curve_path(teachers[k]).read_text())["loss"]]
              for k in TEACHER_KINDS if loss_curve_path(teachers[k]).is_file()}
    for name, spec in plan.items():
        if not spec.merge_of:
            curves[name] = read_scalars(Path(results[f"student {name}-seed{config.seed}"]).parent).get(
                "ekd_distiller/train-loss", [])
    reporting.plot(report, out, curves)
    return report


def make_report(config: DemoConfig, rows: list[reporting.Row], test_utterances: int, teachers: dict,
                reused: list[str] = ()) -> dict:
    table = reporting.table(rows, config.bootstrap, config.seed)
    pairs = reporting.comparisons(rows, config.bootstrap, config.seed)
    top = reporting.best(table)
    lr = "; ".join(f"{t} {rates}" for t, rates in config.lr_grid.items())
    setting = (f"{config.seeds} seed(s) per row ({', '.join(map(str, seeds(config)))}: each the student's training "
               f"seed and its downstream seed); {config.utterances} synthetic utterances; students trained "
               f"{config.student_steps} steps from the target store, every one starting from the "
               f"{config.init_teacher} teacher's CNN (frozen) and first layers; downstream profile {config.profile}, "
               f"learning rates picked on dev from {lr}, training stopped after {config.early_stop} evaluations "
               "without a better dev metric.")
    runs = seeds(config)
    title = f"{config.mode}, seed {runs[0]}" if len(runs) == 1 else f"{config.mode}, seeds {runs[0]}-{runs[-1]}"
    return {"title": title, "setting": setting, "config": asdict(config),
            "tasks": reporting.COLUMNS, "test_utterances": test_utterances, "rows": table, "comparisons": pairs,
            "best": top, "verdict": reporting.verdict(table, pairs, top), "init_teacher": config.init_teacher,
            "teachers": {k: str(v) for k, v in teachers.items()}, "reused": list(reused)}


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the paper's experiment in miniature on a synthetic corpus (CPU)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the larger version: more data, steps and learning rates")
    mode.add_argument("--compare", action="store_true", help="every way of combining teachers beside the three "
                      "single-teacher students, 3 seeds each (no baseline rows)")
    p.add_argument("--converge", action="store_true", help="PR and ASR too train until dev stops improving "
                   "(downstream profile cpu-converge; the default stops them at 300 and 600 steps)")
    p.add_argument("--out", help="default results/demo (or results/demo_full, _compare, _converge)")
    p.add_argument("--data", help="default data/demo (--full: data/demo_full)")
    p.add_argument("--retrain-teachers", action="store_true",
                   help="train the three teachers here (the recipe of the shipped ones) instead of using those")
    p.add_argument("--teachers", help="use hubert.pt, robust_hubert.pt and wavlm.pt from this folder instead")
    defaults = DemoConfig()
    for name in ("seed", "seeds", "utterances", "speakers", "student_steps", "jobs", "superb_jobs"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {getattr(defaults, name)}")
    p.add_argument("--superb-steps", type=int, default=None, help="downstream steps (default: the profile's)")
    p.add_argument("--students", default=None, help=f"comma list of {', '.join(STUDENTS)} "
                   f"(default: {','.join(defaults.students)})")
    p.add_argument("--init-teacher", choices=TEACHER_KINDS, help=f"the teacher every student's CNN and first layers "
                   f"are copied from (default {defaults.init_teacher})")
    p.add_argument("--no-baselines", action="store_true", help="leave out the fbank and teacher rows")
    p.add_argument("--force", action="store_true", help="write into an --out folder the demo did not make")

    def _run(args) -> int:
        overrides = {name: getattr(args, name) for name in ("seed", "seeds", "utterances", "speakers",
                                                            "student_steps", "jobs", "superb_jobs", "superb_steps",
                                                            "init_teacher")
                     if getattr(args, name) is not None}
        if args.students:
            overrides["students"] = [s.strip() for s in args.students.split(",") if s.strip()]
        if args.no_baselines:
            overrides["baselines"] = False
        overrides["retrain_teachers"] = args.retrain_teachers
        overrides["teachers_dir"] = args.teachers
        if args.converge:
            overrides["profile"] = "cpu-converge"
        build = full_config if args.full else compare_config if args.compare else \
            (lambda **o: dataclasses.replace(DemoConfig(), **o))
        config = build(**overrides)
        # Each mode keeps its own results; all but FULL share the data folder (corpus, SUPERB data, targets).
        suffix = "_full" if args.full else "_compare" if args.compare else ""
        out = args.out or f"results/demo{suffix}{'_converge' if args.converge else ''}"
        data = args.data or f"data/demo{'_full' if args.full else ''}"
        report = run_demo(config, out, data, force=args.force)
        print(reporting.markdown(report))
        print(f"report: {Path(out) / 'report.md'}")
        return 0

    p.set_defaults(func=_run)
