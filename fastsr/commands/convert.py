"""Convert a generator checkpoint of another super-resolution code base into fastsr's model file.

Detected from the checkpoint's keys, with sizes and scale read from the tensor shapes:
  Lornatang SRGAN-PyTorch (SRResNet/SRGAN generator, .pth.tar)      -> SRResNet + clamp to [0, 1]
  BasicSR/Real-ESRGAN RRDBNet (RealESRGAN_x4plus, _x2plus, x1; x4)   -> RRDBNet
  original ESRGAN, old architecture (model.0, model.1.sub...; x4/x8) -> RRDBNet
  BSRGAN/RealSR/ESRGAN new architecture (RRDB_trunk, trunk_conv; x4) -> RRDBNet
  BasicSR MSRResNet (x2/x3/x4; params or params_ema)                 -> MSRResNet
  Real-ESRGAN SRVGGNetCompact (realesr-general-x4v3, -animevideov3)  -> SRVGGNetCompact
  SPAN (NTIRE 2024; Conv3XC layers merged into single 3x3 convs)     -> SPAN
  leftthomas SRGAN generator (block1 ... block8)                      -> SRResNet + (tanh + 1) / 2
  a fastsr SRResNet state dict (e.g. runs/NAME/checkpoint.pt)        -> SRResNet
  Real-ESRGAN ncnn model (.param, its .bin beside it)                -> RRDBNet / SRVGGNetCompact
Files: .pth, .pt, .pth.tar, .safetensors, ncnn .param. Checkpoints load with
torch.load(weights_only=True): nothing in them is executed. EMA weights are used when the
checkpoint has them (--no-ema: the raw weights). Other architectures load through spandrel when
it is installed, but as spandrel's own modules, which have no fastsr model file: use such a
checkpoint directly with fastsr.load_model.

DST is a .safetensors file (another suffix is refused); an existing DST is replaced only with
--overwrite, and never when it is SRC (docs/safety.md).

Example:
  fastsr convert SRGAN_x4-SRGAN_ImageNet.pth.tar srgan_x4.safetensors
  fastsr upscale --model srgan_x4.safetensors photo.png photo_x4.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import check_destination
from ..errors import UserError

HELP = "convert another super-resolution code base's checkpoint to a fastsr model file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="checkpoint file (.pth, .pt, .pth.tar, .safetensors; ncnn .param)")
    p.add_argument("dst", metavar="DST", help="fastsr model file to write (.safetensors)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA ones")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="precision of the stored weights (default: fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")


def model_sources(src: Path) -> list[Path]:
    """The files a model is read from: ``src``, and for an ncnn ``.param`` its ``.bin``."""
    return [src, src.with_suffix(".bin")] if src.suffix == ".param" else [src]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models import save_model
    from ..models.checkpoint import FORMAT, ModelFileError
    from ..models.ncnn import load_ncnn
    from ..models.peers import load_checkpoint

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_file():
        raise UserError(f"checkpoint not found: {src}")
    if dst.suffix.lower() != ".safetensors":  # the bytes written are safetensors: the name must say so
        raise UserError(f"{dst}: fastsr model files are .safetensors; name the output NAME.safetensors "
                        "(for ONNX use 'fastsr export')")
    try:
        model = load_ncnn(src) if src.suffix == ".param" else load_checkpoint(src, prefer_ema=not args.no_ema)
    except ModelFileError as exc:
        raise UserError(str(exc)) from None
    if getattr(model, "config", None) is None:  # spandrel's module: no fastsr architecture to record
        raise UserError(f"{src}: no fastsr format builds it; spandrel loaded it as {type(model).__name__}, which "
                        "has no fastsr model file (use the checkpoint itself with fastsr.load_model)")
    # After loading (its errors are about SRC), before writing anything.
    check_destination(dst, sources=model_sources(src), overwrite=args.overwrite)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    save_model(model, dst, dtype=dtype)
    config = ", ".join(f"{k}={v}" for k, v in model.config.items())
    print(f"wrote {args.dst} ({FORMAT}: {config})")
    return 0
