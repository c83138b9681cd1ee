"""The test suite's own layout: test modules import shared code from `helpers` (or a worker), never from each other,
and every helper is written once."""

from __future__ import annotations

import ast
import collections

from helpers import TESTS

SOURCES = sorted(path for path in TESTS.rglob("*.py") if "mutation" not in path.relative_to(TESTS).parts)
TEST_MODULES = {path.stem for path in SOURCES if path.name.startswith("test_")}


def parsed() -> dict[str, ast.Module]:
    return {str(path.relative_to(TESTS)): ast.parse(path.read_text(encoding="utf-8")) for path in SOURCES}


def imported_modules(tree: ast.Module) -> list[str]:
    """Every module an import statement anywhere in `tree` names (`from x import y` gives x and x.y)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return names


def test_no_module_imports_a_test_module():
    """One import style: `from helpers import ...` (and `from workers... import` for a worker's own names); never a
    test module, never through the `tests.` package."""
    offenders = sorted(
        {
            f"{path}: {name}"
            for path, tree in parsed().items()
            for name in imported_modules(tree)
            if name.split(".")[-1] in TEST_MODULES or name.split(".")[0] == "tests"
        }
    )
    assert not offenders, "import shared code with `from helpers import`, not from a test module:\n" + "\n".join(
        offenders
    )


def test_test_module_names_are_unique():
    """Test folders have no __init__.py, so pytest imports each test module by its bare name."""
    paths = collections.defaultdict(list)
    for path in SOURCES:
        paths[path.name].append(str(path.relative_to(TESTS)))
    assert not {name: where for name, where in paths.items() if len(where) > 1}


def definitions(tree: ast.Module):
    return [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]


def test_no_file_redefines_a_helper():
    trees = parsed()
    shared = {node.name for node in definitions(trees.pop("helpers.py"))}
    offenders = [
        f"{path}: {node.name}" for path, tree in trees.items() for node in definitions(tree) if node.name in shared
    ]
    assert not offenders, "defined in helpers.py already:\n" + "\n".join(offenders)


def body(node: ast.FunctionDef) -> str:
    """The function's arguments and code without its name, decorators and docstring: copies under other names match."""
    statements = node.body
    if isinstance(statements[0], ast.Expr) and isinstance(statements[0].value, ast.Constant):
        statements = statements[1:]
    return ast.dump(node.args) + "".join(ast.dump(statement) for statement in statements)


def test_no_function_is_written_twice():
    places = collections.defaultdict(list)
    for path, tree in parsed().items():
        for node in definitions(tree):
            if isinstance(node, ast.FunctionDef):
                places[body(node)].append(f"{path}:{node.lineno} {node.name}")
    copies = [where for where in places.values() if len({place.split(":")[0] for place in where}) > 1]
    assert not copies, "the same function in several files; move it to helpers.py:\n" + "\n".join(map(str, copies))
