"""Fixtures shared by the test files (the root conftest.py holds those benchmarks use too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fastsr


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory) -> Path:
    """A 1-block, 8-channel x4 SRResNet file: fast enough for pipeline tests on a CPU."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    fastsr.save_model(fastsr.SRResNet(scale=4, num_blocks=1, channels=8), path)
    return path


@pytest.fixture(scope="module")
def model(tiny_model_file):
    return fastsr.load_model(tiny_model_file)
