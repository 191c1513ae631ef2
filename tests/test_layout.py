"""The shape of the code base (DESIGN.md, "Layout"): packages by stage, imports one way, no cycles,
modules of a few hundred lines, every module importable alone, no torch in the web process."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BACKEND = REPO / "backend"
MAX_LINES = 400

#: Which package may import which (DESIGN.md). "foundation" = the modules directly in backend/.
ALLOWED = {
    "foundation": set(),
    "ls": {"foundation"},
    "images": {"foundation", "ls"},
    "engine": {"foundation"},
    "pipeline": {"foundation", "ls", "images", "engine"},
    "queue": {"foundation", "ls", "pipeline"},
    "bulk": {"foundation", "ls", "pipeline", "queue"},
    "modes": {"foundation", "ls", "pipeline", "queue", "bulk"},
    "web": {"foundation", "ls", "queue", "bulk", "modes"},
}
ENTRY_POINTS = {"backend.cli", "backend.cli_video", "backend.__main__"}  # may import anything


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(BACKEND.rglob("*.py"))}


def package(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and (BACKEND / parts[1]).is_dir():
        return parts[1]
    if len(parts) == 2 and (BACKEND / parts[1]).is_dir():
        return parts[1]  # the package's own __init__
    return "foundation"


def imports_of(module: str) -> set[str]:
    """Every backend module ``module`` imports, at the top or inside functions (TYPE_CHECKING too)."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES and name != module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for module, targets in GRAPH.items():
        if module in ENTRY_POINTS:
            continue
        source = package(module)
        for target in targets:
            destination = package(target)
            if destination != source and destination not in ALLOWED[source]:
                wrong.append(f"{module} ({source}) imports {target} ({destination})")
    assert not wrong, "imports against the layering of DESIGN.md:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle_between_modules():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_stay_small():
    big = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them along their seams): {big}"


def test_every_package_says_what_it_owns_and_may_import():
    for init in BACKEND.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 80 and "import" in doc, f"{init.relative_to(REPO)}: say what it owns and may import"


def _import_alone(module: str) -> tuple[str, int, str]:
    run = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    return module, run.returncode, run.stderr[-2000:]


def test_every_module_imports_alone_in_a_fresh_interpreter():
    modules = [m for m in MODULES if m != "backend.__main__"]  # __main__ runs the CLI
    with ThreadPoolExecutor(2) as pool:
        failed = [(m, err) for m, code, err in pool.map(_import_alone, modules) if code != 0]
    assert not failed, "\n\n".join(f"{m}:\n{err}" for m, err in failed)


@pytest.mark.parametrize("entry", ["backend.web.app", "backend.modes.queued", "backend.modes.factory", "backend.bulk.runs"])
def test_the_web_side_never_imports_torch(entry):
    code = f"import sys, {entry}; sys.exit(3 if 'torch' in sys.modules else 0)"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 3, f"importing {entry} imports torch: the web process of queue mode must not"
    assert run.returncode == 0, run.stderr[-2000:]
