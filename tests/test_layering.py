"""The import graph runs one way: node -> trainer -> engine, node -> engine; never back.

The engine (``engine/``, installed as ``dicom_node.engine``) imports nothing from the node
(``dicom_node.*``) or the trainer; the trainer (``train/``, ``dicom_node.train``) imports
nothing from the node, not even the package root ``dicom_node`` itself (its folder is the
node's: an engine that reads ``dicom_node.__file__`` depends on the node's layout).  Checked
twice: by reading every import statement (including the ones inside functions, which the
second check cannot see: they run only when called), and by importing every engine and
trainer module in a fresh interpreter where the node's modules cannot be imported at all.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"engine": "dicom_node.engine", "train": "dicom_node.train"}


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).glob("*.py"))


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of the module a ``from ... import`` in ``package`` reads from."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[:len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (a module of ``package``)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, package)
            if module != "dicom_node":
                out.append((node.lineno, module))
            else:  # from dicom_node import config  ->  dicom_node.config (engine, train: their packages)
                out += [(node.lineno, f"dicom_node.{alias.name}") for alias in node.names]
    return out


def _layer(module: str) -> str | None:
    """``node``, ``train``, ``engine`` or None (a third-party or standard library module)."""
    if module == "dicom_node.engine" or module.startswith("dicom_node.engine."):
        return "engine"
    if module == "dicom_node.train" or module.startswith("dicom_node.train."):
        return "train"
    if module == "dicom_node":
        return "root"  # the node's package root (kept free of node imports itself: checked below)
    if module.startswith("dicom_node."):
        return "node"
    return None


FORBIDDEN = {"engine": {"node", "root", "train"}, "train": {"node", "root"}}


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_no_import_arrow_points_up(folder: str) -> None:
    bad = []
    for path in _modules(folder):
        package = PACKAGES[folder]
        for line, module in _imports(path, package):
            if _layer(module) in FORBIDDEN[folder]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_package_root_imports_only_the_engine() -> None:
    """``import dicom_node.engine`` runs dicom_node/__init__.py first: it must stay light."""
    found = _imports(ROOT / "dicom_node" / "__init__.py", "dicom_node")
    assert all(_layer(m) in (None, "engine") and m != "dicom_node.engine.tiling" for _l, m in found), found


BLOCKED_IMPORT = r"""
import importlib, pathlib, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("dicom_node.") and not name.startswith(("dicom_node.engine", "dicom_node.train")):
            raise ImportError(f"layering: {name} imported from the engine or the trainer")
        return None

sys.meta_path.insert(0, Refuse())
root = pathlib.Path(sys.argv[1])
for folder, package in (("engine", "dicom_node.engine"), ("train", "dicom_node.train")):
    for path in sorted((root / folder).glob("*.py")):
        name = package if path.stem == "__init__" else f"{package}.{path.stem}"
        importlib.import_module(name)
leaked = sorted(m for m in sys.modules
                if m.startswith("dicom_node.") and not m.startswith(("dicom_node.engine", "dicom_node.train")))
assert not leaked, leaked
print("ok")
"""


def test_an_import_of_the_node_inside_a_function_is_caught(tmp_path: Path) -> None:
    """The static check sees imports at any depth, and the package root counts as the node's
    (engine/model_paths.py once found the bundled models through ``import dicom_node`` in a
    function: the import check below never runs a function, so only this one can see it)."""
    path = tmp_path / "models.py"
    path.write_text("def folder():\n    if True:\n        import dicom_node\n        from dicom_node import config\n"
                    "        return dicom_node.__file__\n")
    found = [(line, m) for line, m in _imports(path, "dicom_node.engine") if _layer(m) in FORBIDDEN["engine"]]
    assert found == [(3, "dicom_node"), (4, "dicom_node.config")]


def test_engine_and_trainer_import_with_the_node_blocked() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT, str(ROOT)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_engine_errors_are_the_nodes() -> None:
    """The node re-exports the engine's exception types: one class each, caught the same."""
    from dicom_node import errors as node_errors
    from dicom_node.engine import errors as engine_errors

    assert node_errors.UserError is engine_errors.UserError
    assert node_errors.UnsupportedImage is engine_errors.UnsupportedImage


# ----------------------------------------------------------------------------- cycles

FOLDERS = {"dicom_node": "dicom_node", "engine": "dicom_node.engine", "train": "dicom_node.train"}


def _all_modules() -> dict[str, Path]:
    """Every module of the three packages by its installed name (``engine/x.py`` is
    ``dicom_node.engine.x``; a package is its ``__init__.py``)."""
    out: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _runtime_imports(path: Path, package: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports when it runs, inside functions too, but
    not under ``if TYPE_CHECKING:`` (annotations only: they cannot close a cycle at run time).
    ``from pkg import name`` counts as ``pkg.name`` when that is a module, else as ``pkg``."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, package)
            for alias in node.names:
                target = f"{module}.{alias.name}"
                if target in known:
                    out.add(target)
                elif module in known:
                    out.add(module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def test_no_import_cycle_anywhere_even_inside_functions() -> None:
    """A cycle works or breaks depending on which module is imported first (config -> routing
    -> config did, until it was found); a test run that happens to import in the lucky order
    cannot catch it, so the graph is read from the source."""
    modules = _all_modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _runtime_imports(path, package, known) - {name}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    module = ROOT / "tests" / "test_layering.py"  # this file: its own imports are all third-party or stdlib
    assert _runtime_imports(module, "tests", {"ast", "pytest"}) == {"ast", "pytest"}
