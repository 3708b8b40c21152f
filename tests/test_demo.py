"""The demo pipeline at its smallest sizes: every stage runs, a rerun answers from disk with the same report;
the report's intervals, paired verdicts with Holm's correction, and the scheduler that overlaps the stages."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from s3prl_ekd.demo import report as reporting
from s3prl_ekd.demo.pipeline import (
    COMPARE_STUDENTS,
    DEFAULT_STUDENTS,
    DemoConfig,
    Jobs,
    compare_config,
    full_config,
    model_config,
    run_demo,
    student_plan,
)
from s3prl_ekd.errors import UserError
from s3prl_ekd.io.files import file_sha256


def tiny_config(**overrides) -> DemoConfig:
    return DemoConfig(**{"utterances": 48, "speakers": 4, "held_out": (0.2, 0.2),
                         "students": ["distil_wavlm", "ekd_average"], "baselines": False,
                         "student_steps": 3, "superb_steps": 2, "lr_grid": {"pr": [1e-3], "sid": [1e-3],
                                                                             "er": [1e-3], "asr": [1e-3]},
                         "early_stop": 1, "bootstrap": 200, "jobs": 2, **overrides})


def test_demo_smoke_then_rerun_from_disk(tmp_path):
    config = tiny_config()
    report = run_demo(config, tmp_path / "out", tmp_path / "data", progress=False)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [row["name"] for row in saved["rows"]] == ["distil_wavlm", "ekd_average"]
    assert saved["tasks"] == ["pr", "pr_noisy", "sid", "er", "asr"]
    assert saved["test_utterances"] == 10  # 20% of 48, for each of dev and test
    for row in saved["rows"]:
        assert row["params"] > 0 and row["seeds"] == 1
        for task in saved["tasks"]:
            low, high = row["interval95"][task]
            assert low <= row["metrics"][task] <= high and row["per_seed"][task] == [row["metrics"][task]]
        for steps in row["downstream_steps"].values():  # superb_steps=2: evaluated at steps 1 and 2
            assert [s["cap"] for s in steps] == [2] and 1 <= steps[0]["best"] <= steps[0]["ran"] <= 2
    assert len(saved["comparisons"]) == 5 and {c["b"] for c in saved["comparisons"]} == {"distil_wavlm"}
    assert "ekd_average against distil_wavlm" in saved["verdict"] and "Holm-corrected over all 5" in saved["verdict"]
    for name in ("report.md", "loss_curves.png", "metrics.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # Both students' CNN is the robust teacher's, frozen: one shared folder of CNN outputs.
    shared = list((tmp_path / "data" / "cnn-features").iterdir())
    assert len(shared) == 1 and list(shared[0].glob("*.npy"))
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| ekd_average | combination |" in markdown and "## Verdict" in markdown
    assert "starting from the robust_hubert teacher's CNN" in markdown
    # Every student started from the same initialisation (the robust teacher's), recorded in its model config.
    for run in ("distil_wavlm-seed0", "ekd_average-seed0"):
        model = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "out" / "students" /
                                                                    f"{run}.yaml").read_text())))
        assert model["init_from"]["ckpt"].endswith("robust_hubert.pt")

    students = tmp_path / "out" / "students"
    stamps = {p: p.stat().st_mtime_ns for p in [*students.glob("*/states-*.ckpt"),
                                                 *(tmp_path / "out" / "superb").glob("*/*/task_result.json")]}
    assert len(stamps) == 2 + 2 * 4
    again = run_demo(config, tmp_path / "out", tmp_path / "data", progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained
    assert again["rows"] == report["rows"] and again["comparisons"] == report["comparisons"]


def test_a_student_trained_for_another_out_is_reused_with_its_superb_runs(tmp_path):
    """`make demo COMPARE=1` after `make demo`: a student with identical inputs (same data folder) is not
    trained again, its SUPERB tasks are not run again, and the report says where it came from; once that
    student's key no longer matches (its folder was rerun with other settings), it is trained anew."""
    config = tiny_config(students=["distil_wavlm"])
    first = run_demo(config, tmp_path / "a", tmp_path / "data", progress=False)
    ckpt = next((tmp_path / "a" / "students" / "distil_wavlm-seed0").glob("states-*.ckpt"))
    assert first["reused"] == []

    second = run_demo(config, tmp_path / "b", tmp_path / "data", progress=False)
    assert second["reused"] == [str(ckpt)]
    assert not (tmp_path / "b" / "students" / "distil_wavlm-seed0").exists()
    assert second["rows"] == first["rows"]
    for task in ("pr", "sid", "er", "asr"):  # the copied results, found up to date: same times, same scores
        done = [json.loads((tmp_path / out / "superb" / "distil_wavlm-seed0" / task / "task_result.json").read_text())
                for out in ("a", "b")]
        assert done[1] == done[0]
    assert f"`{ckpt}`" in (tmp_path / "b" / "report.md").read_text()

    (tmp_path / "a" / "students" / "distil_wavlm-seed0.key").write_text("trained with other settings since")
    third = run_demo(config, tmp_path / "c", tmp_path / "data", progress=False)
    assert third["reused"] == []
    assert list((tmp_path / "c" / "students" / "distil_wavlm-seed0").glob("states-*.ckpt"))


def test_retrained_teachers_follow_the_recipe_and_are_kept(tmp_path, monkeypatch):
    """--retrain-teachers: the recipe's own corpus (shrunk here) and seed; a second call trains nothing."""
    from s3prl_ekd.demo import pipeline, teacher_training

    monkeypatch.setattr(teacher_training, "RECIPE_CORPUS", {"utterances": 48, "speakers": 4, "seed": 0})
    config = DemoConfig(retrain_teachers=True, teacher_steps=2)
    teachers = pipeline.retrained_teachers(config, tmp_path / "data", tmp_path / "teachers", progress=False)
    assert sorted(teachers) == ["hubert", "robust_hubert", "wavlm"]
    summary = json.loads(teacher_training.loss_curve_path(teachers["wavlm"]).read_text())
    assert summary["steps"] == 2 and summary["seed"] == teacher_training.RECIPE_SEED
    robust = json.loads(teacher_training.loss_curve_path(teachers["robust_hubert"]).read_text())
    assert robust["init_from"]["sha256"] == file_sha256(teachers["hubert"])  # continued
    assert summary["init_from"]["sha256"] == file_sha256(tmp_path / "teachers" / "wavlm_first.pt")
    stamps = {k: p.stat().st_mtime_ns for k, p in teachers.items()}
    assert pipeline.retrained_teachers(config, tmp_path / "data", tmp_path / "teachers", progress=False) == teachers
    assert {k: p.stat().st_mtime_ns for k, p in teachers.items()} == stamps


@pytest.mark.parametrize("flags, expected", [
    ([], ("default", "cpu-small", 1, "results/demo", "data/demo")),
    (["--converge"], ("default", "cpu-converge", 1, "results/demo_converge", "data/demo")),
    (["--compare"], ("compare", "cpu-small", 3, "results/demo_compare", "data/demo")),
    (["--full"], ("full", "cpu-small", 1, "results/demo_full", "data/demo_full")),
    (["--student-steps", "1000", "--no-baselines", "--out", "x"], ("default", "cpu-small", 1, "x", "data/demo")),
])
def test_demo_modes_keep_their_own_results(monkeypatch, tmp_path, flags, expected):
    from s3prl_ekd import cli
    from s3prl_ekd.demo import pipeline

    class Ran(Exception):
        pass

    def record(config, out, data, force=False):
        raise Ran((config.mode, config.profile, config.seeds, out, data), config)

    monkeypatch.setattr(pipeline, "run_demo", record)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Ran) as ran:
        cli.main(["demo", *flags])
    assert ran.value.args[0] == expected
    if "--no-baselines" in flags:
        assert ran.value.args[1].student_steps == 1000 and not ran.value.args[1].baselines


def test_plans():
    assert list(student_plan(DemoConfig())) == DEFAULT_STUDENTS == [
        "distil_hubert", "distil_robust_hubert", "distil_wavlm", "ekd_average", "ekd_multihead"]
    assert list(student_plan(full_config()))[-1] == "merged_singles"
    compare = student_plan(compare_config())
    assert list(compare) == COMPARE_STUDENTS and compare_config().seeds == 3 and not compare_config().baselines
    assert {"ekd_residual", "ekd_average_norm", "ekd_multihead_uncertainty", "merged_singles"} <= set(compare)
    with pytest.raises(UserError, match="merged_singles merges distil_hubert"):
        student_plan(DemoConfig(students=["merged_singles"]))
    with pytest.raises(UserError, match="--students ekd_mean: use some of"):
        student_plan(DemoConfig(students=["ekd_mean"]))
    teachers = {k: Path(f"/t/{k}.pt") for k in ("hubert", "robust_hubert", "wavlm")}
    config = model_config(compare["ekd_average_norm"], teachers, "robust_hubert")
    assert config["target_norm"] == "teacher_layer" and config["init_from"]["ckpt"] == "/t/robust_hubert.pt"
    assert [t["ckpt"] for t in model_config(compare["distil_wavlm"], teachers, "robust_hubert")["teachers"]] == [
        "/t/wavlm.pt"]


def test_jobs_start_after_their_dependencies_and_stop_after_a_failure():
    jobs = Jobs(a=2, b=1)
    order, lock = [], threading.Lock()

    def step(name, value, delay=0.0):
        def run(*inputs):
            time.sleep(delay)
            with lock:
                order.append(name)
            return value + sum(inputs)
        return run

    jobs.add("x", "a", step("x", 1, 0.05))
    jobs.add("y", "a", step("y", 10))
    jobs.add("z", "b", step("z", 100), after=("x", "y"))
    assert jobs.wait() == {"x": 1, "y": 10, "z": 111} and order.index("z") == 2

    jobs = Jobs(a=1)
    ran = []

    def fail():
        raise UserError("first failure")

    jobs.add("bad", "a", fail)
    jobs.add("after", "a", lambda value: ran.append(value), after=("bad",))
    jobs.add("queued", "a", lambda: ran.append("queued"))
    with pytest.raises(UserError, match="first failure"):
        jobs.wait()
    assert ran == []  # neither the dependent nor the job queued behind the failure ran


def fake_results(per_task: dict[str, dict]) -> dict:
    """A superb results.json holding `per_task` scores (pr_noisy beside pr)."""
    runs = {}
    for task in ("pr", "sid", "er", "asr"):
        fold = {"fold1" if task == "er" else task: {"scores": per_task[task],
                                                     **({"noisy": {"scores": per_task["pr_noisy"]}} if task == "pr"
                                                        else {})}}
        runs[task] = {"runs": fold, "best_step": [1], "steps": [2], "max_steps": 2, "lr": [1e-3]}
    return {"runs": runs}


def accuracy(correct, n=100):
    return {f"u{i}": [float(i < correct), 1.0] for i in range(n)}


def errors(count, n=100):
    return {f"u{i}": [float(count), 10.0] for i in range(n)}


def student(sid, er, pr, asr=2, noisy=5):
    return fake_results({"sid": accuracy(sid), "er": accuracy(er), "pr": errors(pr), "asr": errors(asr),
                         "pr_noisy": errors(noisy)})


def test_holm_keeps_only_what_survives_every_comparison():
    """A difference clear on its own (p ~ 1e-3) is 'better' alone but 'not separable' among enough
    comparisons; the verdict names the best combination and the best single-teacher student."""
    combo = reporting.Row("ekd_x", reporting.COMBINATION, [student(90, 60, 4)])
    single = reporting.Row("distil_y", reporting.SINGLE, [student(50, 60, 2)])
    pairs = reporting.comparisons([combo, single], 2000, 0)
    by_task = {p["task"]: p for p in pairs}
    assert by_task["sid"]["verdict"] == "better" and by_task["sid"]["advantage"] == 40.0
    assert by_task["er"]["verdict"] == "not separable" and by_task["er"]["interval95"] == [0.0, 0.0]
    assert by_task["pr"]["verdict"] == "worse" and by_task["pr"]["advantage"] == -20.0
    table = reporting.table([combo, single], 500, 0)
    top = reporting.best(table)
    assert top["combination"] == "ekd_x" and top["single"] == "distil_y"
    text = reporting.verdict(table, pairs, top)
    assert "better on SID acc, worse on PER," in text and "not separable on PER noisy, ER acc, WER" in text

    # A small edge (54 vs 50 of 100, all else equal): p well above 0.05 / 5, not separable under Holm.
    close = reporting.Row("ekd_z", reporting.COMBINATION, [student(54, 60, 2)])
    p = {x["task"]: x for x in reporting.comparisons([close, single], 2000, 0)}["sid"]
    assert p["advantage"] == 4.0 and p["verdict"] == "not separable" and p["p"] > 0.05 / 5


def test_intervals_and_pairs_cover_seeds():
    """With two seeds the metric is their mean, and the interval holds the seed-to-seed spread."""
    row = reporting.Row("ekd_x", reporting.COMBINATION, [student(70, 60, 4), student(90, 60, 4)])
    (table,) = reporting.table([row], 2000, 0)
    assert table["metrics"]["sid"] == 80.0 and table["per_seed"]["sid"] == [70.0, 90.0]
    low, high = table["interval95"]["sid"]
    assert low <= 72 and high >= 88  # spans both seeds, not only one seed's utterance noise
    with pytest.raises(UserError, match="2 runs against 1"):
        reporting.comparisons([row, reporting.Row("distil_y", reporting.SINGLE, [student(50, 60, 2)])], 100, 0)


def test_teacher_checks_join_the_family():
    fbank = reporting.Row("fbank", reporting.BASELINE, [student(10, 25, 4, asr=4)])
    teachers = [reporting.Row(f"teacher_{k}", reporting.TEACHER, [student(s, 60, 2, noisy=n)])
                for k, s, n in (("hubert", 80, 5), ("robust_hubert", 50, 2), ("wavlm", 90, 5))]
    pairs = reporting.comparisons([fbank, *teachers], 2000, 0)
    groups = [p["group"] for p in pairs]
    assert groups.count("teacher vs fbank") == 6 and groups.count("teacher vs teacher") == 6
    roles = {(p["a"], p["b"], p["task"]): p for p in pairs if p["group"] == "teacher vs teacher"}
    assert roles["teacher_robust_hubert", "teacher_hubert", "pr_noisy"]["advantage"] == 30.0
    assert roles["teacher_wavlm", "teacher_robust_hubert", "sid"]["verdict"] == "better"


def test_demo_refuses_an_out_folder_it_did_not_make(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("mine")
    with pytest.raises(UserError, match="holds files that `s3prl-ekd demo` did not write; .* --force"):
        run_demo(tiny_config(), tmp_path / "out", tmp_path / "data", progress=False)
    assert (tmp_path / "out" / "thesis.tex").read_text() == "mine" and not (tmp_path / "data").exists()
