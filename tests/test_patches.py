"""s3prl_ekd/patches.py: every run-time change to someone else's code is listed there, scoped, and still needed.

`test_each_patch_is_still_needed` runs on both stacks (make test, make test-current): when an s3prl (or
torchaudio) release fixes what a patch works around, it fails and names the patch that can go.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import s3prl_ekd
from s3prl_ekd import patches

PACKAGE = Path(s3prl_ekd.__file__).parent
ROOT = PACKAGE.parent
# The start-up trampoline installs the two import-system finders whose behaviour patches.py defines.
ALLOWED = {PACKAGE / "patches.py", PACKAGE / "_startup.py"}
MUTATING_CALLS = {"chdir", "insert", "append", "extend", "remove", "update", "pop", "clear", "setdefault",
                  "filterwarnings", "simplefilter", "addFilter"}


def test_every_patch_is_recorded_with_an_existing_test():
    assert len(patches.PATCHES) >= 10
    for patch in patches.PATCHES.values():
        assert all([patch.replaces, patch.why, patch.needed_on, patch.test]), patch.name
        for reference in patch.test.split(", "):
            path, _, test = reference.strip().partition("::")
            path = path.split(" ")[0]
            assert (ROOT / path).is_file(), f"{patch.name}: {path} does not exist"
            if test:
                assert f"def {test}(" in (ROOT / path).read_text(), f"{patch.name}: {reference} does not exist"


@pytest.mark.parametrize("name", sorted(patches.PATCHES))
def test_each_patch_is_still_needed(name):
    """The behaviour each patch works around is still there on the installed stack."""
    patch = patches.PATCHES[name]
    if patch.reason_holds is None or not patch.applies():
        pytest.skip(f"{name}: not needed on this stack ({patch.needed_on})" if patch.reason_holds else
                    f"{name}: a feature, not a workaround")
    assert patch.reason_holds(), (f"the installed stack no longer shows what patch {name!r} works around "
                                  f"({patch.why}); the patch can go")


def _foreign_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if not a.name.startswith("s3prl_ekd")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and not (node.module or "").startswith("s3prl_ekd"):
            names |= {a.asname or a.name for a in node.names}
    return names


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def changes_to_foreign_code(path: Path) -> list[str]:
    """Assignments to attributes or items of imported modules, setattr on them, and mutating calls on
    sys / os / builtins / warnings / logging state, in one source file."""
    tree = ast.parse(path.read_text())
    foreign = _foreign_modules(tree)
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for item in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(item, (ast.Attribute, ast.Subscript)) and _root(item) in foreign:
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(item)} = ...")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("setattr", "delattr") and node.args \
                    and _root(node.args[0]) in foreign:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(func, ast.Attribute) and func.attr in MUTATING_CALLS \
                    and _root(func) in foreign & {"sys", "os", "builtins", "warnings", "logging"}:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_but_patches_changes_foreign_code():
    found = [line for path in sorted(PACKAGE.rglob("*.py")) if path not in ALLOWED
             for line in changes_to_foreign_code(path)]
    assert not found, "run-time changes to other packages belong in s3prl_ekd/patches.py:\n" + "\n".join(found)


def test_the_scan_finds_a_patch(tmp_path):
    """The scan above is not vacuous: it reports the kinds of change that used to live in the adapters."""
    path = tmp_path / "adapter.py"
    path.write_text("import shutil\nimport torchaudio\nimport sys\nfrom s3prl.utility import helper\n"
                    "shutil.copyfile = None\ntorchaudio.load = print\nsys.path[:0] = ['x']\n"
                    "helper.hack_isinstance = None\nsetattr(torchaudio, 'info', None)\nsys.meta_path.insert(0, 1)\n")
    assert len(changes_to_foreign_code(path)) == 6


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_broken_plugin():
    """If the plugin cannot load, asking s3prl for ekd_distiller gives one line naming why (it does not vanish)."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "s3prl_ekd.upstream.ekd_distiller.hubconf":
            raise ImportError("simulated: a broken install")
sys.meta_path.insert(0, Block())
import s3prl.hub
try:
    s3prl.hub.ekd_distiller(ckpt="x.ckpt")
except ImportError as error:
    print("ERROR", error)
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("ERROR")]
    assert line == ["ERROR ekd_distiller: s3prl-ekd cannot load in this environment (ImportError: simulated: a "
                    "broken install); `s3prl-ekd env` shows what is installed"]


def test_missing_module():
    """s3prl's ctc expert imports a corpus module its wheel lacks: it is ours."""
    code = ("from s3prl.downstream.ctc.corpus.libriphone import LibriPhoneDataset\n"
            "print(LibriPhoneDataset.__module__)")
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "s3prl_ekd.plugin.libriphone", proc.stderr


def test_progress_lines_without_a_terminal(capsys):
    """While stderr is not a terminal, a tqdm bar is a few plain lines, not carriage-return frames."""
    from tqdm import tqdm

    with patches.plain_progress_bars(every=3600):
        for _ in tqdm(range(1000), desc="work"):
            pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("work: 100%") and "1000/1000" in lines[-1]
    assert tqdm.display is not None and "plain" not in repr(tqdm.__init__)  # undone on leaving the block


def test_known_warnings_are_filtered_only_inside(recwarn):
    import warnings

    with patches.known_warnings_filtered():
        warnings.warn("`torch.nn.utils.weight_norm` is deprecated in favor of ...", FutureWarning)
        warnings.warn("something a user should see", FutureWarning)
    warnings.warn("`torch.nn.utils.weight_norm` is deprecated in favor of ...", FutureWarning)
    assert [str(w.message)[:20] for w in recwarn] == ["something a user sho", "`torch.nn.utils.weig"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_teachers, speech_dir):
    """The same 20-step tiny pretraining, by default and with -v: (stderr, experiment folder) each."""
    from conftest import model_config, write_yaml

    from s3prl_ekd.io.resources import pretrain_config

    work = tmp_path_factory.mktemp("quiet")
    config = write_yaml(work / "m.yaml", model_config(
        [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 2]}], "layerwise_average"))
    runs = {}
    for name, verbose in (("default", []), ("verbose", ["-v"])):
        proc = subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", *verbose, "pretrain", "-g", str(config), "-c",
                               str(pretrain_config("tiny_cpu_runner.yaml")), "-n", name, "--device", "cpu", "-o",
                               f"config.pretrain_expert.datarc.audio_dir={speech_dir},,"
                               "config.pretrain_expert.datarc.sequence_length=16000"],
                              cwd=work, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (proc.stderr, work / "result" / "pretrain" / name)
    return runs


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "Warning" in line or "WARNING" in line]


def test_tiny_pretrain_is_quiet(tiny_runs):
    """By default no warning a user cannot act on, and progress as plain lines; -v shows them all."""
    quiet, verbose = tiny_runs["default"][0], tiny_runs["verbose"][0]
    assert warning_lines(quiet) == [], warning_lines(quiet)
    assert "\r" not in quiet and "ESPnet is not installed" not in quiet
    assert len(warning_lines(verbose)) >= 3  # the same run, unfiltered
    print(f"\nwarning lines of a 20-step tiny pretraining: {len(warning_lines(quiet))} by default, "
          f"{len(warning_lines(verbose))} with -v:", *warning_lines(verbose), sep="\n")


def test_checkpoint_names_s3prl_optimizers(tiny_runs):
    """The runner's LR schedule is pickled as s3prl.optimizers.*, so a plain torch.load(weights_only=False)
    works wherever s3prl is installed, and -a still resumes from it."""
    import zipfile

    expdir = tiny_runs["default"][1]
    ckpt = max(expdir.glob("states-*.ckpt"), key=lambda p: p.stat().st_mtime)
    with zipfile.ZipFile(ckpt) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"s3prl.optimizers" in pickled and b"\noptimizers\n" not in pickled
    proc = run_python("import sys, torch; print(torch.load(sys.argv[1], weights_only=False)['Step'])", str(ckpt))
    assert proc.returncode == 0 and proc.stdout.strip() == "20", proc.stderr[-2000:]


def test_the_seam_is_documented():
    """docs/reliability.md lists every patch (the table is written from PATCHES)."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    assert all(f"| `{name}` |" in text for name in patches.PATCHES)


@pytest.mark.parametrize("lengths", [[37, 50, 12, 50], [50, 50, 50, 50]])
def test_unpacked_blstm_equals_the_packed_one(lengths):
    """s3prl's ASR RNNLayer gives the same outputs, lengths and gradients with the BLSTM on padded input."""
    import torch
    from s3prl.downstream.asr.model import RNNLayer

    torch.manual_seed(0)
    layer = RNNLayer(8, "LSTM", True, 6, 0.0, False, 1, False)
    x = torch.randn(4, 55, 8)  # padded beyond the longest, as s3prl's batches can be
    lens = torch.tensor(lengths)

    def run():
        layer.zero_grad()
        inputs = x.clone().requires_grad_()
        out, out_len = layer(inputs, lens)
        (out * torch.linspace(-1, 1, out.shape[1])[None, :, None]).sum().backward()
        return out, out_len, inputs.grad, [p.grad.clone() for p in layer.parameters()]

    reference = run()
    with patches.asr_lstm_unpacked():
        patched = run()
    assert "forward" not in vars(layer.layer)  # undone after the call
    assert torch.equal(reference[1], patched[1]) and reference[0].shape == patched[0].shape
    for a, b in zip([reference[0], reference[2], *reference[3]], [patched[0], patched[2], *patched[3]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)  # float32 sums over 200 frames
