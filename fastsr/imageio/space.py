"""Where an output goes, before and after the work: the destination and output checks, the disk
space an output needs and has, and removing a temporary output. (Moving a finished output to its
name is :func:`fastsr.atomic.commit`.)"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np

from .. import atomic
from .errors import ImageTooLargeError, ImageWriteError, UnsupportedImageError
from .formats import COMPRESSIONS, PILLOW_MAX_OUTPUT_PIXELS, mode_of, output_format


def format_bytes(n: float) -> str:
    """A size for people: 980 bytes, 12.3 KiB, 4.5 MiB, 1.2 GiB, 3.4 TiB."""
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def _refuse_directory(dst: str | os.PathLike, fmt: str) -> None:
    """A file format's destination must not be a directory."""
    if fmt != "zarr" and Path(dst).is_dir():
        raise ImageWriteError(f"{dst}: is a directory; name an output file (e.g. {Path(dst) / 'out.tif'})")


def check_destination(dst: str | os.PathLike, sources=(), *, overwrite: bool = False) -> str:
    """Before any work: ``dst``'s format from its suffix (:func:`output_format`), a file name for a
    file format, and the rule of :func:`fastsr.atomic.check_destination` (no overlap with
    ``sources``, an existing destination only with ``overwrite``, never a folder fastsr did not
    write). Returns the format."""
    fmt = output_format(dst)
    _refuse_directory(dst, fmt)
    atomic.check_destination(dst, sources=sources, overwrite=overwrite)
    return fmt


def _check_pillow_output(dst: str | os.PathLike, height: int, width: int, channels: int, dtype: np.dtype) -> None:
    """What a whole-image (Pillow) format refuses: too many pixels, 16 bits outside PNG, alpha in JPEG."""
    suffix = Path(dst).suffix.lower()
    if height * width > PILLOW_MAX_OUTPUT_PIXELS:
        raise ImageTooLargeError(
            f"{dst}: output of {width}x{height} pixels is too large for {suffix} (whole-image format, limit "
            f"{PILLOW_MAX_OUTPUT_PIXELS // 10**6} Mpixel); write a tiled BigTIFF (.tif) or a .zarr instead")
    if dtype == np.uint16 and suffix != ".png":
        raise UnsupportedImageError(f"{dst}: cannot write a 16-bit {mode_of(channels)} image as {suffix}; "
                                    "write a .png or .tif instead")
    if suffix in (".jpg", ".jpeg") and channels in (2, 4):
        raise UnsupportedImageError(f"{dst}: JPEG has no alpha channel; write .png or .tif for a "
                                    f"{mode_of(channels)} image")


def check_output(dst: str | os.PathLike, *, shape: tuple[int, int, int], dtype: np.dtype, compression: str) -> str:
    """Validate that an image of ``shape`` (H, W, C) and ``dtype`` can be written to ``dst``
    with ``compression``; returns the format. Raises :class:`ImageWriteError` /
    :class:`ImageTooLargeError` before any work is done."""
    fmt = output_format(dst)
    _refuse_directory(dst, fmt)
    height, width, channels = shape
    dtype = np.dtype(dtype)
    if compression not in COMPRESSIONS:
        raise ImageWriteError(f"unknown compression {compression!r}; choose from {', '.join(COMPRESSIONS)}")
    if fmt == "pillow":
        _check_pillow_output(dst, height, width, channels, dtype)
    if fmt == "tiff" and compression == "jpeg" and (dtype != np.uint8 or channels not in (1, 3)):
        raise UnsupportedImageError(f"{dst}: JPEG compression in TIFF needs 8-bit gray or RGB, not "
                                    f"{dtype} {mode_of(channels)}; use --compression zstd or deflate")
    d = Path(dst).resolve().parent
    if not d.is_dir():
        raise ImageWriteError(f"{dst}: output directory {d} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise ImageWriteError(f"{dst}: output directory {d} is not writable")
    return fmt


def estimate_output_bytes(shape: tuple[int, int, int], dtype: np.dtype, fmt: str, compression: str) -> int:
    """A conservative estimate of the disk space an output needs (final file + the resumable
    tile store it is assembled from). Compressed sizes assume photo-like content: lossless
    compression of upscaled images (smooth at pixel scale) rarely exceeds 60% of raw."""
    # Python integers: np.prod wraps around in int64 (a declared 1e9 x 1e9 image came out negative,
    # and the space check passed).
    raw = math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize
    percent = {"none": 100, "deflate": 60, "zstd": 60, "jpeg": 15}[compression]
    store = raw * 60 // 100  # the zstd-compressed tile store (removed at the end, except for .zarr outputs)
    final = 0 if fmt == "zarr" else raw * (60 if fmt == "pillow" else percent) // 100
    return store + final


def check_disk_space(dst: str | os.PathLike, needed: int) -> None:
    """Raise :class:`ImageWriteError` when the folder of ``dst`` has less than ``needed`` bytes free."""
    d = Path(dst).resolve().parent
    free = shutil.disk_usage(d).free
    if needed > free:
        raise ImageWriteError(f"{dst}: not enough disk space in {d}: the output needs about {format_bytes(needed)}, "
                              f"{format_bytes(free)} free")


def remove_path(path: Path) -> None:
    """Remove a temporary output or work folder, a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
