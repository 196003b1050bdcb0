"""What an image carries besides its pixels, read from its file and written to the output:
the ICC profile, EXIF, resolution (DPI), GeoTIFF georeferencing, OME-TIFF / OME-Zarr physical
sizes (:class:`Metadata`), and how each is scaled when the image is upscaled."""

from __future__ import annotations

import dataclasses
import logging
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("fastsr")

EXIF_ORIENTATION, EXIF_X_RESOLUTION, EXIF_Y_RESOLUTION, EXIF_IFD = 0x0112, 0x011A, 0x011B, 0x8769
EXIF_PIXEL_X, EXIF_PIXEL_Y = 0xA002, 0xA003
# IFD0 text tags that a TIFF output carries from EXIF: Make, Model, DateTime, Artist, Copyright.
EXIF_TIFF_TEXT = (271, 272, 306, 315, 33432)
# GeoTIFF: the tags that place pixels (scaled) and those carried as they are (keys, params, nodata).
GEO_PIXEL_SCALE, GEO_TIEPOINT, GEO_TRANSFORMATION = 33550, 33922, 34264
GEO_KEYS, GEO_KEPT = 34735, (34735, 34736, 34737, 42113)
GEO_TAGS = (GEO_PIXEL_SCALE, GEO_TIEPOINT, GEO_TRANSFORMATION, *GEO_KEPT)
GEO_RASTER_TYPE, PIXEL_IS_POINT = 1025, 2
RESOLUTION_UNITS = {1: "none", 2: "inch", 3: "cm"}


@dataclass(frozen=True)
class Metadata:
    """What an input carries besides its pixels, for the output to carry. ``icc_profile``: the
    color profile; ``exif``: EXIF as Pillow loads and saves it; ``resolution``: pixels per
    ``resolution_unit`` ("inch", "cm" or "none") in x and y; ``geotiff``: GeoTIFF tags as tifffile
    extratags (code, TIFF data type, count, value); ``ome_xml``: an OME-TIFF's OME-XML;
    ``ome_zarr``: an OME-Zarr image's ``axes`` (those read: channel, y, x), their ``scale`` and
    ``translation`` (physical units per pixel and offset), ``name`` and ``omero`` (display)."""

    icc_profile: bytes | None = None
    exif: bytes | None = None
    resolution: tuple[float, float] | None = None
    resolution_unit: str = "inch"
    geotiff: tuple[tuple[int, int, int, Any], ...] = ()
    ome_xml: str | None = None
    ome_zarr: dict | None = None

    @property
    def dpi(self) -> tuple[float, float] | None:
        """The resolution in pixels per inch, if it has a physical unit."""
        if self.resolution is None or self.resolution_unit == "none":
            return None
        factor = 2.54 if self.resolution_unit == "cm" else 1.0
        return self.resolution[0] * factor, self.resolution[1] * factor

    def scaled(self, scale: int, width: int, height: int) -> Metadata:
        """The metadata of the image upscaled ``scale`` times to ``width`` x ``height``: the same
        physical size and place (resolution times ``scale``, pixel sizes divided by it, pixel
        coordinates multiplied), EXIF dimensions updated and its orientation 1 (the pixels were
        turned upright on reading)."""
        return dataclasses.replace(
            self, exif=_scaled_exif(self.exif, scale, width, height) if self.exif else None,
            resolution=(self.resolution[0] * scale, self.resolution[1] * scale) if self.resolution else None,
            geotiff=_scaled_geotiff(self.geotiff, scale),
            ome_xml=_scaled_ome(self.ome_xml, scale, width, height) if self.ome_xml else None,
            ome_zarr=_scaled_ome_zarr(self.ome_zarr, scale) if self.ome_zarr else None)

    def exif_text_tags(self) -> list[tuple[int, int, int, Any, bool]]:
        """EXIF's camera and author text (Make, Model, DateTime, Artist, Copyright) as tifffile
        extratags: a TIFF output keeps them in its own tags (tifffile writes no EXIF directory)."""
        if not self.exif:
            return []
        from PIL import Image

        exif = Image.Exif()
        exif.load(self.exif)
        return [(tag, 2, 0, str(exif[tag]).encode(), True) for tag in EXIF_TIFF_TEXT
                if isinstance(exif.get(tag), str) and exif[tag]]


def _scaled_exif(blob: bytes, scale: int, width: int, height: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif.load(blob)
    if EXIF_ORIENTATION in exif:
        exif[EXIF_ORIENTATION] = 1  # the pixels are already upright (ImageOps.exif_transpose on reading)
    for tag in (EXIF_X_RESOLUTION, EXIF_Y_RESOLUTION):
        if tag in exif:
            exif[tag] = float(exif[tag]) * scale
    if EXIF_IFD in exif:
        ifd = exif.get_ifd(EXIF_IFD)  # the dict tobytes() writes back
        ifd[EXIF_PIXEL_X], ifd[EXIF_PIXEL_Y] = width, height
    return exif.tobytes()


def _raster_offset(geotiff, scale: int) -> float:
    """Where the centre of an input pixel lands in output pixel coordinates, minus ``scale`` times
    its own: 0 for PixelIsArea rasters (coordinates at pixel corners, the default), (s - 1) / 2
    for PixelIsPoint ones (coordinates at pixel centres)."""
    keys = next((tag[3] for tag in geotiff if tag[0] == GEO_KEYS), ())
    for i in range(4, len(keys) - 3, 4):  # after the header: (key, location, count, value) entries
        if keys[i] == GEO_RASTER_TYPE and keys[i + 1] == 0 and keys[i + 3] == PIXEL_IS_POINT:
            return (scale - 1) / 2
    return 0.0


def _scaled_geotiff(geotiff, scale: int) -> tuple:
    """GeoTIFF tags for the upscaled raster: the same place on the ground, ``scale`` times the pixels."""
    offset, out = _raster_offset(geotiff, scale), []
    for code, dtype, count, value in geotiff:
        if code == GEO_PIXEL_SCALE:
            value = (value[0] / scale, value[1] / scale, *value[2:])
        elif code == GEO_TIEPOINT:  # (I, J, K, X, Y, Z) per point: raster coordinates scale, model ones stay
            value = tuple(v * scale + offset if i % 6 < 2 else v for i, v in enumerate(value))
        elif code == GEO_TRANSFORMATION:  # model = M @ raster; raster_in = (raster_out - offset) / scale
            m = np.array(value, dtype=np.float64).reshape(4, 4)
            a = np.diag([1 / scale, 1 / scale, 1.0, 1.0])
            a[0, 3] = a[1, 3] = -offset / scale
            value = tuple((m @ a).ravel().tolist())
        out.append((code, dtype, count, value))
    return tuple(out)


OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def _scaled_ome(xml: str, scale: int, width: int, height: int) -> str:
    """The OME-XML of the upscaled image: SizeX/SizeY, PhysicalSizeX/Y divided by ``scale``, a new UUID."""
    import xml.etree.ElementTree as ET

    ET.register_namespace("", OME_NS)
    root = ET.fromstring(xml)
    pixels = root.find(f"{{{OME_NS}}}Image/{{{OME_NS}}}Pixels")
    pixels.set("SizeX", str(width))
    pixels.set("SizeY", str(height))
    for axis in ("X", "Y"):
        if (size := pixels.get(f"PhysicalSize{axis}")) is not None:
            pixels.set(f"PhysicalSize{axis}", repr(float(size) / scale))
    if "UUID" in root.attrib:
        root.set("UUID", f"urn:uuid:{uuid.uuid4()}")  # another file: its own identity
    for data in pixels.iter(f"{{{OME_NS}}}TiffData"):
        for ref in data.findall(f"{{{OME_NS}}}UUID"):  # links to the input file
            data.remove(ref)
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="unicode")


def _scaled_ome_zarr(ome: dict, scale: int) -> dict:
    """The OME-Zarr scale of y and x divided by ``scale`` (the translation, the position of pixel
    0, is kept, as OME-Zarr writers do for their own lower-resolution levels)."""
    factors = [scale if axis.get("type") == "space" else 1 for axis in ome["axes"]]
    return {**ome, "scale": [v / f for v, f in zip(ome["scale"], factors, strict=True)]}


def _ome_single_plane(path: str, xml: str) -> str | None:
    """``xml`` when it describes one image of one plane (all channels interleaved), the layout the
    output has; else None, with a warning (a stack or planar channels: the XML would not match)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        log.warning("%s: the OME-XML does not parse; the output will not carry it", path)
        return None
    images = root.findall(f"{{{OME_NS}}}Image")
    pixels = images[0].find(f"{{{OME_NS}}}Pixels") if len(images) == 1 else None
    channels = pixels.findall(f"{{{OME_NS}}}Channel") if pixels is not None else []
    if (pixels is None or pixels.get("SizeZ", "1") != "1" or pixels.get("SizeT", "1") != "1" or len(channels) > 1
            or (channels and channels[0].get("SamplesPerPixel", "1") != pixels.get("SizeC", "1"))):
        log.warning("%s: the OME-XML describes several images or planes; the output (one image, channels "
                    "interleaved) will not carry it", path)
        return None
    return xml


def tiff_metadata(path: str, tif) -> Metadata:
    """The metadata of a TIFF's first page: profile, resolution, GeoTIFF tags, OME-XML."""
    page = tif.pages.first
    tags = page.tags
    resolution = None
    if 282 in tags and 283 in tags:  # XResolution, YResolution: rationals
        x, y = (tags[c].value for c in (282, 283))
        resolution = (x[0] / x[1], y[0] / y[1]) if x[1] and y[1] else None
    unit = RESOLUTION_UNITS.get(int(tags[296].value), "none") if 296 in tags else "inch"  # TIFF's default
    geotiff = tuple((c, int(tags[c].dtype), tags[c].count, tags[c].value) for c in GEO_TAGS if c in tags)
    ome = _ome_single_plane(path, tif.ome_metadata) if tif.is_ome and tif.ome_metadata else None
    return Metadata(icc_profile=page.iccprofile, exif=_exif_of_text(tags), resolution=resolution,
                    resolution_unit=unit, geotiff=geotiff, ome_xml=ome)


def _exif_of_text(tags) -> bytes | None:
    """A TIFF's camera and author text tags (Make, Model, DateTime, Artist, Copyright) as EXIF,
    the form every output that holds such text takes it in (its EXIF directory is not read)."""
    from PIL import Image

    exif = Image.Exif()
    for code in EXIF_TIFF_TEXT:
        if code in tags and isinstance(tags[code].value, str) and tags[code].value:
            exif[code] = tags[code].value
    return exif.tobytes() if len(exif) else None


def pillow_metadata(im) -> Metadata:
    """The metadata of an opened Pillow image (before its EXIF orientation is applied)."""
    exif = im.getexif()
    dpi = im.info.get("dpi")
    return Metadata(icc_profile=im.info.get("icc_profile") or None, exif=exif.tobytes() if len(exif) else None,
                    resolution=(float(dpi[0]), float(dpi[1])) if dpi and min(dpi) > 0 else None)


def tiff_write_kwargs(metadata: Metadata) -> dict:
    """tifffile ``write`` arguments for ``metadata``."""
    extratags = [(code, dtype, count, value, True) for code, dtype, count, value in metadata.geotiff]
    extratags += metadata.exif_text_tags()
    if metadata.ome_xml:  # UTF-8 bytes: OME-XML is not 7-bit ASCII (µm), which tifffile's description wants
        extratags.append((270, 2, 0, metadata.ome_xml.encode(), True))
    kwargs: dict[str, Any] = {"iccprofile": metadata.icc_profile, "extratags": extratags}
    if metadata.resolution:
        unit = {name: code for code, name in RESOLUTION_UNITS.items()}[metadata.resolution_unit]
        kwargs.update(resolution=metadata.resolution, resolutionunit=unit)
    return kwargs


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_metadata(png: bytes, metadata: Metadata) -> bytes:
    """``png`` with iCCP (profile), pHYs (DPI, as pixels per metre) and eXIf (EXIF) chunks inserted
    after its IHDR, where the PNG specification wants them (before the image data)."""
    chunks = b""
    if metadata.icc_profile:
        chunks += _png_chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(metadata.icc_profile))
    if metadata.dpi:
        x, y = (round(d / 0.0254) for d in metadata.dpi)
        chunks += _png_chunk(b"pHYs", struct.pack(">IIB", x, y, 1))
    if metadata.exif:
        chunks += _png_chunk(b"eXIf", metadata.exif.removeprefix(b"Exif\0\0"))
    ihdr_end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4  # signature, IHDR length/type, data, CRC
    return png[:ihdr_end] + chunks + png[ihdr_end:]
