"""Ties :mod:`fastsr.metadata` (what an image carries besides its pixels) to the readers and writers:
EXIF orientation applied to pixels, a Pillow file's metadata read without its pixels, the metadata
Pillow's writers take, and OME-Zarr's multiscales metadata read and written."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..metadata import EXIF_ORIENTATION, Metadata, pillow_metadata


def upright(array: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, C) pixels turned as EXIF ``orientation`` (1..8) says viewers show them (PIL's exif_transpose)."""
    turns = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
             5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
             7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}
    return turns.get(orientation, lambda a: a)(array)


def pillow_header(path: str) -> tuple[Metadata, int]:
    """The metadata and EXIF orientation (1..8, 1 when absent) of a file Pillow opens, read by
    Pillow, which parses the chunks without decoding the pixels."""
    from PIL import Image

    with Image.open(path) as im:
        return pillow_metadata(im), im.getexif().get(EXIF_ORIENTATION, 1)


def pillow_save_options(fmt: str, metadata: Metadata) -> dict[str, Any]:
    """The keyword arguments of Pillow's ``save`` embedding ``metadata`` where format ``fmt`` holds
    it: the color profile; EXIF in JPEG, PNG, WebP; DPI in JPEG, PNG, BMP."""
    kwargs: dict[str, Any] = {}
    if metadata.icc_profile:
        kwargs["icc_profile"] = metadata.icc_profile
    if metadata.exif and fmt in ("JPEG", "PNG", "WEBP"):
        kwargs["exif"] = metadata.exif
    if metadata.dpi and fmt in ("JPEG", "PNG", "BMP"):
        kwargs["dpi"] = metadata.dpi
    return kwargs


def ome_zarr_transform(image: dict, ndim: int) -> tuple[list[float], list[float] | None]:
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


def ome_zarr_metadata(attrs: dict, image: dict, axes: list[dict], wanted: list[int]) -> Metadata:
    """The :class:`Metadata` of an OME-Zarr image read through the array axes ``wanted`` (in OME-Zarr's
    order: channel, y, x): those axes, their scale and translation, the image's name and omero
    block. ``attrs``: the group's attributes; ``image``: its first multiscales entry."""
    scale, translation = ome_zarr_transform(image, len(axes))
    ome = {"axes": [axes[i] for i in wanted], "scale": [scale[i] for i in wanted],
           "translation": [translation[i] for i in wanted] if translation else None,
           "name": image.get("name"), "omero": attrs.get("ome", attrs).get("omero")}
    return Metadata(ome_zarr=ome)


def ome_zarr_attributes(ome: dict) -> dict:
    """The OME-Zarr 0.5 group attributes (under "ome") of one level, array "0", with the axes,
    scale, translation, name and omero block of ``ome`` (as :func:`ome_zarr_metadata` reads them)."""
    transforms = [{"type": "scale", "scale": ome["scale"]}]
    if ome.get("translation"):
        transforms.append({"type": "translation", "translation": ome["translation"]})
    image = {"axes": ome["axes"], "datasets": [{"path": "0", "coordinateTransformations": transforms}]}
    if ome.get("name"):
        image["name"] = ome["name"]
    return {"version": "0.5", "multiscales": [image], **({"omero": ome["omero"]} if ome.get("omero") else {})}
