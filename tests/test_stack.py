"""Which stacks the package runs on, what it says on the others, and its s3prl.hub start-up hook."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from s3prl_ekd import patches, stack

PURELIB = sysconfig.get_paths()["purelib"]


@pytest.fixture
def fake_environment(monkeypatch):
    """Set which distributions (name -> version) and modules the stack check sees."""

    def install(versions: dict[str, str], modules: set[str]):
        monkeypatch.setattr(stack, "_version", lambda name: tuple(int(x) for x in versions[name].split(".")[:2])
                            if name in versions else None)
        monkeypatch.setattr(stack.importlib.util, "find_spec", lambda name: object() if name in modules else None)

    return install


def test_supported_stacks_pass(fake_environment):
    fake_environment({"s3prl": "0.4.18", "torchaudio": "2.8.0"}, {"s3prl", "torchaudio"})
    assert stack.stack_problem() is None and stack.s3prl_distribution() == "s3prl"
    fake_environment({"espnet-s3prl": "2026.5.14", "torchaudio": "2.11.0"}, {"s3prl", "torchaudio"})
    assert stack.stack_problem() is None and stack.s3prl_distribution() == "espnet-s3prl"


@pytest.mark.parametrize("versions, modules, expected", [
    ({"torchaudio": "2.11.0"}, {"torchaudio"}, "s3prl-ekd needs s3prl, which is not installed: pip install 's3prl-ekd[espnet]'"),
    ({"espnet-s3prl": "2026.5.14"}, {"s3prl"}, "needs torchaudio (s3prl imports it), which is not installed"),
    ({"s3prl": "0.4.18", "torchaudio": "2.11.0"}, {"s3prl", "torchaudio"},
     "s3prl 0.4.18 cannot run on torchaudio 2.11 (it calls torchaudio.set_audio_backend, removed in 2.9)"),
])
def test_unsupported_stacks_get_one_line(fake_environment, versions, modules, expected):
    fake_environment(versions, modules)
    problem = stack.stack_problem()
    assert expected in problem and "\n" not in problem
    with pytest.raises(ImportError, match="s3prl-ekd"):
        stack.require_stack()


def run(code: str, before: str = "") -> subprocess.CompletedProcess:
    """A fresh interpreter whose site-packages are processed without our start-up hook (but with
    the others, e.g. an editable install's finder); `before` runs ahead of that."""
    prelude = (f"import os, site, sys\n{before}\nsys.path.append({PURELIB!r})\n"
               f"for name in sorted(os.listdir({PURELIB!r})):\n"
               f"    if name.endswith('.pth') and name != {patches.PTH_NAME!r}: site.addpackage({PURELIB!r}, name, set())\n")
    return subprocess.run([sys.executable, "-S", "-c", prelude + code], capture_output=True, text=True, timeout=120)


def test_core_without_s3prl_names_what_to_install():
    """The package itself imports anywhere (the start-up hook imports it); its method and plugin layers,
    and the commands that need s3prl, say in one line what to install."""
    hide_s3prl = "sys.modules['s3prl'] = None  # as if not installed: find_spec gives None, import fails"
    assert run("import s3prl_ekd; print(s3prl_ekd.__version__)", before=hide_s3prl).returncode == 0
    proc = run("import s3prl_ekd.core.config", before=hide_s3prl)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "ImportError: s3prl-ekd needs s3prl, which is not installed: pip install 's3prl-ekd[espnet]' "
        "(torch/torchaudio 2.9-2.11) or 's3prl-ekd[s3prl]' (torch/torchaudio <= 2.8)")
    # The command line (console script: `from s3prl_ekd.cli import main`) ends with the same line.
    proc = run("from s3prl_ekd.cli import main; sys.exit(main(['prepare', '--help']))", before=hide_s3prl)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("s3prl-ekd prepare: error: s3prl-ekd needs s3prl, which is not installed: pip "
                                   "install 's3prl-ekd[espnet]' (torch/torchaudio 2.9-2.11) or 's3prl-ekd[s3prl]' "
                                   "(torch/torchaudio <= 2.8)")


def test_register_unregister_roundtrip(tmp_path):
    pth = patches.register(tmp_path)
    assert pth == tmp_path / patches.PTH_NAME
    assert pth.read_text() == (Path(patches.__file__).parent / "plugin" / patches.PTH_NAME).read_text()
    assert patches.register(tmp_path) == pth  # idempotent
    # Processed as a site folder: only a tiny watcher is installed, and nothing of ours is imported ...
    proc = run(f"import site; site.addsitedir({str(tmp_path)!r})\n"
               "print(sorted(n for n in sys.modules if n.startswith('s3prl')))\n"
               "print([type(f).__name__ for f in sys.meta_path if 'S3prlEkd' in type(f).__name__])\n"
               "import s3prl.hub; print(hasattr(s3prl.hub, 'ekd_distiller'))\n"
               "print([type(f).__name__ for f in sys.meta_path if type(f).__name__ in ('HubFinder', 'MissingFinder')])")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "[]" and lines[1] == "['S3prlEkdStartup']"
    assert lines[2] == "True" and lines[3] == "['HubFinder', 'MissingFinder']"  # ... until s3prl is imported
    # Where s3prl_ekd cannot be imported, the hook stays silent instead of failing every import of s3prl.
    silent = subprocess.run([sys.executable, "-S", "-c", f"import site; site.addsitedir({str(tmp_path)!r}); "
                             f"import sys; sys.path.append({PURELIB!r}); sys.modules['s3prl_ekd'] = None; import s3prl; "
                             "print('ok')"],
                            capture_output=True, text=True, timeout=60)
    assert silent.stdout.strip() == "ok" and silent.stderr == ""
    assert patches.unregister(tmp_path) == pth and not pth.exists()
    assert patches.unregister(tmp_path) is None
