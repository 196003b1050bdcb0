"""Image sources: :class:`ImageSource` and the readers behind :func:`open_image`.

Readers never load a whole large image: tiled or stripped TIFF / BigTIFF are read by region
through tifffile's zarr interface (only the tiles or strips a region touches are decoded),
zarr arrays, OME-Zarr images and ``.npy`` files (memory-mapped) by slicing. Pillow formats (PNG,
JPEG, ...) are decoded whole, up to Pillow's decompression-bomb limit, beyond which the error
suggests converting to a tiled TIFF. A file of several frames or pages is refused, never cut to
its first.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..metadata import Metadata, pillow_metadata, tiff_metadata
from .errors import ImageReadError, ImageTooLargeError, MultiFrameError, UnsupportedImageError
from .formats import TIFF_SUFFIXES, check_layout, mode_of
from .metadata_glue import ome_zarr_metadata, pillow_header, upright


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
        """The Pillow mode name of the image ("L", "LA", "RGB", "RGBA")."""
        return mode_of(self.channels)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, channels)."""
        return self.height, self.width, self.channels

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Region [y0, y1) x [x0, x1) as a C-contiguous (h, w, C) array of ``dtype``."""
        return np.ascontiguousarray(self._read(y0, y1, x0, x1))

    def close(self) -> None:
        """Release the file (once; later calls do nothing)."""
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{self.kind} {self.path}: {self.width}x{self.height} {self.mode} {self.dtype}>"


def array_source(array, path: str = "<array>", kind: str = "array", closer=None,
                 metadata: Metadata | None = None) -> ImageSource:
    """Wrap an (H, W) or (H, W, C) array-like that supports slicing (numpy, memmap, zarr)."""
    height, width, channels = check_layout(path, tuple(array.shape), array.dtype, kind)
    if len(array.shape) == 2:
        read = lambda y0, y1, x0, x1: np.asarray(array[y0:y1, x0:x1])[..., None]
    else:
        read = lambda y0, y1, x0, x1: np.asarray(array[y0:y1, x0:x1])
    return ImageSource(path, array, height, width, channels, array.dtype, read, closer, kind, metadata)


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
        return _open_npy(path)
    if p.suffix.lower() in TIFF_SUFFIXES:
        raise ImageReadError(f"{path}: not a TIFF file (bad header {magic[:4]!r})")
    return _open_pillow(path)


def _open_npy(path: str) -> ImageSource:
    """A ``.npy`` file, memory-mapped."""
    try:
        array = np.load(path, mmap_mode="r")
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read .npy file ({exc})") from None
    return array_source(array, path, kind=".npy array")


# ----------------------------------------------------------------------------- TIFF


def _open_tiff(path: str) -> ImageSource:
    """Level 0 of a TIFF's first series, read by region through its tiles or strips."""
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
        index, order, out_shape = _tiff_selection(path, axes, shape)
        height, width, channels = check_layout(path, out_shape, arr.dtype, f"TIFF {series.kind} image")
    except UserError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise ImageReadError(f"{path}: cannot read TIFF image ({exc})") from None

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        sel = list(index)
        sel[axes.index("Y")] = slice(y0, y1)
        sel[axes.index("X")] = slice(x0, x1)
        block = np.asarray(arr[tuple(sel)]).transpose(order)
        return block if block.ndim == 3 else block[..., None]

    return ImageSource(path, arr, height, width, channels, arr.dtype, read, tif.close, "TIFF", metadata)


def _tiff_selection(path: str, axes: str, shape: tuple[int, ...]) -> tuple[list, list[int], tuple[int, ...]]:
    """How a TIFF series of ``axes`` and ``shape`` is read as an image: the index that keeps Y, X and
    one sample axis (S or C) and takes singleton axes (pages, Z, T, ...) at 0, the transposition
    of the kept axes to (Y, X[, sample]), and the image's shape in that order."""
    index, kept = [], []
    for i, (ax, n) in enumerate(zip(axes, shape, strict=True)):
        if ax in "YX" or (ax in "SC" and not any(axes[j] in "SC" for j in kept)):
            index.append(slice(None))
            kept.append(i)
        elif n == 1:
            index.append(0)
        else:
            raise UnsupportedImageError(f"{path}: TIFF series has axes {axes} and shape {tuple(shape)}; "
                                        "fastsr reads 2-D images (YX, YXS or SYX)")
    kept_axes = "".join(axes[i] for i in kept)
    if "Y" not in kept_axes or "X" not in kept_axes:
        raise UnsupportedImageError(f"{path}: TIFF series has axes {axes}; no Y and X axes")
    order = [kept_axes.index("Y"), kept_axes.index("X")] + [k for k, a in enumerate(kept_axes) if a not in "YX"]
    return index, order, tuple(shape[kept[k]] for k in order)


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


# ----------------------------------------------------------------------------- Pillow


def _png_16bit_color(path: str) -> bool:
    """A 16-bit gray+alpha, RGB or RGBA PNG, which Pillow would read as 8 bits (IHDR: bit depth at
    byte 24, color type at byte 25)."""
    with open(path, "rb") as f:
        head = f.read(26)
    return head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 26 and head[24] == 16 and head[25] in (2, 4, 6)


def _open_pillow(path: str) -> ImageSource:
    """A file Pillow reads, decoded whole, EXIF orientation applied (16-bit color PNG: imagecodecs)."""
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
                array = pil_to_array(path, ImageOps.exif_transpose(im))
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

    try:
        array = imagecodecs.png_decode(Path(path).read_bytes())
    except imagecodecs.PngError as exc:
        raise ImageReadError(f"{path}: cannot decode 16-bit PNG, the file may be truncated or corrupt "
                             f"({exc})") from None
    metadata, orientation = pillow_header(path)
    return array_source(np.ascontiguousarray(upright(array, orientation)), path, kind="PNG", metadata=metadata)


def pil_to_array(path: str, im) -> np.ndarray:
    """(H, W, C) uint8/uint16 array of a loaded PIL image ``im`` (``path`` names it in errors): 1-bit
    and palette images converted to L / RGB / RGBA, 16- and 32-bit integer ones to uint16;
    :class:`UnsupportedImageError` for other modes or 32-bit values outside 0..65535."""
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


# ----------------------------------------------------------------------------- zarr, OME-Zarr


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
    """The image of an OME-Zarr group, its metadata malformed or not (:func:`_open_ome_zarr` says so)."""
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
    metadata = ome_zarr_metadata(attrs, image, axes, wanted)
    view = _AxesView(array, [names.index("y"), names.index("x")] + ([channel] if channel is not None else []))
    return array_source(view, path, kind="OME-Zarr image", metadata=metadata)


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
