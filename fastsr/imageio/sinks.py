"""Image sinks: the writers, fed tile by tile, and the pyramid levels of a tiled TIFF.

A tiled BigTIFF (optionally with pyramid levels) is written from an iterator of tiles in
row-major order; a zarr v3 array or OME-Zarr image is written chunk by chunk. PNG / JPEG / WebP
outputs are assembled in memory, so they are limited to what fits. Each sink writes what it can
hold of the image's :class:`fastsr.metadata.Metadata`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..atomic import ZARR_MARK
from ..metadata import Metadata, png_with_metadata, tiff_write_kwargs
from .errors import ImageWriteError
from .formats import pillow_format
from .metadata_glue import ome_zarr_attributes, pillow_save_options


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

    group = zarr.create_group(str(path), zarr_format=3, overwrite=True,
                              attributes={"ome": ome_zarr_attributes(ome), ZARR_MARK: {"kind": "ome-zarr"}})
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
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    im.save(path, format=fmt, **kwargs, **pillow_save_options(fmt, metadata or Metadata()))
