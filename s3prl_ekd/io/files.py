"""Files and folders this package writes: atomically, keyed by content, and never over a user's.

A file written here is either complete or absent: it goes to a temporary name in the same
folder, is flushed to disk, then renamed over the target. A full disk stops with one line
and leaves the previous file as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from s3prl_ekd.errors import UserError


def fingerprint(*parts) -> str:
    """sha256 hex of `parts` as sorted-key JSON (anything not JSON becomes its str())."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then make the result appear at `path` in one rename.

    On failure the temporary file is removed and `path` is untouched; running out of disk
    space is a UserError naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if _disk_full(error, path.parent):
            raise UserError(f"{path}: no space left on the device while writing it; nothing was replaced "
                            "or removed; free some space and run again") from error
        raise
    return path


def _disk_full(error: BaseException, folder: Path) -> bool:
    """ENOSPC / EDQUOT, or another write error (torch's zip writer reports a full disk as a
    RuntimeError) with the device out of space once the partial file is gone."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        return False


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def fresh_owned_dir(path: Path, marker: str, owner: str) -> Path:
    """Empty `path` for writing and mark it as `owner`'s. Only a folder holding `marker` (one
    `owner` made) or an empty one is ever removed; anything else is the user's and is refused."""
    if path.exists():
        if not (path / marker).is_file() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"{path}: exists, is not empty and was not made by `{owner}`; "
                            "choose another --out; nothing was changed")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / marker).write_text(f"made by {owner}; re-running it replaces this folder\n")
    return path


def refuse_foreign_out(path: Path, marker: str, owner: str, force: bool = False) -> None:
    """Refuse an output folder that is neither new, empty, ours (`marker`) nor allowed by `force`."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a folder; choose another --out")
    if path.exists() and not force and any(path.iterdir()) and not (path / marker).is_file():
        raise UserError(f"{path}: holds files that `{owner}` did not write; choose another --out "
                        "or pass --force to write into it; nothing was changed")


def claim_out(path: Path, marker: str, owner: str) -> Path:
    """Create `path` (if needed) and mark it as `owner`'s, after `refuse_foreign_out` let it through."""
    path.mkdir(parents=True, exist_ok=True)
    (path / marker).write_text(f"made by {owner}\n")
    return path


@contextlib.contextmanager
def exclusive_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder/.lock` exclusively (released when the process ends, even by kill -9)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{folder}: another {what} is running in this folder right now; wait for it "
                            "or choose another name") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
