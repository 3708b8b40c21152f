"""`s3prl-ekd export` (SUPERB format): the submission folder loads without an installed s3prl_ekd, through
`sys.path` and through s3prl's `--hub huggingface` code path, is not shadowed by an installed s3prl_ekd, and
gives the same outputs as the original upstream; and the transformers format on each pretrained mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli_here
from s3prl_ekd.upstream.ekd_distiller import hubconf

from s3prl_ekd import __version__
from s3prl_ekd.io.checkpoint import STEP_KEY, TEACHER_FINGERPRINTS_KEY, load_raw
from s3prl_ekd.stack import s3prl_distribution
from s3prl_ekd.tools.export import (
    CARD_FILES,
    SUPERB_FILES,
    VENDORED_MODULES,
    ExportOptions,
    export,
    vendored_package_name,
)

MODE = "multi_head"  # two teachers of different sizes: the richest model card



# As where s3prl-ekd is not installed: its start-up finders are gone and importing it fails as a
# missing module does.
BLOCK_S3PRL_EKD = """
import importlib.abc, sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if type(f).__name__ not in ("S3prlEkdStartup", "HubFinder", "MissingFinder")]
for name in [n for n in sys.modules if n.split(".")[0] == "s3prl_ekd"]:
    del sys.modules[name]
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "s3prl_ekd":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked in this test)", name=name)
sys.meta_path.insert(0, _Blocked())
"""
ONE_THREAD = """
import torch
torch.set_num_threads(1)  # as the reference: CPU kernels sum in another order with more threads
"""


def written(package: str) -> list[str]:
    return sorted([*SUPERB_FILES, *CARD_FILES, package])


def run_cli(argv: list[str]) -> tuple[int, str]:
    return run_cli_here(argv)


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


def student_parameters(ckpt: Path) -> int:
    from s3prl_ekd.core.student import student_from_dict
    from s3prl_ekd.io.checkpoint import read_checkpoint

    return sum(p.numel() for p in student_from_dict(read_checkpoint(ckpt)["student"]).parameters())


def test_export_prints_the_submission_figures(exported):
    params = student_parameters(exported["ckpt"])
    assert f"parameters: {params:,}" in exported["output"]
    assert "real-time factor" in exported["output"] and "for 2 s of audio on cpu" in exported["output"]
    assert sorted(p.name for p in exported["outdir"].iterdir()) == written(vendored_package_name())
    assert "upload: hf upload YOUR_NAME/MODEL_NAME" in exported["output"] and "upload_folder(" in exported["output"]


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
    assert state["runner_config"]["runner"]["total_steps"] == 20  # the card's training facts travel along


def test_readme_gitattributes_and_requirements(exported, tiny_teachers):
    from huggingface_hub import ModelCard

    from s3prl_ekd.io.files import file_sha256

    card = ModelCard.load(exported["outdir"] / "README.md")
    assert card.data.license == "apache-2.0"
    assert {"library:s3prl", "benchmark:superb", "type:upstream", "s3prl-ekd", "multi-head"} <= set(card.data.tags)
    params = student_parameters(exported["ckpt"])
    # sha256 of each teacher file: as the checkpoint recorded it, or hashed at export (marked *)
    mark = "" if TEACHER_FINGERPRINTS_KEY in load_raw(exported["ckpt"]) else " *"
    for fact in ("Aggregation: **multi_head**",
                 f"| 0 | hubert_local | `{file_sha256(tiny_teachers['hubert_a'])}`{mark} | [1, 2] | 1 | 32 |",
                 f"| 1 | wavlm_local | `{file_sha256(tiny_teachers['wavlm_wide'])}`{mark} | [1, 2] | 1 | 48 |",
                 f"pretraining step {exported['step']}", f"**{params:,}**", "downsample rate 320",
                 "from expert import UpstreamExpert", f"`{vendored_package_name()}/`", "steps: 20 of the run's 20"):
        assert fact in card.text, fact
    assert "*.pt filter=lfs diff=lfs merge=lfs -text" in (exported["outdir"] / ".gitattributes").read_text()
    requirements = (exported["outdir"] / "requirements.txt").read_text().split()
    import importlib.metadata

    distribution = s3prl_distribution()  # s3prl (0.4.18 stack) or espnet-s3prl (current stack)
    assert f"{distribution}=={importlib.metadata.version(distribution)}" in requirements
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements


def test_copied_package_is_named_after_the_version_and_content(exported):
    package = vendored_package_name()
    assert package.startswith(f"s3prl_ekd_v{__version__.replace('.', '_')}_") and len(package.rsplit("_", 1)[1]) == 8
    root = exported["outdir"] / package
    copied = {str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "__init__.py"}
    assert copied == {"/".join(m.split(".")[1:]) + ".py" for m in VENDORED_MODULES}
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "from s3prl_ekd." not in text and "import s3prl_ekd" not in text, path
    assert (root / "core" / "__init__.py").read_text().startswith('"""Copied by')  # no require_stack() here


def test_folder_loads_from_sys_path_without_s3prl_ekd(exported, reference, tmp_path):
    outputs = tmp_path / "states.pt"
    stdout = run_python(BLOCK_S3PRL_EKD + ONE_THREAD + f"""
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
    loaded = json.loads(stdout.splitlines()[-2])
    package = vendored_package_name()
    assert {m.replace("s3prl_ekd", package, 1) for m in VENDORED_MODULES} <= set(loaded)
    assert all(path.startswith(str(exported["outdir"])) for path in loaded.values()), loaded
    assert "rate 320" in stdout
    states = torch.load(outputs, weights_only=True)
    assert len(states) == len(reference["states"]) == 3
    for mine, original in zip(states, reference["states"]):
        torch.testing.assert_close(mine, original, rtol=0, atol=0)


def test_an_installed_s3prl_ekd_of_another_version_does_not_shadow_the_copy(exported, reference, tmp_path):
    """s3prl appends the folder to sys.path: a `s3prl_ekd` found earlier (here one that would fail on
    use) is never imported by the folder's code."""
    other = tmp_path / "site" / "s3prl_ekd"
    for module in VENDORED_MODULES:  # another version's modules, which fail if used
        path = other.joinpath(*module.split(".")[1:]).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"raise ImportError('{module} of the other version was imported')\n")
    (other / "__init__.py").write_text('__version__ = "0.0.1"\n')
    (other / "_startup.py").write_text("def install():\n    pass\n")
    other = other.parent
    stdout = run_python(ONE_THREAD + f"""
import sys
sys.path.insert(0, {str(other)!r})
for name in [n for n in sys.modules if n.split(".")[0] == "s3prl_ekd"]:
    del sys.modules[name]
sys.path.append({str(exported['outdir'])!r})
from expert import UpstreamExpert
upstream = UpstreamExpert(ckpt={str(exported['outdir'] / 'model.pt')!r}).eval()
with torch.no_grad():
    states = upstream(torch.load({str(reference['wavs'])!r}))["hidden_states"]
torch.save([s for s in states], {str(tmp_path / 'states.pt')!r})
print("s3prl_ekd modules:", sorted(n for n in sys.modules if n.split(".")[0] == "s3prl_ekd"))
print("s3prl_ekd from", sys.modules["s3prl_ekd"].__file__ if "s3prl_ekd" in sys.modules else None)
""")
    loaded = stdout.split("s3prl_ekd modules: ")[1].splitlines()[0]
    assert loaded in ("[]", "['s3prl_ekd']", "['s3prl_ekd', 's3prl_ekd._startup']"), loaded  # the start-up hook at most
    assert "s3prl_ekd from None" in stdout or f"s3prl_ekd from {other}" in stdout
    for mine, original in zip(torch.load(tmp_path / "states.pt", weights_only=True), reference["states"]):
        torch.testing.assert_close(mine, original, rtol=0, atol=0)


def test_folder_loads_through_the_runner_hugging_face_path(exported, reference, tmp_path):
    """s3prl's Runner._get_upstream with from_hf_hub: snapshot_download replaced by the folder; the
    installed s3prl_ekd (and its start-up hook) present, as on a user's machine."""
    outputs = tmp_path / "states.pt"
    stdout = run_python(ONE_THREAD + f"""
import argparse, sys
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
print("upstream from", sys.modules[type(upstream).__module__].__file__)
""")
    assert "featurizer: 32 320 3" in stdout
    assert f"expert from {exported['outdir'] / 'expert.py'}" in stdout
    assert f"upstream from {exported['outdir'] / vendored_package_name()}" in stdout
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
    report = export(exported["ckpt"], outdir, ExportOptions(force=True, speed_seconds=0))
    assert report.speed is None
    assert sorted(p.name for p in outdir.iterdir()) == sorted([*written(vendored_package_name()), "notes.txt"])
    assert (outdir / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


@pytest.mark.parametrize("args, words", [
    (["--device", "bogus"], "--device 'bogus'"),
    (["--speed-seconds", "0.001"], "CNN window"),
    (["--speed-seconds", "-2"], "--speed-seconds -2"),
    (["--format", "onnx"], "invalid choice: 'onnx'"),
])
def test_bad_options_are_refused_before_writing(exported, tmp_path, args, words):
    rc, output = run_cli(["export", str(exported["ckpt"]), str(tmp_path / "out"), *args])
    assert rc == 2 and words in output and "Traceback" not in output, output
    assert [line for line in output.splitlines() if "error:" in line] == [output.strip().splitlines()[-1]]
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_wrong_kind_checkpoint_fails_clearly(tiny_teachers, tmp_path):
    rc, output = run_cli(["export", str(tiny_teachers["hubert_a"]), str(tmp_path / "out")])
    assert rc == 2
    assert f"s3prl-ekd export: error: {tiny_teachers['hubert_a']}: not an ekd_distiller checkpoint" in output
    assert "teacher model checkpoint" in output
    assert list(tmp_path.iterdir()) == []


def test_transformers_format_gives_the_upstream_states_for_each_pretrained_mode(ekd_checkpoints, speech_dir, tmp_path):
    """Checkpoints of real (tiny) pretraining runs, one per aggregation mode in the fixture."""
    from transformers import AutoModel

    from s3prl_ekd.io.audio import load_audio
    from s3prl_ekd.tools.hf_export import hubert_hidden_states

    wav = torch.cat([load_audio(p) for p in sorted(speech_dir.glob("*.wav"))[:2]])[:40000]
    for mode, ckpt in ekd_checkpoints.items():
        report = export(ckpt, tmp_path / mode, ExportOptions(format="transformers", speed_seconds=0))
        assert max(report.round_trip) <= 1e-5, (mode, report.round_trip)
        model = AutoModel.from_pretrained(tmp_path / mode).eval()
        with torch.no_grad():
            expected = hubconf.ekd_distiller(ckpt=str(ckpt)).eval()([wav])["hidden_states"]
        got = hubert_hidden_states(model, wav[None])
        assert len(got) == len(expected)
        assert max(float((a - b).abs().max()) for a, b in zip(expected, got)) <= 1e-5, mode
