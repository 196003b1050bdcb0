"""The ``torch`` backend: each fused op as a plain PyTorch composition.

These functions are the oracle every other backend is tested against, so they stay
obviously correct rather than fast. Inputs are validated in :mod:`fastsr.ops.functional`; the
contract they implement is :class:`fastsr.ops.contract.Backend`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..constants import Y_OFFSET, Y_WEIGHTS
from ..layout import acc_dtype


def availability(device_type: str) -> tuple[bool, str]:
    return True, "plain PyTorch, always available"


def conv2d_prelu(x, weight, bias, slope, residual, shuffle):
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)
    if shuffle > 1:
        y = F.pixel_shuffle(y, shuffle)
    if slope is not None:
        y = F.prelu(y, slope.to(y.dtype))
    if residual is not None:
        y = y + residual
    return y


def conv2d_silu(x, weight, bias, skip):
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)
    if skip is None:
        return F.silu(y)
    return (y + skip) * (torch.sigmoid(y) - 0.5)


def batch_norm_prelu(x, weight, bias, slope, residual, eps):
    y = F.batch_norm(x, None, None, weight.to(x.dtype), bias.to(x.dtype), training=True, eps=eps)
    if slope is not None:
        y = F.prelu(y, slope.to(x.dtype))
    if residual is not None:
        y = y + residual
    with torch.no_grad():
        var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=(0, 2, 3), correction=0)
    return y, mean, var


def pixel_shuffle_prelu(x, slope, upscale_factor):
    return F.prelu(F.pixel_shuffle(x, upscale_factor), slope.to(x.dtype))


def mse(a, b, reduction):
    acc = acc_dtype(a.dtype)
    per_image = (a.to(acc) - b.to(acc)).square().flatten(1).mean(dim=1)
    return per_image if reduction == "none" else per_image.mean()


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 1, H, W) luma in [16/255, 235/255] (MATLAB rgb2ycbcr)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return Y_WEIGHTS[0] * r + Y_WEIGHTS[1] * g + Y_WEIGHTS[2] * b + Y_OFFSET


def protocol_view(x: torch.Tensor, data_range: float, y_channel: bool, crop_border: int) -> torch.Tensor:
    """What an SR metric compares: ``x`` in the accumulation dtype, scaled to [0, 1], with
    ``crop_border`` pixels dropped on each side, then reduced to luma if ``y_channel``."""
    x = x.to(acc_dtype(x.dtype)) / data_range
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
    return rgb_to_y(x) if y_channel else x


def psnr(sr, hr, data_range, y_channel, crop_border, reduction):
    sr, hr = (protocol_view(t, data_range, y_channel, crop_border) for t in (sr, hr))
    per_image = 10.0 * torch.log10(1.0 / mse(sr, hr, "none"))
    return per_image if reduction == "none" else per_image.mean()


def to_uint8(x):
    y = x if x.dtype == torch.float64 else x.float()
    y = torch.nan_to_num(y, nan=0.0).clamp(0, 1) * 255
    return y.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # round(): half to even


@torch.no_grad()
def adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay):
    """torch.optim.Adam's update, in place, one tensor at a time (L2 weight decay, no amsgrad): each
    step count gains 1, then ``m = lerp(m, g, 1 - beta1)``, ``v = beta2 v + (1 - beta2) g^2`` and
    ``p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``, ``g`` the gradient plus
    ``weight_decay * p``."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step += 1
        t = step.item()
        g = g + weight_decay * p if weight_decay else g
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
