"""Drop-in modules built on :mod:`fastsr.functional`, so every backend serves a whole model.

``ConvPReLU`` is one SRGAN layer: Conv2d('same') -> [BatchNorm2d] -> [PixelShuffle(r)] ->
[PReLU] -> [+ residual]. In eval mode the BatchNorm is folded into the convolution on the fly,
so the whole layer is one fused op; in training mode the batch statistics need the conv
output first, so the BatchNorm runs between the conv and the (fused) activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as ops


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None,
                   bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm2d into the conv before it: ``bn(conv(x)) == conv'(x)``.

    ``weight`` (C_out, C_in, k, k) and ``bias`` (C_out,) or None; returns the folded weight and
    bias in ``weight``'s dtype. Computed in float64 (the fold multiplies every weight once, so
    fp32/bf16 weights keep their own rounding only); differentiable. The one fold that
    ``ConvPReLU``, :func:`fastsr.fuse` and :func:`fastsr.optimize` use.
    """
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.weight is not None:  # affine=False BatchNorms have no weight and bias
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double() + bn.bias.double()
    if bias is not None:
        shift = shift + bias.double() * scale
    return (weight.double() * scale.view(-1, 1, 1, 1)).to(weight.dtype), shift.to(weight.dtype)


class ConvPReLU(nn.Module):
    """Conv2d(kernel_size, stride 1, 'same') -> [BN] -> [PixelShuffle(shuffle)] -> [activation].

    ``activation``: "prelu" (learned, ``num_slopes`` = 1 or out_channels / shuffle**2),
    "relu", "leaky_relu" (fixed ``negative_slope``) or None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        bias: bool = True,
        batch_norm: bool = False,
        activation: str | None = "prelu",
        shuffle: int = 1,
        num_slopes: int = 1,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else None
        self.shuffle = shuffle
        self.activation = activation
        if activation == "prelu":
            self.slope = nn.Parameter(torch.full((num_slopes,), 0.25))
        elif activation in ("relu", "leaky_relu"):
            value = 0.0 if activation == "relu" else negative_slope
            self.register_buffer("slope", torch.tensor([value]), persistent=False)
        elif activation is None:
            self.slope = None
        else:
            raise ValueError(f"unknown activation {activation!r}; use prelu, relu, leaky_relu or None")

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conv weight and bias with the eval-mode BatchNorm folded in (``y = scale * conv + shift``)."""
        if self.bn is None:
            return self.conv.weight, self.conv.bias
        return fold_batchnorm(self.conv.weight, self.conv.bias, self.bn)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        slope = None if self.slope is None else self.slope.to(x.dtype)
        if self.bn is None or not self.training:
            weight, bias = self.folded_weight_bias()
            bias = None if bias is None else bias.to(x.dtype)
            return ops.conv2d_prelu(x, weight.to(x.dtype), bias, slope, residual, shuffle=self.shuffle)
        # Training BatchNorm needs the statistics of the whole conv output before normalising.
        bias = None if self.conv.bias is None else self.conv.bias.to(x.dtype)
        y = ops.conv2d_prelu(x, self.conv.weight.to(x.dtype), bias)
        y = self.bn(y)
        if self.shuffle > 1:
            y = F.pixel_shuffle(y, self.shuffle)
        if slope is not None:
            y = F.prelu(y, slope)
        return y if residual is None else y + residual


class ResidualBlock(nn.Module):
    """SRGAN residual block: conv3x3 (no bias) - BN - PReLU - conv3x3 (no bias) - BN, + skip."""

    def __init__(self, channels: int = 64, *, batch_norm: bool = True) -> None:
        super().__init__()
        self.conv1 = ConvPReLU(channels, channels, 3, bias=not batch_norm, batch_norm=batch_norm)
        self.conv2 = ConvPReLU(channels, channels, 3, bias=not batch_norm, batch_norm=batch_norm, activation=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x), residual=x)


class UpsampleBlock(nn.Module):
    """SRGAN x2 upsampling: conv3x3 C -> 4C, PixelShuffle(2), PReLU, as one fused op."""

    def __init__(self, channels: int = 64, factor: int = 2) -> None:
        super().__init__()
        self.conv = ConvPReLU(channels, channels * factor * factor, 3, shuffle=factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
