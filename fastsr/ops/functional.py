"""The fused SRGAN ops. Each validates its inputs, then dispatches to a backend.

``backend=None`` uses the backend in effect (:func:`fastsr.get_backend`); ``"auto"`` picks per
call from the tensor's device. All ops accept fp32, fp16 and bf16 (fp32 accumulation) and
fp64 (for ``gradcheck``), in NCHW or channels_last memory format.
"""

from __future__ import annotations

import torch

from ..layout import acc_dtype, as_dtype
from .dispatch import resolve

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_image_batch(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp32/fp16/bf16/fp64), got {t.dtype}")
    if 0 in t.shape[1:]:
        raise ValueError(f"{name} has an empty channel or spatial dimension: shape {tuple(t.shape)}")


def _autocast(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast the inputs of a convolution as ``torch.autocast`` casts ``F.conv2d``'s.

    The custom ops of the cpp and triton backends have no autocast kernel, so without this they
    would run in fp32 inside an autocast region while the torch backend runs in bf16/fp16
    (twice as slow on CPUs with AMX, and a different result). fp64 is never cast, as in autocast.
    """
    if not torch.is_autocast_enabled(x.device.type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(x.device.type)
    low = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(as_dtype(t, dtype) if t is not None and t.dtype in low else t for t in (x, *tensors))


def _check_devices(x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Every tensor argument is a tensor on ``x``'s device. Backends read raw pointers: a weight on
    another device (a meta tensor above all) would be read as uninitialised memory, not refused."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on device {t.device} but x is on {x.device}; every tensor argument "
                             f"must be on x's device")


def _check_dtypes(x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Every tensor argument has ``x``'s dtype (after autocast's casts): a mixed call would be
    computed in a dtype nobody asked for, differently on each backend."""
    for name, t in tensors.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")


def _check_factor(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_slope(slope: torch.Tensor, channels: int) -> None:
    if slope.numel() not in (1, channels):
        raise ValueError(f"slope must have 1 or {channels} elements (one per output channel), got {slope.numel()}")


def _check_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shuffle: int = 1) -> None:
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"weight must be (C_out, C_in, K, K) with odd K, got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects {weight.shape[1]} input channels but x has {x.shape[1]}")
    _check_dtypes(x, weight=weight, bias=bias)
    _check_factor("shuffle", shuffle)
    if weight.shape[0] % (shuffle * shuffle):
        raise ValueError(f"C_out={weight.shape[0]} is not divisible by shuffle**2 = {shuffle * shuffle}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def conv2d_prelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    slope: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    shuffle: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = prelu(pixel_shuffle(conv2d(x, weight, bias, stride 1, 'same' padding), shuffle), slope) + residual``.

    Shapes: ``x`` (N, C_in, H, W); ``weight`` (C_out, C_in, K, K) with odd K; ``bias`` (C_out,);
    output (N, C_out / shuffle**2, H * shuffle, W * shuffle). ``slope`` has 1 or C_out / shuffle**2
    elements (``None``: no activation; ReLU is slope 0, LeakyReLU a fixed slope). ``residual``
    has the output's shape and is added after the activation. Output dtype = ``x.dtype``, or the
    autocast dtype inside ``torch.autocast`` (all inputs are cast to it, as for ``F.conv2d``).
    """
    _check_image_batch("x", x)
    if weight is None:
        raise TypeError("weight must be a torch.Tensor, got None")
    _check_devices(x, weight=weight, bias=bias, slope=slope, residual=residual)
    x, weight, bias, slope, residual = _autocast(x, weight, bias, slope, residual)
    _check_conv(x, weight, bias, shuffle)
    _check_dtypes(x, slope=slope, residual=residual)
    n, _, h, w = x.shape
    out_shape = (n, weight.shape[0] // (shuffle * shuffle), h * shuffle, w * shuffle)
    if slope is not None:
        _check_slope(slope, out_shape[1])
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual must have the output's shape {out_shape}, got {tuple(residual.shape)}")
    return resolve(backend, x, "conv2d_prelu").conv2d_prelu(x, weight, bias, slope, residual, shuffle)


def conv2d_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = conv2d(x, weight, bias, stride 1, 'same' padding)``, then ``silu(y) = y * sigmoid(y)``, or
    with ``skip`` SPAN's parameter-free attention ``(y + skip) * (sigmoid(y) - 0.5)``.

    Both are ``(y + a) * (sigmoid(y) - b)``: (a, b) = (0, 0) for SiLU, (skip, 0.5) for the attention
    (Wan et al., SPAN: the block's last conv output gates itself plus the block input).
    Shapes: ``x`` (N, C_in, H, W); ``weight`` (C_out, C_in, K, K) with odd K; ``bias`` (C_out,);
    ``skip`` and the output (N, C_out, H, W). Output dtype = ``x.dtype``, or the autocast dtype
    inside ``torch.autocast``.
    """
    _check_image_batch("x", x)
    if weight is None:
        raise TypeError("weight must be a torch.Tensor, got None")
    _check_devices(x, weight=weight, bias=bias, skip=skip)
    x, weight, bias, skip = _autocast(x, weight, bias, skip)
    _check_conv(x, weight, bias)
    _check_dtypes(x, skip=skip)
    out_shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    if skip is not None and tuple(skip.shape) != out_shape:
        raise ValueError(f"skip must have the output's shape {out_shape}, got {tuple(skip.shape)}")
    return resolve(backend, x, "conv2d_silu").conv2d_silu(x, weight, bias, skip)


def batch_norm_prelu(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    slope: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """Training-mode ``BatchNorm2d`` -> PReLU -> ``+ residual`` in two passes each way (statistics, then
    one elementwise pass; the backward likewise): ``prelu(batch_norm(x, training=True), slope) + residual``.

    ``x`` (N, C, H, W), normalised with its own batch statistics over (N, H, W); ``weight`` and
    ``bias`` (C,) (None: 1 and 0, an ``affine=False`` BatchNorm); ``slope`` 1 or C elements (None:
    no activation); ``residual`` like ``x``. ``running_mean`` / ``running_var`` (C,), when given,
    are updated in place as ``F.batch_norm(training=True)`` does (unbiased variance, ``momentum``).
    Output: ``x``'s shape, dtype and memory format. Statistics and normalisation in fp32 (fp64 for fp64).
    """
    _check_image_batch("x", x)
    _check_devices(x, weight=weight, bias=bias, slope=slope, residual=residual)
    channels, count = x.shape[1], x.numel() // x.shape[1]
    if count < 2:
        raise ValueError(f"batch_norm_prelu needs more than one value per channel, got shape {tuple(x.shape)}")
    acc = acc_dtype(x.dtype)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
    weight = torch.ones(channels, dtype=acc, device=x.device) if weight is None else as_dtype(weight, acc)
    bias = torch.zeros(channels, dtype=acc, device=x.device) if bias is None else as_dtype(bias, acc)
    if slope is not None:
        _check_slope(slope, channels)
        slope = as_dtype(slope, x.dtype)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    _check_dtypes(x, residual=residual)
    impl = resolve(backend, x, "batch_norm_prelu")
    y, mean, var = impl.batch_norm_prelu(x, weight, bias, slope, residual, float(eps))
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(as_dtype(mean, running_mean.dtype), momentum)
        if running_var is not None:
            running_var.lerp_(as_dtype(var * (count / (count - 1)), running_var.dtype), momentum)
    return y


def pixel_shuffle_prelu(
    x: torch.Tensor, slope: torch.Tensor, upscale_factor: int = 2, *, backend: str | None = None
) -> torch.Tensor:
    """``prelu(pixel_shuffle(x, r), slope)``: (N, C*r*r, H, W) -> (N, C, H*r, W*r)."""
    _check_image_batch("x", x)
    _check_devices(x, slope=slope)
    _check_factor("upscale_factor", upscale_factor)
    _check_dtypes(x, slope=slope)
    r = upscale_factor
    if x.shape[1] % (r * r):
        raise ValueError(f"channels ({x.shape[1]}) must be divisible by upscale_factor**2 = {r * r}")
    _check_slope(slope, x.shape[1] // (r * r))
    return resolve(backend, x, "pixel_shuffle_prelu").pixel_shuffle_prelu(x, slope, r)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    _check_image_batch("first image batch", a)
    _check_image_batch("second image batch", b)
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def mse(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean", *, backend: str | None = None) -> torch.Tensor:
    """Mean squared error in one pass. ``"mean"``: a scalar; ``"none"``: one value per image, (N,).

    Accumulates in fp32 (fp64 for fp64 inputs) and returns that dtype.
    """
    _check_pair(a, b)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return resolve(backend, a, "mse").mse(a, b, reduction)


def psnr(
    sr: torch.Tensor,
    hr: torch.Tensor,
    data_range: float = 1.0,
    y_channel: bool = False,
    crop_border: int = 0,
    reduction: str = "none",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """PSNR in dB per image, (N,) (``reduction="mean"``: their mean).

    ``y_channel`` compares the BT.601 luma (MATLAB ``rgb2ycbcr``) of RGB inputs; ``crop_border``
    pixels are dropped on each side first (the SR protocol crops ``scale``).
    """
    _check_pair(sr, hr)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if y_channel and sr.shape[1] != 3:
        raise ValueError(f"y_channel=True needs RGB images (3 channels), got {sr.shape[1]}")
    if crop_border < 0 or 2 * crop_border >= min(sr.shape[-2:]):
        raise ValueError(f"crop_border={crop_border} leaves nothing of a {sr.shape[-2]}x{sr.shape[-1]} image")
    return resolve(backend, sr, "psnr").psnr(sr, hr, float(data_range), bool(y_channel), int(crop_border), reduction)


def to_uint8(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C), contiguous: clamp, * 255, round half to
    even, NaN -> 0. Computed in fp32 (fp64 for fp64 input); either memory format in. The last
    step of upscaling: one pass where the plain expression takes four."""
    _check_image_batch("x", x)
    return resolve(backend, x, "to_uint8").to_uint8(x)
