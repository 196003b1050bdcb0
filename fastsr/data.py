"""Training data: HR image folders -> random HR crops -> bicubic LR, with augmentation.

The LR images are made exactly as :mod:`fastsr.evaluate` makes them (antialiased bicubic,
MATLAB ``imresize``-like, then rounded to 8 bits as a real LR image would be), so training
and evaluation see the same degradation.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger("fastsr")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
# How a crop picks its image: each image equally often, or in proportion to its pixel count.
SAMPLINGS = ("image", "area")

# Photos shipped in scikit-image, split once and for all: the default model never sees HELD_OUT.
HELD_OUT_PHOTOS = ("astronaut", "coffee", "rocket")
TRAIN_PHOTOS = (
    "chelsea", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
    "camera", "moon", "coins", "brick", "grass", "gravel", "clock", "text", "page", "cell",
)


def find_images(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root``, searched recursively, in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB (grayscale is replicated, alpha dropped)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
        return np.asarray(im.convert("RGB"))


def to_float(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> (1, C, H, W) float32 in [0, 1]."""
    # np.array copies: PIL-backed arrays are read-only, which torch.from_numpy warns about.
    return torch.from_numpy(np.array(image, order="C")).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round a [0, 1] float image to the 8-bit grid (what saving it as PNG would do)."""
    return x.clamp(0.0, 1.0).mul(255.0).round().div(255.0)


def bicubic_downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """(N, C, H, W) HR in [0, 1] -> (N, C, H//scale, W//scale) LR: antialiased bicubic, 8-bit."""
    h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
    hr = hr[..., : h * scale, : w * scale]
    return quantize(F.interpolate(hr.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False))


def bicubic_upscale(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The bicubic baseline: (N, C, h, w) -> (N, C, h*scale, w*scale), clamped to [0, 1]."""
    return F.interpolate(lr.float(), scale_factor=scale, mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def export_skimage_photos(out_dir: str | os.PathLike, names: tuple[str, ...] = TRAIN_PHOTOS) -> list[Path]:
    """Write photos shipped in scikit-image as PNG files into ``out_dir`` (no download)."""
    import skimage.data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        image = getattr(skimage.data, name)()
        images = image[:2] if isinstance(image, tuple) else (image,)  # stereo pair: both views
        for i, im in enumerate(images):
            path = out_dir / (f"{name}.png" if len(images) == 1 else f"{name}_{i}.png")
            Image.fromarray(np.asarray(im)).save(path)
            written.append(path)
    return written


class RandomCrops:
    """Random HR crops with flips, rot90 and (optionally) a random colour-channel permutation.

    ``sampling="image"`` picks each image equally often; ``"area"`` in proportion to its pixel
    count, so every pixel of the set is equally likely to be seen (a folder mixing 0.3 Mpx and
    3 Mpx photos otherwise shows each pixel of the small ones ten times as often).
    ``shrink < 1`` takes each crop from its image shrunk by a random factor in ``[shrink, 1]``
    (antialiased bicubic, rounded to 8 bits like a photo saved at that size): the same photos at
    more scales, so detail as dense as in a smaller picture.

    Every crop is drawn from its own ``torch.Generator`` seeded from ``(seed, step, index)``,
    where ``index`` is the crop's place in the global batch of that step. So the data position
    of a run is just its step: resuming needs no sampler state, DataLoader workers can build
    batches in any order, and DDP ranks (each taking a slice of the global batch) together see
    exactly the batch a single process would.
    Images smaller than the crop and unreadable files are skipped with a warning and counted
    in :attr:`skipped`; a folder without any image, or without a usable one, is an error.
    """

    def __init__(self, root: str | os.PathLike, crop: int, scale: int, *, permute_channels: bool = True,
                 seed: int = 0, sampling: str = "image", shrink: float = 1.0) -> None:
        if crop % scale:
            raise ValueError(f"crop ({crop}) must be a multiple of scale ({scale})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if not 0.0 < shrink <= 1.0:
            raise ValueError(f"shrink must be in (0, 1], got {shrink}")
        self.crop, self.scale, self.permute_channels, self.seed = crop, scale, permute_channels, seed
        self.sampling, self.shrink = sampling, shrink
        self.images: list[torch.Tensor] = []
        self.skipped: dict[str, str] = {}
        paths = find_images(root)
        if not paths:
            raise ValueError(f"no images (png/jpg/tif/bmp/webp) found under {root}")
        for path in paths:
            try:
                image = load_rgb(path)
            except (OSError, ValueError) as exc:
                self.skipped[str(path)] = f"unreadable ({exc})"
                continue
            if min(image.shape[:2]) < crop:
                self.skipped[str(path)] = f"smaller than the {crop}px crop ({image.shape[1]}x{image.shape[0]})"
                continue
            self.images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous())
        for path, why in self.skipped.items():
            log.warning("skipping %s: %s", path, why)
        if self.skipped:
            log.warning("skipped %d of %d images under %s", len(self.skipped), len(paths), root)
        if not self.images:
            raise ValueError(f"none of the {len(paths)} images under {root} is usable (see warnings)")
        # Cumulative pixel counts: image i owns the draws in [ends[i-1], ends[i]).
        self._area_ends = list(itertools.accumulate(im.shape[1] * im.shape[2] for im in self.images))

    def _generator(self, step: int, index: int) -> torch.Generator:
        # SeedSequence mixes the three integers into well-spread, independent seeds.
        words = np.random.SeedSequence([self.seed, step, index]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)

    def crop_at(self, step: int, index: int) -> torch.Tensor:
        """Crop number ``index`` of ``step``'s global batch: (3, crop, crop) uint8."""
        g = self._generator(step, index)
        randint = lambda high: int(torch.randint(high, (1,), generator=g))  # noqa: E731
        if self.sampling == "area":
            image = self.images[bisect.bisect_right(self._area_ends, randint(self._area_ends[-1]))]
        else:
            image = self.images[randint(len(self.images))]
        side = self.crop  # of the region cut out, before any shrinking
        if self.shrink < 1.0:  # draws nothing when off, so the crops of shrink=1 stay what they were
            factor = self.shrink + (1.0 - self.shrink) * float(torch.rand((), generator=g))
            side = min(round(self.crop / factor), image.shape[1], image.shape[2])
        top = randint(image.shape[1] - side + 1)
        left = randint(image.shape[2] - side + 1)
        crop = image[:, top : top + side, left : left + side]
        if side != self.crop:
            crop = F.interpolate(crop[None].float(), size=(self.crop, self.crop), mode="bicubic", antialias=True,
                                 align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
        if randint(2):
            crop = crop.flip(-1)
        crop = torch.rot90(crop, randint(4), dims=(-2, -1))
        if self.permute_channels:
            crop = crop[torch.randperm(3, generator=g)]
        return crop

    def batch(self, step: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops ``start .. start+count-1`` of ``step``'s global batch:
        (LR (count, 3, crop/scale, crop/scale), HR (count, 3, crop, crop)), float32 in [0, 1]."""
        hr = torch.stack([self.crop_at(step, start + i) for i in range(count)]).float().div_(255.0)
        return bicubic_downscale(hr, self.scale), hr


class StepBatches(torch.utils.data.Dataset):
    """Dataset indexed by training step: item ``step`` is this rank's slice of that step's batch.

    Use with ``DataLoader(batch_size=None, sampler=range(first_step, last_step))``.
    """

    def __init__(self, crops: RandomCrops, start: int, count: int) -> None:
        self.crops, self.start, self.count = crops, start, count

    def __len__(self) -> int:
        return 2**62  # indexed by step, unbounded

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.crops.batch(step, self.start, self.count)
