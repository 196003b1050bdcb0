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


def run(args: argparse.Namespace) -> int:
    from ..data import find_images
    from ..evaluate import format_table, score_folder
    from ..models import load_model
    from ..models.checkpoint import ModelFileError
    from ..sheet import ZOOM, SheetRow, check_sheet_path, comparison_sheet, sheet_row

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
    if args.json and not Path(args.json).resolve().parent.is_dir():  # before the work, not after it
        raise UserError(f"--json {args.json}: folder {Path(args.json).resolve().parent} does not exist")
    if args.sheet:
        check_sheet_path(args.sheet)
    try:
        paths = find_images(args.data)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    if not paths:
        raise UserError(f"no images (png/jpg/tif/bmp/webp) found under {args.data}")
    too_small = [p.name for p in paths if min(_size(p)) < 4 * scale]
    if too_small:
        raise UserError(f"images too small for x{scale} evaluation: {', '.join(too_small)}")
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
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError as exc:
        raise UserError(f"{path}: unreadable image ({exc})") from None
