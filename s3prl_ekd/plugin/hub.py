"""Adds the `ekd_distiller*` entries to `s3prl.hub` the moment s3prl imports it, and
provides the few modules s3prl's experts import but its wheel lacks (MODULE_ALIASES).

Imported at interpreter start-up by `s3prl_ekd_hub.pth`, which the wheel installs beside the
package (pip uninstall removes it) and `s3prl-ekd register` writes for editable installs, so
s3prl's unmodified run_downstream.py, `s3prl.nn.S3PRLUpstream` and ESPnet's S3prlFrontend
find the upstream. It imports nothing heavy until `s3prl.hub` itself is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import sysconfig
from pathlib import Path

HUB_MODULE = "s3prl.hub"
# Modules s3prl's experts import but the wheel lacks: s3prl name -> our module providing them
# (None: an empty package). Asked last, so a full s3prl checkout's own modules win.
MODULE_ALIASES = {
    "s3prl.downstream.ctc.corpus": None,
    "s3prl.downstream.ctc.corpus.libriphone": "s3prl_ekd.plugin.libriphone",
}
# The start-up hook, beside this module; setup.py puts the same file at the top of the wheel.
# One line, as .pth files need; a missing or broken stack is reported when s3prl_ekd is used,
# not by every interpreter start in the environment, hence its ImportError guard.
PTH_NAME = "s3prl_ekd_hub.pth"


def add_entries(hub_module) -> None:
    """Set every public function of our hubconf as an attribute of `hub_module`."""
    from s3prl_ekd.upstream.ekd_distiller import hubconf

    for name in hubconf.__all__:
        setattr(hub_module, name, getattr(hubconf, name))


class _AfterExec(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        add_entries(module)


class _HubFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != HUB_MODULE:
            return None
        sys.meta_path.remove(self)  # find the real spec, then wrap its loader
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterExec(spec.loader)
        return spec


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str | None):
        self.target = target

    def create_module(self, spec):
        return None  # a fresh module named as s3prl expects

    def exec_module(self, module):
        if self.target is not None:
            provider = importlib.import_module(self.target)
            module.__dict__.update({k: v for k, v in vars(provider).items() if not k.startswith("__")})


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in MODULE_ALIASES:
            return None
        target_name = MODULE_ALIASES[fullname]
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(target_name),
                                              is_package=target_name is None)


def install() -> None:
    """Register now if s3prl.hub is loaded, else when it is imported. Idempotent."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_AliasFinder())  # last: only asked when nothing else has the module
    if HUB_MODULE in sys.modules:
        add_entries(sys.modules[HUB_MODULE])
    elif not any(isinstance(finder, _HubFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HubFinder())


def register(site_dir: str | Path | None = None) -> Path:
    """Write the start-up hook into `site_dir` (default: this environment's site-packages). Idempotent."""
    pth = Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    pth.write_text((Path(__file__).parent / PTH_NAME).read_text())
    return pth


def unregister(site_dir: str | Path | None = None) -> Path | None:
    """Remove the start-up hook; returns its path, or None if there was none."""
    pth = Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    if not pth.is_file():
        return None
    pth.unlink()
    return pth


install()
