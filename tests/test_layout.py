"""The import rules of the tree, pinned (see the README's "Layout" and DESIGN.md).

Most rules read the source with ``ast`` (all of bsfinder in well under a second, and lazy
imports inside functions count); the no-torch rule also imports the modules for real, in one
fresh interpreter, because what matters there is what an import pulls in transitively.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import bsfinder

PACKAGE = Path(bsfinder.__file__).parent

#: the public names, as httpx pins its own: adding or removing one is a decision, not a side
#: effect (``FakeDevice``, the deprecated alias of ``FakeRunner``, still resolves, unlisted)
PUBLIC = [
    "BsfinderError",
    "BsfinderWarning",
    "EstimatePoint",
    "FakeRunner",
    "InputSpec",
    "LearningRateAdvice",
    "MemoryEstimate",
    "MemoryProfile",
    "ModelCrashError",
    "ProbeEvent",
    "ProbeResult",
    "ProbeSettings",
    "RankEstimate",
    "Recommendations",
    "SearchResult",
    "SpecError",
    "TargetDevice",
    "Trial",
    "UserCodeError",
    "WorkerError",
    "__version__",
    "estimate_memory",
    "find_batch_size",
    "is_oom",
    "parse_input_spec",
    "profile_memory",
    "run_probe",
    "scale_learning_rate",
    "scale_out",
    "search",
    "time_optimal_batch",
]

#: modules that must import neither torch nor the execution layer: the pure ones
PURE = ["bsfinder.errors", "bsfinder.units", "bsfinder.options"]


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in SOURCES.items()}


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    """Every module an import statement names (``from a import b``: ``a`` and ``a.b``), with
    its line, at any depth: a lazy import inside a function is still an import."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"line {node.lineno}: bsfinder uses absolute imports"
            module = node.module or ""
            found.append((module, node.lineno))
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_pure_modules_import_neither_torch_nor_execution() -> None:
    """core/, options, errors and units load without torch and without the runners.

    A fresh interpreter, with ``bsfinder`` registered as a bare namespace so that the
    package's ``__init__`` (the public facade, which imports everything) stays out of it.
    """
    pure = sorted(m for m in SOURCES if _in(m, "bsfinder.core")) + PURE
    script = f"""
import importlib, sys, types
package = types.ModuleType("bsfinder")
package.__path__ = [{str(PACKAGE)!r}]
sys.modules["bsfinder"] = package
for name in {pure!r}:
    importlib.import_module(name)
    pulled = [m for m in sys.modules if m == "torch" or m.startswith(("torch.",
              "bsfinder.execution"))]
    assert not pulled, f"importing {{name}} imports {{sorted(pulled)[:5]}}"
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("package", ["bsfinder.core", *PURE])
def test_pure_modules_have_no_lazy_torch_or_execution_import(package: str) -> None:
    """The same rule for imports inside functions, which no import-time check sees."""
    bad = [
        f"{name}:{line} imports {module}"
        for name, tree in TREES.items()
        if _in(name, package)
        for module, line in _imports(tree)
        if _in(module, "torch") or _in(module, "bsfinder.execution")
    ]
    assert not bad


def test_only_the_cli_prints_or_imports_click() -> None:
    bad = []
    for name, tree in TREES.items():
        if _in(name, "bsfinder.cli"):
            continue
        bad += [
            f"{name}:{line} imports {module}"
            for module, line in _imports(tree)
            if _in(module, "click")
        ]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id == "print":
                bad.append(f"{name}:{node.lineno} calls print()")
            if isinstance(func, ast.Attribute) and func.attr in ("echo", "secho"):
                bad.append(f"{name}:{node.lineno} calls .{func.attr}()")
    assert not bad


def test_devices_import_only_errors_units_and_themselves() -> None:
    """A backend knows nothing of trials, runners or results (it is what they run on)."""
    allowed = ("bsfinder.errors", "bsfinder.units", "bsfinder.devices")
    bad = [
        f"{name}:{line} imports {module}"
        for name, tree in TREES.items()
        if _in(name, "bsfinder.devices")
        for module, line in _imports(tree)
        if _in(module, "bsfinder") and not any(_in(module, a) for a in allowed)
    ]
    assert not bad


def test_the_layers_below_execution_do_not_import_it() -> None:
    """What a training step is (workload/), what it runs on (devices/), what it measured
    (core/, memory/, noise/) and how that reads (report/) know nothing of how trials run."""
    below = (
        "bsfinder.workload", "bsfinder.devices", "bsfinder.core", "bsfinder.memory",
        "bsfinder.noise", "bsfinder.report",
    )  # fmt: skip
    bad = [
        f"{name}:{line} imports {module}"
        for name, tree in TREES.items()
        if any(_in(name, b) for b in below)
        for module, line in _imports(tree)
        if _in(module, "bsfinder.execution")
    ]
    assert not bad


def test_no_module_imports_the_cli_or_the_package_facade() -> None:
    """The CLI is the top; ``bsfinder/__init__`` is the public facade, and importing it back
    from inside the package makes an import circle. ``__main__`` is the CLI's entry point."""
    bad = []
    for name, tree in TREES.items():
        for module, line in _imports(tree):
            inside = _in(name, "bsfinder.cli") or name == "bsfinder.__main__"
            if _in(module, "bsfinder.cli") and not inside:
                bad.append(f"{name}:{line} imports {module}")
            if module == "bsfinder" and name != "bsfinder":
                bad.append(f"{name}:{line} imports the package facade")
    assert not bad


def test_no_import_circle_lazy_imports_included() -> None:
    """No module imports one that imports it back, even lazily inside a function (the
    devices' base once imported its backends, which import the base)."""
    graph: dict[str, set[str]] = {}
    for name, tree in TREES.items():
        targets = set()
        for module, _ in _imports(tree):
            parts = module.split(".")
            # importing a.b.c runs a.b's __init__ too; the root facade is the test above's
            targets |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        graph[name] = {t for t in targets if t in SOURCES and t != name and not _in(name, t)}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_public_names_are_pinned_sorted_and_resolve() -> None:
    assert bsfinder.__all__ == PUBLIC
    assert sorted(PUBLIC) == PUBLIC
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no listed name is a deprecated one
        missing = [name for name in PUBLIC if not hasattr(bsfinder, name)]
    assert not missing


def test_the_old_fake_name_still_works_and_says_so() -> None:
    with pytest.warns(DeprecationWarning, match="FakeRunner"):
        old = bsfinder.FakeDevice
    assert old is bsfinder.FakeRunner
    assert old(capacity_bytes=10).run_trial(10).fits


def test_every_subpackage_says_what_it_is() -> None:
    bare = [
        name
        for name, path in SOURCES.items()
        if path.name == "__init__.py" and not ast.get_docstring(TREES[name])
    ]
    assert not bare
