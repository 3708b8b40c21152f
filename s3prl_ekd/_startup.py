"""The s3prl.hub hook proper, imported when a process first imports s3prl: standard library only.

The `s3prl_ekd_hub.pth` start-up file costs every interpreter of the environment one tiny finder that
watches for `import s3prl` and then calls `install()` here (benchmarks/startup_hook.py measures it).
Two import-system finders then hand over to `s3prl_ekd.patches` when s3prl needs this package
(patches.PATCHES["hub_entries"] and ["missing_modules"] say what they change and why):
- after `s3prl.hub` executes, `patches.add_hub_entries` adds the ekd_distiller entries to it;
- the modules in MISSING (imported by s3prl's experts, absent from its wheel) come from
  `patches.missing_module_spec`; that finder is asked last, so a full s3prl checkout's own win.
"""

import sys

HUB = "s3prl.hub"
MISSING = frozenset({"s3prl.downstream.ctc.corpus", "s3prl.downstream.ctc.corpus.libriphone"})


class _HubLoader:
    """s3prl.hub's own loader, followed by our entries."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        from s3prl_ekd.patches import add_hub_entries

        add_hub_entries(module)

    def __getattr__(self, name):  # get_source, get_filename, ... as the real loader
        return getattr(self.loader, name)


class HubFinder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != HUB:
            return None
        from importlib.util import find_spec

        sys.meta_path.remove(self)  # the real spec, whose loader we then wrap
        try:
            spec = find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _HubLoader(spec.loader)
        return spec


class MissingFinder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MISSING:
            return None
        from s3prl_ekd.patches import missing_module_spec

        return missing_module_spec(fullname)


def install() -> None:
    """Put both finders in place (idempotent); if s3prl.hub is already imported, add the entries now."""
    names = {type(finder).__name__ for finder in sys.meta_path}
    if "HubFinder" not in names:
        sys.meta_path.insert(0, HubFinder())
    if "MissingFinder" not in names:
        sys.meta_path.append(MissingFinder())
    if HUB in sys.modules:
        from s3prl_ekd.patches import add_hub_entries

        add_hub_entries(sys.modules[HUB])
