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
from ..pipeline.options import UpscaleOptions
from . import terminate_as_interrupt
from .options import add_options, options_from

HELP = "upscale an image (any size: tiled, streaming, resumable) or a folder of images"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """SRC, DST and --model, then one option per :class:`UpscaleOptions` field."""
    p.add_argument("src", metavar="SRC", help="input image, or a folder of images")
    p.add_argument("dst", metavar="DST", help="output image, the format following the suffix; for a folder SRC, "
                                              "the output folder")
    p.add_argument("--model", default="default",
                   help="embedded model name or a model file: fastsr's own, a checkpoint of ESRGAN / "
                        "Real-ESRGAN / BSRGAN / SPAN / SRResNet code (.pth, .pt, .safetensors) or an ncnn "
                        ".param (default: default, an x4 SRResNet)")
    add_options(p, UpscaleOptions)


def run(args: argparse.Namespace) -> int:
    from ..pipeline.folder import is_image_folder

    opts = options_from(args, UpscaleOptions, UserError)
    folder = is_image_folder(args.src)
    if opts.fmt is not None and not folder:
        raise UserError(f"--format is for a folder SRC; {args.src} is one image: DST's suffix gives its format")
    with terminate_as_interrupt():
        return _folder(args, opts) if folder else _file(args, opts)


def _file(args: argparse.Namespace, opts: UpscaleOptions) -> int:
    from ..pipeline import upscale_file

    out = upscale_file(args.src, args.dst, args.model, opts)
    if opts.progress and int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out}")
    return 0


def _folder(args: argparse.Namespace, opts: UpscaleOptions) -> int:
    """Exit 2 when a file failed for a reason of its own (a UserError), 1 for any other failure."""
    from ..pipeline import upscale_folder

    summary = upscale_folder(args.src, args.dst, args.model, opts)
    if opts.progress:
        print(summary.line())
    if any(f.user_error for f in summary.failed):
        return 2
    return 1 if summary.failed else 0
