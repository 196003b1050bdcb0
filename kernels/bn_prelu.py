"""batch_norm_prelu: training-mode BatchNorm (batch statistics) -> PReLU -> + residual, forward and
backward, in two passes each way (the C++ kernels' math, csrc/cpu/batch_norm_prelu_cpu.cpp).

Every kernel tiles the (N, H, W) pixels x C channels of an image as (BLOCK_P pixels) x (BLOCK_C
channels), with strides in (n, h, w, c) order (NCHW and channels_last alike) and int64 offsets.

Forward: ``_batch_norm_stats_kernel`` writes per tile and channel the tile's mean m and the sums of
x - m and (x - m)^2; the host merges the tiles in float64 (Chan et al.'s pairwise update). Both steps
stay accurate when the mean is large against the spread, unlike sum(x^2)/n - mean^2.
``_batch_norm_prelu_fwd_kernel`` then applies y = prelu(xhat * weight + bias) + residual, xhat =
(x - mean) * invstd (torch's order of operations, so the PReLU kink falls where torch's does).

Backward: ``_batch_norm_prelu_bwd_sums_kernel`` writes per-tile sums of g', g' * xhat and (with a
slope) g * v where v <= 0, g' being the gradient through the PReLU; the host adds the tiles up in
float64, in a fixed order (deterministic, no atomics); ``_batch_norm_prelu_bwd_kernel`` then writes
grad_x = weight * invstd * (g' - mean(g') - xhat * mean(g' * xhat)).

Entry point, eager and under ``torch.compile`` alike: the ``torch.library.triton_op``
``fastsr_triton::batch_norm_prelu`` with ``register_autograd``; mean and var are statistics for
the running averages, not differentiable outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastsr.layout import acc_dtype, memory_format_of

from .common import checked_grid, interpreting, nhwc_strides, pixel_coords, tl_acc_dtype

# Interpreter: large tiles (its cost is per program); GPU: 128 pixels x 32 channels, 4 warps.
_BLOCK_P, _BLOCK_C = (1024, 64) if interpreting() else (128, 32)


def grid(pixels: int, channels: int) -> tuple[int, ...]:
    """Every kernel's grid: pixel blocks on axis 0 (CUDA allows 2**31 - 1), channel blocks on axis 1."""
    return checked_grid(triton.cdiv(pixels, _BLOCK_P), triton.cdiv(channels, _BLOCK_C))


@triton.jit
def _tile(M, H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: (n, h, w) of its pixels as int64 columns, its channels c as a row, the
    pixel mask (a column), the channel mask (a row) and the tile's mask."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n, h, w = pixel_coords(p, H, W)
    p_mask = (p < M)[:, None]
    c_mask = c < C
    return n[:, None], h[:, None], w[:, None], c, p_mask, c_mask, p_mask & c_mask[None, :]


@triton.jit
def _at(n, h, w, c, sn, sh, sw, sc):
    """Element offsets of a tile; int64 channel offsets, as an NCHW channel stride is H*W."""
    return n * sn + h * sh + w * sw + c[None, :].to(tl.int64) * sc


@triton.jit
def _normalise(x, coef_ptr, c, c_mask, C, ACC: tl.constexpr):
    """(xhat, v) of a tile of x: xhat = (x - mean) * invstd, v = xhat * weight + bias, with the
    coefficients' rows (mean, invstd, weight, bias) of ``coef`` (4, C)."""
    mean = tl.load(coef_ptr + c, mask=c_mask, other=0.0).to(ACC)
    invstd = tl.load(coef_ptr + C + c, mask=c_mask, other=0.0).to(ACC)
    weight = tl.load(coef_ptr + 2 * C + c, mask=c_mask, other=0.0).to(ACC)
    bias = tl.load(coef_ptr + 3 * C + c, mask=c_mask, other=0.0).to(ACC)
    xhat = (x - mean[None, :]) * invstd[None, :]
    return xhat, xhat * weight[None, :] + bias[None, :]


@triton.jit
def _prelu_grad(g, v, slope_ptr, c, c_mask, slope_stride, HAS_SLOPE: tl.constexpr, ACC: tl.constexpr):
    """(g', g * v where v <= 0): the gradient through the PReLU at v, and the terms of the slope's."""
    if HAS_SLOPE:
        s = tl.load(slope_ptr + c * slope_stride, mask=c_mask, other=0.0).to(ACC)
        pos = v > 0
        gp = tl.where(pos, g, g * s[None, :])
        neg = tl.where(pos, 0.0, g * v)
    else:
        gp = g
        neg = tl.zeros_like(g)
    return gp, neg


@triton.jit
def _batch_norm_stats_kernel(
    x_ptr, part_ptr,
    M, H, W, C,
    sxn, sxh, sxw, sxc,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per channel c of this program's tile, into part (3, pixel blocks, C), contiguous: [0] the tile's
    mean m as summed, [1] the sum of x - m and [2] the sum of (x - m)^2. The sums of deviations are
    small, so their rounding error scales with the spread, not the mean (corrected two-pass)."""
    n, h, w, c, p_mask, c_mask, mask = _tile(M, H, W, C, BLOCK_P, BLOCK_C)
    x = tl.load(x_ptr + _at(n, h, w, c, sxn, sxh, sxw, sxc), mask=mask, other=0.0).to(ACC)
    rough = tl.sum(x, axis=0) / tl.sum(p_mask.to(ACC), axis=0)  # the last tile may hold fewer pixels
    d = tl.where(mask, x - rough[None, :], 0.0)
    row = part_ptr + tl.program_id(0).to(tl.int64) * C + c
    plane = tl.num_programs(0).to(tl.int64) * C
    tl.store(row, rough, mask=c_mask)
    tl.store(row + plane, tl.sum(d, axis=0), mask=c_mask)
    tl.store(row + 2 * plane, tl.sum(d * d, axis=0), mask=c_mask)


@triton.jit
def _batch_norm_prelu_fwd_kernel(
    x_ptr, coef_ptr, slope_ptr, res_ptr, y_ptr,
    M, H, W, C,
    sxn, sxh, sxw, sxc,
    srn, srh, srw, src,
    syn, syh, syw, syc,
    slope_stride,
    HAS_SLOPE: tl.constexpr, HAS_RES: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = prelu((x - mean) * invstd * weight + bias, slope) + residual."""
    n, h, w, c, _, c_mask, mask = _tile(M, H, W, C, BLOCK_P, BLOCK_C)
    x = tl.load(x_ptr + _at(n, h, w, c, sxn, sxh, sxw, sxc), mask=mask, other=0.0).to(ACC)
    _, v = _normalise(x, coef_ptr, c, c_mask, C, ACC)
    if HAS_SLOPE:
        s = tl.load(slope_ptr + c * slope_stride, mask=c_mask, other=0.0).to(ACC)
        v = tl.where(v > 0, v, v * s[None, :])
    if HAS_RES:
        v += tl.load(res_ptr + _at(n, h, w, c, srn, srh, srw, src), mask=mask, other=0.0).to(ACC)
    tl.store(y_ptr + _at(n, h, w, c, syn, syh, syw, syc), v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _batch_norm_prelu_bwd_sums_kernel(
    g_ptr, x_ptr, coef_ptr, slope_ptr, part_ptr,
    M, H, W, C,
    sgn, sgh, sgw, sgc,
    sxn, sxh, sxw, sxc,
    slope_stride,
    HAS_SLOPE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """part[k, pid_p, c] = the tile's sum in channel c of g' (k = 0), g' * xhat (k = 1) and, with a slope,
    g * v where v <= 0 (k = 2). part is (2 or 3, pixel blocks, C), contiguous."""
    n, h, w, c, _, c_mask, mask = _tile(M, H, W, C, BLOCK_P, BLOCK_C)
    g = tl.load(g_ptr + _at(n, h, w, c, sgn, sgh, sgw, sgc), mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + _at(n, h, w, c, sxn, sxh, sxw, sxc), mask=mask, other=0.0).to(ACC)
    xhat, v = _normalise(x, coef_ptr, c, c_mask, C, ACC)
    gp, neg = _prelu_grad(g, v, slope_ptr, c, c_mask, slope_stride, HAS_SLOPE, ACC)  # 0 off the tile, as g
    row = part_ptr + tl.program_id(0).to(tl.int64) * C + c
    plane = tl.num_programs(0).to(tl.int64) * C
    tl.store(row, tl.sum(gp, axis=0), mask=c_mask)
    tl.store(row + plane, tl.sum(gp * xhat, axis=0), mask=c_mask)
    if HAS_SLOPE:
        tl.store(row + 2 * plane, tl.sum(neg, axis=0), mask=c_mask)


@triton.jit
def _batch_norm_prelu_bwd_kernel(
    g_ptr, x_ptr, coef_ptr, gcoef_ptr, slope_ptr, dx_ptr,
    M, H, W, C,
    sgn, sgh, sgw, sgc,
    sxn, sxh, sxw, sxc,
    sdn, sdh, sdw, sdc,
    slope_stride,
    HAS_SLOPE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = gain * (g' - mean(g') - xhat * mean(g' * xhat)), with the rows (gain = weight * invstd,
    mean(g'), mean(g' * xhat)) of ``gcoef`` (3, C)."""
    n, h, w, c, _, c_mask, mask = _tile(M, H, W, C, BLOCK_P, BLOCK_C)
    g = tl.load(g_ptr + _at(n, h, w, c, sgn, sgh, sgw, sgc), mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + _at(n, h, w, c, sxn, sxh, sxw, sxc), mask=mask, other=0.0).to(ACC)
    xhat, v = _normalise(x, coef_ptr, c, c_mask, C, ACC)
    gp, _ = _prelu_grad(g, v, slope_ptr, c, c_mask, slope_stride, HAS_SLOPE, ACC)
    gain = tl.load(gcoef_ptr + c, mask=c_mask, other=0.0).to(ACC)
    mean_g = tl.load(gcoef_ptr + C + c, mask=c_mask, other=0.0).to(ACC)
    mean_gx = tl.load(gcoef_ptr + 2 * C + c, mask=c_mask, other=0.0).to(ACC)
    dx = gain[None, :] * (gp - mean_g[None, :] - xhat * mean_gx[None, :])
    tl.store(dx_ptr + _at(n, h, w, c, sdn, sdh, sdw, sdc), dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _slope_stride(slope: torch.Tensor | None) -> int:
    return 0 if slope is None or slope.numel() == 1 else slope.stride(0)


def _statistics(part: torch.Tensor, pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel from the stats kernel's per-tile partials, merged in float64: a
    tile's mean is m + sum(x - m) / count and its M2 = sum((x - m)^2) - sum(x - m)^2 / count; the
    total M2 = sum of the tiles' M2 + sum of count * (tile mean - mean)^2. Returned in part's dtype."""
    rough, dev, sq = part.double()
    counts = pixels - _BLOCK_P * torch.arange(rough.shape[0], dtype=torch.float64, device=part.device)
    counts = counts.clamp(max=_BLOCK_P)[:, None]
    tile_mean = rough + dev / counts
    mean = (counts * tile_mean).sum(0) / pixels
    m2 = (sq - dev.square() / counts).sum(0) + (counts * (tile_mean - mean).square()).sum(0)
    return mean.to(part.dtype), (m2 / pixels).clamp(min=0).to(part.dtype)  # >= 0 despite rounding


def _coefficients(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """(4, C) rows mean, invstd, weight, bias in mean's dtype. invstd comes from the var returned (in
    the accumulation dtype), so the backward recomputes bit for bit the xhat and v of the forward."""
    invstd = 1.0 / torch.sqrt(var.double() + eps)
    return torch.stack([mean, invstd.to(mean.dtype), weight.to(mean.dtype), bias.to(mean.dtype)])


def batch_norm_prelu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor | None,
                             residual: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, ...]:
    """(y like x in its dtype and memory format, mean, biased var (C,) in the accumulation dtype)."""
    n, c, h, w = x.shape
    launch = grid(n * h * w, c)
    consts = dict(ACC=tl_acc_dtype(x.dtype), BLOCK_P=_BLOCK_P, BLOCK_C=_BLOCK_C, num_warps=4)
    part = torch.empty((3, launch[0], c), dtype=acc_dtype(x.dtype), device=x.device)
    wrap_triton(_batch_norm_stats_kernel)[launch](x, part, n * h * w, h, w, c, *nhwc_strides(x), **consts)
    mean, var = _statistics(part, n * h * w)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    res = residual if residual is not None else y
    wrap_triton(_batch_norm_prelu_fwd_kernel)[launch](
        x, _coefficients(mean, var, weight, bias, eps), slope if slope is not None else y, res, y,
        n * h * w, h, w, c, *nhwc_strides(x), *nhwc_strides(res), *nhwc_strides(y), _slope_stride(slope),
        HAS_SLOPE=slope is not None, HAS_RES=residual is not None, **consts,
    )
    return y, mean, var


def batch_norm_prelu_backward(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                              weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor | None,
                              eps: float) -> tuple[torch.Tensor, ...]:
    """(grad_x like x, grad_weight, grad_bias, grad_slope like slope or a 0-element tensor without one)."""
    n, c, h, w = x.shape
    launch = grid(n * h * w, c)
    consts = dict(HAS_SLOPE=slope is not None, ACC=tl_acc_dtype(x.dtype), BLOCK_P=_BLOCK_P, BLOCK_C=_BLOCK_C,
                  num_warps=4)
    coef = _coefficients(mean, var, weight, bias, eps)
    slope_arg = slope if slope is not None else x
    part = torch.empty((2 + (slope is not None), launch[0], c), dtype=mean.dtype, device=x.device)
    wrap_triton(_batch_norm_prelu_bwd_sums_kernel)[launch](
        grad, x, coef, slope_arg, part, n * h * w, h, w, c, *nhwc_strides(grad), *nhwc_strides(x),
        _slope_stride(slope), **consts,
    )
    sums = part.double().sum(1)
    gcoef = torch.stack([weight.double() * coef[1].double(), sums[0] / (n * h * w), sums[1] / (n * h * w)])
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    wrap_triton(_batch_norm_prelu_bwd_kernel)[launch](
        grad, x, coef, gcoef.to(mean.dtype), slope_arg, dx, n * h * w, h, w, c,
        *nhwc_strides(grad), *nhwc_strides(x), *nhwc_strides(dx), _slope_stride(slope), **consts,
    )
    # Copies: rows of ``sums`` are views of one tensor, and a custom op's outputs may not alias.
    grad_slope = x.new_empty(0)
    if slope is not None:
        per_channel = sums[2].sum() if slope.numel() == 1 else sums[2]
        grad_slope = per_channel.reshape(slope.shape).to(slope.dtype, copy=True)
    return dx, sums[1].to(weight.dtype, copy=True), sums[0].to(bias.dtype, copy=True), grad_slope


@triton_op("fastsr_triton::batch_norm_prelu", mutates_args=())
def batch_norm_prelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor | None,
                        residual: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): see :func:`batch_norm_prelu_forward`."""
    return batch_norm_prelu_forward(x, weight, bias, slope, residual, eps)


@triton_op("fastsr_triton::batch_norm_prelu_backward", mutates_args=())
def batch_norm_prelu_backward_op(
    grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, slope: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Traceable :func:`batch_norm_prelu_backward` for the op's autograd formula."""
    return batch_norm_prelu_backward(grad, x, mean, var, weight, bias, slope, eps)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, slope, residual, eps = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.eps = eps
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, mean, var, weight, bias, slope)


def _backward(ctx, grad, _grad_mean, _grad_var):
    x, mean, var, weight, bias, slope = ctx.saved_tensors
    grad_x, grad_w, grad_b, grad_slope = batch_norm_prelu_backward_op(grad, x, mean, var, weight, bias, slope,
                                                                      ctx.eps)
    need = ctx.needs_input_grad
    return (grad_x if need[0] else None, grad_w if need[1] else None, grad_b if need[2] else None,
            grad_slope if slope is not None and need[3] else None, grad if ctx.has_residual else None, None)


batch_norm_prelu_op.register_autograd(_backward, setup_context=_setup_context)
