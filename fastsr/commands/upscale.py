"""Upscale an image file of any size (or a folder of images) with an SRGAN model, tile by tile in bounded memory.

Each tile is computed with a halo of context and only its centre is kept: the model's receptive
field (output equal to whole-image inference) for models such as SRResNet and SRVGGNetCompact; a
halo measured on the image for deep ones such as RRDBNet (see --halo). Large images stream from a
tiled TIFF, zarr or .npy input into a tiled BigTIFF or zarr output; PNG/JPEG work for images that
fit in memory. The output is written under a hidden temporary name and renamed when complete;
finished tiles are recorded next to it, so an interrupted run continues with --resume.

Inputs:  .tif/.tiff (tiled or stripped, BigTIFF too), .zarr, .npy, .png, .jpg, ...
         8 or 16 bit; gray, gray+alpha, RGB, RGBA (alpha is upscaled with bicubic)
Outputs: .tif (tiled BigTIFF), .zarr (v3), .png/.jpg/.webp (up to 268 Mpixel)

Folders: SRC a folder upscales every image under it (recursively) into the same relative path
under the folder DST, each in its own format or all in --format. Images are the files named
.png .jpg .jpeg .webp .bmp .tif .tiff .btf .tf8 .tf2 (any case) and .zarr arrays; other files and
hidden names (a leading dot) are ignored, and DST inside SRC is not read. The model is loaded once.
A file that fails is reported on one line and the others go on; outputs that exist are complete
(written under a temporary name, then renamed) and are skipped when an earlier run made them with
the same model, so a rerun does what is left (a file cut short: --resume continues it, --restart
starts it over); other existing outputs need --overwrite.

Never lost: an existing DST is replaced only with --overwrite, a folder never unless it is a zarr
fastsr wrote, and DST may not be, lie inside or contain SRC (docs/safety.md). The last line sums up; the exit
status is 2 if a file failed for a reason of its own (unreadable, corrupt, unsupported mode), 1 if
one failed otherwise.

Examples:
  fastsr upscale photo.png photo_x4.png
  fastsr upscale scan.tif scan_x4.tif --tile 512 --compression jpeg --pyramid
  fastsr upscale scan.tif scan_x4.tif --resume          # after an interruption
  fastsr upscale photos/ photos_x4/                     # a folder; rerun it to finish what is left
  fastsr upscale scans/ scans_x4/ --format tif --pyramid
  torchrun --nproc_per_node=4 -m fastsr upscale scan.tif scan_x4.tif --device cuda
"""

from __future__ import annotations

import argparse
import os

from ..errors import UserError
from ..pipeline.folder import OUTPUT_FORMATS
from . import terminate_as_interrupt

HELP = "upscale an image (any size: tiled, streaming, resumable) or a folder of images"


def _halo(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of pixels, got {value!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="input image, or a folder of images")
    p.add_argument("dst", metavar="DST", help="output image, the format following the suffix; for a folder SRC, "
                                              "the output folder")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default=None,
                   help="folders: write every output in this format (default: each keeps its input's)")
    p.add_argument("--model", default="default",
                   help="embedded model name or a model file: fastsr's own, a checkpoint of ESRGAN / "
                        "Real-ESRGAN / BSRGAN / SPAN / SRResNet code (.pth, .pt, .safetensors) or an ncnn "
                        ".param (default: default, an x4 SRResNet)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="compute dtype (default: fp32)")
    p.add_argument("--tile", type=int, default=512, metavar="N",
                   help="tile size in input pixels (default: 512); smaller uses less memory, halos cost more")
    p.add_argument("--halo", type=_halo, default="auto", metavar="auto|N",
                   help="input pixels of context around each tile (default: auto = the model's receptive "
                        "field, which makes tiled output equal whole-image output, for fields up to 128 pixels "
                        "(SRResNet: 40); for deeper models (RRDBNet: ~350) the smallest halo whose output "
                        "stays within half a level of a 128-pixel context, measured on the image)")
    p.add_argument("--border", default="mirror", choices=["mirror", "reflect", "zero"],
                   help="what the model sees beyond the image's edges: mirror (default: 10 pixels of the "
                        "image mirrored, so edges look like the interior and flat images stay flat), reflect "
                        "(mirrored without repeating the edge pixel, as Real-ESRGAN's pre_pad) or zero (the "
                        "plain model's zero padding)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="tiles per model call (default: 1 on CPU, 4 on CUDA)")
    p.add_argument("--compression", default="zstd", choices=["none", "deflate", "zstd", "jpeg"],
                   help="TIFF tile compression (default: zstd; deflate is the most widely readable)")
    p.add_argument("--pyramid", action="store_true",
                   help="add half-resolution levels to a TIFF output (SubIFDs); folders: to the TIFF outputs")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with the same arguments from its finished tiles (folders: "
                        "finished files are always skipped; this continues the file that was cut short)")
    p.add_argument("--restart", action="store_true",
                   help="discard the finished tiles of an interrupted run and start over")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST (folders: existing outputs another model or run made); a folder "
                        "that is not a zarr fastsr wrote is never removed (docs/safety.md)")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton", "cpp"],
                   help="kernel backend (default: $FASTSR_BACKEND, else auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (folders: nor the summary line)")


def run(args: argparse.Namespace) -> int:
    from ..errors import BackendUnavailableError
    from ..pipeline.folder import is_image_folder

    if args.tile is not None and args.tile < 1:
        raise UserError(f"--tile must be a positive number of pixels, got {args.tile}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    folder = is_image_folder(args.src)
    if args.format is not None and not folder:
        raise UserError(f"--format is for a folder SRC; {args.src} is one image: DST's suffix gives its format")
    try:
        with terminate_as_interrupt():
            return _folder(args) if folder else _file(args)
    except BackendUnavailableError as exc:
        raise UserError(str(exc)) from None


def _settings(args: argparse.Namespace) -> dict:
    names = ("tile", "halo", "border", "batch_size", "device", "dtype", "resume", "restart", "compression", "pyramid",
             "backend", "overwrite")
    return {**{name: getattr(args, name) for name in names}, "progress": not args.quiet}


def _file(args: argparse.Namespace) -> int:
    from ..pipeline import upscale_file

    out = upscale_file(args.src, args.dst, args.model, **_settings(args))
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out}")
    return 0


def _folder(args: argparse.Namespace) -> int:
    """Exit 2 when a file failed for a reason of its own (a UserError), 1 for any other failure."""
    from ..pipeline import upscale_folder

    summary = upscale_folder(args.src, args.dst, args.model, fmt=args.format, **_settings(args))
    if not args.quiet:
        print(summary.line())
    if any(f.user_error for f in summary.failed):
        return 2
    return 1 if summary.failed else 0
