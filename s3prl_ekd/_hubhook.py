"""Adds the `ekd_distiller*` entries to `s3prl.hub` the moment s3prl imports it.

Imported at interpreter start-up by `s3prl_ekd_hub.pth` (written by
`s3prl-ekd register`), so s3prl's unmodified run_downstream.py and
`s3prl.nn.S3PRLUpstream` find the upstream. It imports nothing heavy until
`s3prl.hub` itself is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

HUB_MODULE = "s3prl.hub"


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


def install() -> None:
    """Register now if s3prl.hub is loaded, else when it is imported. Idempotent."""
    if HUB_MODULE in sys.modules:
        add_entries(sys.modules[HUB_MODULE])
    elif not any(isinstance(finder, _HubFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HubFinder())


install()
