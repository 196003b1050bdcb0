"""The upscaling options, declared once (:class:`UpscaleOptions`): ``fastsr upscale``'s flags,
:func:`~fastsr.upscale_file`'s, :func:`~fastsr.upscale_folder`'s and :func:`~fastsr.upscale_image`'s
keywords, their defaults, help and checks, and the settings a resumed run must match."""

from __future__ import annotations

import argparse
import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from ..imageio import COMPRESSIONS
from ..ops.dispatch import BACKENDS
from ..options import check_values, fields_for, name_of, option
from .engine import UpscaleError
from .halo import BORDERS, HaloChoice

# What --format can turn every output of a folder into (without it each keeps its input's suffix).
OUTPUT_FORMATS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "zarr")
# The compute dtypes by name; the torch dtypes and long names the API also accepts map onto them.
DTYPE_NAMES = ("fp32", "fp16", "bf16")
_DTYPE_ALIASES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                  "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", None: "fp32"}

# The default tile, in input pixels; a tile of None upscales images up to AUTO_TILE x AUTO_TILE
# pixels whole (the activations of a whole 4x SRResNet pass grow with the image), larger in tiles of it.
AUTO_TILE = 512
FILES = frozenset({"upscale_file", "upscale_folder"})  # options of the functions that write files
FOLDER = frozenset({"upscale_folder"})


def parse_halo(value: str) -> int | str:
    """``--halo``'s value: "auto" or a number of pixels."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of pixels, got {value!r}") from None


@dataclass(frozen=True)
class UpscaleOptions:
    """How to upscale: every option of ``fastsr upscale`` and of the ``upscale_*`` functions, with
    its default. A function takes the options it uses (see each field's ``uses``) as keywords or as
    one ``options`` object; the values are checked when the object is made. ``tile=None`` (API
    only): the whole image up to AUTO_TILE x AUTO_TILE pixels, tiles of AUTO_TILE beyond."""

    tile: int | None = option(AUTO_TILE, "tile size in input pixels; smaller uses less memory, halos cost more",
                              at_least=1, metavar="N")
    halo: int | str | HaloChoice = option(
        "auto", "input pixels of context around each tile (default: auto = the model's receptive field, which "
        "makes tiled output equal whole-image output, for fields up to 128 pixels (SRResNet: 40); for deeper "
        "models (RRDBNet: ~350) the smallest halo whose output stays within half a level of a 128-pixel "
        "context, measured on the image)", parse=parse_halo, metavar="auto|N")
    border: str = option("mirror", "what the model sees beyond the image's edges: mirror (default: 10 pixels of "
                         "the image mirrored, so edges look like the interior and flat images stay flat), reflect "
                         "(mirrored without repeating the edge pixel, as Real-ESRGAN's pre_pad) or zero (the plain "
                         "model's zero padding)", choices=BORDERS)
    batch_size: int | None = option(None, "tiles per model call (default: 1 on CPU, 4 on CUDA)", at_least=1,
                                    metavar="N")
    device: str | None = option(None, "cpu or cuda (default: cuda if available, else cpu)")
    dtype: str = option("fp32", "compute dtype", choices=DTYPE_NAMES)
    backend: str | None = option(None, "kernel backend (default: $FASTSR_BACKEND, else auto)",
                                 choices=("auto", *BACKENDS))
    fmt: str | None = option(None, "folders: write every output in this format (default: each keeps its input's)",
                             choices=OUTPUT_FORMATS, flag="--format", uses=FOLDER)
    compression: str = option("zstd", "TIFF tile compression (deflate is the most widely readable)",
                              choices=COMPRESSIONS, uses=FILES)
    pyramid: bool = option(False, "add half-resolution levels to a TIFF output (SubIFDs); folders: to the TIFF "
                           "outputs", uses=FILES)
    resume: bool = option(False, "continue an interrupted run with the same arguments from its finished tiles "
                          "(folders: finished files are always skipped; this continues the file that was cut "
                          "short)", uses=FILES)
    restart: bool = option(False, "discard the finished tiles of an interrupted run and start over", uses=FILES)
    overwrite: bool = option(False, "replace an existing DST (folders: existing outputs another model or run "
                             "made); a folder that is not a zarr fastsr wrote is never removed (docs/safety.md)",
                             uses=FILES)
    progress: bool = option(True, "no progress bar (folders: nor the summary line)", flag="--quiet", negated=True,
                            uses=FILES)

    def __post_init__(self) -> None:
        if isinstance(self.tile, bool) or (self.tile is not None and not isinstance(self.tile, numbers.Integral)):
            raise UpscaleError(f"tile must be a positive number of pixels, got {self.tile!r}")
        if self.tile is not None:
            object.__setattr__(self, "tile", int(self.tile))
        if self.dtype in _DTYPE_ALIASES or not isinstance(self.dtype, str):
            if self.dtype not in _DTYPE_ALIASES:
                raise UpscaleError(f"unsupported compute dtype {self.dtype}; use {', '.join(DTYPE_NAMES)}")
            object.__setattr__(self, "dtype", _DTYPE_ALIASES[self.dtype])
        check_values(UpscaleOptions, lambda name: getattr(self, name), UpscaleError, name_of)

    @classmethod
    def of(cls, use: str, options: UpscaleOptions | None = None, **changes: Any) -> UpscaleOptions:
        """``options`` (default: every default) with ``changes``, for the function ``use``: a keyword
        that is no option, or one that ``use`` does not take, is a TypeError, as Python's own."""
        takes = {field.name for field in fields_for(cls, use)}
        for name in changes:
            if name not in takes:
                what = "an option of " + ", ".join(sorted(_users(name))) if name in _ALL else "no option"
                raise TypeError(f"{use}() got an unexpected keyword argument {name!r} ({what})")
        return dataclasses.replace(options or cls(), **changes)

    def batch_for(self, device: torch.device) -> int:
        """Tiles per model call on ``device``: ``batch_size``, by default 1 on a CPU and 4 on CUDA."""
        if self.batch_size is not None:
            return self.batch_size
        return 4 if device.type == "cuda" else 1

    def header(self, resolved: dict[str, Any]) -> dict[str, Any]:
        """The settings of a run that a resumed run must match: these options' values as the run
        resolved them (``resolved``: the tile after clamping, the chosen halo, the batch size...)."""
        return {name: resolved.get(name, getattr(self, name)) for name in HEADER_FIELDS}


_ALL = frozenset(field.name for field in dataclasses.fields(UpscaleOptions))
# The options that change the output's pixels or its tiles: a resumed run must use the same.
HEADER_FIELDS = ("tile", "halo", "border", "batch_size", "dtype", "device", "backend")


def _users(name: str) -> frozenset[str]:
    uses = next(f for f in dataclasses.fields(UpscaleOptions) if f.name == name).metadata["uses"]
    return uses if uses is not None else frozenset({"upscale_file", "upscale_folder", "upscale_image"})
