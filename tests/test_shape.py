"""The code's shape (issue 23): functions that fit on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 50


def _sources() -> list[Path]:
    return [*sorted((REPO / "fastsr").rglob("*.py")), *sorted((REPO / "kernels").rglob("*.py")),
            *sorted((REPO / "csrc").glob("*.py"))]


def test_no_function_is_longer_than_a_screen():
    """Every function (methods and @triton.jit kernels too) in fastsr/, kernels/ and csrc/*.py has at
    most MAX_LINES lines, decorators and docstring included."""
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - first + 1 > MAX_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - first + 1})")
    assert not long, "\n".join(long)
