"""Drop-in modules built on :mod:`fastsr.ops.functional`, so every backend serves a whole model.

``ConvPReLU`` is one SRGAN layer: Conv2d('same') -> [BatchNorm2d] -> [PixelShuffle(r)] ->
[PReLU] -> [+ residual]. In eval mode the BatchNorm is folded into the convolution on the fly,
so the whole layer is one fused op; in training mode the batch statistics need the conv
output first, so the BatchNorm runs between the conv and the (fused) activation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layout import as_dtype
from .ops import functional as ops


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


def fusable_batchnorm(bn: nn.BatchNorm2d) -> bool:
    """Whether a training-mode ``bn`` runs as :func:`fastsr.functional.batch_norm_prelu`: a BatchNorm2d
    with running statistics, and not one synchronised across ranks (a SyncBatchNorm2d under DDP
    all-reduces its sums between the passes; it keeps its own forward)."""
    synced = isinstance(bn, SyncBatchNorm2d) and bn.synchronising()
    return isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and not synced


def batchnorm_update(bn: nn.BatchNorm2d) -> dict:
    """The running-statistics arguments of :func:`fastsr.functional.batch_norm_prelu` for a training
    step of ``bn``, counting the step as ``BatchNorm2d.forward`` does (momentum None: the cumulative average)."""
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return {"running_mean": bn.running_mean, "running_var": bn.running_var, "momentum": momentum, "eps": bn.eps}


# Rows: the LR kernel tap (offset -1, 0, +1); columns: the HR tap it gathers. For sub-pixel 0 the
# HR taps -1, 0, +1 of HR position 2y fall on LR rows y-1, y, y; for sub-pixel 1 (2y+1) on y, y, y+1.
_NEAREST_X2_TAPS = torch.tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 0]],
                                 [[0, 0, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.float64)


def fold_nearest_upsampling(weight: torch.Tensor,
                            bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 3x3 conv after a nearest-neighbour x2 upsampling, as a conv at the low resolution followed
    by ``pixel_shuffle(2)``: ``conv(interpolate(x, 2, "nearest")) == pixel_shuffle(conv'(x), 2)``.

    ``weight`` (C_out, C_in, 3, 3) -> (4 C_out, C_in, 3, 3), output channel ``4 c + 2 i + j`` being
    sub-pixel (i, j) of channel c (pixel_shuffle's order); ``bias`` (C_out,) -> (4 C_out,). Exact,
    zero padding included (an HR tap outside the image is an LR tap outside it); the upsampled
    tensor is never built. Summed taps are computed in float64 and rounded once.
    """
    if weight.shape[2:] != (3, 3):
        raise ValueError(f"fold_nearest_upsampling needs a 3x3 kernel, got {tuple(weight.shape[2:])}")
    taps = _NEAREST_X2_TAPS.to(weight.device)
    # w'[o, i, j, c, a, b] = sum_{k,l} taps[i, a, k] * w[o, c, k, l] * taps[j, b, l]
    folded = torch.einsum("iak,ockl,jbl->oijcab", taps, weight.double(), taps)
    folded = folded.reshape(4 * weight.shape[0], weight.shape[1], 3, 3).to(weight.dtype)
    return folded, None if bias is None else bias.repeat_interleave(4)


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
        slope = as_dtype(self.slope, x.dtype)
        if self.bn is None or not self.training:
            weight, bias = self.folded_weight_bias()
            return ops.conv2d_prelu(x, as_dtype(weight, x.dtype), as_dtype(bias, x.dtype), slope, residual,
                                    shuffle=self.shuffle)
        # Training BatchNorm needs the statistics of the whole conv output before normalising: the
        # conv, then BatchNorm + PReLU + residual as one fused op (two passes each way).
        y = ops.conv2d_prelu(x, as_dtype(self.conv.weight, x.dtype), as_dtype(self.conv.bias, x.dtype))
        if self.shuffle == 1 and fusable_batchnorm(self.bn):
            return ops.batch_norm_prelu(y, self.bn.weight, self.bn.bias, slope, residual,
                                        **batchnorm_update(self.bn))
        y = self.bn(y)
        if self.shuffle > 1:
            y = F.pixel_shuffle(y, self.shuffle)
        if slope is not None:
            y = F.prelu(y, slope)
        return y if residual is None else y + residual


class ConvSiLU(nn.Module):
    """Conv2d(kernel_size, stride 1, 'same') -> SiLU, or with a ``skip`` SPAN's parameter-free attention
    ``(y + skip) * (sigmoid(y) - 0.5)``: one fused op (:func:`fastsr.functional.conv2d_silu`).

    The convolution is ``self.conv`` (an ``nn.Conv2d``), as in :class:`ConvPReLU`, so checkpoints
    and tiling see the same layout.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W); ``skip`` (N, C_out, H, W) selects the attention."""
        return ops.conv2d_silu(x, as_dtype(self.conv.weight, x.dtype), as_dtype(self.conv.bias, x.dtype), skip)


class BicubicDownscale(nn.Module):
    """Bicubic resize by ``factor`` < 1 (``F.interpolate``, A = -0.75, no antialiasing, edge pixels
    repeated): the output resize of Real-ESRGAN's x2/x3 ncnn models, whose network is x4.

    (N, C, H, W) -> (N, C, H * factor, W * factor); ``factor`` must make those whole numbers for
    the sizes it is used on. Each output pixel reads 4 x 4 input pixels within 2 of its mapped
    position: ``receptive_radius``, which tiling counts like a 5 x 5 convolution's (:mod:`fastsr.tiling`).
    """

    receptive_radius = 2

    def __init__(self, factor: float) -> None:
        super().__init__()
        if not 0 < factor < 1:
            raise ValueError(f"BicubicDownscale needs a factor in (0, 1), got {factor}")
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode="bicubic", align_corners=False)


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


# ---------------------------------------------------------------------------------------------
# BatchNorm over the global batch of all DDP ranks, on any device and process-group backend:
# torch's own nn.SyncBatchNorm is CUDA-only, so training uses SyncBatchNorm2d on every device and
# N ranks train the same model as one process with the whole batch would.


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum) over the default process group: the gradient of a
    global sum with respect to each rank's contribution is the all-reduced incoming gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all DDP ranks.

    Works on any device and process-group backend (gloo included): the per-channel sums are
    all-reduced with a differentiable all-reduce (:class:`_AllReduceSum`), so the
    backward pass gets the cross-rank terms right. Two passes (mean, then centred squares) for
    the variance, as numerically safe as the single-process BatchNorm. Without an initialised
    process group (or in eval mode) it is a plain BatchNorm2d; state dict keys are unchanged.
    """

    @staticmethod
    def synchronising() -> bool:
        """Whether statistics are all-reduced: a process group of more than one rank is running."""
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: this rank's (N, C, H, W) slice of the batch, any float dtype; returns the same
        shape and dtype (the statistics and normalisation are computed in float32)."""
        if not (self.training and self.synchronising()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        xf = x.float()
        dims = (0, 2, 3)
        count = all_reduce(xf.new_tensor([float(x.numel() // x.shape[1])]))
        mean = all_reduce(xf.sum(dims)) / count
        centred = xf - mean.view(1, -1, 1, 1)
        var = all_reduce(centred.square().sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a :class:`SyncBatchNorm2d` with a copy of its
    parameters and buffers (in place for children; returns the converted module)."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        sync = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        sync.load_state_dict(module.state_dict())
        return sync.to(next(iter(module.state_dict().values())).device).train(module.training)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child))
    return module
