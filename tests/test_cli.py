"""The command line a user reads: help texts, flag names, what works without s3prl, `env` and `inspect`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from s3prl_ekd.cli import COMMANDS, build_parser
from s3prl_ekd.plugin.runner import installed_s3prl_dir

# Hides s3prl from this interpreter: as if it were not installed.
WITHOUT_S3PRL = """
import sys
class NoS3prl:
    def find_spec(self, name, path=None, target=None):
        if name == "s3prl" or name.startswith("s3prl."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoS3prl())
from s3prl_ekd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(*args: str, prelude: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", prelude, *args] if prelude else [sys.executable, "-m", "s3prl_ekd.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_pretrain_help_is_ours_with_s3prls_arguments_marked():
    proc = cli("pretrain", "--help")
    assert proc.returncode == 0
    text = proc.stdout
    assert text.startswith("usage: s3prl-ekd pretrain")
    assert "passed through to s3prl's run_pretrain.py" in text and "s3prl-ekd's own" in text
    assert "--force" in text and "--allow-config-change" in text
    choices = re.search(r"-u \{([^}]*)\}", text).group(1).split(",")
    assert "ekd_distiller" in choices and all(not c.endswith(".py") and c != "__init__" for c in choices)
    # s3prl's own flags keep their names and also take the hyphen spelling
    assert "--upstream-config YAML, --upstream_config YAML" in text and "--past-exp CKPT_OR_DIR, --past_exp" in text


def test_downstream_help_lists_our_flags():
    text = cli("downstream", "--help").stdout
    assert text.startswith("usage: s3prl-ekd downstream")
    assert "--memoize-upstream" in text and "--early-stop" in text and "run_downstream.py" in text


@pytest.mark.parametrize("script, ours", [("run_pretrain.py", "pretrain"), ("run_downstream.py", "downstream")])
def test_every_option_of_s3prls_script_is_accepted(script, ours):
    """When s3prl adds an option to its script, this names it (both stacks run this test)."""
    source = (installed_s3prl_dir() / script).read_text()
    options = set(re.findall(r"""add_argument\(\s*(?:['"]-\w['"]\s*,\s*)?['"](--[\w-]+)['"]""", source))
    assert len(options) >= 10
    parser = build_parser(ours)
    sub = parser._subparsers._group_actions[0].choices[ours]
    known = {s for action in sub._actions for s in action.option_strings}
    assert options <= known, f"s3prl's {script} has options we do not pass: {sorted(options - known)}"


def test_one_long_name_per_concept():
    """-g is --upstream-config on every subcommand that takes it; --device and --out likewise one spelling."""
    for command in COMMANDS:
        if command in ("downstream",):  # s3prl's own -g there is --upstream_model_config, passed through
            continue
        parser = build_parser(command)
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if "-g" in action.option_strings:
                assert "--upstream-config" in action.option_strings, (command, action.option_strings)
            assert not any(s.startswith("--") and "_" in s and s.replace("_", "-") not in action.option_strings
                           for s in action.option_strings), (command, action.option_strings)


def test_help_and_corpus_work_without_s3prl(tmp_path):
    proc = cli("--help", prelude=WITHOUT_S3PRL)
    assert proc.returncode == 0 and "corpus" in proc.stdout and "pretrain" in proc.stdout
    proc = cli("corpus", "synth", str(tmp_path / "c"), "--utterances", "24", "--speakers", "2", prelude=WITHOUT_S3PRL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "c" / "manifest.jsonl").is_file()
    proc = cli("pretrain", "-n", "x", prelude=WITHOUT_S3PRL)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "s3prl-ekd pretrain: error: s3prl-ekd needs s3prl, which is not installed: pip install 's3prl-ekd[espnet]' "
        "(torch/torchaudio 2.9-2.11) or 's3prl-ekd[s3prl]' (torch/torchaudio <= 2.8)")
    env = cli("env", prelude=WITHOUT_S3PRL)
    assert env.returncode == 0 and "ekd_distiller registered: no: s3prl-ekd needs s3prl" in env.stdout


def test_env_names_what_a_bug_report_needs():
    proc = cli("env")
    assert proc.returncode == 0
    for key in ("python", "torch", "torchaudio", "s3prl module from", "transformers", "huggingface_hub",
                "start-up hook", "ekd_distiller registered: yes", "cuda", "torchcodec + FFmpeg", "espeak-ng"):
        assert key in proc.stdout, key


def test_inspect_prints_the_checkpoint(ekd_checkpoints):
    proc = cli("inspect", str(ekd_checkpoints["multi_head"]))
    assert proc.returncode == 0, proc.stderr
    assert "s3prl runner checkpoint" in proc.stdout and "aggregation: multi_head" in proc.stdout
    assert "teacher: hubert_local layers [1, 2]" in proc.stdout and "--- runner config (-c)" in proc.stdout


def test_pretrain_device_defaults_and_says_so(tmp_path, tiny_teachers):
    """Without --device, pretrain picks cuda when available, else cpu, and says which (seen on a run that then
    stops at a missing audio folder)."""
    import torch
    from conftest import model_config, write_yaml

    from s3prl_ekd.io.resources import pretrain_config

    config = write_yaml(tmp_path / "m.yaml", model_config(
        [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1]}], "layerwise_average"))
    proc = cli("pretrain", "-g", str(config), "-c", str(pretrain_config("tiny_cpu_runner.yaml")), "-n", "x",
               "-o", f"config.pretrain_expert.datarc.audio_dir={tmp_path / 'nowhere'}", cwd=tmp_path)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"[s3prl-ekd] device: {expected} (default: cuda when available; --device to choose)" in proc.stdout
    assert proc.returncode == 2 and "nowhere is not a folder" in proc.stderr
