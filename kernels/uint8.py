"""Float image -> uint8 in one pass: clamp to [0, 1], * 255, round half to even, NaN -> 0, and the
(N, C, H, W) -> (N, H, W, C) transpose in the store (the last step of upscaling).

One program handles BLOCK_P pixels x all channels (C <= BLOCK_C, a power of two >= C). Rounding is
exact: with r = floor(v) and f = v - r (exact in floating point), r + 1 when f > 0.5, or f == 0.5
and r is odd; ``floor(v + 0.5)`` would round 0.49999997 up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import checked_grid, interpreting, nhwc_strides, pixel_coords, tl_acc_dtype

_BLOCK_P = 4096 if interpreting() else 256


@triton.jit
def _to_uint8_fwd_kernel(
    x_ptr, out_ptr, M, H, W, C,
    sxn, sxh, sxw, sxc,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    mask = (p < M)[:, None] & (c < C)[None, :]
    n, h, w = pixel_coords(p, H, W)
    # int64 channel offsets: an NCHW channel stride is H*W, and c * H*W passes 2**31 in large images.
    offsets = n[:, None] * sxn + h[:, None] * sxh + w[:, None] * sxw + c[None, :].to(tl.int64) * sxc
    v = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    v = tl.where(v == v, v, 0.0)  # NaN -> 0
    v = tl.minimum(tl.maximum(v, 0.0), 1.0) * 255.0
    r = tl.floor(v)
    f = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)
    tl.store(out_ptr + p[:, None] * C + c[None, :], r.to(tl.uint8), mask=mask)


def grid(pixels: int) -> tuple[int, ...]:
    """Pixel blocks, all on axis 0 (CUDA allows 2**31 - 1 there)."""
    return checked_grid(triton.cdiv(pixels, _BLOCK_P))


def to_uint8_forward(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float, any memory format -> (N, H, W, C) uint8, contiguous."""
    n, c, h, w = x.shape
    out = torch.empty((n, h, w, c), dtype=torch.uint8, device=x.device)
    m = n * h * w
    if m == 0:
        return out
    _to_uint8_fwd_kernel[grid(m)](
        x, out, m, h, w, c, *nhwc_strides(x),
        ACC=tl_acc_dtype(x.dtype), BLOCK_P=_BLOCK_P, BLOCK_C=triton.next_power_of_2(c),
    )
    return out
