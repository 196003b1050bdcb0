"""Image readers and writers for images of any size, one module per job:

- :mod:`.sources`: :class:`ImageSource` and the readers behind :func:`open_image` (Pillow formats,
  tiled or stripped TIFF / BigTIFF, zarr and OME-Zarr, ``.npy``), which read by region;
- :mod:`.sinks`: the writers (tiled BigTIFF with pyramid levels, zarr, OME-Zarr, Pillow formats),
  fed tile by tile;
- :mod:`.metadata_glue`: how they carry :class:`fastsr.metadata.Metadata` (EXIF orientation,
  Pillow's save options, OME-Zarr's multiscales);
- :mod:`.space`: destination and output checks, disk space, removing a temporary output;
- :mod:`.formats`: the layouts, suffixes, compressions and size limits they share;
- :mod:`.errors`: their errors, each a :class:`fastsr.errors.UserError`.

Every image is (H, W, C) with C = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA), dtype uint8 or uint16.
What a file carries besides its pixels (color profile, EXIF, resolution, GeoTIFF tags, OME-XML)
is read into :class:`fastsr.metadata.Metadata`, scaled with the image (:meth:`Metadata.scaled`)
and written by the sinks that can hold it. A file of several frames or pages is refused, never
cut to its first. The names below are the package's API: import them from ``fastsr.imageio``.
"""

from __future__ import annotations

from ..metadata import Metadata
from .errors import (
    DiskFullError,
    ImageReadError,
    ImageTooLargeError,
    ImageWriteError,
    MultiFrameError,
    UnsupportedImageError,
    is_disk_full,
)
from .formats import (
    COMPRESSIONS,
    DTYPES,
    MAX_PIXELS,
    MAX_SIDE,
    MODES,
    PILLOW_MAX_OUTPUT_PIXELS,
    PILLOW_SUFFIXES,
    TIFF_SUFFIXES,
    check_declared_size,
    check_layout,
    mode_of,
    output_format,
    pillow_format,
)
from .metadata_glue import upright
from .sinks import (
    build_pyramid,
    create_zarr,
    iter_chunks,
    pyramid_shapes,
    write_gray_zarr,
    write_ome_zarr,
    write_pillow,
    write_tiff,
)
from .sources import ImageSource, array_source, open_image, pil_to_array
from .space import check_destination, check_disk_space, check_output, estimate_output_bytes, format_bytes, remove_path

__all__ = [
    "COMPRESSIONS", "DTYPES", "MAX_PIXELS", "MAX_SIDE", "MODES", "PILLOW_MAX_OUTPUT_PIXELS", "PILLOW_SUFFIXES",
    "TIFF_SUFFIXES", "DiskFullError", "ImageReadError", "ImageSource", "ImageTooLargeError", "ImageWriteError",
    "Metadata", "MultiFrameError", "UnsupportedImageError", "array_source", "build_pyramid", "check_declared_size",
    "check_destination", "check_disk_space", "check_layout", "check_output", "create_zarr", "estimate_output_bytes",
    "format_bytes", "is_disk_full", "iter_chunks", "mode_of", "open_image", "output_format", "pil_to_array",
    "pillow_format", "pyramid_shapes", "remove_path", "upright", "write_gray_zarr", "write_ome_zarr",
    "write_pillow", "write_tiff",
]
