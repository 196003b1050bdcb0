"""PSNR at the image border: zero padding (the plain model) vs fastsr's mirror and reflect padding.

Each held-out photo (fastsr.data.HELD_OUT_PHOTOS) is bicubic-downscaled x4, upscaled with the
default model through ``fastsr.upscale(..., border=...)`` and compared with the original on the Y
channel (BT.601, as ``fastsr eval``): PSNR of the whole image (``scale`` pixels cropped, as eval
does), of the border band (the outer ``--band`` output pixels, crop excluded) and of the interior.

    python benchmarks/borders.py [--band 16] [--out benchmarks/results/borders-....json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import skimage.data
import torch

import fastsr
from fastsr.constants import Y_WEIGHTS
from fastsr.data import HELD_OUT_PHOTOS, bicubic_downscale, quantize, to_float

SCALE = 4


def _psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    mse = float(((a - b)[mask] ** 2).mean())
    return 10 * np.log10(255.0**2 / mse)


def _y(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W) Y in [16, 235]."""
    rgb = image[0].double().numpy() * 255
    return 16 + sum(w * c for w, c in zip(Y_WEIGHTS, rgb, strict=True))


def measure(band: int) -> list[dict]:
    model = fastsr.load_model("default")
    rows = []
    for name in HELD_OUT_PHOTOS:
        hr = to_float(getattr(skimage.data, name)())
        lr = quantize(bicubic_downscale(hr, SCALE))
        hr = hr[..., : lr.shape[-2] * SCALE, : lr.shape[-1] * SCALE]
        h, w = hr.shape[-2:]
        keep = np.zeros((h, w), bool)
        keep[SCALE:h - SCALE, SCALE:w - SCALE] = True
        inner = np.zeros((h, w), bool)
        inner[band:h - band, band:w - band] = True
        row = {"photo": name, "size": f"{w}x{h}"}
        for border in ("zero", "reflect", "mirror"):
            sr = quantize(fastsr.upscale(lr, model, border=border).clamp(0, 1))
            a, b = _y(sr), _y(hr)
            row[border] = {"psnr": round(_psnr(a, b, keep), 3), "border_band": round(_psnr(a, b, keep & ~inner), 3),
                           "interior": round(_psnr(a, b, inner), 3)}
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--band", type=int, default=16, help="border band width in output pixels (default 16)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    rows = measure(args.band)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"band": args.band, "scale": SCALE, "model": "default", "rows": rows}, f, indent=1)
    print(f"| photo | PSNR zero / reflect / mirror | border band ({args.band} px) zero / reflect / mirror "
          "| interior zero / reflect / mirror |")
    print("|---|---|---|---|")
    for r in rows:
        cells = [" / ".join(str(r[b][k]) for b in ("zero", "reflect", "mirror"))
                 for k in ("psnr", "border_band", "interior")]
        print(f"| {r['photo']} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
