"""Folders and files this package writes: content keys to reuse them, and replacing only our own."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from s3prl_ekd.errors import UserError


def fingerprint(*parts) -> str:
    """sha256 hex of `parts` as sorted-key JSON (anything not JSON becomes its str())."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


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
