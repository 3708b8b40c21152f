"""The demo pipeline at its smallest sizes: every stage runs, a rerun answers from disk with the same
report; the report's intervals and paired verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from s3prl_ekd.demo.pipeline import (
    DemoConfig,
    comparisons,
    full_config,
    run_demo,
    student_plan,
    table_rows,
    teacher_roles,
    teachers_vs_fbank,
    verdict,
)
from s3prl_ekd.io.files import file_sha256


def tiny_config(**overrides) -> DemoConfig:
    return DemoConfig(**{"utterances": 48, "speakers": 4, "held_out": (0.2, 0.2),
                         "students": ["distil_wavlm", "ekd_average"], "baselines": False,
                         "student_steps": 3, "superb_steps": 2, "lr_grid": [1e-3], "early_stop": 1,
                         "bootstrap": 200, "jobs": 2, **overrides})


def test_demo_smoke_then_rerun_from_disk(tmp_path):
    config = tiny_config()
    report = run_demo(config, tmp_path / "out", tmp_path / "data", progress=False)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [row["name"] for row in saved["rows"]] == ["distil_wavlm", "ekd_average"]
    assert saved["tasks"] == ["pr", "pr_noisy", "sid", "er", "asr"]
    assert saved["test_utterances"] == 10  # 20% of 48, for each of dev and test
    for row in saved["rows"]:
        assert row["params"] > 0
        for task in saved["tasks"]:
            low, high = row["interval95"][task]
            assert low <= row["metrics"][task] <= high
        assert set(row["downstream_steps"]) == {"pr", "sid", "er", "asr"}
        for steps in row["downstream_steps"].values():  # superb_steps=2: evaluated at steps 1 and 2
            assert steps["cap"] == 2 and 1 <= steps["best"] <= steps["ran"] <= 2
    assert len(saved["comparisons"]) == 5 and {c["other"] for c in saved["comparisons"]} == {"distil_wavlm"}
    assert "ekd_average vs the single-teacher students, over 5 (student, task) pairs" in saved["verdict"]
    for name in ("report.md", "loss_curves.png", "metrics.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| ekd_average | EKD student |" in markdown and "## Verdict" in markdown
    assert "runs stopped early;" in markdown
    assert saved["teachers_vs_fbank"] == []  # the smoke run has no baseline rows

    students = tmp_path / "out" / "students"
    stamps = {p: p.stat().st_mtime_ns for p in [*students.glob("*/states-*.ckpt"),
                                                 *(tmp_path / "out" / "superb").glob("*/*/task_result.json")]}
    assert len(stamps) == 2 + 2 * 4
    again = run_demo(config, tmp_path / "out", tmp_path / "data", progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained
    assert again["rows"] == report["rows"] and again["comparisons"] == report["comparisons"]


def test_retrained_teachers_follow_the_recipe_and_are_kept(tmp_path, monkeypatch):
    """--retrain-teachers: the recipe's own corpus (shrunk here) and seed; a second call trains nothing."""
    from s3prl_ekd.demo import pipeline, teacher_training

    monkeypatch.setattr(teacher_training, "RECIPE_CORPUS", {"utterances": 48, "speakers": 4, "seed": 0})
    config = DemoConfig(retrain_teachers=True, teacher_steps=2)
    teachers = pipeline.retrained_teachers(config, tmp_path / "data", tmp_path / "teachers", progress=False)
    assert sorted(teachers) == ["hubert", "robust_hubert", "wavlm"]
    assert (tmp_path / "data" / "teacher-corpus-seed0-n48-s4" / "manifest.jsonl").is_file()
    summary = json.loads(teacher_training.loss_curve_path(teachers["wavlm"]).read_text())
    assert summary["steps"] == 2 and summary["seed"] == teacher_training.RECIPE_SEED
    robust = json.loads(teacher_training.loss_curve_path(teachers["robust_hubert"]).read_text())
    recipe = dict((name, settings) for name, _, settings in teacher_training.RECIPE)
    assert robust["init_from"]["sha256"] == file_sha256(teachers["hubert"])  # continued
    assert (robust["lr"], robust["distort_prob"]) == (recipe["robust_hubert"]["lr"], recipe["robust_hubert"]["distort_prob"])
    wavlm_first = tmp_path / "teachers" / "wavlm_first.pt"
    assert summary["init_from"]["sha256"] == file_sha256(wavlm_first)  # WavLM is continued too
    assert (summary["lr"], summary["mix_gain_db"]) == (recipe["wavlm"]["lr"], list(recipe["wavlm"]["mix_gain_db"]))
    assert summary["num_files"] == sum(1 for line in (tmp_path / "data" / "teacher-corpus-seed0-n48-s4" /
                                                      "manifest.jsonl").read_text().splitlines()
                                       if json.loads(line)["split"] == "train")
    stamps = {k: p.stat().st_mtime_ns for k, p in teachers.items()}
    assert pipeline.retrained_teachers(config, tmp_path / "data", tmp_path / "teachers", progress=False) == teachers
    assert {k: p.stat().st_mtime_ns for k, p in teachers.items()} == stamps


def test_converge_flag_picks_the_profile_and_keeps_its_own_results(monkeypatch, tmp_path):
    from s3prl_ekd import cli
    from s3prl_ekd.demo import pipeline

    class Ran(Exception):
        pass

    def record(config, out, data, force=False):
        raise Ran(config.profile, out, data)

    monkeypatch.setattr(pipeline, "run_demo", record)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Ran) as ran:
        cli.main(["demo", "--converge"])
    assert ran.value.args == ("cpu-converge", "results/demo_converge", "data/demo")
    with pytest.raises(Ran) as ran:
        cli.main(["demo"])
    assert ran.value.args == ("cpu-small", "results/demo", "data/demo")


def test_full_plan_and_table_order():
    assert list(student_plan(DemoConfig())) == ["distil_hubert", "distil_robust_hubert", "distil_wavlm",
                                                "ekd_average"]
    config = full_config()
    assert list(student_plan(config)) == ["distil_hubert", "distil_robust_hubert", "distil_wavlm",
                                          "ekd_average", "ekd_concat", "ekd_multihead"]
    teachers = {k: Path(f"{k}.pt") for k in ("hubert", "robust_hubert", "wavlm")}
    students = {name: Path(f"{name}.ckpt") for name in student_plan(config)}
    assert [(name, kind) for name, _, _, kind in table_rows(config, teachers, students)] == [
        ("fbank", "baseline"), ("teacher_hubert", "teacher"), ("teacher_robust_hubert", "teacher"),
        ("teacher_wavlm", "teacher"), ("distil_hubert", "single-teacher student"),
        ("distil_robust_hubert", "single-teacher student"), ("distil_wavlm", "single-teacher student"),
        ("ekd_average", "EKD student"), ("ekd_concat", "EKD student"), ("ekd_multihead", "EKD student")]


def test_paired_verdicts_separate_only_what_the_data_separates():
    """EKD right on 90 of 100 SID utterances where the other is right on 50: better; on ER both right
    on the same 60: not separable; PER twice the errors: worse."""
    def accuracy(correct):
        return {f"u{i}": [float(i < correct), 1.0] for i in range(100)}

    def errors(count):
        return {f"u{i}": [float(count), 10.0] for i in range(100)}

    def superb(sid, er, pr):
        return {"runs": {"sid": {"runs": {"sid": {"scores": sid}}}, "er": {"runs": {"fold1": {"scores": er}}},
                         "pr": {"runs": {"pr": {"scores": pr}}}}}

    results = {"ekd_average": superb(accuracy(90), accuracy(60), errors(4)),
               "distil_hubert": superb(accuracy(50), accuracy(60), errors(2))}
    rows = [{"name": "ekd_average", "kind": "EKD student"}, {"name": "distil_hubert", "kind": "single-teacher student"}]
    pairs = comparisons(rows, results, ["sid", "er", "pr"], DemoConfig(bootstrap=500))
    by_task = {p["task"]: p for p in pairs}
    assert by_task["sid"]["verdict"] == "better" and by_task["sid"]["advantage"] == 40.0
    assert by_task["er"]["verdict"] == "not separable" and by_task["er"]["interval95"] == [0.0, 0.0]
    assert by_task["pr"]["verdict"] == "worse" and by_task["pr"]["advantage"] == -20.0
    text = verdict(rows, pairs)
    assert "better in 1, worse in 1, not separable in 1" in text and "No EKD student beats every" in text

    def content_runs(pr, asr):
        return {"runs": {"pr": {"runs": {"pr": {"scores": pr}}}, "asr": {"runs": {"asr": {"scores": asr}}}}}

    content = {"fbank": content_runs(errors(4), errors(3)), "teacher_wavlm": content_runs(errors(2), errors(3))}
    rows = [{"name": "fbank", "kind": "baseline"}, {"name": "teacher_wavlm", "kind": "teacher"}]
    checks = {p["task"]: p for p in teachers_vs_fbank(rows, content, DemoConfig(bootstrap=500))}
    assert checks["pr"]["verdict"] == "better" and checks["pr"]["advantage"] == 20.0
    assert checks["asr"]["verdict"] == "not separable"
    assert teachers_vs_fbank(rows[1:], content, DemoConfig(bootstrap=500)) == []  # no fbank row, no check

    def role_runs(sid, er, noisy):
        return {"runs": {"sid": {"runs": {"sid": {"scores": sid}}}, "er": {"runs": {"fold1": {"scores": er}}},
                         "pr": {"runs": {"pr": {"scores": {}, "noisy": {"scores": noisy}}}}}}

    teachers = {"teacher_hubert": role_runs(accuracy(80), accuracy(60), errors(5)),
                "teacher_robust_hubert": role_runs(accuracy(50), accuracy(60), errors(2)),
                "teacher_wavlm": role_runs(accuracy(90), accuracy(60), errors(5))}
    rows = [{"name": name, "kind": "teacher"} for name in teachers] + [{"name": "fbank", "kind": "baseline"}]
    roles = {(p["teacher"], p["other"], p["task"]): p for p in teacher_roles(rows, teachers, DemoConfig(bootstrap=500))}
    assert len(roles) == 6  # robust on noisy PR, WavLM on SID and ER, each against the other two teachers
    assert roles["teacher_robust_hubert", "teacher_hubert", "pr_noisy"]["advantage"] == 30.0
    assert roles["teacher_wavlm", "teacher_robust_hubert", "sid"]["verdict"] == "better"
    assert roles["teacher_wavlm", "teacher_hubert", "er"]["verdict"] == "not separable"


def test_demo_refuses_an_out_folder_it_did_not_make(tmp_path):
    import pytest

    from s3prl_ekd.errors import UserError

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("mine")
    with pytest.raises(UserError, match="holds files that `s3prl-ekd demo` did not write; .* --force"):
        run_demo(tiny_config(), tmp_path / "out", tmp_path / "data", progress=False)
    assert (tmp_path / "out" / "thesis.tex").read_text() == "mine" and not (tmp_path / "data").exists()
