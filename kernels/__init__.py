"""The ``triton`` backend of :mod:`fastsr.ops.functional` (ships as ``fastsr.kernels``).

Each op has its own module (``conv_prelu``, ``conv_silu``, ``bn_prelu``, ``shuffle_prelu``,
``mse_psnr``, ``uint8``) holding its ``@triton.jit`` kernels, host launchers and autograd. The two conv ops share
the generic conv + epilogue kernels of ``conv`` and keep only their epilogue's own parts, with one
entry point each: a ``torch.library.triton_op`` with ``register_autograd``, which serves eager
calls and ``torch.compile`` (traced as one op) alike. This module implements the backend contract
(:class:`fastsr.ops.contract.Backend`): :func:`availability` and the ops with the positional
signatures of :mod:`fastsr.ops.reference`. Triton itself is imported only when an op runs, so
``import fastsr`` stays light and the interpreter switch (``TRITON_INTERPRET=1``) can still be set
before that.
The submodules are deliberately not named after the ops: importing ``fastsr.kernels.mse`` would
rebind the package attribute ``mse`` from the function to the submodule.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_INTERPRETER_HINT = (
    "triton runs on CUDA tensors; set TRITON_INTERPRET=1 before importing triton to run its interpreter on CPU"
)


def availability(device_type: str) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device_type`` ("cuda" or "cpu") tensors, and why not."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton; Linux only)"
    if not hasattr(torch.library, "wrap_triton"):
        return False, f"the triton backend needs torch >= 2.6 (torch.library.wrap_triton); this is {torch.__version__}"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device is available to this PyTorch build"
        return True, "compiled Triton kernels on CUDA"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "Triton interpreter on CPU (TRITON_INTERPRET=1): correct but slow"
        return False, _INTERPRETER_HINT
    return False, f"triton has no support for {device_type!r} tensors"


def conv2d_prelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    slope: torch.Tensor | None,
    residual: torch.Tensor | None,
    shuffle: int,
) -> torch.Tensor:
    """Fused conv2d ('same', stride 1) + bias + pixel shuffle + PReLU + residual; see
    :func:`fastsr.functional.conv2d_prelu`. Output (N, C_out/shuffle**2, H*shuffle, W*shuffle),
    x's dtype and memory format; differentiable in x, weight, bias, slope and residual."""
    from .conv_prelu import conv2d_prelu_op

    # The pre-activation is kept only for a gradient that needs it (the residual's does not).
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, slope))
    return conv2d_prelu_op(x, weight, bias, slope, residual, int(shuffle), needs_grad)[0]


def conv2d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                skip: torch.Tensor | None) -> torch.Tensor:
    """Fused conv2d ('same', stride 1) + bias + SiLU, or SPAN's attention ``(y + skip) * (sigmoid(y) - 0.5)``
    with a skip; see :func:`fastsr.functional.conv2d_silu`. Output (N, C_out, H, W), x's dtype and
    memory format; differentiable in x, weight, bias and skip."""
    from .conv_silu import conv2d_silu_op

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, skip))
    return conv2d_silu_op(x, weight, bias, skip, needs_grad)[0]


def batch_norm_prelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    slope: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm -> PReLU -> + residual; see :func:`fastsr.ops.functional.batch_norm_prelu`.
    (y like x in its dtype and memory format, mean, biased var (C,) in the accumulation dtype);
    y is differentiable in x, weight, bias, slope and residual, mean and var are not."""
    from .bn_prelu import batch_norm_prelu_op

    return batch_norm_prelu_op(x, weight, bias, slope, residual, float(eps))


def pixel_shuffle_prelu(x: torch.Tensor, slope: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    """``prelu(pixel_shuffle(x, r), slope)``: (N, C*r*r, H, W) -> (N, C, H*r, W*r), x's dtype."""
    from .shuffle_prelu import PixelShufflePReLUFunction

    return PixelShufflePReLUFunction.apply(x, slope, int(upscale_factor))


def mse(a: torch.Tensor, b: torch.Tensor, reduction: str) -> torch.Tensor:
    """Mean squared error, one pass: (N,) per image for ``"none"``, a scalar for ``"mean"``;
    fp32 (fp64 for fp64 inputs); differentiable in both inputs."""
    from .mse_psnr import MSEFunction

    return MSEFunction.apply(a, b, reduction)


def psnr(
    sr: torch.Tensor, hr: torch.Tensor, data_range: float, y_channel: bool, crop_border: int, reduction: str
) -> torch.Tensor:
    """PSNR in dB, (N,) for ``"none"`` or their mean; Y channel and crop border fused into the
    one pass; fp32 (fp64 for fp64 inputs). Not differentiable (a metric)."""
    from .mse_psnr import psnr as _psnr

    return _psnr(sr, hr, data_range, y_channel, crop_border, reduction)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C): clamp, * 255, round half to even; NaN -> 0."""
    from .uint8 import to_uint8_forward

    return to_uint8_forward(x)
