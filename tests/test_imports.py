"""The package's import structure: what importing the trainer loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules_loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after `statement` (a child process: this one has imported everything)."""
    script = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(SRC), "PATH": ""})
    return set(result.stdout.split())


def test_training_imports_no_onnx_or_int8_code():
    loaded = modules_loaded_by("import resnetlab.train")
    assert "resnetlab.train" in loaded and "resnetlab.evaluate" in loaded  # the statement ran as meant
    unwanted = {"resnetlab.export", "resnetlab.quantize", "resnetlab.inference", "onnx", "onnxruntime"}
    assert not unwanted & loaded, f"import resnetlab.train loaded {sorted(unwanted & loaded)}"


# --------------------------------------------------------------------------------------------------------------
# No import cycle among the package's modules
# --------------------------------------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside a function (a deferred import is a dependency too),
    except those under `if TYPE_CHECKING:`, which never run."""
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and is_type_checking(block.test)
               for statement in block.body for node in ast.walk(statement)}
    return [node for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped]


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, from the source. `from X import y` points at the module X.y when
    there is one (`from resnetlab import train`), else at X. Relative imports are resolved against the module's
    package. The parent packages Python runs on the way to a module (their __init__) are not counted as edges: a
    package's __init__ re-exports its modules, so every module of it would otherwise form a cycle with it."""
    files = {module_name(path): path for path in (SRC / "resnetlab").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {target for target in targets if target in files and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"resnetlab.train", "resnetlab.data.spec", "resnetlab.detection.train"} <= graph.keys()
    assert "resnetlab.checkpoint" in graph["resnetlab.factory"]  # the graph holds the edges it should
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
