"""Damage to a target store, generated systematically: every file of a small finished store cut short,
extended and with a byte flipped at seeded random places. Each case is refused with one line when
the store is opened, or, for a change inside a .bin that only its checksum reveals, by
`s3prl-ekd targets verify`; none trains silently."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import model_config, write_yaml

from s3prl_ekd.cli import main
from s3prl_ekd.io.target_store import StoreError, TargetStore
from s3prl_ekd.plugin.targets import build_store, verify_store

SEED = 25
CASES = 50
DAMAGE = ("truncate", "extend", "flip")


@pytest.fixture(scope="module")
def store(tiny_teachers, speech_dir, tmp_path_factory) -> Path:
    """Two teachers, four utterances in two shards, bfloat16: 12 files."""
    work = tmp_path_factory.mktemp("damage")
    audio = work / "audio"
    audio.mkdir()
    for path in sorted(speech_dir.glob("*.wav"))[:4]:
        shutil.copy(path, audio / path.name)
    config = write_yaml(work / "teachers.yaml", model_config(
        [{"name": "hubert_local", "ckpt": str(tiny_teachers["hubert_a"]), "layers": [1, 3]},
         {"name": "wavlm_local", "ckpt": str(tiny_teachers["wavlm_a"]), "layers": [2, 3]}], "layerwise_average"))
    for shard in ("0/2", "1/2"):
        build_store(config, str(audio), work / "store", shard=shard, log=lambda _: None)
    return work / "store"


def store_files(store: Path) -> list[Path]:
    return sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())


def damage(path: Path, kind: str, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if kind == "truncate":
        size = rng.randrange(len(data))
        path.write_bytes(data[:size])
        return f"cut to {size} of {len(data)} bytes"
    if kind == "extend":
        extra = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        path.write_bytes(data + extra)
        return f"{len(extra)} bytes appended"
    at = rng.randrange(len(data))
    data[at] ^= rng.randrange(1, 256)
    path.write_bytes(data)
    return f"byte {at} of {len(data)} flipped"


def cases(files: list[Path]) -> list[tuple[Path, str]]:
    """Every file with every kind of damage, then seeded random picks up to CASES."""
    rng = random.Random(SEED)
    chosen = [(f, kind) for f in files for kind in DAMAGE]
    chosen += [(rng.choice(files), rng.choice(DAMAGE)) for _ in range(CASES - len(chosen))]
    return chosen


def test_the_undamaged_store_opens_and_verifies(store, capsys):
    assert len(store_files(store)) == 12
    assert TargetStore(store).index["utterances"] == 4
    assert main(["targets", "verify", str(store)]) == 0
    assert "verified 4 utterances" in capsys.readouterr().out


def test_every_damage_is_refused_at_open_or_caught_by_verify(store, tmp_path, capsys):
    files = store_files(store)
    rng = random.Random(SEED)
    outcomes, through_cli = Counter(), Counter()
    for number, (name, kind) in enumerate(cases(files)):
        copy = tmp_path / f"case{number:02d}"
        shutil.copytree(store, copy)
        what = damage(copy / name, kind, rng)
        try:
            TargetStore(copy)
        except StoreError as error:
            outcome, message = "refused at open", str(error)
        else:
            try:
                verify_store(copy)
            except StoreError as error:
                outcome, message = "caught by verify", str(error)
            else:
                outcome, message = "missed", ""
        outcomes[outcome] += 1
        assert outcome != "missed", f"{name} {what}: opened and verified"
        assert "\n" not in message and str(copy / name) in message, (name, what, message)
        assert name.suffix == ".bin" or outcome == "refused at open", (name, what, message)
        # The same through the CLI: exit 2, one `error:` line naming the file.
        code = main(["targets", "verify", str(copy)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0] == f"s3prl-ekd targets: error: {message}", err
        through_cli[outcome] += 1
        shutil.rmtree(copy)
    counts = {kind: outcomes[kind] for kind in ("refused at open", "caught by verify", "missed")}
    with capsys.disabled():
        print(f"\nstore damage, {CASES} cases (seed {SEED}) over {len(files)} files: {counts}")
    assert sum(counts.values()) == CASES and counts["missed"] == 0
    assert counts["refused at open"] >= 40 and counts["caught by verify"] >= 3  # .bin flips need the checksum
    assert through_cli == outcomes


def test_damage_through_the_installed_command(store, tmp_path):
    """`s3prl-ekd targets verify` in its own process: exit 2, one error line, no traceback."""
    for name, kind, seed in (("shard-00001-of-00002/teacher1.bin", "truncate", 1),
                             ("shard-00000-of-00002/teacher0.bin", "flip", 2)):
        copy = tmp_path / f"{kind}"
        shutil.copytree(store, copy)
        damage(copy / name, kind, random.Random(seed))
        proc = subprocess.run([sys.executable, "-m", "s3prl_ekd.cli", "targets", "verify", str(copy)],
                              capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert [line for line in lines if "error:" in line] == [lines[-1]]
        assert lines[-1].startswith(f"s3prl-ekd targets: error: {copy / name}: ")


def test_a_teacher_file_cut_or_extended_by_whole_frames_or_mid_frame(store, tmp_path):
    """Issue 25 case 3: 100 whole frames missing, or half a frame, or more: one line with the sizes."""
    name = "shard-00001-of-00002/teacher1.bin"
    size = (store / name).stat().st_size
    frame = 2 * 32 * 2  # 2 layers x 32 dims x bfloat16
    frames = size // frame
    for label, new_size in (("100 frames short", size - 100 * frame), ("half a frame short", size - frame // 2),
                            ("a frame extra", size + frame)):
        copy = tmp_path / label.replace(" ", "_")
        shutil.copytree(store, copy)
        with open(copy / name, "r+b") as handle:
            handle.truncate(new_size)
        with pytest.raises(StoreError) as refused:
            TargetStore(copy)
        assert str(refused.value).startswith(
            f"{copy / name}: {new_size} bytes, expected {size} ({frames} frames of 2 layers x 32 bfloat16); "
            "the store is damaged or was changed after it was built; copy it again, or rebuild it"), str(refused.value)
        print(f"{label}: {refused.value}")


def test_build_refuses_a_damaged_store_unless_forced(store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    name = "shard-00000-of-00002/utterances.jsonl"
    damage(copy / name, "flip", random.Random(3))
    before = {p: (copy / p).read_bytes() for p in store_files(copy)}
    args = (store.parent / "teachers.yaml", str(store.parent / "audio"), copy)
    with pytest.raises(StoreError, match=rf"^{copy / name}: .*with --force replaces it\)$"):
        build_store(*args, shard="1/2", log=lambda _: None)
    assert {p: (copy / p).read_bytes() for p in store_files(copy)} == before
    lines = []
    build_store(*args, shard="0/2", force=True, log=lines.append)
    assert f"[targets] {copy}: damaged; --force: rebuilding it" in lines and not (copy / "index.json").exists()
    build_store(*args, shard="1/2", log=lambda _: None)
    assert all((copy / p).read_bytes() == (store / p).read_bytes() for p in store_files(store))
