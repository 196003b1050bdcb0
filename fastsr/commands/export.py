"""Export a model to ONNX with dynamic batch, height and width.

MODEL is an embedded model name ("default") or a model file: a fastsr .safetensors file or a
checkpoint of another SRGAN code base (see `fastsr convert`). The ONNX graph takes "lr" (N, C, H, W)
float32 in [0, 1] and returns "sr" (N, C, H*scale, W*scale).

OUT.onnx must end in .onnx; an existing one is replaced only with --overwrite, and never when it
is MODEL (docs/safety.md). The file is written under a temporary name and renamed when complete.

Example:
  fastsr export default srresnet_x4.onnx
  fastsr export SRGAN_x4-ImageNet.pth.tar srgan_x4.onnx --opset 18
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import atomic_path, check_destination
from ..errors import UserError
from .convert import model_sources

HELP = "export a model to ONNX (dynamic height and width)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help='embedded model name ("default") or a model/checkpoint file')
    p.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.onnx")


def run(args: argparse.Namespace) -> int:
    from ..export import export_onnx
    from ..models import load_model
    from ..models.checkpoint import EMBEDDED, ModelFileError

    out = Path(args.output)
    if out.suffix.lower() != ".onnx":
        raise UserError(f"{out}: the export is an ONNX file; name it NAME.onnx")
    sources = [] if args.model in EMBEDDED else model_sources(Path(args.model))
    check_destination(out, sources=sources, overwrite=args.overwrite)
    low, high = _opset_range()
    if not low <= args.opset <= high:
        raise UserError(f"--opset {args.opset}: choose an ONNX opset from {low} to {high} (default 17)")
    try:
        model = load_model(args.model)
    except ModelFileError as exc:
        raise UserError(str(exc)) from None
    with atomic_path(out, overwrite=args.overwrite) as tmp:  # the exporter writes in place: a crash leaves half
        export_onnx(model, tmp, opset=args.opset)
    path = out
    print(f"wrote {path} ({type(model).__name__}, x{model.config.get('scale', '?')}, opset {args.opset})")
    return 0


def _opset_range() -> tuple[int, int]:
    """The opsets torch's TorchScript-based exporter (the one :func:`export_onnx` uses) writes."""
    try:
        from torch.onnx._constants import ONNX_MIN_OPSET, ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except ImportError:  # a private module: if it moves, the range of torch 2.11-2.13
        return 7, 20
    return ONNX_MIN_OPSET, ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
