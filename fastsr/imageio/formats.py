"""What fastsr reads and writes, shared by sources, sinks and checks: the image layouts (modes,
dtypes) and size limits, the file suffixes and compressions, and the format a file name asks for."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ImageReadError, ImageWriteError, UnsupportedImageError

MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
COMPRESSIONS = ("none", "deflate", "zstd", "jpeg")
# A whole-image (Pillow) output must fit in memory with room to spare: at most this many pixels.
PILLOW_MAX_OUTPUT_PIXELS = 1 << 28
# Sizes declared by a file header are checked against these before anything is planned or
# allocated: a 200-byte zarr.json can declare any shape. 2**31 - 1 pixels a side is what TIFF
# readers and numpy's int32 index paths take; 2**44 pixels (17.6 Tpixel, 50 TiB of RGB) is far
# beyond any real image, so a larger declaration is a lying header, refused in one line.
MAX_SIDE = (1 << 31) - 1
MAX_PIXELS = 1 << 44


def mode_of(channels: int) -> str:
    """The Pillow mode name of an image of ``channels`` channels (1 -> "L" ... 4 -> "RGBA")."""
    return MODES[channels]


def check_layout(path: str, shape: tuple[int, ...], dtype: np.dtype, what: str) -> tuple[int, int, int]:
    """(height, width, channels) of an (H, W) or (H, W, C) image ``what`` in ``path``, refusing an
    empty one (:class:`ImageReadError`), or another shape, channel count, dtype or a declared size
    no real image has (:class:`UnsupportedImageError`)."""
    if len(shape) not in (2, 3):
        raise UnsupportedImageError(f"{path}: {what} has shape {tuple(shape)}; expected (H, W) or (H, W, C)")
    height, width = int(shape[0]), int(shape[1])
    channels = 1 if len(shape) == 2 else int(shape[2])
    if height == 0 or width == 0 or channels == 0:
        raise ImageReadError(f"{path}: {what} has zero size (shape {tuple(shape)})")
    check_declared_size(path, height, width, what)
    if channels not in MODES:
        raise UnsupportedImageError(f"{path}: {what} has {channels} channels (shape {tuple(shape)}); "
                                    "fastsr handles 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA)")
    if np.dtype(dtype) not in DTYPES:
        raise UnsupportedImageError(f"{path}: {what} has dtype {np.dtype(dtype)}; fastsr handles uint8 and uint16")
    return height, width, channels


def check_declared_size(path: str, height: int, width: int, what: str = "image") -> None:
    """Refuse a declared size no real image has (:data:`MAX_SIDE`, :data:`MAX_PIXELS`), in Python
    integers (numpy's int64 products overflow silently)."""
    height, width = int(height), int(width)
    if height < 0 or width < 0 or max(height, width) > MAX_SIDE or height * width > MAX_PIXELS:
        raise UnsupportedImageError(f"{path}: {what} declares {width}x{height} pixels, beyond what fastsr handles "
                                    f"(at most {MAX_SIDE} a side and {MAX_PIXELS} pixels); is its header damaged?")


def output_format(path: str | os.PathLike) -> str:
    """"tiff", "zarr" or "pillow" from the output file name; UserError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix == ".zarr":
        return "zarr"
    if suffix in PILLOW_SUFFIXES:
        return "pillow"
    raise ImageWriteError(f"{path}: unknown output format {suffix or '(no suffix)'!r}; use .tif (tiled BigTIFF), "
                          f".zarr, or one of {', '.join(PILLOW_SUFFIXES)} for images that fit in memory")


def pillow_format(dst: str | os.PathLike) -> str:
    """Pillow's format name ("PNG", "JPEG", "WEBP", "BMP") for a file name with one of :data:`PILLOW_SUFFIXES`."""
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}[Path(dst).suffix.lower()]
