"""The README is true: its Python snippets run as written (on small stand-ins for the user's files),
and every `fastsr COMMAND --option` it shows is an option of that command."""

from __future__ import annotations

import copy
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tolerance import assert_within_rule

import fastsr
from fastsr.cli import COMMANDS, build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", TEXT, re.MULTILINE | re.DOTALL)

# A user's own plain SRGAN generator, for the "run your own model" snippet (`from my_project.model import ...`).
USER_MODEL = textwrap.dedent('''
    import torch.nn as nn

    class Generator(nn.Module):
        def __init__(self, upscale_factor):
            super().__init__()
            self.head = nn.Sequential(nn.Conv2d(3, 16, 9, padding=4), nn.PReLU())
            self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.PReLU())
            self.up = nn.Sequential(nn.Conv2d(16, 16 * upscale_factor**2, 3, padding=1),
                                    nn.PixelShuffle(upscale_factor), nn.PReLU())
            self.tail = nn.Conv2d(16, 3, 9, padding=4)

        def forward(self, x):
            h = self.head(x)
            return self.tail(self.up(self.body(h) + h))
''')


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """The files and variables the snippets assume: photos, a scan, tensors, a user's model and checkpoints."""
    import tifffile

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save("photo.png")
    tifffile.imwrite("scan.tif", rng.integers(0, 256, (40, 36, 3), dtype=np.uint8))
    (tmp_path / "my_project").mkdir()
    (tmp_path / "my_project" / "__init__.py").write_text("")
    (tmp_path / "my_project" / "model.py").write_text(USER_MODEL)
    torch.manual_seed(0)
    from my_project.model import Generator

    torch.save(Generator(4).state_dict(), "netG.pth")
    basicsr_keys = {k.replace(".conv.", "."): v for k, v in fastsr.MSRResNet(num_blocks=2).state_dict().items()}
    torch.save(basicsr_keys, "MSRResNet_x4.pth")  # BasicSR's layout: conv_first.weight, body.0.conv1.weight, ...
    g = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    return {"fastsr": fastsr, "x": rand(1, 16, 13, 11), "weight": rand(16, 16, 3, 3) - 0.5, "bias": rand(16),
            "slope": rand(16) / 4, "w_up": rand(64, 16, 3, 3) - 0.5, "b_up": rand(64), "sr": rand(2, 3, 20, 20),
            "hr": rand(2, 3, 20, 20), "lr": rand(1, 3, 12, 10)}


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_snippet_runs(index, user_files):
    namespace = dict(user_files)
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
    if "fuse(g)" in PYTHON_BLOCKS[index]:  # "same output, fused layers": g in float64 the reference
        g, lr = namespace["g"].eval(), namespace["lr"]
        with torch.no_grad(), fastsr.use_backend("torch"):
            ref64, same = copy.deepcopy(g).double()(lr.double()), g(lr)
        assert_within_rule("README fuse(g)", namespace["sr"], ref64, same, torch.float32)
    if "upscale_file" in PYTHON_BLOCKS[index]:
        assert Path("scan_x4.tif").is_file()


def test_the_readme_has_python_snippets():
    assert len(PYTHON_BLOCKS) >= 3


def _options_of(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {s for action in sub.choices[command]._actions for s in action.option_strings}


def _cli_uses() -> list[tuple[str, str, str]]:
    """(command, option, the README line) for every `fastsr COMMAND ... --option` in the README,
    continuation lines (ending in a backslash) included."""
    uses = []
    text = re.sub(r"\\\n", " ", TEXT)
    for line in text.splitlines():
        for match in re.finditer(r"\bfastsr (\w+)\b([^`#|]*)", line):
            command, rest = match.groups()
            if command in COMMANDS:
                uses += [(command, opt, line.strip()) for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)]
    return uses


def test_every_cli_option_the_readme_names_exists():
    uses = _cli_uses()
    assert len(uses) > 20  # the README's command lines were found
    unknown = [f"fastsr {c} {o}   ({line[:90]})" for c, o, line in uses if o not in _options_of(c)]
    assert not unknown, "options in the README that the commands do not have:\n" + "\n".join(unknown)
