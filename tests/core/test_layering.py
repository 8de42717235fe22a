"""The house's layering, read from the source (docs/architecture.md): core without Qt or napari, the napari face never
importing the command line, and no import cycles between modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "napari_dagman"
GUI_LIBRARIES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt", "vispy")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Modules a file imports (absolute names), at module level only or anywhere (functions included); imports
    under ``if TYPE_CHECKING:`` are annotations, not imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    name = f"{base}.{node.module}" if node.module else base
                else:
                    name = node.module or ""
                found.add(name)
                found.update(f"{name}.{alias.name}" for alias in node.names)
            elif not top_level_only:
                visit(list(ast.iter_child_nodes(node)))  # type: ignore[arg-type]
            elif isinstance(node, ast.If | ast.Try | ast.With):
                visit([n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)])

    visit(tree.body)
    return found


def files(under: str = "") -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py"))


def test_core_imports_no_gui_library_anywhere():
    offenders = {
        module_name(f): sorted(
            m for m in imports(f, top_level_only=False) if m.split(".")[0] in GUI_LIBRARIES
        )
        for f in files("core")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_napari_face_never_imports_the_command_line():
    face = [
        *files("_widgets"),
        *(PACKAGE / n for n in ("_reader.py", "_writer.py", "_sample_data.py", "_layers.py")),
    ]
    offenders = {
        module_name(f): sorted(
            m for m in imports(f, top_level_only=False) if m.startswith("napari_dagman.cli")
        )
        for f in face
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_core_never_imports_the_napari_face_or_the_command_line():
    offenders = {
        module_name(f): sorted(
            m
            for m in imports(f, top_level_only=False)
            if m.startswith(("napari_dagman._", "napari_dagman.cli"))
        )
        for f in files("core")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def _graph() -> dict[str, set[str]]:
    known = {module_name(f) for f in files()}
    graph: dict[str, set[str]] = {}
    for f in files():
        name = module_name(f)
        targets = set()
        for imported in imports(f, top_level_only=True):
            # "pkg.module.symbol" -> the longest known module name it starts with
            parts = imported.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in known:
                    targets.add(candidate)
                    break
        graph[name] = targets - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets in a graph of module -> imported modules."""
    cycles, state = [], dict.fromkeys(graph, 0)

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif state.get(nxt) == 0:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            walk(node, [node])
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    """Module-level imports form no cycle (a package's __init__ importing its own modules is not one)."""
    graph = _graph()
    for name, targets in graph.items():  # a package importing its submodules, and a submodule its package
        graph[name] = {t for t in targets if not (t.startswith(name + ".") or name.startswith(t + "."))}
    assert find_cycles(graph) == []


#: the sizes past which a module, class or function is split (issue 24: a dock is a package of parts, not one class)
MODULE_LINES, CLASS_LINES, FUNCTION_LINES = 600, 350, 100


def oversized(path: Path) -> list[str]:
    """What in one file is over the limits, as "file:line kind name (lines)"."""
    text = path.read_text(encoding="utf-8")
    where = path.relative_to(PACKAGE.parent)
    out = []
    if (n := len(text.splitlines())) > MODULE_LINES:
        out.append(f"{where} module ({n})")
    for node in ast.walk(ast.parse(text)):
        limit = CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                out.append(f"{where}:{node.lineno} {type(node).__name__} {node.name} ({n})")
    return out


def test_the_size_check_finds_a_long_function(tmp_path):
    long = tmp_path / "napari_dagman" / "long.py"
    long.parent.mkdir()
    long.write_text("def f():\n" + "    x = 1\n" * FUNCTION_LINES + "\n\nclass C:\n    pass\n")
    global PACKAGE
    kept, PACKAGE = PACKAGE, tmp_path / "napari_dagman"
    try:
        assert oversized(long) == [f"napari_dagman/long.py:1 FunctionDef f ({FUNCTION_LINES + 1})"]
    finally:
        PACKAGE = kept


def test_no_module_class_or_function_is_over_the_size_limits():
    found = [line for path in files() for line in oversized(path)]
    assert not found, "split these:\n" + "\n".join(found)


def test_the_child_interpreter_imports_no_gui_library():
    """The background job's child starts as ``python -m napari_dagman._widgets.common.child``: importing the package
    on the way must not load Qt, magicgui or napari (seconds of start-up for nothing, and runpy's double import)."""
    import subprocess
    import sys

    probe = (
        "import sys, napari_dagman._widgets.common.child; "
        "print(sorted(m for m in ('qtpy', 'magicgui', 'napari') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
