"""The package's layering holds: imports run one way (io -> core -> plugin -> recipes/tools -> demo
-> cli), nothing imports in a circle, and an exported submission carries every module it imports."""

from __future__ import annotations

import ast
from pathlib import Path

import s3prl_ekd
from s3prl_ekd.tools.export import VENDORED_MODULES

PACKAGE_DIR = Path(s3prl_ekd.__file__).parent
UPSTREAM_DIR = Path(__import__("s3prl_ekd.upstream", fromlist=["_"]).__file__).parent

# Lower rank = closer to the bottom; a module may import its own rank or lower.
RANKS = {"s3prl_ekd.errors": 0, "s3prl_ekd.stack": 0, "s3prl_ekd.devices": 0, "s3prl_ekd._startup": 3,
         "s3prl_ekd.patches": 3, "s3prl_ekd.io": 1, "s3prl_ekd.core": 2,
         "s3prl_ekd.plugin": 3, "s3prl_ekd.upstream": 3, "s3prl_ekd.recipes": 4, "s3prl_ekd.tools": 4,
         "s3prl_ekd.demo": 5, "s3prl_ekd.cli": 6}


def rank(module: str) -> int:
    for prefix in sorted(RANKS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return RANKS[prefix]
    raise AssertionError(f"{module}: not placed in a layer; add its package to RANKS")


def modules() -> dict[str, Path]:
    found = {}
    for root, package in ((PACKAGE_DIR, "s3prl_ekd"), (UPSTREAM_DIR, "s3prl_ekd.upstream")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, module_level_only: bool = False) -> set[str]:
    """s3prl_ekd modules `path` imports (`from s3prl_ekd.x import y` counts as x, or x.y if a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    known = modules()
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("s3prl_ekd")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("s3prl_ekd"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


def test_every_module_is_in_a_layer():
    for name in modules():
        if name != "s3prl_ekd":
            rank(name)


def test_imports_run_one_way():
    violations = []
    for name, path in modules().items():
        if name == "s3prl_ekd":  # the public API: imports the method lazily, inside its functions
            assert all(rank(m) == 0 for m in imports(path, module_level_only=True)), imports(path, True)
            continue
        for imported in imports(path):
            if imported != "s3prl_ekd" and rank(imported) > rank(name):
                violations.append(f"{name} (layer {rank(name)}) imports {imported} (layer {rank(imported)})")
    assert not violations, "\n".join(violations)


def test_the_method_does_not_import_s3prl_runners():
    """core/ builds on s3prl's models only: not its runners, optimizers or downstream code."""
    for name, path in modules().items():
        if name.startswith("s3prl_ekd.core"):
            text = path.read_text()
            for forbidden in ("s3prl.downstream", "s3prl.pretrain", "s3prl.optimizers", "run_pretrain"):
                assert forbidden not in text, f"{name} uses {forbidden}"


def test_no_import_cycles():
    graph = {name: {m for m in imports(path, module_level_only=True) if m in modules() and m != name}
             for name, path in modules().items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt])
                                     if nxt in stack else f"import cycle through {node} -> {nxt}")
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_exported_modules_carry_what_they_import():
    known = modules()
    for name in VENDORED_MODULES:
        needed = imports(known[name]) - {"s3prl_ekd"}
        missing = {m for m in needed if m not in VENDORED_MODULES}
        assert not missing, f"{name} imports {missing}, which an exported submission folder lacks"
