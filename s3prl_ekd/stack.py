"""Which s3prl stack is installed, and whether this package can run on it.

Two stacks are supported (see README, "Installing"): s3prl 0.4.18 on torch/torchaudio <= 2.8
(`pip install 's3prl-ekd[s3prl]'`) and ESPnet's maintained fork espnet-s3prl, which installs
the same `s3prl` module, on torch/torchaudio 2.9 - 2.11 (`pip install 's3prl-ekd[espnet]'`).
Reads package metadata only: nothing heavy is imported here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

S3PRL_DISTRIBUTIONS = ("espnet-s3prl", "s3prl")
INSTALL_HINT = ("pip install 's3prl-ekd[espnet]' (torch/torchaudio 2.9-2.11) or "
                "'s3prl-ekd[s3prl]' (torch/torchaudio <= 2.8)")


def _version(distribution: str) -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


def s3prl_distribution() -> str:
    """The installed distribution that provides the `s3prl` module: 's3prl' or 'espnet-s3prl'."""
    for name in S3PRL_DISTRIBUTIONS:
        if _version(name) is not None:
            return name
    raise ImportError(f"s3prl-ekd needs s3prl, which is not installed: {INSTALL_HINT}")


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a module that cannot even be found is not installed
        return False


def stack_problem() -> str | None:
    """One line saying why this environment cannot run s3prl-ekd, or None if it can."""
    if not _findable("s3prl"):
        return f"s3prl-ekd needs s3prl, which is not installed: {INSTALL_HINT}"
    if not _findable("torchaudio"):
        return ("s3prl-ekd needs torchaudio (s3prl imports it), which is not installed: "
                "pip install torchaudio==<your torch version> (2.11 at most), or " + INSTALL_HINT)
    torchaudio = _version("torchaudio")
    if _version("s3prl") is not None and _version("espnet-s3prl") is None and torchaudio and torchaudio >= (2, 9):
        return (f"s3prl 0.4.18 cannot run on torchaudio {'.'.join(map(str, torchaudio))} (it calls "
                "torchaudio.set_audio_backend, removed in 2.9): pip uninstall s3prl && "
                "pip install 's3prl-ekd[espnet]', or use torch/torchaudio 2.8 with 's3prl-ekd[s3prl]'")
    return None


def require_stack() -> None:
    problem = stack_problem()
    if problem:
        raise ImportError(problem)
