"""Upscaling images held in memory: PIL images, numpy arrays and tensors (:func:`upscale_image`)."""

from __future__ import annotations

import numpy as np
import torch

from .. import imageio
from ..imageio import ImageSource
from ..tiling import Tile, TilePlan, paste
from .engine import UpscaleError, Upscaler
from .halo import plan_for, source_reader
from .options import AUTO_TILE, UpscaleOptions

AUTO_TILE_MAX_PIXELS = AUTO_TILE * AUTO_TILE


def _uint_tiles(up: Upscaler, source: ImageSource, plan: TilePlan, batch_size: int, out: np.ndarray) -> None:
    for group in plan.batches(batch_size):
        tiles = [plan.tile_at(i) for i in group]
        result = up.run_uint(np.stack([plan.read(source.read, t) for t in tiles]))
        for t, o in zip(tiles, result, strict=True):
            paste(out, t, o, plan.scale)


# A tile larger than the image (and than AUTO_TILE) is clamped to the image's longer side rounded
# up to this (so that TIFF output tiles stay multiples of 16 pixels at any scale).
TILE_CLAMP_ALIGN = 16
# More tiles than this (a tiny --tile on a huge image) would make a plan of gigabytes.
MAX_TILES = 1 << 26


def tile_size(tile: int | None, height: int, width: int) -> int:
    """The tile size to use: ``tile``, checked and clamped to the image or AUTO_TILE, the larger
    (a store chunk is a whole output tile: --tile 4096 on a 64x80 image took 5 GB), or for None
    the whole image up to AUTO_TILE_MAX_PIXELS."""
    if tile is None:
        return max(height, width) if height * width <= AUTO_TILE_MAX_PIXELS else AUTO_TILE
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)):
        raise UpscaleError(f"tile must be a positive number of pixels, got {tile!r}")
    tile = int(tile)
    if tile < 1:
        raise UpscaleError(f"tile must be a positive number of pixels, got {tile}")
    # Clamped, but never below the default tile: sizes up to it are affordable on any image and
    # keep the output tiles they ask for (a TIFF's tile size is the user's choice).
    tile = min(tile, max(AUTO_TILE, -(-max(height, width) // TILE_CLAMP_ALIGN) * TILE_CLAMP_ALIGN))
    tiles = -(-height // tile) * -(-width // tile)
    if tiles > MAX_TILES:
        raise UpscaleError(f"tile {tile} cuts the {width}x{height} image into {tiles} tiles (at most {MAX_TILES}); "
                           "use a larger tile")
    return tile


def upscale_image(image, model=None, options: UpscaleOptions | None = None, **changes):
    """Upscale an image held in memory; returns the same kind of object.

    image: a PIL image (L, LA, RGB, RGBA, P, I;16; its ICC profile and DPI, scaled, are carried
    in the result's ``info``), an (H, W) or (H, W, C) uint8/uint16 numpy
    array (C = 1..4), or a float tensor (N, C, H, W) / (C, H, W) in [0, 1] (output on the
    input's device and dtype, not clamped). model: a module, a model file, "default" or None
    (the embedded default). The options (:class:`~fastsr.pipeline.options.UpscaleOptions`, as one
    ``options`` object and/or keywords) are ``tile``, ``halo``, ``border``, ``batch_size``,
    ``device``, ``dtype`` and ``backend``, with the defaults of :func:`~fastsr.upscale_file`:
    tiles of 512 pixels (``tile=None``: the whole image up to 512x512 pixels, tiles of 512 beyond;
    the output is the same up to float rounding when the halo covers the receptive field, as
    halo="auto" does where affordable; see :mod:`fastsr.pipeline.halo`). border: "mirror"
    (default: the image is padded by 10 pixels of its mirror image, so a flat image stays flat),
    "reflect" (mirrored without repeating the edge) or "zero" (the plain model's zero padding).
    Safe to call from several threads.
    """
    opts = UpscaleOptions.of("upscale_image", options, **changes)
    up = Upscaler(model, device=opts.device, dtype=opts.dtype, backend=opts.backend)
    batch_size = opts.batch_for(up.device)
    if isinstance(image, torch.Tensor):
        return _upscale_tensor(up, image, opts.tile, opts.halo, opts.border, batch_size)
    pil_mode = None
    if isinstance(image, np.ndarray):
        array = image
    elif hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image
        pil_mode = image.mode
        array = imageio.pil_to_array("<PIL image>", image)
    else:
        raise UpscaleError(f"cannot upscale a {type(image).__name__}; pass a PIL image, a numpy array or a tensor")
    source = imageio.array_source(array, "<array>", "array")
    plan = plan_for(up, height=source.height, width=source.width, channels=source.channels,
                    tile=tile_size(opts.tile, source.height, source.width), halo=opts.halo, border=opts.border,
                    read=source_reader(source))
    out = np.empty((*plan.output_shape, source.channels), dtype=source.dtype)
    _uint_tiles(up, source, plan, batch_size, out)
    if pil_mode is None:
        return out if array.ndim == 3 else out[..., 0]
    return _pil_like(image, out, up.scale)


def _pil_like(image, out: np.ndarray, scale: int):
    """The PIL image of ``out`` with what ``image.info`` says about its look and size carried: the
    color profile, and the DPI times ``scale`` (the same physical size), which ``save`` writes."""
    from PIL import Image

    result = Image.fromarray(out[..., 0] if out.shape[2] == 1 else out)  # mode from shape and dtype
    if image.info.get("icc_profile"):
        result.info["icc_profile"] = image.info["icc_profile"]
    dpi = image.info.get("dpi")
    if dpi and min(dpi) > 0:
        result.info["dpi"] = (dpi[0] * scale, dpi[1] * scale)
    return result


def _tensor_window(image: torch.Tensor, plan: TilePlan, tile: Tile) -> torch.Tensor:
    """(C, h, w) pixels of ``tile``'s window, padded beyond the image like :meth:`TilePlan.read`."""
    rows, cols = plan.window_indices(tile)
    rows, cols = (torch.from_numpy(i).to(image.device) for i in (rows, cols))
    return image.index_select(1, rows).index_select(2, cols)


def _upscale_tensor(up: Upscaler, x: torch.Tensor, tile, halo, border: str, batch_size: int) -> torch.Tensor:
    if not x.is_floating_point() or x.dim() not in (3, 4) or x.shape[-3] not in imageio.MODES:
        raise UpscaleError(f"tensor input must be float (N, C, H, W) or (C, H, W) with C in 1..4, "
                           f"got {x.dtype} {tuple(x.shape)}")
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise UpscaleError(f"tensor input has zero size {tuple(x.shape)}")
    squeeze = x.dim() == 3
    x4 = x[None] if squeeze else x
    n, c, h, w = x4.shape
    plan = plan_for(up, height=h, width=w, channels=c, tile=tile_size(tile, h, w), halo=halo, border=border,
                    read=lambda y0, y1, x0, x1: x4[:1, :, y0:y1, x0:x1].float().cpu())
    s = up.scale
    out = torch.empty((n, c, h * s, w * s), dtype=x.dtype, device=x.device)
    with torch.inference_mode():
        for i in range(n):
            for group in plan.batches(batch_size):
                tiles = [plan.tile_at(j) for j in group]
                windows = torch.stack([_tensor_window(x4[i], plan, t) for t in tiles])
                result = up.forward(windows.to(up.device).float()).to(x.device, x.dtype)
                for t, o in zip(tiles, result, strict=True):
                    paste(out[i], t, o, s, channels_first=True)
    return out[0] if squeeze else out
