"""Helpers shared by the Triton kernels: interpreter detection, Triton dtype choices, launch-grid
checks, and the upstream-gradient loader that folds PReLU backward and pixel-unshuffle into a load.
The output memory format and the accumulation dtype are :mod:`fastsr.layout`'s rules (shared by
every backend).

Index convention used by every kernel here: a 4-D image tensor is described by its
strides in (n, h, w, c) order, whatever its memory format, so NCHW and channels_last
tensors go through the same code. ``tensor.stride()`` is (n, c, h, w); :func:`nhwc_strides`
reorders it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def nhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a (N, C, H, W) tensor in (n, h, w, c) order."""
    sn, sc, sh, sw = t.stride()
    return sn, sh, sw, sc


def tl_acc_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype matching :func:`fastsr.layout.acc_dtype`."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision. fp32/fp64 use exact IEEE products (no TF32 rounding) so the
    fp32 path is as accurate as the reference; 16-bit inputs use the tensor-core default."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def check_interpreter_dtype(dtype: torch.dtype) -> None:
    """The interpreter cannot run ``tl.dot`` on bf16 (numpy has no bfloat16): say so clearly."""
    if dtype == torch.bfloat16 and interpreting():
        raise TypeError(
            "the Triton interpreter (TRITON_INTERPRET=1) cannot run bf16 tl.dot; "
            "use fp32/fp16 on CPU, or a CUDA GPU for bf16"
        )


# CUDA's launch grid limits per axis (x, y, z). Every kernel here puts its large block count (pixels
# or elements) on axis 0; axes 1 and 2 count channel blocks or split-K chunks.
MAX_GRID = (2**31 - 1, 65535, 65535)


def checked_grid(*axes: int) -> tuple[int, ...]:
    """``axes`` as a launch grid, after checking each against CUDA's limit: past it a launch fails
    with an opaque "invalid argument" on a GPU, and the interpreter checks nothing at all."""
    for axis, (size, limit) in enumerate(zip(axes, MAX_GRID, strict=False)):  # 1 to 3 axes
        if size > limit:
            raise ValueError(f"a Triton launch needs {size} programs on grid axis {axis}, over CUDA's limit of "
                             f"{limit}; this shape is too large for the triton backend (try backend='cpp')")
    return axes


def check_index_range(t: torch.Tensor, name: str) -> None:
    """Kernels index small tensors (weights, slopes) with int32 arithmetic, which is exact only
    below 2**31 elements; refuse larger ones rather than read wrong addresses."""
    if t.numel() >= 2**31:
        raise ValueError(f"{name} has {t.numel()} elements; the triton backend indexes it in int32 (< 2**31)")


@triton.jit
def pixel_coords(p, H, W):
    """(n, h, w) of flat pixel indices ``p`` over an (N, H, W) grid, w fastest. Decoded without
    the product H * W, which int32 arguments would overflow in an image of >= 2**31 pixels; with
    int64 ``p`` every result is int64, so offsets built from them are too."""
    q = p // W
    return q // H, q % H, p % W


@triton.jit
def load_upstream_grad(
    g_ptr, z_ptr, slope_ptr,
    n, h, w, co, mask,
    sgn, sgh, sgw, sgc,
    szn, szh, szw, szc,
    slope_stride,
    R: tl.constexpr,
    HAS_SLOPE: tl.constexpr,
    ACC: tl.constexpr,
):
    """Gradient w.r.t. the pre-shuffle, pre-activation conv output at (n, h, w, co).

    ``n, h, w, co`` are broadcastable int tensors indexing the conv output *before* pixel
    shuffle (co in [0, C_out)); the upstream gradient ``g`` and the saved pre-activation ``z``
    live in the shuffled output (n, co // R**2, h*R + i, w*R + j), so the un-shuffle happens
    in the address computation. Returns ``(dz, g * min(z, 0))``; the second term summed per
    output channel is the PReLU slope gradient (zeros when there is no activation).
    """
    sub = co % (R * R)
    oc = co // (R * R)
    yh = h * R + sub // R
    yw = w * R + sub % R
    oc64 = oc.to(tl.int64)  # an NCHW channel stride is H*W: oc * stride passes 2**31 in large images
    g = tl.load(g_ptr + n * sgn + yh * sgh + yw * sgw + oc64 * sgc, mask=mask, other=0.0).to(ACC)
    if HAS_SLOPE:
        z = tl.load(z_ptr + n * szn + yh * szh + yw * szw + oc64 * szc, mask=mask, other=0.0).to(ACC)
        s = tl.load(slope_ptr + oc * slope_stride, mask=mask, other=0.0).to(ACC)
        dz = tl.where(z > 0, g, g * s)
        neg = g * tl.minimum(z, 0.0)
    else:
        dz = g
        neg = tl.zeros_like(g)
    return dz, neg
