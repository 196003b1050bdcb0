"""Export a model to ONNX with dynamic batch, height and width.

MODEL is an embedded model name ("default") or a model file: a fastsr .safetensors file or a
checkpoint of another SRGAN code base (see `fastsr convert`). The ONNX graph takes "lr" (N, C, H, W)
float32 in [0, 1] and returns "sr" (N, C, H*scale, W*scale).

Example:
  fastsr export default srresnet_x4.onnx
  fastsr export SRGAN_x4-ImageNet.pth.tar srgan_x4.onnx --opset 18
"""

from __future__ import annotations

import argparse

HELP = "export a model to ONNX (dynamic height and width)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help='embedded model name ("default") or a model/checkpoint file')
    p.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17)")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..export import export_onnx
    from ..models import load_model
    from ..models.checkpoint import ModelFileError

    try:
        model = load_model(args.model)
    except ModelFileError as exc:
        raise UserError(str(exc)) from None
    path = export_onnx(model, args.output, opset=args.opset)
    print(f"wrote {path} ({type(model).__name__}, x{model.config.get('scale', '?')}, opset {args.opset})")
    return 0
