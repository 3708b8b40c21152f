"""Files shipped with the package: pretraining configs and downstream recipes.

They live in the project's top-level `pretrain_configs/` and `downstream_recipes/` folders,
which setup.cfg installs as the packages `s3prl_ekd.pretrain_configs` and
`s3prl_ekd.downstream_recipes`, so a wheel and a source checkout find them alike.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from s3prl_ekd.errors import ConfigError


def _path(package: str, *parts: str) -> Path:
    """A real file-system path (s3prl's scripts open these by name), or a clear error."""
    path = Path(str(resources.files(package).joinpath(*parts)))
    if not path.exists():
        raise ConfigError(f"{path}: package data file missing; reinstall s3prl-ekd")
    return path


def pretrain_config(name: str) -> Path:
    """A file of pretrain_configs/, e.g. pretrain_config('tiny_cpu_runner.yaml')."""
    path = Path(str(resources.files("s3prl_ekd.pretrain_configs").joinpath(name)))
    if not path.is_file():
        names = ", ".join(sorted(p.name for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"{name}: not a shipped pretraining config; use one of {names}")
    return path


def recipe_file(*parts: str) -> Path:
    """A file of downstream_recipes/, e.g. recipe_file('pr', 'cpu-small.yaml')."""
    return _path("s3prl_ekd.downstream_recipes", *parts)


def pretrain_config_names() -> list[str]:
    return sorted(p.name for p in Path(str(resources.files("s3prl_ekd.pretrain_configs"))).glob("*.yaml"))
