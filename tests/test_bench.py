"""`s3prl-ekd bench` in its tiny setting: every field of the JSON and the table is produced.

The ratios themselves are measured by running the benchmark (benchmarks/RESULTS.md), not here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from s3prl_ekd import cli
from s3prl_ekd.tools import bench

RUN_FIELDS = ("mode", "k", "t_teachers", "t_student", "t_step", "overhead_ratio", "peak_mem_bytes")
TOP_FIELDS = ("runs", "loader_share", "device", "size", "student_params", "teacher_params",
              "inference_speedup_vs_hubert_base")


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """The CLI on the tiny setting, cut short: K = 1 and 3, one repetition, 2 x 1 s batches."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "s3prl_ekd.cli", "bench", "--json", str(out / "bench.json"),
           "--size", "tiny", "--k", "1,3", "--device", "cpu", "--reps", "1", "--warmup", "0",
           "--batch-size", "2", "--seconds", "1", "--loader-steps", "2", "--threads", "1",
           "--workdir", str(out / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), proc.stdout


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_bench_json_has_every_field(tiny_bench):
    result, _, _ = tiny_bench
    assert all(field in result for field in TOP_FIELDS)
    assert result["device"] == "cpu" and result["size"] == "tiny"
    assert result["torch_threads"] == 1
    assert 0.0 <= result["loader_share"] < 1.0
    assert _positive(result["inference_speedup_vs_hubert_base"])
    assert _positive(result["student_params"]) and isinstance(result["student_params"], int)
    assert list(result["teacher_params"]) == ["hubert", "hubert_robust", "wavlm"]
    assert all(_positive(n) for n in result["teacher_params"].values())
    # the tiny HuBERT is 3 x 32-dim layers: far below HuBERT Base's 94.7M
    assert result["teacher_params"]["hubert"] < 1_000_000


def test_bench_runs_cover_every_mode_and_k(tiny_bench):
    result, _, _ = tiny_bench
    runs = result["runs"]
    assert {(r["mode"], r["k"]) for r in runs} == {(m, k) for m in bench.AGGREGATIONS for k in (1, 3)}
    for run in runs:
        assert all(field in run for field in RUN_FIELDS), run.keys()
        for field in ("t_teachers", "t_student", "t_step", "overhead_ratio", "peak_mem_bytes"):
            assert _positive(run[field]), (field, run[field])
        assert run["overhead_ratio"] == pytest.approx(run["t_step"] / (run["t_teachers"] + run["t_student"]))
        assert run["peak_mem_bytes"] > 50 * 2**20  # the RSS of a process holding torch and the models


def test_bench_checks_teachers_run_once_without_graph(tiny_bench):
    result, _, _ = tiny_bench
    for run in result["runs"]:
        checks = run["checks"]
        assert checks["teacher_calls_per_step"] == [1] * run["k"]
        assert checks["teacher_params_requiring_grad"] == 0
        assert checks["teacher_outputs_inference_mode"] is True
        assert checks["teacher_layers_kept"] == [len(bench.TEACHER_LAYERS["tiny"])] * run["k"]


def test_bench_markdown_has_a_row_per_run(tiny_bench):
    result, markdown, stdout = tiny_bench
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(result["runs"])  # header + one per (mode, K)
    first = result["runs"][0]
    assert f"| {first['mode']} | {first['k']} | {first['t_teachers']:.3f} |" in markdown
    assert "data loader share" in markdown and markdown in stdout


def test_bench_rejects_bad_k_before_building_anything(tmp_path, capsys):
    code = cli.main(["bench", "--json", str(tmp_path / "x.json"), "--k", "1,4"])
    assert code == 2
    assert "--k" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
