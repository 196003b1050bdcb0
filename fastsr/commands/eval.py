"""Evaluate a model against bicubic on a folder of HR images.

Each HR image is reduced with the same antialiased bicubic (8-bit) that training uses, then
upscaled by bicubic and by the model; PSNR and SSIM are measured on the Y channel with a border
of --scale pixels cropped, per image and as the mean.

With --sheet, a PNG shows each image's most detailed crop as ground truth, bicubic and model side
by side (nearest-neighbour enlarged), with the PSNRs of the table in the captions.

Example:
  fastsr eval --model runs/default/model.safetensors --data data/val --json val.json
  fastsr eval --model default --data data/val --sheet val.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic import atomic_path, check_destination
from ..errors import UserError

HELP = "PSNR/SSIM of a model vs bicubic on HR images (table and JSON)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="embedded model name or model file (default: default)")
    p.add_argument("--data", required=True, help="folder of HR images (searched recursively)")
    p.add_argument("--scale", type=int, help="upscaling factor; must match the model's (default: the model's)")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.add_argument("--sheet", metavar="PATH",
                   help="also write a comparison sheet (.png): ground truth / bicubic / model crops per image")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json or --sheet file")


# SSIM's Gaussian window is 11x11 pixels: an image smaller than that after the border crop has no score.
SSIM_WINDOW = 11


def _check_outputs(args: argparse.Namespace) -> None:
    """--json and --sheet before any work (docs/safety.md): a .json / .png in an existing folder, not
    over an existing file without --overwrite, and neither inside the HR folder nor the model file."""
    from ..sheet import check_sheet_path

    sources = [Path(args.data)] + ([Path(args.model)] if Path(args.model).is_file() else [])
    if args.json:
        if Path(args.json).suffix.lower() != ".json":
            raise UserError(f"--json {args.json}: the scores are JSON; name a .json file")
        if not Path(args.json).resolve().parent.is_dir():
            raise UserError(f"--json {args.json}: folder {Path(args.json).resolve().parent} does not exist")
        check_destination(args.json, sources=sources, overwrite=args.overwrite, what="--json")
    if args.sheet:
        check_sheet_path(args.sheet)
        check_destination(args.sheet, sources=sources, overwrite=args.overwrite, what="--sheet")
    if args.json and args.sheet and Path(args.json).resolve() == Path(args.sheet).resolve():
        raise UserError(f"--json and --sheet are both {args.json}; name two files")


def _too_small(size: tuple[int, int], scale: int) -> bool:
    """Whether an HR image of ``size`` has no score at x``scale``: its LR must be 4 pixels a side, and
    the HR cropped to the LR grid, less a ``scale``-pixel border, must hold SSIM's window."""
    side = min(size)
    return side < 4 * scale or (side // scale) * scale - 2 * scale < SSIM_WINDOW


def run(args: argparse.Namespace) -> int:
    from ..data import find_images
    from ..evaluate import format_table, score_folder
    from ..models import load_model
    from ..models.checkpoint import ModelFileError
    from ..sheet import ZOOM, SheetRow, comparison_sheet, sheet_row

    try:
        model = load_model(args.model, device=args.device)
    except ModelFileError as exc:
        raise UserError(str(exc)) from None
    model_scale = getattr(model, "scale", None)
    if model_scale is None:
        raise UserError(f"{args.model} is not a super-resolution generator ({type(model).__name__})")
    scale = model_scale if args.scale is None else args.scale
    if scale != model_scale:
        raise UserError(f"--scale {scale} does not match the model, which upscales x{model_scale}")
    _check_outputs(args)  # before the work, not after it
    try:
        paths = find_images(args.data)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    if not paths:
        raise UserError(f"no images (png/jpg/tif/bmp/webp) found under {args.data}")
    too_small = [p.name for p in paths if _too_small(_size(p), scale)]
    if too_small:
        raise UserError(f"images too small for x{scale} evaluation (at least {4 * scale} pixels a side, and "
                        f"{SSIM_WINDOW}x{SSIM_WINDOW} for SSIM after a {scale}-pixel border): {', '.join(too_small)}")
    rows: list[SheetRow] = []

    def add_row(score, hr, bic, sr) -> None:  # only the crops are kept, not the whole images
        rows.append(sheet_row(score.name, hr, bic, sr, score.bicubic_psnr, score.model_psnr))

    scores = score_folder(model, paths, scale, add_row if args.sheet else None)
    print(format_table(scores))
    if args.sheet:
        comparison_sheet(args.sheet, rows, model_label=f"model: {Path(str(args.model)).name}",
                         note=f"PSNR: Y channel (BT.601), border {scale}, whole image; crops enlarged x{ZOOM}")
        print(f"wrote {args.sheet}")
    if args.json:
        mean = {key: sum(getattr(s, key) for s in scores) / len(scores)
                for key in ("bicubic_psnr", "model_psnr", "bicubic_ssim", "model_ssim")}
        mean["gain_db"] = mean["model_psnr"] - mean["bicubic_psnr"]
        report = {"model": str(args.model), "data": str(args.data), "scale": scale,
                  "protocol": {"channel": "Y (BT.601)", "crop_border": scale, "lr": "antialiased bicubic, 8-bit"},
                  "images": [s.as_dict() for s in scores], "mean": mean}
        with atomic_path(args.json, overwrite=args.overwrite, what="--json") as tmp:
            tmp.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError as exc:
        raise UserError(f"{path}: unreadable image ({exc})") from None
