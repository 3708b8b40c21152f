"""The `--device` of every command: checked before any work, "cuda when available, else cpu" by default."""

from __future__ import annotations

from s3prl_ekd.errors import ConfigError


def resolve_device(device: str | None, flag: str = "--device") -> str:
    """`device` checked (a torch device string this machine has), or the default when None.

    A misspelt or absent device is a ConfigError naming `flag` and the choices, raised before any
    file is written.
    """
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag} {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {device}: this machine has no usable CUDA device; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                              f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type != "cpu":
        raise ConfigError(f"{flag} {device}: s3prl-ekd runs on cpu or cuda")
    return device
