"""`s3prl-ekd export`: the submission folder loads without an installed s3prl_ekd, through `sys.path`
and through s3prl's `--hub huggingface` code path, and gives the same outputs as the original upstream."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from s3prl_ekd.upstream.ekd_distiller import hubconf

from s3prl_ekd import cli
from s3prl_ekd.io.checkpoint import STEP_KEY, load_raw
from s3prl_ekd.stack import s3prl_distribution
from s3prl_ekd.tools.export import VENDORED_MODULES, WRITTEN_FILES, count_parameters, export

MODE = "multi_head"  # two teachers of different sizes: the richest model card



def only_from(folder: Path) -> str:
    """Code to run first in a subprocess: the installed s3prl_ekd is hidden, as on a machine that only
    has the submission folder, s3prl and torch (the start-up hook that imports it is undone too);
    `s3prl_ekd` resolves from `folder` alone."""
    return f"""
import importlib.machinery, sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ not in ("_HubFinder", "_AliasFinder")]
for name in [n for n in sys.modules if n == "s3prl_ekd" or n.startswith("s3prl_ekd.")]:
    del sys.modules[name]
class _OnlyFromFolder:
    def find_spec(self, name, path=None, target=None):
        if name == "s3prl_ekd":
            return importlib.machinery.PathFinder.find_spec(name, [{str(folder)!r}])
        if name.startswith("s3prl_ekd."):
            return importlib.machinery.PathFinder.find_spec(name, path)
sys.meta_path.insert(0, _OnlyFromFolder())
import torch
torch.set_num_threads(1)  # as the reference: CPU kernels sum in another order with more threads
"""


def run_cli(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def exported(ekd_checkpoints, tmp_path_factory) -> dict:
    outdir = tmp_path_factory.mktemp("export") / "submission"
    rc, output = run_cli(["export", str(ekd_checkpoints[MODE]), str(outdir), "--speed-seconds", "2"])
    assert rc == 0, output
    return {"outdir": outdir, "output": output, "ckpt": ekd_checkpoints[MODE], "step": saved_step(ekd_checkpoints[MODE])}


def saved_step(ckpt: Path) -> int:
    return load_raw(ckpt)[STEP_KEY]


@pytest.fixture(scope="module")
def reference(exported, speech_dir, tmp_path_factory) -> dict:
    """A padded batch (1 s + 3 s of speech) and the original upstream's outputs on it."""
    from s3prl_ekd.io.audio import load_audio

    waves = [load_audio(p) for p in sorted(speech_dir.glob("*.wav"))[:3]]
    wavs = [waves[0][:16000], torch.cat(waves)[:48000]]
    path = tmp_path_factory.mktemp("inputs") / "wavs.pt"
    torch.save(wavs, path)
    upstream = hubconf.ekd_distiller(ckpt=str(exported["ckpt"])).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # outputs are compared bit for bit; the thread count changes summation order
    try:
        with torch.no_grad():
            states = upstream(wavs)["hidden_states"]
    finally:
        torch.set_num_threads(threads)
    return {"wavs": path, "states": states, "upstream": upstream}


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_export_prints_the_submission_figures(exported, reference):
    params = count_parameters(reference["upstream"].student)
    assert params.total == sum(p.numel() for p in reference["upstream"].student.parameters())
    assert f"parameters: {params.total:,}" in exported["output"]
    assert "real-time factor" in exported["output"] and "for 2 s of audio on cpu" in exported["output"]
    assert sorted(p.name for p in exported["outdir"].iterdir()) == sorted(WRITTEN_FILES)


def test_model_file_is_tensors_and_plain_values(exported):
    state = torch.load(exported["outdir"] / "model.pt", map_location="cpu", weights_only=True)

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (torch.Tensor, str, int, float, bool))

    assert plain(state)
    assert state["aggregation"] == MODE and state["step"] == exported["step"] > 0
    assert [(t["name"], t["dim"]) for t in state["teachers"]] == [("hubert_local", 32), ("wavlm_local", 48)]


def test_readme_and_requirements(exported, reference):
    readme = (exported["outdir"] / "README.md").read_text()
    params = count_parameters(reference["upstream"].student).total
    for fact in ("multi_head", "| 0 | hubert_local | [1, 2] | 1 | 32 |", "| 1 | wavlm_local | [1, 2] | 1 | 48 |",
                 f"pretraining step {exported['step']}", f"**{params:,}**", "downsample rate 320", "from expert import UpstreamExpert"):
        assert fact in readme, fact
    requirements = (exported["outdir"] / "requirements.txt").read_text().split()
    import importlib.metadata

    distribution = s3prl_distribution()  # s3prl (0.4.18 stack) or espnet-s3prl (current stack)
    assert f"{distribution}=={importlib.metadata.version(distribution)}" in requirements
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements


def test_folder_loads_from_sys_path_without_s3prl_ekd(exported, reference, tmp_path):
    outputs = tmp_path / "states.pt"
    stdout = run_python(only_from(exported["outdir"]) + f"""
sys.path.append({str(exported['outdir'])!r})
from expert import UpstreamExpert
upstream = UpstreamExpert(ckpt={str(exported['outdir'] / 'model.pt')!r}).eval()
with torch.no_grad():
    states = upstream(torch.load({str(reference['wavs'])!r}))["hidden_states"]
torch.save([s for s in states], {str(outputs)!r})
import json
print(json.dumps({{n: m.__file__ for n, m in sys.modules.items() if n.startswith("s3prl_ekd")}}))
print("rate", upstream.get_downsample_rates("hidden_states"))
""")
    import json

    loaded = json.loads(stdout.splitlines()[-2])
    assert set(VENDORED_MODULES) <= set(loaded)
    assert all(path.startswith(str(exported["outdir"])) for path in loaded.values()), loaded
    assert "rate 320" in stdout
    states = torch.load(outputs, weights_only=True)
    assert len(states) == len(reference["states"]) == 3
    for mine, original in zip(states, reference["states"]):
        torch.testing.assert_close(mine, original, rtol=0, atol=0)


def test_folder_loads_through_the_runner_hugging_face_path(exported, reference, tmp_path):
    """s3prl's Runner._get_upstream with from_hf_hub: snapshot_download replaced by the folder."""
    outputs = tmp_path / "states.pt"
    stdout = run_python(only_from(exported["outdir"]) + f"""
import argparse
import huggingface_hub
huggingface_hub.snapshot_download = lambda repo_id, revision=None, **kwargs: {str(exported['outdir'])!r}
from s3prl.downstream.runner import Runner
runner = Runner.__new__(Runner)
runner.init_ckpt = {{}}
runner.args = argparse.Namespace(
    from_hf_hub=True, upstream="someone/ekd-submission", upstream_revision=None, upstream_model_name="model.pt",
    upstream_model_config=None, upstream_refresh=False, upstream_trainable=False, device="cpu",
    upstream_feature_selection="hidden_states", upstream_layer_selection=None, upstream_feature_normalize=False)
runner.upstream = runner._get_upstream()
featurizer = runner._get_featurizer().model
upstream = runner.upstream.model.eval()
with torch.no_grad():
    states = upstream(torch.load({str(reference['wavs'])!r}))["hidden_states"]
torch.save([s for s in states], {str(outputs)!r})
print("featurizer:", featurizer.output_dim, featurizer.downsample_rate, featurizer.layer_num)
print("expert from", sys.modules["expert"].__file__)
""")
    assert "featurizer: 32 320 3" in stdout
    assert f"expert from {exported['outdir'] / 'expert.py'}" in stdout
    assert "0. torch==" in stdout  # the runner listed requirements.txt
    states = torch.load(outputs, weights_only=True)
    for mine, original in zip(states, reference["states"]):
        torch.testing.assert_close(mine, original, rtol=0, atol=0)


def test_refuses_a_non_empty_outdir_unless_forced(exported, tmp_path):
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "notes.txt").write_text("mine\n")
    rc, output = run_cli(["export", str(exported["ckpt"]), str(outdir), "--speed-seconds", "0"])
    assert rc == 2 and "not empty" in output and "--force" in output
    assert sorted(p.name for p in outdir.iterdir()) == ["notes.txt"]
    report = export(exported["ckpt"], outdir, force=True, speed_seconds=0)
    assert report.speed is None
    assert sorted(p.name for p in outdir.iterdir()) == sorted([*WRITTEN_FILES, "notes.txt"])


def test_export_of_a_wrong_kind_checkpoint_fails_clearly(tiny_teachers, tmp_path):
    rc, output = run_cli(["export", str(tiny_teachers["hubert_a"]), str(tmp_path / "out")])
    assert rc == 2
    assert f"s3prl-ekd export: error: {tiny_teachers['hubert_a']}: not an ekd_distiller checkpoint" in output
    assert "teacher model checkpoint" in output
    assert not (tmp_path / "out").exists()
