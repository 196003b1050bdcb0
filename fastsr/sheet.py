"""A picture to look at: ground truth, bicubic and the model side by side (:func:`comparison_sheet`).

One row per image, one column each for the ground truth, the bicubic baseline and the model. Every
column of a row shows the same crop (the square of the ground truth with the most fine detail),
enlarged with nearest-neighbour resampling so that single pixels stay visible. The captions give
each column's PSNR as the caller measured it (``fastsr eval`` and ``fastsr demo``: Y channel,
whole image). Drawn with Pillow alone, with its default font.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .atomic import atomic_path
from .constants import Y_WEIGHTS
from .errors import UserError

PAD = 6  # pixels around and between the cells
FONT_SIZE = 13
ZOOM = 3  # nearest-neighbour enlargement of the crops
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


class SheetError(UserError):
    """A comparison sheet that cannot be made (its path, or images that do not match)."""


@dataclass(frozen=True)
class SheetRow:
    """One image of a sheet: the same crop of its ground truth, bicubic and model images
    ((size, size, 3) uint8 each), where the crop lies (x0, y0, x1, y1), and the PSNRs in dB."""

    name: str
    ground_truth: np.ndarray
    bicubic: np.ndarray
    model: np.ndarray
    box: tuple[int, int, int, int]
    bicubic_psnr: float
    model_psnr: float

    def captions(self) -> tuple[str, str, str]:
        """The text under each column's crop: the image and where the crop is; the PSNRs."""
        x0, y0 = self.box[:2]
        gain = self.model_psnr - self.bicubic_psnr
        return (f"{self.name}, crop at ({x0}, {y0})", f"PSNR {self.bicubic_psnr:.2f} dB",
                f"PSNR {self.model_psnr:.2f} dB ({gain:+.2f})")


def check_sheet_path(path: str | os.PathLike) -> Path:
    """``path`` if a sheet can be written there (a .png in an existing folder); :class:`SheetError`
    otherwise. For commands to call before their work, not after it."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SheetError(f"--sheet {path}: the sheet is a PNG; name a .png file")
    if not path.resolve().parent.is_dir():
        raise SheetError(f"--sheet {path}: folder {path.resolve().parent} does not exist")
    return path


def informative_crop(image: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the ``size`` x ``size`` square (smaller for a smaller image) with the most
    fine detail in the (H, W, 3) ``image``: the largest sum of squared differences between
    neighbouring luma values. Not the largest variance, which picks a smooth edge between a bright
    and a dark area; fine texture and small print are where upscalers differ. The first such square
    in row-major order on ties (a flat image: the top-left corner)."""
    height, width = image.shape[:2]
    size = max(1, min(size, height, width))
    luma = image[..., :3].astype(np.float64) @ np.asarray(Y_WEIGHTS)
    detail = np.zeros_like(luma)
    detail[:, :-1] += np.diff(luma, axis=1) ** 2
    detail[:-1, :] += np.diff(luma, axis=0) ** 2
    sums = _window_sums(detail, size)
    y0, x0 = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(x0), int(y0), int(x0) + size, int(y0) + size


def _window_sums(a: np.ndarray, k: int) -> np.ndarray:
    """Sums over every k x k window of ``a`` (from a summed-area table: any image size, one pass)."""
    table = np.pad(a.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return table[k:, k:] - table[:-k, k:] - table[k:, :-k] + table[:-k, :-k]


def sheet_row(name: str, ground_truth, bicubic, model, bicubic_psnr: float, model_psnr: float, *,
              crop: int = 64) -> SheetRow:
    """A :class:`SheetRow` from whole images: (H, W, 3) uint8 arrays or (1, 3, H, W) / (3, H, W) float
    tensors in [0, 1], all the same size. Only the crop is kept, so rows of large images are small."""
    images = [_as_uint8(x) for x in (ground_truth, bicubic, model)]
    if len({x.shape for x in images}) != 1:
        raise SheetError(f"{name}: ground truth, bicubic and model images differ in size "
                         f"({', '.join('x'.join(map(str, x.shape[1::-1])) for x in images)})")
    x0, y0, x1, y1 = box = informative_crop(images[0], crop)
    gt, bic, sr = (np.ascontiguousarray(x[y0:y1, x0:x1]) for x in images)
    return SheetRow(name, gt, bic, sr, box, float(bicubic_psnr), float(model_psnr))


def _as_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 from an array (gray is repeated) or a float tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
        image = t.reshape(t.shape[-3:]).permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (1, 3):
        raise SheetError(f"expected an (H, W, 3) uint8 image or a float tensor, got {array.dtype} {array.shape}")
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def comparison_sheet(path: str | os.PathLike, rows: Sequence[SheetRow], *, zoom: int = ZOOM,
                     model_label: str = "model", note: str = "") -> Path:
    """Write the comparison sheet of ``rows`` (:func:`render_sheet`) to the PNG ``path``, atomically;
    returns the path. The captions and the note are also stored as the PNG's ``Description`` text."""
    path = check_sheet_path(path)
    if not rows:
        raise SheetError(f"--sheet {path}: no images to show")
    sheet = render_sheet(rows, zoom=zoom, model_label=model_label, note=note)
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", "\n".join([" | ".join(row.captions()) for row in rows] + ([note] if note else [])))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG", optimize=True, pnginfo=info)
    return path


def render_sheet(rows: Sequence[SheetRow], *, zoom: int = ZOOM, model_label: str = "model",
                 note: str = "") -> Image.Image:
    """The sheet as an RGB image: a header line naming the columns (ground truth, bicubic,
    ``model_label``), then per row its three crops enlarged ``zoom`` times (nearest neighbour) with
    their captions below (:meth:`SheetRow.captions`), then ``note`` (e.g. how PSNR was measured).
    Each column is as wide as the largest enlarged crop, or its widest caption if that is wider;
    :data:`PAD` pixels around and between the cells."""
    face = font()
    line = face.getbbox("Ag")[3] + 4
    header = ("ground truth", "bicubic", model_label)
    cells = [row.ground_truth.shape[0] * zoom for row in rows]
    texts = [header, *(row.captions() for row in rows)]
    column = max([*cells, *(_text_width(face, text) for group in texts for text in group)])
    width = max(3 * column + 4 * PAD, _text_width(face, note) + 2 * PAD)
    height = PAD + line + sum(cell + line + PAD for cell in cells) + (line if note else 0)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(header):
        draw.text((PAD + i * (column + PAD), PAD), text, fill=INK, font=face)
    y = PAD + line
    for row, cell in zip(rows, cells, strict=True):
        crops = (row.ground_truth, row.bicubic, row.model)
        for i, (crop, text) in enumerate(zip(crops, row.captions(), strict=True)):
            x = PAD + i * (column + PAD)
            sheet.paste(Image.fromarray(crop).resize((cell, cell), Image.NEAREST), (x, y))
            draw.text((x, y + cell + 2), text, fill=INK, font=face)
        y += cell + line + PAD
    if note:
        draw.text((PAD, y), note, fill=INK, font=face)
    return sheet


def font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The font of the labels: Pillow's default at FONT_SIZE (the small bitmap font where that is missing)."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ImportError):  # Pillow < 10.1 or without FreeType: the small bitmap font
        return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    return int(font.getlength(text)) + 1 if text else 0
