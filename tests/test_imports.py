"""The allowed imports of docs/architecture.md ("Allowed arrows"), checked on the source files.

import-linter's graph builder walks the ``fastsr`` folder only and so never sees ``kernels/`` and
``csrc/`` (shipped as ``fastsr.kernels`` / ``fastsr.csrc`` through a package-dir mapping), so the
contracts are checked here with ``ast``: every ``import`` / ``from ... import`` of a fastsr module,
at any depth in the file (imports inside functions count too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastsr
from fastsr import csrc, kernels

# Import name -> the folder it is read from (a checkout or an installed package alike).
ROOTS = {"fastsr": Path(fastsr.__file__).parent, "fastsr.kernels": Path(kernels.__file__).parent,
         "fastsr.csrc": Path(csrc.__file__).parent}

BACKEND_DEPS = ("fastsr.errors", "fastsr.constants")
# (modules the contract covers, the fastsr modules they may import besides their own package). A
# module matches a prefix when it is that module or inside it.
CONTRACTS = {
    "a backend imports only torch, errors and constants": (
        ("fastsr.kernels", "fastsr.csrc", "fastsr.ops.reference"), BACKEND_DEPS),
    "csrc.build imports nothing of fastsr": (("fastsr.csrc.build",), ()),
    "the op interface goes through dispatch": (("fastsr.ops.functional",), ("fastsr.ops.dispatch",)),
    "dispatch reaches backends by name at run time, validation through the reference": (
        ("fastsr.ops.dispatch",), ("fastsr.errors", "fastsr.ops.validate")),
    "tiling depends on torch only": (("fastsr.tiling",), ()),
    "the leaves depend on nothing of fastsr": (
        ("fastsr.errors", "fastsr.constants", "fastsr.data", "fastsr.distributed", "fastsr.metadata"), ()),
    "atomic depends on errors only": (("fastsr.atomic",), ("fastsr.errors",)),
    "nn sits on the op interface": (("fastsr.nn",), ("fastsr.ops.functional",)),
    "fusion sits on nn": (("fastsr.fusion",), ("fastsr.nn",)),
    "models sit on nn": (("fastsr.models",), ("fastsr.nn", "fastsr.atomic", "fastsr.errors")),
    # metrics reads the SR protocol's view (crop, luma) from beside the reference, not a backend op.
    "metrics use the op interface": (
        ("fastsr.metrics",), ("fastsr.ops.functional", "fastsr.ops.reference.protocol_view")),
    "the pipeline never reaches training or the commands": (
        ("fastsr.pipeline",), ("fastsr.atomic", "fastsr.distributed", "fastsr.errors", "fastsr.fusion",
                               "fastsr.imageio", "fastsr.models", "fastsr.ops.dispatch", "fastsr.ops.functional",
                               "fastsr.tiling")),
}


def _module_files():
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            if package == "fastsr" and parts[:1] in (["kernels"], ["csrc"]):
                continue  # an installed package holds them under fastsr/: read once, by their own root
            yield ".".join([package, *parts]), path


def _imports(module: str, path: Path) -> list[set[str]]:
    """Each import of a fastsr module in ``path`` as the set of names that would make it allowed:
    ``import fastsr.x`` -> {fastsr.x}; ``from fastsr.x import y`` -> {fastsr.x, fastsr.x.y}."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [{a.name} for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            found += [{target, f"{target}.{a.name}"} for a in node.names]
    return [forms for forms in found if any(m == "fastsr" or m.startswith("fastsr.") for m in forms)]


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


MODULES = dict(_module_files())


def test_every_package_is_read():
    assert {"fastsr.kernels.conv_prelu", "fastsr.csrc.backend", "fastsr.ops.reference"} <= set(MODULES)


@pytest.mark.parametrize("name", CONTRACTS)
def test_contract(name):
    covered, allowed = CONTRACTS[name]
    broken = []
    for module, path in MODULES.items():
        if not _within(module, covered):
            continue
        own = next(p for p in covered if _within(module, (p,)))
        for forms in _imports(module, path):
            if not any(_within(f, (own,)) or f in allowed or _within(f, allowed) for f in forms):
                broken.append(f"{module} -> {max(forms, key=len)}")
    assert not broken, f"{name}: " + ", ".join(sorted(broken))


def test_the_library_never_imports_the_commands():
    commands = ("fastsr.commands", "fastsr.cli", "fastsr.__main__")
    broken = [f"{m} -> {max(forms, key=len)}" for m, p in MODULES.items() if not _within(m, commands)
              for forms in _imports(m, p) if all(_within(f, commands) for f in forms)]
    assert not broken
