"""Evaluate a model against bicubic on HR images: HR -> bicubic LR -> model, PSNR/SSIM on Y."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import metrics
from .data import bicubic_downscale, bicubic_upscale, find_images, load_rgb, quantize, to_float


@dataclass
class ImageScore:
    name: str
    bicubic_psnr: float
    model_psnr: float
    bicubic_ssim: float
    model_ssim: float

    @property
    def gain_db(self) -> float:
        return self.model_psnr - self.bicubic_psnr

    def as_dict(self) -> dict:
        return {**asdict(self), "gain_db": self.gain_db}


# Called with each score and the images it was measured on: HR, bicubic, model, (1, 3, H, W) in [0, 1].
OnImage = Callable[[ImageScore, torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.inference_mode()
def score_image(model: nn.Module, hr: torch.Tensor, scale: int, name: str = "",
                on_image: OnImage | None = None) -> ImageScore:
    """Score one (1, 3, H, W) HR image in [0, 1]; the model runs in fp32 on the model's device.
    ``on_image`` sees the images too (a comparison sheet is made from them)."""
    lr = bicubic_downscale(hr, scale)
    hr = hr[..., : lr.shape[-2] * scale, : lr.shape[-1] * scale]
    device = next(model.parameters()).device
    sr = quantize(model(lr.to(device)).float().cpu())
    bic = quantize(bicubic_upscale(lr, scale))
    kw = {"crop_border": scale, "y_channel": True}
    score = ImageScore(
        name,
        float(metrics.psnr(bic, hr, **kw)), float(metrics.psnr(sr, hr, **kw)),
        float(metrics.ssim(bic, hr, **kw)), float(metrics.ssim(sr, hr, **kw)),
    )
    if on_image is not None:
        on_image(score, hr, bic, sr)
    return score


def score_folder(model: nn.Module, paths: list[Path] | str | os.PathLike, scale: int,
                 on_image: OnImage | None = None) -> list[ImageScore]:
    if not isinstance(paths, list):
        paths = find_images(paths)
    was_training = model.training
    model.eval()
    try:
        return [score_image(model, to_float(load_rgb(p)), scale, p.stem, on_image) for p in paths]
    finally:
        model.train(was_training)


def format_table(scores: list[ImageScore]) -> str:
    """A Markdown table: per image and mean, bicubic vs model PSNR (dB) / SSIM."""
    lines = ["| image | bicubic PSNR | model PSNR | gain (dB) | bicubic SSIM | model SSIM |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in scores:
        lines.append(f"| {s.name} | {s.bicubic_psnr:.2f} | {s.model_psnr:.2f} | {s.gain_db:+.2f} | "
                     f"{s.bicubic_ssim:.4f} | {s.model_ssim:.4f} |")
    if scores:
        mean = lambda attr: sum(getattr(s, attr) for s in scores) / len(scores)  # noqa: E731
        lines.append(f"| **mean** | {mean('bicubic_psnr'):.2f} | {mean('model_psnr'):.2f} | "
                     f"{mean('model_psnr') - mean('bicubic_psnr'):+.2f} | {mean('bicubic_ssim'):.4f} | "
                     f"{mean('model_ssim'):.4f} |")
    return "\n".join(lines)
