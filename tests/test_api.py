"""The public API is importable the usual ways, names what the README names, and hides no import error."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastsr

README = Path(__file__).resolve().parents[1] / "README.md"


def test_public_namespaces_import_as_modules():
    """`import fastsr.functional as F` and `from fastsr.functional import ...`, as torch.nn.functional."""
    import fastsr.backend
    import fastsr.functional as F
    from fastsr.functional import conv2d_prelu, psnr  # noqa: F401

    assert F is fastsr.functional and fastsr.backend is fastsr.ops.dispatch
    assert importlib.import_module("fastsr.functional") is fastsr.functional


def test_every_name_in_all_exists_and_the_readme_names_are_exported():
    """__all__ is true, and every `fastsr.Name` / fastsr model class the README's tables and API
    section name is in it (or a submodule of it)."""
    for name in fastsr.__all__:
        assert hasattr(fastsr, name), name
    text = README.read_text()
    attributes = set(re.findall(r"`fastsr\.([A-Za-z_]\w*)", text))
    model_column = set(re.findall(r"\| (?:`[A-Za-z]+`(?:, )?)+ \|$", text, re.MULTILINE))
    classes = {c for cell in model_column for c in re.findall(r"`([A-Z]\w+)`", cell)}
    assert {"RRDBNet", "SPAN", "SRVGGNetCompact", "MSRResNet"} <= classes  # the table was found
    missing = sorted(n for n in attributes | classes if n not in fastsr.__all__ and not _is_submodule(n))
    assert not missing, f"named in the README but not exported by fastsr: {missing}"
    assert {"upscale_folder", "UserError"} <= set(fastsr.__all__)


def _is_submodule(name: str) -> bool:
    try:
        importlib.import_module(f"fastsr.{name}")
    except ModuleNotFoundError:
        return False
    return True


def test_a_command_that_fails_to_import_is_an_error_not_a_missing_subcommand(tmp_path):
    """A broken install (a module the command needs is missing) shows its traceback."""
    blocker = tmp_path / "sitecustomize.py"  # the child cannot import the upscale command's module
    blocker.write_text("import sys\nclass Block:\n    def find_spec(self, name, *a):\n"
                       "        if name == 'fastsr.commands.upscale': raise ModuleNotFoundError(name, name=name)\n"
                       "sys.meta_path.insert(0, Block())\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "fastsr", "upscale", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode != 0
    assert "ModuleNotFoundError" in out.stderr and "invalid choice" not in out.stderr


@pytest.mark.parametrize("module", ["fastsr.ops", "fastsr.pipeline", "fastsr.training", "fastsr.kernels",
                                    "fastsr.csrc.build", "fastsr.commands.upscale"])
def test_subpackages_are_installed(module):
    """The packages found by setup.py: each imports (the wheel once left out ops/ and pipeline/)."""
    importlib.import_module(module)
