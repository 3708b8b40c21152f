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

RUN_FIELDS = ("step", "mode", "k", "t_student", "t_step", "segments", "overhead_ratio", "overhead_ratio_spread",
              "audio_seconds_per_second", "flops_per_step", "peak_mem_bytes")
TOP_FIELDS = ("runs", "loader_share", "device", "size", "student_params", "teacher_params",
              "inference_speedup_vs_hubert_base")


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """The CLI on the tiny setting, cut short: K = 1 and 3, two repetitions, 2 x 1 s batches, live and cached."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "s3prl_ekd.cli", "bench", "--json", str(out / "bench.json"),
           "--size", "tiny", "--k", "1,3", "--device", "cpu", "--reps", "2", "--warmup", "0",
           "--batch-size", "2", "--seconds", "1", "--loader-steps", "2", "--threads", "1",
           "--workdir", str(out / "work"), "--targets", str(out / "store")]
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
    assert all(_positive(result[f"inference_{k}"]) for k in ("t_student_cnn", "speedup_bound_same_cnn",
                                                                 "speedup_slim_cnn"))
    assert result["inference_slim_cnn"] == "[(32,10,5), (32,3,2), (32,3,2), (32,3,2), (32,3,2), (32,2,2), (32,2,2)]"
    assert _positive(result["student_params"]) and isinstance(result["student_params"], int)
    assert list(result["teacher_params"]) == ["hubert", "hubert_robust", "wavlm"]
    assert all(_positive(n) for n in result["teacher_params"].values())
    # the tiny HuBERT is 3 x 32-dim layers: far below HuBERT Base's 94.7M
    assert result["teacher_params"]["hubert"] < 1_000_000


def test_bench_runs_cover_every_mode_and_k(tiny_bench):
    result, _, _ = tiny_bench
    runs = result["runs"]
    live = {(r["mode"], r["k"]) for r in runs if r["step"] == "live"}
    assert live == {(m, k) for m in bench.PAPER_AGGREGATIONS for k in (1, 3)}
    assert {(r["mode"], r["k"]) for r in runs if r["step"] == "cached"} == {(m, 3) for m in bench.PAPER_AGGREGATIONS}
    for run in runs:
        assert all(field in run for field in RUN_FIELDS), run.keys()
        for field in ("t_student", "t_step", "overhead_ratio", "peak_mem_bytes", "flops_per_step"):
            assert _positive(run[field]), (field, run[field])
        segments = run["segments"]
        assert set(segments) == set(bench.SEGMENTS)
        # measured inside the same step: the parts cannot add up to more than the step
        spread = run["overhead_ratio_spread"]
        assert 1.0 <= spread["min"] <= run["overhead_ratio"] <= spread["max"]
        assert sum(segments.values()) == pytest.approx(run["t_step"], rel=0.5)
        assert run["audio_seconds_per_second"] == pytest.approx(2 * 1.0 / run["t_step"])
        assert run["peak_mem_bytes"] > 50 * 2**20  # the RSS of a process holding torch and the models
        assert (segments["teachers"] > 0) == (run["step"] == "live")
    for run in runs:
        if run["step"] == "cached":
            assert run["teachers_loaded"] is False
            assert run["cached_step_over_student"] == pytest.approx(run["t_step"] / run["t_student"])


def test_bench_checks_teachers_run_once_without_graph(tiny_bench):
    result, _, _ = tiny_bench
    for run in (r for r in result["runs"] if r["step"] == "live"):
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
    assert f"| live | {first['mode']} | {first['k']} | {first['t_step']:.3f} |" in markdown
    assert "data loader share" in markdown and markdown in stdout


@pytest.mark.parametrize("fp32", [True, False])
def test_bench_fp32_pos_conv_flag_reaches_the_models(fp32, tmp_path, tiny_teachers, speech_dir):
    """--no-fp32-pos-conv times what autocast alone picks: no positional convolution is wrapped."""
    setting = bench.default_setting("tiny", "cpu", ks=(1,), fp32_pos_conv=fp32)
    paths = {"hubert": tiny_teachers["hubert_a"]}
    expert = bench.build_expert(setting, paths, 1, "layerwise_average", speech_dir)
    convs = [m.pos_conv for m in [*expert.student.modules(), *expert.teachers.modules()] if hasattr(m, "pos_conv")]
    assert len(convs) >= 2  # the student's and the teacher's
    assert all(getattr(c, "runs_in_float32", False) == fp32 for c in convs)


def test_bench_rejects_bad_k_before_building_anything(tmp_path, capsys):
    code = cli.main(["bench", "--json", str(tmp_path / "x.json"), "--k", "1,4"])
    assert code == 2
    assert "--k" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


TRAIN_STEP_VS_RUNNER = """
import argparse, json, os, sys
import torch
from torch.utils.data import DataLoader
from s3prl_ekd.io.checkpoint import load_raw
from s3prl_ekd.io.events import read_scalars
from s3prl_ekd.plugin.pretrain_expert import UpstreamPretrainExpert
from s3prl_ekd.plugin.runner import installed_s3prl_dir, pretrain_workspace
from s3prl_ekd.tools.bench import BenchSetting, TrainStep

config, model, expdir = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
generator = torch.Generator().manual_seed(5)
batch = (0.1 * torch.randn(2, 16000, generator=generator), torch.tensor([16000, 12000]))
batch[0][1, 12000:] = 0

# s3prl's own pretrain runner, two steps on the batch
s3prl_dir = installed_s3prl_dir()
with pretrain_workspace(s3prl_dir) as workspace:
    sys.path[:0] = [str(workspace), str(s3prl_dir)]
    os.chdir(workspace)
    from pretrain.runner import Runner
    torch.manual_seed(0)
    args = argparse.Namespace(upstream="ekd_distiller", upstream_config=model, device="cpu", multi_gpu=False,
                              expdir=expdir, init_ckpt=None)
    runner = Runner(args, config)
    runner.upstream.get_train_dataloader = lambda: DataLoader([batch, batch], batch_size=1, collate_fn=lambda x: x[0])
    runner.train()
    runner.logger.close()
saved = load_raw(os.path.join(expdir, "states-epoch-1.ckpt"))["Student"]["state_dict"]  # the final save

# bench's copy of the step
torch.manual_seed(0)
expert = UpstreamPretrainExpert(config["pretrain_expert"]["datarc"], model, "cpu")
expert.train()
step = TrainStep(expert, BenchSetting(), config)
initial = {k: v.clone() for k, v in expert.student.state_dict().items()}
losses = [step(batch), step(batch)]
mine = expert.student.state_dict()
print(json.dumps({"max_diff": max((mine[k] - saved[k]).abs().max().item() for k in saved),
                  "moved": max((mine[k] - initial[k]).abs().max().item() for k in saved),
                  "runner_losses": [v for _, v in read_scalars(expdir)["ekd_distiller/train-loss"]],
                  "bench_losses": losses}))
"""


def test_train_step_equals_s3prl_runner_step(tmp_path, tiny_teachers, speech_dir):
    """What bench times is what s3prl's runner does: two steps on one batch give the same losses and
    the same student parameters (bit for bit, on CPU) as Runner.train with the same runner config."""
    from conftest import model_config, write_yaml

    config = bench.runner_config("tiny_cpu_runner.yaml")
    config["runner"].update(total_steps=2, log_step=1, save_step=1, max_keep=2)
    config["pretrain_expert"]["datarc"].update(audio_dir=str(speech_dir), train_batch_size=2, num_workers=0)
    teachers = [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 3]}]
    model = write_yaml(tmp_path / "model.yaml", model_config(teachers, "layerwise_average"))
    proc = subprocess.run([sys.executable, "-c", TRAIN_STEP_VS_RUNNER, json.dumps(config), str(model),
                           str(tmp_path / "exp")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["runner_losses"] == pytest.approx(result["bench_losses"], rel=0, abs=0)
    assert result["max_diff"] == 0.0 and result["moved"] > 0  # two real updates, equal in both
