"""Receptive field, tile plans and exact stitching for tiled upscaling.

A convolutional upscaler's output pixel depends only on the input pixels within its
receptive field. If each tile is run on a *window* that extends the tile's *core* by at
least that radius on every side (or reaches the image border, where the model sees the
same zero padding as in a whole-image run), the core of the tile's output is the same as
the whole-image output at those pixels (up to float rounding). Stitching keeps only the
cores, so there are no seams to blend.

All windows of a plan have the same shape: near the borders the window slides inwards
rather than shrinking, so tiles can be batched. Models that pixel-unshuffle their input by a
factor ``a`` (RRDBNet x1/x2) compute the same output for a window only if it starts on the same
``a``-pixel grid as the image: a plan with ``align=a`` keeps every window start a multiple of it.

Borders: a plan with ``pad=P`` tiles the image as if it were padded by P pixels on every side,
mirrored (:data:`PAD_MODES`; repeated for images smaller than P): windows may reach P pixels
beyond the image and :meth:`TilePlan.window_indices` says which image pixels they read there.
The model's own zero padding then starts P pixels out, so a flat image stays flat and borders
look like the rest of the image; tiled output still equals whole-image output with the same
padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch import nn

from .errors import UserError


class ReceptiveFieldError(UserError, ValueError):
    """The model contains a layer whose receptive field fastsr cannot derive."""


def _conv_radius(conv: nn.Conv2d) -> int:
    if conv.stride != (1, 1):
        raise ReceptiveFieldError(f"strided convolution {conv} is not supported for tiling")
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    return max(dh * (kh - 1) // 2, dw * (kw - 1) // 2)


def _layers(module: nn.Module) -> Iterator[tuple[str, int]]:
    """Yield ("conv", radius) and ("up", factor) for the spatial layers of ``module``, in
    registration order (which is forward order for fastsr's models and for nn.Sequential)."""
    if isinstance(module, nn.Conv2d):
        yield "conv", _conv_radius(module)
    elif isinstance(module, nn.PixelShuffle):
        yield "up", module.upscale_factor
    elif isinstance(module, nn.Upsample):
        factor = module.scale_factor
        if module.mode != "nearest" or factor is None or float(factor) != int(factor):
            raise ReceptiveFieldError(f"only integer nearest upsampling is supported for tiling, got {module}")
        yield "up", int(factor)
    elif isinstance(getattr(module, "receptive_radius", None), int):
        yield "conv", module.receptive_radius  # a parameter-free layer that reads this far (fastsr.nn.BicubicDownscale)
    elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.ConvTranspose2d, nn.Unfold)):
        raise ReceptiveFieldError(f"{type(module).__name__} is not supported for tiling")
    else:
        for child in module.children():
            yield from _layers(child)
        shuffle = getattr(module, "shuffle", 1)
        if isinstance(shuffle, int) and not isinstance(shuffle, bool) and shuffle > 1:
            yield "up", shuffle  # a pixel shuffle fused after its conv child (fastsr.nn.ConvPReLU)


def _layer_list(model: nn.Module) -> list[tuple[str, int]]:
    return list(_layers(model))


def model_scale(model: nn.Module) -> int:
    """The model's integer upscaling factor: its ``scale`` attribute, else the product of its
    upsampling layers."""
    scale = getattr(model, "scale", None)
    if scale is not None:
        return int(scale)
    return math.prod(f for kind, f in _layer_list(model) if kind == "up")


def receptive_field(model: nn.Module) -> int:
    """Receptive-field radius of ``model`` in input (LR) pixels, derived from its layers.

    Walks the layers backwards from one output pixel of each sub-pixel phase, growing an
    integer interval: a k x k conv adds k // 2 on each side at its own resolution, an
    upsampling by r maps output positions [lo, hi] to input positions [lo // r, hi // r].
    The radius is the largest distance from the LR pixel that contains the output pixel.
    Residual branches are covered because every conv on the longest path is counted
    (an upper bound for branches that skip some of them). SRResNet x4 gives 40.
    """
    layers = _layer_list(model)
    scale = math.prod(f for kind, f in layers if kind == "up")
    radius = 0
    for phase in range(scale):
        lo = hi = phase
        for kind, value in reversed(layers):
            if kind == "conv":
                lo, hi = lo - value, hi + value
            else:
                lo, hi = lo // value, hi // value
        radius = max(radius, -lo, hi)
    return radius


@dataclass(frozen=True)
class Tile:
    """One tile: its index in row-major order, its core (the input pixels it produces output
    for) and its window (the input pixels the model reads), both as (y0, y1, x0, x1)."""

    index: int
    row: int
    col: int
    core: tuple[int, int, int, int]
    window: tuple[int, int, int, int]

    def output_box(self, scale: int) -> tuple[int, int, int, int]:
        """Where the core's output goes in the full output image, (y0, y1, x0, x1)."""
        y0, y1, x0, x1 = self.core
        return y0 * scale, y1 * scale, x0 * scale, x1 * scale

    def output_crop(self, scale: int) -> tuple[slice, slice]:
        """Slices that cut the core's output out of the window's output (rows, cols)."""
        y0, y1, x0, x1 = self.core
        wy0, _, wx0, _ = self.window
        return (slice((y0 - wy0) * scale, (y1 - wy0) * scale), slice((x0 - wx0) * scale, (x1 - wx0) * scale))


def paste(out, tile: Tile, result, scale: int, *, channels_first: bool = False) -> None:
    """Copy the centre of a tile's output ``result`` (the part its core produces) into ``out``, the
    whole output image. Arrays (H, W, C) by default; ``channels_first``: (C, H, W) tensors."""
    y0, y1, x0, x1 = tile.output_box(scale)
    rows, cols = tile.output_crop(scale)
    if channels_first:
        out[:, y0:y1, x0:x1] = result[:, rows, cols]
    else:
        out[y0:y1, x0:x1] = result[rows, cols]


def _window(start: int, stop: int, size: int, length: int, halo: int, pad: int) -> tuple[int, int]:
    # A window of `size` pixels around [start, stop), slid inside [-pad, length + pad) at the borders.
    w0 = min(max(start - halo, -pad), length + pad - size)
    return w0, w0 + size


# How positions outside the image map into it (numpy's np.pad modes, repeated for any distance):
# "mirror" = numpy "symmetric" (the edge pixel repeated: ... b a | a b c ... ), "reflect" = numpy
# "reflect" (... c b | a b c ..., PyTorch's and Real-ESRGAN's pre_pad).
PAD_MODES = ("mirror", "reflect")


def border_index(index: np.ndarray, length: int, mode: str) -> np.ndarray:
    """Image coordinates of positions ``index`` (any integers) under padding ``mode`` (PAD_MODES)."""
    if mode == "mirror":
        m = np.mod(index, 2 * length)
        return np.where(m < length, m, 2 * length - 1 - m)
    if mode != "reflect":
        raise ValueError(f"pad mode must be one of {', '.join(PAD_MODES)}, got {mode!r}")
    if length == 1:  # nothing to reflect: numpy repeats the pixel
        return np.zeros_like(index)
    period = 2 * (length - 1)
    m = np.mod(index, period)
    return np.where(m < length, m, period - m)


@dataclass(frozen=True)
class TilePlan:
    """Tiles of ``tile`` x ``tile`` input pixels on a (height, width) image, each read with a
    ``halo``-pixel margin. ``window_shape`` is the same for every tile (batchable). ``align``:
    ``tile``, ``halo`` and ``pad`` must be multiples of it, and every window starts on a multiple
    of it. ``pad``: padding around the image that windows may read, filled by ``pad_mode``
    (:data:`PAD_MODES`; see the module docstring); :meth:`read` and :meth:`window_indices` apply it."""

    height: int
    width: int
    tile: int
    halo: int
    scale: int
    align: int = 1
    pad: int = 0
    pad_mode: str = "mirror"

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"cannot tile an empty image of {self.height}x{self.width} pixels")
        if self.tile < 1 or self.halo < 0:
            raise ValueError(f"tile must be >= 1 and halo >= 0, got tile={self.tile}, halo={self.halo}")
        if self.align < 1 or self.tile % self.align or self.halo % self.align or self.pad % self.align:
            raise ValueError(f"tile {self.tile}, halo {self.halo} and pad {self.pad} must be multiples of "
                             f"align={self.align}")
        if not 0 <= self.pad <= self.halo:
            raise ValueError(f"pad must be between 0 and the halo ({self.halo}), got {self.pad}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {', '.join(PAD_MODES)}, got {self.pad_mode!r}")

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile)

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile)

    def __len__(self) -> int:
        return self.rows * self.cols

    @property
    def window_shape(self) -> tuple[int, int]:
        return self._window_size(self.height), self._window_size(self.width)

    def _window_size(self, length: int) -> int:
        padded = length + 2 * self.pad
        size = min(self.tile + 2 * self.halo, padded)
        # A window slid against the far border starts at length + pad - size: make that a multiple
        # of align too (the others start at -pad or at core start - halo, multiples already).
        return size + (padded - size) % self.align

    @property
    def output_shape(self) -> tuple[int, int]:
        return self.height * self.scale, self.width * self.scale

    def tile_at(self, index: int) -> Tile:
        row, col = divmod(index, self.cols)
        y0, x0 = row * self.tile, col * self.tile
        y1, x1 = min(y0 + self.tile, self.height), min(x0 + self.tile, self.width)
        wh, ww = self.window_shape
        wy = _window(y0, y1, wh, self.height, self.halo, self.pad)
        wx = _window(x0, x1, ww, self.width, self.halo, self.pad)
        return Tile(index, row, col, (y0, y1, x0, x1), (wy[0], wy[1], wx[0], wx[1]))

    def window_indices(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        """The image rows and columns ``tile``'s window reads (padding mapped into the image)."""
        y0, y1, x0, x1 = tile.window
        return (border_index(np.arange(y0, y1), self.height, self.pad_mode),
                border_index(np.arange(x0, x1), self.width, self.pad_mode))

    def read(self, read, tile: Tile) -> np.ndarray:
        """``tile``'s window (h, w, C) through ``read(y0, y1, x0, x1)`` (an image source's region
        reader), padded where it reaches beyond the image; one read of the region it covers."""
        y0, y1, x0, x1 = tile.window
        if y0 >= 0 and x0 >= 0 and y1 <= self.height and x1 <= self.width:
            return read(*tile.window)
        rows, cols = self.window_indices(tile)
        r0, c0 = int(rows.min()), int(cols.min())
        region = read(r0, int(rows.max()) + 1, c0, int(cols.max()) + 1)
        return np.ascontiguousarray(region[rows - r0][:, cols - c0])

    def __iter__(self) -> Iterator[Tile]:
        return (self.tile_at(i) for i in range(len(self)))

    def batches(self, batch_size: int) -> list[range]:
        """Tile indices in fixed groups of ``batch_size`` (row-major). The groups do not depend
        on what has been done already, so a resumed run computes every tile in the same batch
        as an uninterrupted one (bitwise-identical results)."""
        n = len(self)
        return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

    def input_pixels_computed(self) -> int:
        """Input pixels the model processes, halos included (for throughput accounting)."""
        wh, ww = self.window_shape
        return len(self) * wh * ww


def align_up(value: int, align: int) -> int:
    """``value`` rounded up to a multiple of ``align``."""
    return -(-value // align) * align


def plan_tiles(height: int, width: int, *, tile: int, halo: int, scale: int, align: int = 1,
               pad: int = 0, pad_mode: str = "mirror") -> TilePlan:
    """Plan tiles for an image; see :class:`TilePlan`. ``tile``, ``halo`` and ``pad`` are rounded
    up to multiples of ``align``."""
    return TilePlan(height, width, align_up(tile, align), align_up(halo, align), scale, align, align_up(pad, align),
                    pad_mode)
