"""Fused pixel shuffle + PReLU, forward and backward.

Both kernels tile the *input* (N, C*r*r, H, W) as (BLOCK_P pixels) x (BLOCK_C channels); channel
ci of pixel (n, h, w) goes to output (n, ci // r**2, h*r + i, w*r + j) with (i, j) = divmod(ci % r**2, r).
Backward loads the upstream gradient through the same un-shuffled address and writes
per-program partial sums of g * min(x, 0) per input channel; the host folds them into the slope
gradient in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsr.layout import acc_dtype, memory_format_of

from .common import checked_grid, interpreting, load_upstream_grad, nhwc_strides, pixel_coords, tl_acc_dtype

# Interpreter: large tiles (cost is per program); GPU: 64 pixels x 32 channels, 4 warps.
_BLOCK_P, _BLOCK_C = (256, 64) if interpreting() else (64, 32)


def grid(pixels: int, channels: int) -> tuple[int, ...]:
    """Both kernels' grid: pixel blocks on axis 0 (CUDA allows 2**31 - 1), channel blocks on axis 1."""
    return checked_grid(triton.cdiv(pixels, _BLOCK_P), triton.cdiv(channels, _BLOCK_C))


@triton.jit
def _pixel_shuffle_prelu_fwd_kernel(
    x_ptr, slope_ptr, out_ptr,
    M, H, W, C_in,
    sxn, sxh, sxw, sxc,
    son, soh, sow, soc,
    slope_stride,
    R: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    ci = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < M
    ci_mask = ci < C_in
    n, h, w = pixel_coords(p, H, W)
    n, h, w = n[:, None], h[:, None], w[:, None]
    mask = p_mask[:, None] & ci_mask[None, :]
    # int64 channel offsets: an NCHW channel stride is H*W, and ci * H*W passes 2**31 in large images.
    ci_off = ci[None, :].to(tl.int64) * sxc
    v = tl.load(x_ptr + n * sxn + h * sxh + w * sxw + ci_off, mask=mask, other=0.0).to(ACC)
    sub = ci % (R * R)
    oc = ci // (R * R)
    s = tl.load(slope_ptr + oc * slope_stride, mask=ci_mask, other=0.0).to(ACC)
    v = tl.where(v > 0, v, v * s[None, :])
    yh = h * R + (sub // R)[None, :]
    yw = w * R + (sub % R)[None, :]
    oc_off = oc[None, :].to(tl.int64) * soc
    tl.store(out_ptr + n * son + yh * soh + yw * sow + oc_off, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixel_shuffle_prelu_bwd_kernel(
    g_ptr, x_ptr, slope_ptr, dx_ptr, ds_ptr,
    M, H, W, C_in,
    sgn, sgh, sgw, sgc,
    sxn, sxh, sxw, sxc,
    sdn, sdh, sdw, sdc,
    slope_stride,
    R: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = g_unshuffled * (x > 0 ? 1 : slope); ds_ptr[pid_p, ci] = sum over the tile's pixels of
    g_unshuffled * min(x, 0)."""
    pid_p = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    ci = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < M
    ci_mask = ci < C_in
    n, h, w = pixel_coords(p, H, W)
    n, h, w = n[:, None], h[:, None], w[:, None]
    mask = p_mask[:, None] & ci_mask[None, :]
    # Un-shuffled load of g only (no z: the activation input here is x itself, in input layout).
    g, _ = load_upstream_grad(
        g_ptr, g_ptr, slope_ptr, n, h, w, ci[None, :], mask,
        sgn, sgh, sgw, sgc, 0, 0, 0, 0, 0, R, False, ACC,
    )
    ci64 = ci[None, :].to(tl.int64)  # int64 channel offsets, as in the forward
    v = tl.load(x_ptr + n * sxn + h * sxh + w * sxw + ci64 * sxc, mask=mask, other=0.0).to(ACC)
    s = tl.load(slope_ptr + (ci // (R * R)) * slope_stride, mask=ci_mask, other=0.0).to(ACC)
    dx = tl.where(v > 0, g, g * s[None, :])
    tl.store(dx_ptr + n * sdn + h * sdh + w * sdw + ci64 * sdc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    ds = tl.sum(g * tl.minimum(v, 0.0), axis=0)
    tl.store(ds_ptr + pid_p * C_in + ci, ds, mask=ci_mask)


def _slope_stride(slope: torch.Tensor) -> int:
    return 0 if slope.numel() == 1 else slope.stride(0)


def pixel_shuffle_prelu_forward(x: torch.Tensor, slope: torch.Tensor, r: int) -> torch.Tensor:
    """(N, C*r*r, H, W) -> (N, C, H*r, W*r) in x's dtype and memory format; slope (1,) or (C,)."""
    n, c_in, h, w = x.shape
    out = torch.empty((n, c_in // (r * r), h * r, w * r), dtype=x.dtype, device=x.device,
                      memory_format=memory_format_of(x))
    _pixel_shuffle_prelu_fwd_kernel[grid(n * h * w, c_in)](
        x, slope, out, n * h * w, h, w, c_in, *nhwc_strides(x), *nhwc_strides(out), _slope_stride(slope),
        R=r, ACC=tl_acc_dtype(x.dtype), BLOCK_P=_BLOCK_P, BLOCK_C=_BLOCK_C, num_warps=4,
    )
    return out


def pixel_shuffle_prelu_backward(
    grad_out: torch.Tensor, x: torch.Tensor, slope: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx like x, dslope like slope, summed from fp32 per-tile partials)."""
    n, c_in, h, w = x.shape
    launch = grid(n * h * w, c_in)
    dx = torch.empty_like(x, memory_format=memory_format_of(x))
    ds_part = torch.empty((launch[0], c_in), dtype=acc_dtype(x.dtype), device=x.device)
    _pixel_shuffle_prelu_bwd_kernel[launch](
        grad_out, x, slope, dx, ds_part, n * h * w, h, w, c_in,
        *nhwc_strides(grad_out), *nhwc_strides(x), *nhwc_strides(dx), _slope_stride(slope),
        R=r, ACC=tl_acc_dtype(x.dtype), BLOCK_P=_BLOCK_P, BLOCK_C=_BLOCK_C, num_warps=4,
    )
    per_ci = ds_part.sum(0)
    ds = per_ci.view(-1, r * r).sum(1) if slope.numel() > 1 else per_ci.sum().view(1)
    return dx, ds.to(slope.dtype)


class PixelShufflePReLUFunction(torch.autograd.Function):
    """Autograd wrapper; saves x and slope."""

    @staticmethod
    def forward(ctx, x, slope, r):
        ctx.r = r
        ctx.save_for_backward(x, slope)
        return pixel_shuffle_prelu_forward(x, slope, r)

    @staticmethod
    def backward(ctx, grad_out):
        x, slope = ctx.saved_tensors
        dx, ds = pixel_shuffle_prelu_backward(grad_out, x, slope, ctx.r)
        return (dx if ctx.needs_input_grad[0] else None), (ds if ctx.needs_input_grad[1] else None), None
