"""PSNR and SSIM with the super-resolution evaluation protocol.

The protocol of the SR literature (and BasicSR): compare the luma of ITU-R BT.601 as MATLAB's
``rgb2ycbcr`` computes it, on [0, 255] values, after cropping ``scale`` pixels off each border.
Images are (N, 3, H, W) float tensors in [0, ``data_range``]; results are one value per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import functional
from .ops.reference import protocol_view


def psnr(sr: torch.Tensor, hr: torch.Tensor, *, crop_border: int = 0, y_channel: bool = True,
         data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image, (N,)."""
    return functional.psnr(sr, hr, data_range, y_channel, crop_border, "none")


def _gaussian_window(dtype: torch.dtype, device: torch.device, sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, 2 * radius + 1, 2 * radius + 1)


def ssim(sr: torch.Tensor, hr: torch.Tensor, *, crop_border: int = 0, y_channel: bool = True,
         data_range: float = 1.0) -> torch.Tensor:
    """SSIM per image, (N,): 11x11 Gaussian window (sigma 1.5), 'valid' region, as MATLAB's
    reference code, BasicSR and ``skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)`` compute it. Multi-channel images average channels."""
    sr, hr = (protocol_view(t, data_range, y_channel, crop_border) for t in (sr, hr))
    n, c, h, w = sr.shape
    if min(h, w) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 after cropping, got {h}x{w}")
    window = _gaussian_window(sr.dtype, sr.device)
    x, y = sr.reshape(n * c, 1, h, w), hr.reshape(n * c, 1, h, w)
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x**2
    var_y = F.conv2d(y * y, window) - mu_y**2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(n, -1).mean(dim=1)
