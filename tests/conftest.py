"""Fixtures shared by the test files (the root conftest.py holds those benchmarks use too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fastsr
from fastsr.ops.validate import ieee_fp32


@pytest.fixture(autouse=True, scope="session")
def _ieee_fp32_deterministic_cuda():
    """On a GPU, fp32 means IEEE fp32 and cuDNN picks deterministic algorithms, for every test. The
    tolerance rule's baseline is torch's fp32 error: cuDNN's TF32 (on by default for convolutions)
    made it a TF32 error, compared element by element with another algorithm's TF32 rounding. And
    gradcheck's reentrancy check (nondet_tol 0) failed on cuDNN's default weight-gradient algorithms,
    which accumulate with atomics. Seen on the first H200 run (docs/gpu-check.md). No effect on a CPU."""
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    with ieee_fp32(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        yield
    torch.backends.cudnn.deterministic = deterministic


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
