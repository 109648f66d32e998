"""The layout shows the architecture: a core that knows nothing of any application, and no import cycle.

The core is ``rdl_functional`` less ``rdl_functional/apps``; the package's ``__init__`` names a few application
functions (``rf.run_disc``, ``rf.plot_history``, ...) lazily, for convenience, so importing the core loads no
application module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rdl_functional"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _core_modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py")
                  if "apps" not in path.relative_to(PACKAGE).parts and path.name != "__main__.py")


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The modules ``path`` imports (relative imports made absolute); with ``top_level_only``, only those that run
    when the module is imported (not inside functions, nor under ``if TYPE_CHECKING``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x` imports module x
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module.startswith("rdl_functional")}


def test_no_core_module_imports_an_application():
    offenders = {str(path.relative_to(ROOT)): sorted(name for name in _imports(path, top_level_only=False)
                                                    if name.startswith("rdl_functional.apps"))
                 for path in _core_modules() if path.name != "__init__.py" or path.parent != PACKAGE}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_importing_every_core_module_loads_no_application_module():
    modules = [_module_name(path) for path in _core_modules()]
    script = ("import importlib, sys\n"
              f"for name in {modules!r}:\n"
              "    importlib.import_module(name)\n"
              "print(sorted(m for m in sys.modules if m.startswith('rdl_functional.apps')))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_core_has_no_import_cycle_at_import_time():
    graph = {}
    for path in _core_modules():
        name = _module_name(path)
        graph[name] = {module for module in _imports(path, top_level_only=True) if module != name}
    known = set(graph)
    graph = {name: {module for module in imported if module in known} for name, imported in graph.items()}
    # A package's __init__ imports its modules, which import it back as their package: not a cycle of code.
    graph = {name: {m for m in imported if not (name.startswith(f"{m}.") or m == name)}
             for name, imported in graph.items()}
    done, on_path, cycles = set(), [], []

    def visit(name: str) -> None:
        if name in on_path:
            cycles.append([*on_path[on_path.index(name):], name])
            return
        if name in done:
            return
        on_path.append(name)
        for module in sorted(graph[name]):
            visit(module)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert cycles == []
