"""The demo pipeline at its smallest sizes: every stage runs, then is cached; the report is complete."""

import json
from pathlib import Path

from s3prl_ekd.demo.pipeline import DemoConfig, Stages, mean_ranks, run_demo, student_plan, table_rows, verdict


def test_demo_smoke_and_cache(tmp_path):
    config = DemoConfig(utterances=40, speakers=4, teacher_steps=3, student_steps=3, superb_steps=2)
    report = run_demo(config, tmp_path / "out", tmp_path / "data", progress=False)
    expected_stages = ["corpus", "prepare", "pretrain_audio", "teacher_hubert", "teacher_robust_hubert",
                       "teacher_wavlm", "student_ekd_average", "superb_ekd_average"]
    assert report["stages_run"] == expected_stages and report["stages_cached"] == []
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [row["name"] for row in saved["rows"]] == ["ekd_average"]
    row = saved["rows"][0]
    assert row["params"] > 0 and row["mean_rank"] == 1.0
    assert set(row["metrics"]) == {"pr", "sid", "er", "asr"}
    assert all(0.0 <= value <= 100.0 for value in row["metrics"].values())
    for name in ("report.md", "loss_curves.png", "metrics.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "| ekd_average | EKD student |" in (tmp_path / "out" / "report.md").read_text()

    again = run_demo(config, tmp_path / "out", tmp_path / "data", progress=False)
    assert again["stages_run"] == [] and again["stages_cached"] == expected_stages
    assert again["rows"] == report["rows"]



def test_full_plan_and_ranks():
    assert list(student_plan(DemoConfig(full=True))) == [
        "ekd_average", "distil_hubert", "distil_robust_hubert", "distil_wavlm", "ekd_concat", "ekd_multihead"]
    config = DemoConfig(full=True)
    teachers = {k: Path(f"{k}.pt") for k in ("hubert", "robust_hubert", "wavlm")}
    students = {name: Path(f"{name}.ckpt") for name in student_plan(config)}
    assert [(name, kind) for name, _, _, kind in table_rows(config, teachers, students)] == [
        ("fbank", "baseline"), ("teacher_hubert", "teacher"), ("teacher_robust_hubert", "teacher"),
        ("teacher_wavlm", "teacher"), ("distil_hubert", "single-teacher student"),
        ("distil_robust_hubert", "single-teacher student"), ("distil_wavlm", "single-teacher student"),
        ("ekd_average", "EKD student"), ("ekd_concat", "EKD student"), ("ekd_multihead", "EKD student")]
    assert [row[1] for row in table_rows(config, teachers, students)][:5] == [
        "fbank", "hubert_local", "hubert_local", "wavlm_local", "ekd_distiller"]
    rows = [{"name": "ekd_average", "kind": "EKD student", "metrics": {"pr": 10.0, "sid": 50.0}},
            {"name": "distil_hubert", "kind": "single-teacher student", "metrics": {"pr": 20.0, "sid": 50.0}},
            {"name": "fbank", "kind": "baseline", "metrics": {"pr": 30.0, "sid": 10.0}}]
    mean_ranks(rows, ["pr", "sid"])
    # pr (lower better): 1, 2, 3; sid (higher better, tie shares rank 1): 1, 1, 3
    assert [r["mean_rank"] for r in rows] == [1.0, 1.5, 3.0]
    assert "ranks ahead" in verdict(rows)
    rows[0]["mean_rank"] = 2.0
    assert "does NOT beat" in verdict(rows) and "ties" not in verdict(rows)
    rows[0]["mean_rank"] = 1.5
    assert "does NOT beat the single-teacher students; it ties" in verdict(rows)


def test_stage_reruns_when_its_key_or_output_changes(tmp_path):
    calls = []

    def make(path):
        return lambda: (calls.append(path.name), path.write_text("x"))

    stages = Stages(tmp_path)
    stages.run("a", "k1", [tmp_path / "a"], make(tmp_path / "a"))
    stages = Stages(tmp_path)                        # a new process reads stages.json
    stages.run("a", "k1", [tmp_path / "a"], make(tmp_path / "a"))
    assert calls == ["a"] and stages.skipped == ["a"]
    stages.run("a", "k2", [tmp_path / "a"], make(tmp_path / "a"))   # inputs changed
    (tmp_path / "a").unlink()
    stages.run("a", "k2", [tmp_path / "a"], make(tmp_path / "a"))   # output lost
    assert calls == ["a", "a", "a"]
