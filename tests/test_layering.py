"""The library sits below the task populations and the analysis scripts: nothing in
`es_l2o` imports `populations` or `analysis` (configs reach them by `_target_`)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "es_l2o"
ABOVE = ("populations", "analysis")


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import statement, at any depth (function-level
    imports included; relative imports resolve inside es_l2o and are skipped)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _violations(source: str, path: str = "<string>") -> list[str]:
    tree = ast.parse(source, filename=path)
    return [
        f"{path}:{line} imports {module}"
        for line, module in _imported_modules(tree)
        if module.split(".")[0] in ABOVE
    ]


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_library_module_imports_nothing_above_it(path):
    assert _violations(path.read_text(), str(path)) == []


def test_the_check_sees_every_kind_of_import():
    source = (
        "import populations\n"
        "import analysis.eval_plots as plots\n"
        "def f():\n"
        "    from populations.suites import get_suite\n"
        "from es_l2o import tasks\n"
        "import populations_extra\n"
    )
    assert [v.split(" imports ")[1] for v in _violations(source)] == [
        "populations",
        "analysis.eval_plots",
        "populations.suites",
    ]
