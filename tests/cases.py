"""Inputs shared by the test files: conv cases of the backend suites (test_conformance.py,
test_cpp.py, test_triton.py) and the photo crops of the pipeline tests; and the mark of the tests
too large for the GPU to run several at once."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tolerance import fmt
from torch import nn

import fastsr

# 13-40 GB of GPU memory a test (and each process's caching allocator keeps its peak): under the GPU
# check's `-n 12` they would start together and pass the H200's 139 GB. One xdist group puts them on
# one worker, one after another (`--dist loadgroup`, as the GPU check and `make test` run pytest).
GPU_MEMORY_HEAVY = pytest.mark.xdist_group("gpu-memory")


def conv_inputs(device, n, c_in, c_out, h, w, k, shuffle, bias, slope, residual, channels_last, seed=0):
    """Random conv2d_prelu inputs (x, weight, bias, slope, residual) in float64 on ``device``
    (cast per test); weights ~1/sqrt(fan_in); slope None, "scalar" or "channel"."""
    g = torch.Generator().manual_seed(seed)
    oc = c_out // (shuffle * shuffle)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64) / (c_in * k * k) ** 0.5
    b = torch.randn(c_out, generator=g, dtype=torch.float64) * 0.1 if bias else None
    s = {"scalar": torch.tensor([0.2], dtype=torch.float64),
         "channel": torch.rand(oc, generator=g, dtype=torch.float64) - 0.5, None: None}[slope]
    r = torch.randn(n, oc, h * shuffle, w * shuffle, generator=g, dtype=torch.float64) if residual else None
    moved = [None if t is None else t.to(device) for t in (x, wt, b, s, r)]
    return [fmt(t, channels_last) if t is not None and t.dim() == 4 else t for t in moved]


def image_pair(device, shape, channels_last, seed=3):
    """Two float64 images in [0, 1] of ``shape`` (N, C, H, W), the second a noisy copy of the first."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(*shape, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return fmt(a.to(device), channels_last), fmt(b.to(device), channels_last)


def small_srresnet(seed=0):
    """SRResNet x4 (2 blocks, 16 channels) with non-trivial BatchNorm statistics and PReLU slopes."""
    torch.manual_seed(seed)
    model = fastsr.SRResNet(scale=4, num_blocks=2, channels=16)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, fastsr.nn.ConvPReLU) and isinstance(m.slope, torch.nn.Parameter):
                m.slope.uniform_(0.0, 0.5)
    return model


def photo(h: int = 64, w: int = 80) -> np.ndarray:
    """An (h, w, 3) uint8 crop of a real photo (scikit-image's chelsea)."""
    from skimage import data

    return np.ascontiguousarray(data.chelsea()[60:60 + h, 100:100 + w])


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights, BatchNorm statistics and PReLU slopes (not the defaults: they hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif t.dim() == 4:  # conv weights: keep activations of order 1
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()
