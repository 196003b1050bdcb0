"""Image readers and writers for images of any size.

Readers never load a whole large image: tiled or stripped TIFF / BigTIFF are read by region
through tifffile's zarr interface (only the tiles or strips a region touches are decoded),
zarr arrays and ``.npy`` files (memory-mapped) by slicing. Pillow formats (PNG, JPEG, ...)
are decoded whole, up to Pillow's decompression-bomb limit, beyond which the error suggests
converting to a tiled TIFF.

Writers are fed tile by tile: a tiled BigTIFF (optionally with pyramid levels) is written
from an iterator of tiles in row-major order; a zarr v3 array is written chunk by chunk.
PNG / JPEG / WebP outputs are assembled in memory, so they are limited to what fits.

Every image is (H, W, C) with C = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA), dtype uint8 or uint16.
What a file carries besides its pixels (color profile, EXIF, resolution, GeoTIFF tags, OME-XML)
is read into :class:`fastsr.metadata.Metadata`, scaled with the image (:meth:`Metadata.scaled`)
and written by the sinks that can hold it. A file of several frames or pages is refused, never cut to its first.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import ZARR_MARK, commit
from .errors import UserError
from .metadata import (
    EXIF_ORIENTATION,
    Metadata,
    pillow_metadata,
    png_with_metadata,
    tiff_metadata,
    tiff_write_kwargs,
)

log = logging.getLogger("fastsr")

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


class ImageReadError(UserError):
    """The input image is missing, unreadable, empty or corrupt."""


class UnsupportedImageError(UserError):
    """The input image has a mode, dtype or layout fastsr does not handle."""


class MultiFrameError(UnsupportedImageError):
    """The input holds several frames or pages (an animation, a stack): fastsr upscales one image."""


class ImageTooLargeError(UserError):
    """The image is too large for the requested whole-image format."""


class ImageWriteError(UserError):
    """The output cannot be written (directory, format, disk space)."""


class DiskFullError(ImageWriteError):
    """The disk (or the user's quota) cannot hold the rest of a run. The run stopped with its
    finished tiles kept for a resume, unlike other user errors, which discard the work folder."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for want of space: a full disk or a full quota."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def format_bytes(n: float) -> str:
    """A size for people: 980 bytes, 12.3 KiB, 4.5 MiB, 1.2 GiB, 3.4 TiB."""
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def mode_of(channels: int) -> str:
    return MODES[channels]


class ImageSource:
    """A readable image: ``height``, ``width``, ``channels``, ``dtype`` and ``read(y0, y1, x0, x1)``
    returning an (y1 - y0, x1 - x0, channels) array. Reads touch only the requested region.
    ``metadata``: what the file carries besides its pixels (:class:`Metadata`), for the output."""

    def __init__(self, path: str, array, height: int, width: int, channels: int, dtype: np.dtype,
                 read: Callable[[int, int, int, int], np.ndarray], closer: Callable[[], None] | None = None,
                 kind: str = "", metadata: Metadata | None = None) -> None:
        self.path, self.array, self.height, self.width = path, array, height, width
        self.channels, self.dtype, self._read, self._closer, self.kind = channels, np.dtype(dtype), read, closer, kind
        self.metadata = metadata or Metadata()

    @property
    def mode(self) -> str:
        return mode_of(self.channels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.channels

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Region [y0, y1) x [x0, x1) as a C-contiguous (h, w, C) array of ``dtype``."""
        return np.ascontiguousarray(self._read(y0, y1, x0, x1))

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{self.kind} {self.path}: {self.width}x{self.height} {self.mode} {self.dtype}>"


def _check_layout(path: str, shape: tuple[int, ...], dtype: np.dtype, what: str) -> tuple[int, int, int]:
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


def array_source(array, path: str = "<array>", kind: str = "array", closer=None,
                 metadata: Metadata | None = None) -> ImageSource:
    """Wrap an (H, W) or (H, W, C) array-like that supports slicing (numpy, memmap, zarr)."""
    height, width, channels = _check_layout(path, tuple(array.shape), array.dtype, kind)
    if len(array.shape) == 2:
        read = lambda y0, y1, x0, x1: np.asarray(array[y0:y1, x0:x1])[..., None]
    else:
        read = lambda y0, y1, x0, x1: np.asarray(array[y0:y1, x0:x1])
    return ImageSource(path, array, height, width, channels, array.dtype, read, closer, kind, metadata)


def _open_tiff(path: str) -> ImageSource:
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable TIFF file ({exc})") from None
    try:
        if not tif.series:
            raise ImageReadError(f"{path}: TIFF file contains no image")
        series = tif.series[0]
        axes, shape = series.axes, series.shape
        _refuse_stacks(path, tif)
        # Level 0 of series 0 as a zarr array whose chunks are the TIFF's tiles or strips.
        arr = zarr.open_array(series.aszarr(level=0), mode="r")
        metadata = tiff_metadata(path, tif)
    except UserError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise ImageReadError(f"{path}: cannot read TIFF image ({exc})") from None
    # Index away singleton axes (pages, Z, T, ...) and keep Y, X and one sample axis (S or C).
    index, kept = [], []
    for i, (ax, n) in enumerate(zip(axes, shape, strict=True)):
        if ax in "YX" or (ax in "SC" and not any(axes[j] in "SC" for j in kept)):
            index.append(slice(None))
            kept.append(i)
        elif n == 1:
            index.append(0)
        else:
            tif.close()
            raise UnsupportedImageError(f"{path}: TIFF series has axes {axes} and shape {tuple(shape)}; "
                                        "fastsr reads 2-D images (YX, YXS or SYX)")
    kept_axes = "".join(axes[i] for i in kept)
    if "Y" not in kept_axes or "X" not in kept_axes:
        tif.close()
        raise UnsupportedImageError(f"{path}: TIFF series has axes {axes}; no Y and X axes")
    order = [kept_axes.index("Y"), kept_axes.index("X")] + [k for k, a in enumerate(kept_axes) if a not in "YX"]
    out_shape = tuple(shape[kept[k]] for k in order)
    height, width, channels = _check_layout(path, out_shape, arr.dtype, f"TIFF {series.kind} image")

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        sel = list(index)
        sel[axes.index("Y")] = slice(y0, y1)
        sel[axes.index("X")] = slice(x0, x1)
        block = np.asarray(arr[tuple(sel)]).transpose(order)
        return block if block.ndim == 3 else block[..., None]

    return ImageSource(path, arr, height, width, channels, arr.dtype, read, tif.close, "TIFF", metadata)


def _refuse_stacks(path: str, tif) -> None:
    """Raise :class:`MultiFrameError` for a TIFF of several images: pages stacked along an axis
    that is not a channel one (frames, Z, T, pages of one size), or several series of the first
    one's size (OME positions, pages). Pyramid levels, SubIFDs and smaller pages (thumbnails,
    labels) are not images of their own."""
    series = tif.series[0]
    extra = [(ax, n) for ax, n in zip(series.axes, series.shape, strict=True) if ax not in "YXSC" and n > 1]
    frames = int(np.prod([n for _, n in extra])) if extra else 1
    size = [series.shape[series.axes.index(a)] for a in "YX"]
    others = sum(1 for s in tif.series[1:] if "Y" in s.axes and "X" in s.axes
                 and [s.shape[s.axes.index(a)] for a in "YX"] == size)
    if frames * (1 + others) > 1:
        what = f"{frames * (1 + others)} pages or frames" + (f" (axes {series.axes}, shape {tuple(series.shape)})"
                                                             if extra else f" in {1 + others} series")
        raise MultiFrameError(f"{path}: holds {what}; fastsr upscales one image per file: extract the pages first "
                              f"(e.g. 'tiffsplit' or 'magick IN page_%03d.tif') and upscale each")


def _png_16bit_color(path: str) -> bool:
    """A 16-bit gray+alpha, RGB or RGBA PNG, which Pillow would read as 8 bits (IHDR: bit depth at
    byte 24, color type at byte 25)."""
    with open(path, "rb") as f:
        head = f.read(26)
    return head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 26 and head[24] == 16 and head[25] in (2, 4, 6)


def _open_pillow(path: str) -> ImageSource:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if _png_16bit_color(path):
        return _open_png_16bit_color(path)
    try:
        with warnings.catch_warnings():
            # Above Pillow's bomb limit, refuse clearly instead of decoding gigabytes.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = im.format
                frames = getattr(im, "n_frames", 1)
                # MPO (camera JPEG with a preview or depth image): the first image is the photo.
                if frames > 1 and fmt != "MPO":
                    raise MultiFrameError(f"{path}: holds {frames} frames ({fmt} animation); fastsr upscales one "
                                          "image per file: extract the frames first (e.g. 'ffmpeg -i IN "
                                          "frame_%03d.png' or 'magick IN frame_%03d.png') and upscale each")
                im.load()
                metadata = pillow_metadata(im)
                # EXIF orientation applied: the pixels as viewers show them, the output oriented normally.
                array = _pil_to_array(path, ImageOps.exif_transpose(im))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLargeError(
            f"{path}: too large to decode whole ({str(exc).split(',')[0]}); convert it to a tiled BigTIFF, e.g. "
            "'vips tiffsave IN OUT.tif --tile --bigtiff' or 'gdal_translate -co TILED=YES -co BIGTIFF=YES IN OUT.tif'"
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file Pillow can read (is it really {Path(path).suffix}?)") from None
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot decode image, the file may be truncated or corrupt ({exc})") from None
    return array_source(array, path, kind=fmt or "image", metadata=metadata)


def _open_png_16bit_color(path: str) -> ImageSource:
    """A 16-bit color PNG: pixels decoded by imagecodecs (Pillow reads them as 8 bit), metadata and
    EXIF orientation read by Pillow, which parses the chunks without decoding the pixels."""
    import imagecodecs
    from PIL import Image

    try:
        array = imagecodecs.png_decode(Path(path).read_bytes())
    except imagecodecs.PngError as exc:
        raise ImageReadError(f"{path}: cannot decode 16-bit PNG, the file may be truncated or corrupt "
                             f"({exc})") from None
    with Image.open(path) as im:
        metadata = pillow_metadata(im)
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    return array_source(np.ascontiguousarray(_upright(array, orientation)), path, kind="PNG", metadata=metadata)


def _upright(array: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, C) pixels turned as EXIF ``orientation`` (1..8) says viewers show them (PIL's exif_transpose)."""
    turns = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
             5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
             7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}
    return turns.get(orientation, lambda a: a)(array)


def _pil_to_array(path: str, im) -> np.ndarray:
    """(H, W, C) uint8/uint16 array of a loaded PIL image."""
    mode = im.mode
    if mode == "1":
        im = im.convert("L")
    elif mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode in ("I;16", "I;16L", "I;16B", "I"):
        array = np.asarray(im)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise UnsupportedImageError(f"{path}: 32-bit integer image (mode {mode}) with values outside 0..65535")
        return array.astype(np.uint16)[..., None]
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise UnsupportedImageError(f"{path}: unsupported image mode {mode!r} ({im.size[0]}x{im.size[1]}); "
                                    "fastsr handles L, LA, RGB, RGBA (8 or 16 bit); convert it to RGB first")
    array = np.asarray(im)
    return array[..., None] if array.ndim == 2 else array


def open_image(path: str | os.PathLike) -> ImageSource:
    """Open ``path`` for region reads: TIFF/BigTIFF, a zarr array (directory), a ``.npy`` file
    (memory-mapped), or any Pillow format (decoded whole). Raises :class:`ImageReadError` /
    :class:`UnsupportedImageError` / :class:`ImageTooLargeError` with the file name."""
    path = str(path)
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{path}: no such file")
    if p.is_dir():
        if any((p / name).exists() for name in ("zarr.json", ".zarray", ".zgroup")):
            return _open_zarr(path)
        raise ImageReadError(f"{path}: is a directory, not an image (nor a zarr array)")
    if not os.access(path, os.R_OK):
        raise ImageReadError(f"{path}: permission denied")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _open_tiff(path)
    if magic.startswith(b"\x93NUMPY"):
        try:
            array = np.load(path, mmap_mode="r")
        except Exception as exc:
            raise ImageReadError(f"{path}: cannot read .npy file ({exc})") from None
        return array_source(array, path, kind=".npy array")
    if p.suffix.lower() in TIFF_SUFFIXES:
        raise ImageReadError(f"{path}: not a TIFF file (bad header {magic[:4]!r})")
    return _open_pillow(path)


def _open_zarr(path: str) -> ImageSource:
    """A zarr array, or an OME-Zarr image (a group with multiscales metadata: its full resolution)."""
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot open zarr array ({exc})") from None
    if isinstance(node, zarr.Group):
        return _open_ome_zarr(path, node)
    return array_source(node, path, kind="zarr array")


def _open_ome_zarr(path: str, group) -> ImageSource:
    """Level 0 of an OME-Zarr image (0.4 or 0.5) read as (H, W, C): the channel axis, if any, goes
    last; time and z must be single planes. Metadata of the wrong shape (a missing dataset, a
    string where a list belongs) is one :class:`UnsupportedImageError`, not a parser's traceback."""
    try:
        return _parse_ome_zarr(path, group)
    except UserError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise UnsupportedImageError(f"{path}: malformed OME-Zarr metadata ({type(exc).__name__}: {exc})") from None


def _ome_dataset_path(path: str, image: dict) -> str:
    """Level 0's array path inside the group: a plain relative name, never one leading out of it."""
    name = image["datasets"][0]["path"]
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
        raise UnsupportedImageError(f"{path}: OME-Zarr dataset path {name!r} does not name an array inside the group")
    return name


def _parse_ome_zarr(path: str, group) -> ImageSource:
    attrs = dict(group.attrs)
    multiscales = attrs.get("ome", attrs).get("multiscales")  # 0.5 nests it under "ome"
    if not multiscales:
        raise UnsupportedImageError(f"{path}: a zarr group without OME-Zarr multiscales metadata; name the array "
                                    f"inside it (e.g. {path}/0)")
    image = multiscales[0]
    array = group[_ome_dataset_path(path, image)]
    # Axes as dicts (0.4 on) or names (0.3); before 0.3 always t, c, z, y, x.
    axes = [a if isinstance(a, dict) else {"name": a} for a in image.get("axes", "tczyx"[-array.ndim:])]
    names = [a["name"] for a in axes]
    if "y" not in names or "x" not in names or len(names) != array.ndim:
        raise UnsupportedImageError(f"{path}: OME-Zarr axes {names} for an array of shape {array.shape}; fastsr "
                                    "reads images with y and x axes")
    extra = [(n, k) for n, k, a in zip(names, array.shape, axes, strict=True)
             if n not in "yx" and a.get("type", "channel" if n == "c" else "") != "channel" and k > 1]
    if extra:
        raise MultiFrameError(f"{path}: holds {int(np.prod([k for _, k in extra]))} planes (axes {names}, shape "
                              f"{tuple(array.shape)}); fastsr upscales one image: pass a single plane")
    channel = next((i for i, (n, a) in enumerate(zip(names, axes, strict=True))
                    if a.get("type") == "channel" or (n == "c" and "type" not in a)), None)
    wanted = [i for i in (channel, names.index("y"), names.index("x")) if i is not None]  # OME-Zarr's order
    scale, translation = _ome_zarr_transform(image, array.ndim)
    ome = {"axes": [axes[i] for i in wanted], "scale": [scale[i] for i in wanted],
           "translation": [translation[i] for i in wanted] if translation else None,
           "name": image.get("name"), "omero": attrs.get("ome", attrs).get("omero")}
    view = _AxesView(array, [names.index("y"), names.index("x")] + ([channel] if channel is not None else []))
    return array_source(view, path, kind="OME-Zarr image", metadata=Metadata(ome_zarr=ome))


def _ome_zarr_transform(image: dict, ndim: int) -> tuple[list[float], list[float] | None]:
    """Level 0's scale and translation per axis, the multiscales-wide transformation applied on top."""
    scale, translation = [1.0] * ndim, None
    for transforms in (image["datasets"][0].get("coordinateTransformations", []),
                       image.get("coordinateTransformations", [])):
        for t in transforms:
            if t.get("type") == "scale":
                scale = [a * b for a, b in zip(scale, t["scale"], strict=True)]
                translation = [a * b for a, b in zip(translation, t["scale"], strict=True)] if translation else None
            elif t.get("type") == "translation":
                translation = [a + b for a, b in zip(translation or [0.0] * ndim, t["translation"], strict=True)]
    return scale, translation


class _AxesView:
    """An N-D array seen through the axes ``axes`` (array axis numbers, in the view's order), the
    other axes (single planes) at index 0. Slicing the view slices the array: region reads."""

    def __init__(self, array, axes: list[int]) -> None:
        self.array, self.axes, self.dtype = array, axes, array.dtype
        self.shape = tuple(array.shape[a] for a in axes)
        kept = sorted(axes)  # the order the axes have after indexing the others away
        self.perm = [kept.index(a) for a in axes]

    def __getitem__(self, key) -> np.ndarray:
        sel: list = [slice(None) if a in self.axes else 0 for a in range(self.array.ndim)]
        for a, part in zip(self.axes, key if isinstance(key, tuple) else (key,), strict=False):
            sel[a] = part
        return np.asarray(self.array[tuple(sel)]).transpose(self.perm)


# ----------------------------------------------------------------------------- writers


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


def check_destination(dst: str | os.PathLike, sources=(), *, overwrite: bool = False) -> str:
    """Before any work: ``dst``'s format from its suffix (:func:`output_format`), a file name for a
    file format, and the rule of :func:`fastsr.atomic.check_destination` (no overlap with
    ``sources``, an existing destination only with ``overwrite``, never a folder fastsr did not
    write). Returns the format."""
    from .atomic import check_destination as check_rule

    fmt = output_format(dst)
    if fmt != "zarr" and Path(dst).is_dir():
        raise ImageWriteError(f"{dst}: is a directory; name an output file (e.g. {Path(dst) / 'out.tif'})")
    check_rule(dst, sources=sources, overwrite=overwrite)
    return fmt


def check_output(dst: str | os.PathLike, *, shape: tuple[int, int, int], dtype: np.dtype, compression: str) -> str:
    """Validate that an image of ``shape`` (H, W, C) and ``dtype`` can be written to ``dst``
    with ``compression``; returns the format. Raises :class:`ImageWriteError` /
    :class:`ImageTooLargeError` before any work is done."""
    fmt = output_format(dst)
    if fmt != "zarr" and Path(dst).is_dir():
        raise ImageWriteError(f"{dst}: is a directory; name an output file (e.g. {Path(dst) / 'out.tif'})")
    height, width, channels = shape
    dtype = np.dtype(dtype)
    if compression not in COMPRESSIONS:
        raise ImageWriteError(f"unknown compression {compression!r}; choose from {', '.join(COMPRESSIONS)}")
    if fmt == "pillow":
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
    d = Path(dst).resolve().parent
    free = shutil.disk_usage(d).free
    if needed > free:
        raise ImageWriteError(f"{dst}: not enough disk space in {d}: the output needs about {format_bytes(needed)}, "
                              f"{format_bytes(free)} free")


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def commit_path(tmp: Path, dst: Path, overwrite: bool = False) -> None:
    """Move a finished temporary output to its final name (atomic for files), by the one rule of
    :func:`fastsr.atomic.commit`: an existing destination only with ``overwrite``, and a directory
    only if it is a zarr fastsr wrote."""
    commit(tmp, dst, overwrite=overwrite)


def create_zarr(path: str | os.PathLike, shape: tuple[int, ...], chunks: tuple[int, ...],
                dtype: np.dtype, mode: str = "w"):
    """A zarr v3 array on disk, zstd-compressed chunks (fast, lossless). ``mode="a"`` opens an
    existing one. Chunk-aligned writes from several workers need no locks."""
    import zarr
    from zarr.codecs import BytesCodec, ZstdCodec

    if mode == "a":
        return zarr.open_array(str(path), mode="r+")
    # The mark tells a later run with --overwrite that this array is fastsr's to replace.
    return zarr.create_array(str(path), shape=shape, chunks=chunks, dtype=np.dtype(dtype),
                             serializer=BytesCodec(), compressors=ZstdCodec(level=1), zarr_format=3,
                             fill_value=0, overwrite=True, attributes={ZARR_MARK: {"kind": "array"}})


def write_gray_zarr(path: str | os.PathLike, base, block: int) -> None:
    """A 2-D (H, W) zarr array at ``path`` from the (H, W, 1) array-like ``base``, block by block: a
    gray image comes out with the shape it went in with, as PNG and TIFF outputs do."""
    height, width, _ = base.shape
    array = create_zarr(path, (height, width), (block, block), base.dtype)
    for y in range(0, height, block):
        for x in range(0, width, block):
            array[y:y + block, x:x + block] = np.asarray(base[y:y + block, x:x + block])[..., 0]


def write_ome_zarr(path: str | os.PathLike, base, ome: dict, block: int) -> None:
    """An OME-Zarr 0.5 image at ``path`` (a zarr v3 group) from the (H, W, C) array-like ``base``:
    array "0" in the axes of ``ome`` (channel first, as OME-Zarr requires, or y, x only), written
    block by block, and its multiscales metadata (one level, ``ome``'s scale and translation)."""
    import zarr
    from zarr.codecs import BytesCodec, ZstdCodec

    transforms = [{"type": "scale", "scale": ome["scale"]}]
    if ome.get("translation"):
        transforms.append({"type": "translation", "translation": ome["translation"]})
    image = {"axes": ome["axes"], "datasets": [{"path": "0", "coordinateTransformations": transforms}]}
    if ome.get("name"):
        image["name"] = ome["name"]
    attrs = {"version": "0.5", "multiscales": [image], **({"omero": ome["omero"]} if ome.get("omero") else {})}
    group = zarr.create_group(str(path), zarr_format=3, attributes={"ome": attrs, ZARR_MARK: {"kind": "ome-zarr"}},
                              overwrite=True)
    height, width, channels = base.shape
    planes = len(ome["axes"]) == 3  # (c, y, x); else (y, x), one channel
    array = group.create_array("0", shape=(channels, height, width) if planes else (height, width),
                               chunks=(channels, block, block) if planes else (block, block), dtype=base.dtype,
                               serializer=BytesCodec(), compressors=ZstdCodec(level=1), fill_value=0)
    for y in range(0, height, block):
        for x in range(0, width, block):
            tile = np.asarray(base[y:y + block, x:x + block])
            if planes:
                array[:, y:y + block, x:x + block] = tile.transpose(2, 0, 1)
            else:
                array[y:y + block, x:x + block] = tile[..., 0]


def iter_chunks(array, block: tuple[int, int]) -> Iterator[np.ndarray]:
    """(bh, bw, C) blocks of an (H, W, C) array-like in row-major order (edge blocks smaller)."""
    height, width = array.shape[:2]
    for y in range(0, height, block[0]):
        for x in range(0, width, block[1]):
            yield np.asarray(array[y:y + block[0], x:x + block[1]])


def _downsample2(block: np.ndarray) -> np.ndarray:
    """2x2 box filter (rounded mean) of an (h, w, C) block; odd edges repeat the last pixel."""
    h, w = block.shape[:2]
    if h % 2 or w % 2:
        block = np.pad(block, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    b = block.astype(np.uint32)
    s = b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]
    return ((s + 2) // 4).astype(block.dtype)


def pyramid_shapes(shape: tuple[int, int, int], min_size: int) -> list[tuple[int, int, int]]:
    """Shapes of the levels below ``shape`` (each half the previous, rounded up) until the
    longer side is at most ``min_size``."""
    shapes = []
    h, w, c = shape
    while max(h, w) > min_size:
        h, w = -(-h // 2), -(-w // 2)
        shapes.append((h, w, c))
    return shapes


def build_pyramid(base, folder: Path, block: int, min_size: int) -> list:
    """Downsampled levels (each half the previous) of a zarr ``base`` array, as zarr arrays in
    ``folder``, until the longer side is at most ``min_size``. Works block by block."""
    levels, prev = [], base
    for shape in pyramid_shapes(tuple(base.shape), min_size):
        level = create_zarr(folder / f"level{len(levels) + 1}.zarr", shape, (block, block, shape[2]), prev.dtype)
        for y in range(0, shape[0], block):
            for x in range(0, shape[1], block):
                level[y:y + block, x:x + block] = _downsample2(np.asarray(prev[2 * y:2 * y + 2 * block,
                                                                               2 * x:2 * x + 2 * block]))
        levels.append(level)
        prev = level
    return levels


def write_tiff(path: str | os.PathLike, base, *, tile: int, compression: str = "zstd", levels=(),
               num_levels: int | None = None, metadata: Metadata | None = None) -> None:
    """Write the (H, W, C) array-like ``base`` (e.g. a zarr array) as a tiled BigTIFF, reading
    it one ``tile`` x ``tile`` block at a time in row-major order, plus ``levels`` as reduced-
    resolution SubIFDs (a pyramid viewers can use). ``levels`` may be a callable returning
    them, called once the base is written (``num_levels`` then says how many there will be).
    The first page carries ``metadata`` (profile, resolution, GeoTIFF tags, OME-XML, EXIF text)."""
    import tifffile

    if tile % 16:
        raise ImageWriteError(f"{path}: TIFF tiles must be a multiple of 16 pixels, got {tile}")
    codec = {"none": None, "deflate": "zlib", "zstd": "zstd", "jpeg": "jpeg"}[compression]
    height, width, channels = base.shape
    photometric = "rgb" if channels >= 3 else "minisblack"
    extrasamples = ("unassalpha",) if channels in (2, 4) else None
    predictor = compression in ("deflate", "zstd")  # horizontal differencing: smaller lossless files
    if num_levels is None:
        num_levels = len(levels)

    def write_level(tif, array, **kwargs):
        h, w, c = array.shape
        if c == 1:
            array = _Squeeze(array)
        tif.write(iter_chunks(array, (tile, tile)), shape=(h, w, c) if c > 1 else (h, w),
                  dtype=array.dtype, tile=(tile, tile), photometric=photometric, compression=codec,
                  predictor=predictor, extrasamples=extrasamples, planarconfig="contig", **kwargs)

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        write_level(tif, base, subifds=num_levels or None, metadata=None, software="fastsr",
                    **tiff_write_kwargs(metadata or Metadata()))
        for level in (levels() if callable(levels) else levels):
            write_level(tif, level, subfiletype=1, metadata=None)


class _Squeeze:
    """View an (H, W, 1) array-like as (H, W) for TIFF gray images."""

    def __init__(self, array) -> None:
        self.array, self.dtype = array, array.dtype
        self.shape = (array.shape[0], array.shape[1], 1)

    def __getitem__(self, key):
        return np.asarray(self.array[key])[..., 0]


def write_pillow(path: str | os.PathLike, array: np.ndarray, fmt: str | None = None,
                 metadata: Metadata | None = None) -> None:
    """Write an (H, W, C) uint8 array (or uint16 PNG) with Pillow, with ``metadata`` embedded where
    the format holds it (profile; EXIF in JPEG, PNG, WebP; DPI in JPEG, PNG, BMP); 16-bit color
    PNG with imagecodecs, since Pillow cannot write it, its metadata chunks added by fastsr."""
    from PIL import Image

    if array.dtype == np.uint16 and array.shape[2] > 1:
        import imagecodecs

        png = imagecodecs.png_encode(np.ascontiguousarray(array))
        Path(path).write_bytes(png_with_metadata(png, metadata or Metadata()))
        return

    im = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)  # mode from shape and dtype
    fmt = fmt or pillow_format(path)
    kwargs: dict[str, Any] = {"quality": 95} if fmt == "JPEG" else {}
    metadata = metadata or Metadata()
    if metadata.icc_profile:
        kwargs["icc_profile"] = metadata.icc_profile
    if metadata.exif and fmt in ("JPEG", "PNG", "WEBP"):
        kwargs["exif"] = metadata.exif
    if metadata.dpi and fmt in ("JPEG", "PNG", "BMP"):
        kwargs["dpi"] = metadata.dpi
    im.save(path, format=fmt, **kwargs)


def pillow_format(dst: str | os.PathLike) -> str:
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}[Path(dst).suffix.lower()]
