"""The backend contract: what every backend module provides (docs/architecture.md).

A backend is a module (``fastsr.ops.reference``, ``fastsr.kernels``, ``fastsr.csrc.backend``)
with these functions, positional arguments exactly as here. :mod:`fastsr.ops.functional`
validates the inputs, so a backend may assume them valid. Every output keeps the input's memory
format (channels_last in, channels_last out) and, for the image ops, its dtype; the reductions
return fp32 (fp64 for fp64 inputs). Results stay within the tolerance rule of the float64
reference (tests/test_conformance.py checks it for every backend).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

OPS = ("conv2d_prelu", "conv2d_silu", "batch_norm_prelu", "pixel_shuffle_prelu", "mse", "psnr", "to_uint8")

# Training kernels a fast backend may have, declared in its ``OPTIONAL`` dict (op -> the (device type,
# dtype) pairs it serves); where the backend in effect has none, the caller uses PyTorch's own (the
# torch backend's is PyTorch's: torch.optim.Adam). The reference holds each one's plain form, the
# oracle of the tests, of first-use validation (dispatch.optional_kernel) and of `fastsr selftest`.
#   adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay) -> None:
#       torch.optim.Adam's update in place for lists of tensors (reference.adam_step).
OPTIONAL_OPS = ("adam_step",)


@runtime_checkable
class Backend(Protocol):
    def availability(self, device_type: str) -> tuple[bool, str]:
        """Whether this backend serves ``device_type`` ("cpu" or "cuda") tensors, and if not, why."""

    def conv2d_prelu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     slope: torch.Tensor | None, residual: torch.Tensor | None, shuffle: int) -> torch.Tensor:
        """prelu(pixel_shuffle(conv2d(x, weight, bias, 'same'), shuffle), slope) + residual:
        (N, C_in, H, W) -> (N, C_out / shuffle**2, H * shuffle, W * shuffle); slope None = no activation."""

    def conv2d_silu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    skip: torch.Tensor | None) -> torch.Tensor:
        """y = conv2d(x, weight, bias, 'same'); silu(y) when skip is None, else SPAN's parameter-free
        attention (y + skip) * (sigmoid(y) - 0.5): (N, C_in, H, W) -> (N, C_out, H, W)."""

    def batch_norm_prelu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor | None,
                         residual: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training-mode BatchNorm -> PReLU -> + residual: (y, mean, var). y = prelu((x - mean) / sqrt(var + eps)
        * weight + bias, slope) + residual, (N, C, H, W) like x; mean and the biased var (C,) of x over
        (N, H, W) in the accumulation dtype, for the running statistics (no gradient flows through them).
        weight and bias (C,) in the accumulation dtype; slope None = no activation. Differentiable in
        x, weight, bias, slope and residual."""

    def pixel_shuffle_prelu(self, x: torch.Tensor, slope: torch.Tensor, upscale_factor: int) -> torch.Tensor:
        """prelu(pixel_shuffle(x, r), slope): (N, C r^2, H, W) -> (N, C, H r, W r)."""

    def mse(self, a: torch.Tensor, b: torch.Tensor, reduction: str) -> torch.Tensor:
        """Mean squared error per image (N,) for "none", or their mean for "mean"."""

    def psnr(self, sr: torch.Tensor, hr: torch.Tensor, data_range: float, y_channel: bool, crop_border: int,
             reduction: str) -> torch.Tensor:
        """PSNR in dB per image (N,) or their mean; BT.601 luma with ``y_channel``; borders cropped."""

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C): clamp, * 255, round half to even, NaN -> 0."""
