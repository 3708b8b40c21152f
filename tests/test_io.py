"""io/: strict YAML and typed configs, the tensorboard reader, and the dependency floors setup.cfg states."""

from __future__ import annotations

import configparser
import importlib.metadata
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from s3prl_ekd.errors import ConfigError
from s3prl_ekd.io.events import read_scalars
from s3prl_ekd.io.strict import from_dict, read_yaml_mapping

ROOT = Path(__file__).resolve().parents[1]


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("teachers: []\nstudent:\n  encoder_layers: 2\n  dropout: 0.1\n  encoder_layers: 4\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: student: key 'encoder_layers' appears twice \(lines 3 and 5\); "
                                          r"keep one"):
        read_yaml_mapping(path, "model config")
    path.write_text("a: 1\nb: 2\n")  # and a clean file still reads
    assert read_yaml_mapping(path, "model config") == {"a": 1, "b": 2}


@dataclass
class Rates:
    lr: float = 1.0
    steps: int = 1


def test_a_number_yaml_reads_as_text_says_how_to_write_it(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 5e-2\nsteps: 3\n")
    data = read_yaml_mapping(path, "config")
    assert data["lr"] == "5e-2"  # what PyYAML (YAML 1.1) does
    with pytest.raises(ConfigError, match=r"r\.lr: '5e-2' is text, not a number: YAML 1\.1 reads .*; write 5\.0e-2$"):
        from_dict(Rates, data, "r")
    assert from_dict(Rates, {"lr": 5.0e-2, "steps": 3}).lr == 0.05
    with pytest.raises(ConfigError, match=r"r\.steps: expected int, got 'three'"):
        from_dict(Rates, {"steps": "three"}, "r")
    with pytest.raises(ConfigError, match=r"r\.steps: expected int, got '2'$"):  # quoted: no float advice
        from_dict(Rates, {"steps": "2"}, "r")


def _record(payload: bytes) -> bytes:
    return struct.pack("<Q", len(payload)) + b"\0" * 4 + payload + b"\0" * 4


def test_events_reader_stops_at_a_cut_last_record(tmp_path):
    """A killed writer leaves its last record incomplete: the records before it are read, nothing breaks."""
    from tensorboardX.proto import event_pb2

    def event(step: int, value: float) -> bytes:
        e = event_pb2.Event(step=step)
        e.summary.value.add(tag="loss", simple_value=value)
        return e.SerializeToString()

    whole = _record(event(1, 0.5)) + _record(event(2, 0.25))
    (tmp_path / "events.out.tfevents.1").write_bytes(whole + _record(event(3, 0.125))[:-7])
    assert read_scalars(tmp_path) == {"loss": [(1, 0.5), (2, 0.25)]}


def _floor(requirement: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([\d.]+)", requirement)
    return tuple(int(x) for x in match.group(1).split("."))


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def _pins(lock: Path) -> dict[str, str]:
    lines = lock.read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def test_torch_floor_is_the_oldest_tested_stack():
    """setup.cfg's torch / torchaudio floors are what the lock files test (and what safe_globals with
    (class, name) tuples needs)."""
    requires = _setup_cfg()["options"]["install_requires"].split("\n")
    for name in ("torch", "torchaudio"):
        floor = _floor(next(r for r in requires if re.match(rf"\s*{name}\s*>=", r)))
        tested = min(tuple(int(x) for x in _pins(ROOT / lock)[name].split("+")[0].split(".")[:2])
                     for lock in ("requirements.lock", "requirements-current.lock"))
        assert floor[:2] == tested, f"{name}: setup.cfg floor {floor} but the oldest tested is {tested}"


def test_python_floor_covers_every_locked_package():
    """python_requires is at least every pinned package's own Requires-Python (read from this environment)."""
    floor = _floor(_setup_cfg()["options"]["python_requires"])
    needed = []
    for name, version in _pins(ROOT / "requirements.lock").items():
        try:
            meta = importlib.metadata.metadata(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if meta["Version"] == version and meta["Requires-Python"] and ">=" in meta["Requires-Python"]:
            needed.append((_floor(meta["Requires-Python"])[:2], name))
    assert needed, "no pinned package found in this environment"
    assert floor[:2] >= max(needed)[0], f"python_requires {floor} is below {max(needed)}"


def test_subprocesses_get_huge_page_tensors_unless_the_caller_says_otherwise(tmp_path, monkeypatch):
    """run_logged (demo students, SUPERB runs) turns on PyTorch's huge-page CPU allocations, measured to cut a
    student's CPU time with bit-identical results; a value in the caller's environment wins."""
    import sys

    from s3prl_ekd.io.processes import run_logged

    show = [sys.executable, "-c", "import os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'), os.environ['OMP_NUM_THREADS'])"]
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    run_logged(show, tmp_path / "default.log", "show", threads=1)
    assert (tmp_path / "default.log").read_text().split() == ["1", "1"]
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    run_logged(show, tmp_path / "own.log", "show", threads=2)
    assert (tmp_path / "own.log").read_text().split() == ["0", "2"]
