"""The main job, end to end: take photos shipped in scikit-image that the default model never saw
in training, shrink them 4x (bicubic, as the SR benchmarks do), upscale the small images back
with the embedded default model through the same file pipeline as `fastsr upscale`, and print
the PSNR/SSIM of the result against the original, next to plain bicubic upscaling, and write a
comparison sheet (ground truth / bicubic / fastsr on the same crop of each photo).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "upscale held-out photos from scikit-image and compare with bicubic"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="folder for the LR, bicubic and upscaled images")
    p.add_argument("--model", default="default", help="model name or file (default: the embedded default model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--sheet", metavar="PATH", default=None,
                   help="where to write the comparison sheet (.png; default: OUT/comparison.png)")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .. import metrics
    from ..data import HELD_OUT_PHOTOS, bicubic_downscale, bicubic_upscale, export_skimage_photos, load_rgb, to_float
    from ..errors import UserError
    from ..evaluate import ImageScore, format_table
    from ..pipeline import upscale_file
    from ..sheet import ZOOM, check_sheet_path, comparison_sheet, sheet_row

    try:
        import skimage  # noqa: F401
    except ImportError:
        raise UserError("the demo takes its photos from scikit-image: pip install scikit-image") from None
    out = Path(args.out)
    if args.sheet:
        check_sheet_path(args.sheet)  # before the work, not after it
    hr_paths = export_skimage_photos(out / "hr", HELD_OUT_PHOTOS)
    scale, scores, rows = 4, [], []
    for hr_path in hr_paths:
        hr = to_float(load_rgb(hr_path))
        lr = bicubic_downscale(hr, scale)
        hr = hr[..., : lr.shape[-2] * scale, : lr.shape[-1] * scale]
        lr_path, bic_path, sr_path = (out / f"{hr_path.stem}_{tag}.png" for tag in ("lr", "bicubic_x4", "fastsr_x4"))
        to_png = lambda t: Image.fromarray((t[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))  # noqa: E731
        to_png(lr).save(lr_path)
        bic = bicubic_upscale(lr, scale)
        to_png(bic).save(bic_path)
        started = time.perf_counter()
        # The demo folder's files are the demo's own (the LR and bicubic PNGs are rewritten too).
        upscale_file(lr_path, sr_path, model=args.model, device=args.device, progress=False, overwrite=True)
        seconds = time.perf_counter() - started
        sr = to_float(load_rgb(sr_path))
        bic = to_float(load_rgb(bic_path))
        kw = {"crop_border": scale, "y_channel": True}
        scores.append(ImageScore(hr_path.stem, float(metrics.psnr(bic, hr, **kw)), float(metrics.psnr(sr, hr, **kw)),
                                 float(metrics.ssim(bic, hr, **kw)), float(metrics.ssim(sr, hr, **kw))))
        rows.append(sheet_row(hr_path.stem, hr, bic, sr, scores[-1].bicubic_psnr, scores[-1].model_psnr))
        print(f"{lr_path.name} {lr.shape[-1]}x{lr.shape[-2]} -> {sr_path} {sr.shape[-1]}x{sr.shape[-2]} "
              f"in {seconds:.1f} s")
    print()
    print(format_table(scores))
    gain = sum(s.gain_db for s in scores) / len(scores)
    sheet = comparison_sheet(args.sheet or out / "comparison.png", rows,
                             model_label=f"fastsr ({Path(args.model).name})",
                             note=f"PSNR: Y channel (BT.601), border {scale}, whole image; crops enlarged x{ZOOM}")
    print(f"\nfastsr x4 vs bicubic: {gain:+.2f} dB PSNR (Y channel, border {scale}) on {len(scores)} held-out photos;"
          f" images in {out}/, side by side in {sheet}")
    return 0
