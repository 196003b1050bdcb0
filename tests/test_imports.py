"""The allowed imports of docs/architecture.md ("Allowed arrows"): import-linter's contracts (in
pyproject.toml) checked on the package laid out as it is installed, and no private name used
across modules.

import-linter builds its graph from the folder ``fastsr`` is imported from. In the checkout,
``kernels/`` and ``csrc/`` are not in that folder (setup.py maps them to ``fastsr.kernels`` and
``fastsr.csrc``), so the check runs on a copy with the installed layout, in a fresh process.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import fastsr
from fastsr import csrc, kernels

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
# Import name -> the folder it is read from (a checkout or an installed package alike).
ROOTS = {"fastsr": Path(fastsr.__file__).parent, "fastsr.kernels": Path(kernels.__file__).parent,
         "fastsr.csrc": Path(csrc.__file__).parent}


def _installed_layout(dest: Path) -> Path:
    """``fastsr`` as a wheel installs it (kernels and csrc inside), copied under ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "build")
    for name, root in ROOTS.items():
        target = dest.joinpath(*name.split("."))
        if not target.exists():
            shutil.copytree(root, target, ignore=ignore)
    return dest


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache", str(PYPROJECT)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return _installed_layout(tmp_path_factory.mktemp("installed"))


def test_the_import_contracts_are_kept(layout):
    result = _lint_imports(layout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("nn.py", "import fastsr.pipeline", "the stack"),
    ("kernels/common.py", "import fastsr.atomic", "a backend imports only"),
    ("ops/functional.py", "import fastsr.kernels", "dispatch reaches a backend by name"),
    ("tiling.py", "from fastsr import nn", "the leaves"),
])
def test_a_broken_arrow_breaks_a_contract(tmp_path, module, line, contract):
    root = _installed_layout(tmp_path)
    path = root / "fastsr" / module
    path.write_text(path.read_text() + f"\n\ndef _broken():\n    {line}\n")  # inside a function: still counted
    result = _lint_imports(root)
    assert result.returncode != 0
    broken = result.stdout[result.stdout.index("Broken contracts"):]
    assert contract in broken


def test_the_architecture_doc_states_the_contracts():
    """docs/architecture.md names every contract and draws the stack exactly as pyproject declares it."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    for contract in contracts:
        assert contract["name"] in doc, contract["name"]
        if contract["type"] == "layers":
            block = "\n".join(contract["layers"])
            assert block in doc, f"the layers of {contract['name']!r} as a block:\n{block}"


def _module_files():
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            if package == "fastsr" and parts[:1] in (["kernels"], ["csrc"]):
                continue  # an installed package holds them under fastsr/: read once, by their own root
            yield ".".join([package, *parts]), path
    for path in sorted((REPO / "tests").glob("*.py")):
        yield f"tests.{path.stem}", path


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _fastsr_modules_bound(tree: ast.AST, module: str) -> set[str]:
    """Names in the file bound to a fastsr module (``from fastsr import imageio``, ``import
    fastsr.x as y``, ``from . import halo``): attribute reads on them are reads across modules."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("fastsr")}
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fastsr")):
            bound |= {a.asname or a.name for a in node.names if not a.name[:1].isupper()}
    return bound


def _patched_name(call: ast.Call) -> str | None:
    """The attribute a ``setattr``/``monkeypatch.setattr`` call sets: ``(obj, "name", v)`` or ``("a.b.name", v)``."""
    if getattr(call.func, "attr", getattr(call.func, "id", None)) != "setattr" or not call.args:
        return None
    texts = [a.value for a in call.args[:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return texts[0] if texts else None


def _private_uses(module: str, path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    modules = _fastsr_modules_bound(tree, module)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fastsr")):
            found += [(f"imports {a.name}", node.lineno) for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in modules:
            found.append((f"reads {node.value.id}.{node.attr}", node.lineno))
        elif isinstance(node, ast.Call) and _private((_patched_name(node) or "x").rsplit(".", 1)[-1]):
            found.append((f"patches {_patched_name(node)}", node.lineno))
    return [f"{module}:{line}: {what}" for what, line in found]


def test_no_private_name_is_used_across_modules():
    """A name with a leading underscore is its module's own: other modules (and tests) use public names."""
    used = [use for module, path in _module_files() for use in _private_uses(module, path)]
    assert not used, "\n".join(used)
