"""How much context each tile gets: the halo of a tiled run (``halo="auto"``).

A halo of the model's receptive-field radius makes tiled output equal whole-image output (see
:mod:`fastsr.tiling`). For SRResNet (radius 40) that costs 34% more compute at 512-pixel tiles.
For deep models it is unaffordable: RRDBNet x4plus has a radius of about 350 LR pixels, a
window 5.6x the tile's area. Their outputs depend on far context only weakly, so ``"auto"``:

1. uses the exact radius when windows of the default 512-pixel tiles (or the run's, if larger)
   would cost at most :data:`AFFORDABLE_AREA` x the tiles, i.e. a radius up to 128 at 512
   (SRResNet 40, SRVGGNetCompact 18), and when one tile covers the image (no halo needed);
   the decision is the model's, so a run with small tiles stays exact for these models;
2. otherwise measures an *effective* halo on the image itself: a few probe cores are upscaled
   with a reference context (:data:`REFERENCE_HALO`, or the radius if smaller), then with
   growing candidate halos; the first candidate whose output stays within
   :data:`TOLERANCE_LEVELS` of an 8-bit level of the reference at every probe pixel wins.

The choice is logged; the pipeline stores it in the resume header, so a resumed run keeps it.

Borders (``border="mirror"``, the default): the image is tiled as if padded by
:data:`BORDER_PAD` pixels of its mirror image, edge pixel repeated (:mod:`fastsr.tiling`), so the
model's zero padding starts that far out and a flat image stays flat; ``"reflect"`` mirrors
without repeating the edge (Real-ESRGAN's ``pre_pad``); ``"zero"`` is the plain model's zero
padding at the image border.
:func:`plan_for` makes the whole plan: aligned tile, halo, border padding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..tiling import TilePlan, align_up, plan_tiles
from .engine import UpscaleError, Upscaler

log = logging.getLogger(__name__)

AFFORDABLE_AREA = 2.25
AFFORDABLE_TILE = 512
PROBE_CORE = 8
REFERENCE_HALO = 128
CANDIDATES = (8, 12, 16, 24, 32, 48, 64, 96)
TOLERANCE_LEVELS = 0.5

# read(y0, y1, x0, x1) -> (1, C, y1 - y0, x1 - x0) float tensor in [0, 1], on the CPU.
Reader = Callable[[int, int, int, int], torch.Tensor]


@dataclass(frozen=True)
class HaloChoice:
    """The halo a run uses and why: ``how`` is "given", "exact", "whole image", "measured" or
    "measured on NAME" (on another image of the same folder run, which measures once)."""

    halo: int
    how: str
    radius: int

    def describe(self) -> str:
        if self.how == "measured":
            return (f"halo {self.halo} (measured on the image: within {TOLERANCE_LEVELS} of a level of a "
                    f"{min(self.radius, REFERENCE_HALO)}-pixel context; the exact radius {self.radius} "
                    "is unaffordable)")
        return f"halo {self.halo} ({self.how}; receptive-field radius {self.radius})"


BORDERS = ("mirror", "reflect", "zero")
# Padding width (LR pixels; at most the halo). Measured with the default model: 8 already keeps a
# flat image flat (within 3 levels; zero padding: 19, and a 1x1 image's mean drops from
# (200, 100, 50) to (29, 24, 24)), and 8, 16, 24 or the whole halo give the same PSNR on the
# held-out photos; "mirror" gave the best border-band PSNR there (benchmarks/borders.py).
# Real-ESRGAN's pre_pad default is 10.
BORDER_PAD = 10


def plan_for(up: Upscaler, *, height: int, width: int, channels: int, tile: int, halo: int | str | None,
             border: str, read: Reader, stored_halo: int | None = None) -> TilePlan:
    """The tile plan of a run: ``tile`` rounded to the model's alignment, the halo chosen by
    :func:`choose_halo` (or ``stored_halo``, an interrupted run's), padding of :data:`BORDER_PAD`
    (at most the halo) for ``border`` "mirror" or "reflect"."""
    if border not in BORDERS:
        raise UpscaleError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
    tile = align_up(tile, up.align)
    if stored_halo is None:
        stored_halo = pick_halo(up, halo, height=height, width=width, channels=channels, tile=tile, read=read)
    pad = 0 if border == "zero" else min(stored_halo, BORDER_PAD)
    return plan_tiles(height, width, tile=tile, halo=stored_halo, scale=up.scale, align=up.align, pad=pad,
                      pad_mode="reflect" if border == "reflect" else "mirror")


def pick_halo(up: Upscaler, requested: int | str | None, *, height: int, width: int, channels: int, tile: int,
              read: Reader) -> int:
    """:func:`choose_halo`'s halo for ``tile`` rounded to the model's alignment; a measured one is logged."""
    choice = choose_halo(up, requested, height=height, width=width, channels=channels, tile=align_up(tile, up.align),
                         read=read)
    if choice.how == "measured":
        log.warning("%s", choice.describe())
    return choice.halo


def window_area(tile: int, halo: int) -> float:
    """Window area over core area for a tile of ``tile`` pixels with ``halo`` on each side."""
    return ((tile + 2 * halo) / tile) ** 2


def choose_halo(up: Upscaler, requested: int | str | None, *, height: int, width: int, channels: int, tile: int,
                read: Reader) -> HaloChoice:
    """The halo for a run over a ``height`` x ``width`` image in tiles of ``tile``; see the module doc.

    ``requested``: "auto"/None, a number of pixels (checked; a warning below the radius), or a
    HaloChoice made earlier (a folder's measured halo), which is kept.
    """
    if isinstance(requested, HaloChoice):
        return requested
    exact = align_up(max(up.radius, 2 if channels in (2, 4) else 0), up.align)  # bicubic alpha needs 2
    if requested not in ("auto", None):
        return HaloChoice(align_up(up.halo(requested, channels), up.align), "given", exact)
    if tile >= max(height, width):
        return HaloChoice(exact, "whole image", exact)
    if not measures(up, tile, channels):
        return HaloChoice(exact, "exact", exact)
    measured = align_up(max(measure_halo(up, height, width, read), 2 if channels in (2, 4) else 0), up.align)
    return HaloChoice(measured, "measured", exact)


def measures(up: Upscaler, tile: int, channels: int = 3) -> bool:
    """Whether ``"auto"`` measures a halo for this model at ``tile`` (on images larger than a tile):
    the exact radius would cost more than :data:`AFFORDABLE_AREA` x the tiles."""
    exact = align_up(max(up.radius, 2 if channels in (2, 4) else 0), up.align)
    return window_area(max(align_up(tile, up.align), AFFORDABLE_TILE), exact) > AFFORDABLE_AREA


def probe_cores(height: int, width: int, context: int) -> list[tuple[int, int]]:
    """Top-left corners of the probe cores: the centre and two points on the diagonal, pulled in
    so that their reference windows stay inside the image where it is large enough."""
    def place(size: int, fraction: float) -> int:
        c = int(size * fraction) - PROBE_CORE // 2
        if size >= 2 * context + PROBE_CORE:
            c = min(max(c, context), size - context - PROBE_CORE)
        return min(max(c, 0), size - PROBE_CORE)

    points = [(0.5, 0.5), (0.25, 0.3), (0.7, 0.75)]
    return sorted({(place(height, fy), place(width, fx)) for fy, fx in points})


def source_reader(source) -> Reader:
    """A :data:`Reader` over an :class:`fastsr.imageio.ImageSource` (uint8 or uint16 pixels)."""
    maxval = 255.0 if source.dtype == np.uint8 else 65535.0

    def read(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        region = source.read(y0, y1, x0, x1).astype(np.float32) / maxval
        return torch.from_numpy(region).permute(2, 0, 1)[None]

    return read


def measure_halo(up: Upscaler, height: int, width: int, read: Reader) -> int:
    """The smallest :data:`CANDIDATES` halo whose probe outputs match the reference context's (the
    reference context itself for an image thinner than a probe core, which cannot be probed)."""
    context = align_up(min(up.radius, REFERENCE_HALO), up.align)
    if min(height, width) < PROBE_CORE:
        return context
    # Windows on the model's input grid (see fastsr.tiling): aligned cores and halos.
    cores = [(y // up.align * up.align, x // up.align * up.align) for y, x in probe_cores(height, width, context)]
    references = [_probe(up, read, core, context, height, width) for core in cores]
    for halo in sorted({align_up(c, up.align) for c in CANDIDATES if c < context}):
        worst = max(_levels_apart(_probe(up, read, core, halo, height, width), ref)
                    for core, ref in zip(cores, references, strict=True))
        log.debug("halo %d: %.2f levels from the %d-pixel context", halo, worst, context)
        if worst <= TOLERANCE_LEVELS:
            return halo
    return context


def _probe(up: Upscaler, read: Reader, core: tuple[int, int], halo: int, height: int, width: int) -> torch.Tensor:
    """The model's output for the probe core at ``core`` computed from a window of ``halo`` context
    (clipped at the image border, where whole-image inference sees the same zero padding)."""
    y, x = core
    y0, y1 = max(0, y - halo), min(height, y + PROBE_CORE + halo)
    x0, x1 = max(0, x - halo), min(width, x + PROBE_CORE + halo)
    s = up.scale
    with torch.inference_mode():
        out = up.forward(read(y0, y1, x0, x1).to(up.device)).float().clamp(0, 1)
    return out[..., (y - y0) * s:(y - y0 + PROBE_CORE) * s, (x - x0) * s:(x - x0 + PROBE_CORE) * s].cpu()


def _levels_apart(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) * 255.0
