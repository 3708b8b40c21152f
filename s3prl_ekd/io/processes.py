"""Running another `s3prl-ekd` command (or any program) with its output in log files."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from s3prl_ekd.errors import UserError


def s3prl_ekd_command(*args: str) -> list[str]:
    """`s3prl-ekd ARGS` run by this interpreter (so in this environment, whatever PATH says)."""
    return [sys.executable, "-m", "s3prl_ekd.cli", *args]


def run_logged(command: list[str], log: Path, what: str, threads: int | None = None) -> None:
    """Run `command` with stdout in `log` and stderr beside it (suffix .err); `threads` caps torch's CPU
    threads in it. A failure is one UserError naming `what`, the command, the logs and stderr's last lines.

    PyTorch's CPU allocator asks for transparent huge pages for tensors of 2 MiB and more unless the caller's
    environment says otherwise (THP_MEM_ALLOC_ENABLE): a demo student ran with 11% less CPU time and 0.09x the
    page faults, bit-identical (benchmarks/RESULTS.md, "Memory allocator")."""
    env = {"THP_MEM_ALLOC_ENABLE": "1", **os.environ}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    err = log.with_suffix(".err")
    with open(log, "w") as out, open(err, "w") as error:
        code = subprocess.call(command, stdout=out, stderr=error, stdin=subprocess.DEVNULL, env=env)
    if code != 0:
        tail = [line for line in err.read_text().splitlines() if line.strip()][-12:]
        raise UserError(f"{what} failed (exit {code}); command: {shlex.join(command)}; logs: {log}, {err}"
                        + ("; last lines:\n" + "\n".join(tail) if tail else ""))
