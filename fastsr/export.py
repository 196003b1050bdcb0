"""Export a fastsr model to ONNX with dynamic batch, height and width.

The exported graph is the plain PyTorch composition of the fused ops (the ``torch`` backend):
conv, pixel shuffle, PReLU and add, which every ONNX runtime implements. fastsr's fused kernels
are a PyTorch-side speed-up and do not travel into the ONNX file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .ops.dispatch import use_backend

INPUT_NAME = "lr"
OUTPUT_NAME = "sr"


class ExportError(UserError):
    """The model cannot be exported (missing package, unsupported model, bad path)."""


def export_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int = 17, example_size: int = 32,
                in_channels: int | None = None) -> Path:
    """Write ``model`` to ``path`` as ONNX: input ``lr`` (N, C, H, W) float32, output ``sr``
    (N, C, H*scale, W*scale); N, H and W are dynamic. Returns the path.

    ``example_size`` is the side of the square example input used to trace the model (any size
    works afterwards); ``in_channels`` defaults to the model config's ``in_channels`` (else 3).
    """
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install onnx") from None
    if in_channels is None:
        in_channels = int(getattr(model, "config", {}).get("in_channels", 3))
    model = model.eval().float().cpu()
    example = torch.rand(1, in_channels, example_size, example_size)
    path = Path(path)
    dims = {0: "batch", 2: "height", 3: "width"}
    out_dims = {0: "batch", 2: "out_height", 3: "out_width"}
    with use_backend("torch"), torch.no_grad(), warnings.catch_warnings():
        # The ops' argument checks compare shapes in Python; the tracer warns that these become
        # constants, which is right for checks that passed on the example input.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The deprecation notices are about the exporter choice below, which is deliberate.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # dynamo=False: the TorchScript-based exporter, which needs no onnxscript package.
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: dims, OUTPUT_NAME: out_dims}, opset_version=opset,
                          dynamo=False)
    return path
