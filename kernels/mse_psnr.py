"""MSE and PSNR in one pass over both image batches, plus the MSE backward.

``_sq_err_partial_kernel`` reads each pixel of both images once (optionally cropped, optionally
converted to BT.601 luma as MATLAB's rgb2ycbcr does) and writes one fp32 (fp64 for fp64
inputs) partial sum of squared differences per (image, block). ``_finish_kernel`` (one program)
then sums each image's partials in a fixed order into the MSE, or their mean: two launches per
call, deterministic run to run (no atomics). PSNR is ``-10 * log10(mse)`` in torch on the N MSEs:
the kernel's former ``10 / log2(10)`` literal was fp32 (below), torch's log10 needs no constant.

Float constants (the data range, the luma weights and offset, the pixel count) reach the kernels
in a small tensor of the accumulation dtype, never as Python floats: Triton types a float argument
or literal as fp32, which cost fp64 inputs 1e-8 of relative error on the GPU (the interpreter
keeps Python floats in fp64, so only a GPU showed it).

Grids are one-dimensional, program = image * blocks + block: the block count of a large image
exceeds CUDA's 65535 limit of grid axes 1 and 2 (a 16400x16400 image has 131329 blocks), while
axis 0 allows 2**31 - 1 programs. Pixel and element counts come from the host (Triton types an
int >= 2**31 as int64) and program ids are int64, so offsets are exact past 2**31 elements.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastsr.constants import Y_OFFSET, Y_WEIGHTS
from fastsr.layout import acc_dtype

from .common import checked_grid, interpreting, nhwc_strides, tl_acc_dtype

# Pixels per program. GPU: 2048 pixels x C channels in flight per program with 8 warps
# (a streaming reduction, no dot: the num_warps caveat of the conv loop does not apply).
_BLOCK = 8192 if interpreting() else 2048
_NUM_WARPS = 8
# Positions in the constants tensor (``_constants``): 1 / data range, the three luma weights, the
# luma offset, the count of compared values per image. constexpr: the kernels read them as globals.
_INV_RANGE, _W0, _Y_OFF, _COUNT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(4), tl.constexpr(5)


@triton.jit
def _sq_err_partial_kernel(
    a_ptr, b_ptr, part_ptr, const_ptr,
    C, CROP, WC, PIXELS, BLOCKS,
    san, sah, saw, sac,
    sbn, sbh, sbw, sbc,
    Y_CHANNEL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """part[pid] = sum over block pid % BLOCKS of image pid // BLOCKS (PIXELS pixels of the cropped
    window, WC wide, starting at (CROP, CROP)) of (a - b)**2 over channels, or of (Y(a) - Y(b))**2
    with Y_CHANNEL; the constants (1 / data range, the luma weights W0-W2 and offset) from const_ptr
    (see ``_constants``)."""
    inv_range = tl.load(const_ptr + _INV_RANGE)
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid // BLOCKS
    p = (pid % BLOCKS) * BLOCK + tl.arange(0, BLOCK)  # int64
    mask = p < PIXELS
    h = p // WC + CROP
    w = p % WC + CROP
    a_pix = a_ptr + pid_n * san + h * sah + w * saw
    b_pix = b_ptr + pid_n * sbn + h * sbh + w * sbw
    if Y_CHANNEL:
        # Scale by 1/data_range first, as the reference does, then the MATLAB luma. The colour
        # planes are reached by adding the stride twice: 2 * sac would overflow int32 when an NCHW
        # plane holds >= 2**30 pixels (pointer arithmetic is 64-bit).
        a1, b1 = a_pix + sac, b_pix + sbc
        a2, b2 = a1 + sac, b1 + sbc
        W0, W1, W2 = tl.load(const_ptr + _W0), tl.load(const_ptr + _W0 + 1), tl.load(const_ptr + _W0 + 2)
        Y_OFF = tl.load(const_ptr + _Y_OFF)
        ya = (W0 * (tl.load(a_pix, mask=mask, other=0.0).to(ACC) * inv_range)
              + W1 * (tl.load(a1, mask=mask, other=0.0).to(ACC) * inv_range)
              + W2 * (tl.load(a2, mask=mask, other=0.0).to(ACC) * inv_range) + Y_OFF)
        yb = (W0 * (tl.load(b_pix, mask=mask, other=0.0).to(ACC) * inv_range)
              + W1 * (tl.load(b1, mask=mask, other=0.0).to(ACC) * inv_range)
              + W2 * (tl.load(b2, mask=mask, other=0.0).to(ACC) * inv_range) + Y_OFF)
        d = tl.where(mask, ya - yb, 0.0)
        total = tl.sum(d * d, axis=0)
    else:
        acc = tl.zeros((BLOCK,), dtype=ACC)
        # Step the pointers one channel plane at a time: pointer arithmetic is 64-bit, whereas
        # c * sac could overflow int32 in a gigapixel image.
        for _ in range(C):
            va = tl.load(a_pix, mask=mask, other=0.0).to(ACC) * inv_range
            vb = tl.load(b_pix, mask=mask, other=0.0).to(ACC) * inv_range
            d = va - vb
            acc += d * d
            a_pix += sac
            b_pix += sbc
        total = tl.sum(acc, axis=0)
    tl.store(part_ptr + pid, total)  # part is (N, BLOCKS), contiguous: index pid


@triton.jit
def _finish_kernel(part_ptr, out_ptr, const_ptr, N, BLOCKS, MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out[n] = mse_n = sum(part[n, :]) / count (the compared values per image, from const_ptr);
    with MEAN, out[0] = their mean over images instead. A single program: the sums are tiny.
    n * BLOCKS + idx stays below N * BLOCKS, the partial kernel's grid size (< 2**31)."""
    count = tl.load(const_ptr + _COUNT)
    total = tl.sum(tl.zeros((BLOCK,), dtype=ACC), axis=0)
    for n in range(N):
        acc = tl.zeros((BLOCK,), dtype=ACC)
        for b0 in range(0, BLOCKS, BLOCK):
            idx = b0 + tl.arange(0, BLOCK)
            acc += tl.load(part_ptr + n * BLOCKS + idx, mask=idx < BLOCKS, other=0.0)
        value = tl.sum(acc, axis=0) / count
        if MEAN:
            total += value
        else:
            tl.store(out_ptr + n, value)
    if MEAN:
        tl.store(out_ptr, total / N)


@triton.jit
def _mse_bwd_kernel(
    a_ptr, b_ptr, scale_ptr, da_ptr, db_ptr,
    H, W, ELEMENTS, BLOCKS,
    san, sah, saw, sac,
    sbn, sbh, sbw, sbc,
    sdn, sdh, sdw, sdc,
    sen, seh, sew, sec,
    HAS_DA: tl.constexpr, HAS_DB: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """da = scale[n] * (a - b), db = -da, with scale[n] = 2 * dL/dmse_n / ELEMENTS, ELEMENTS = C*H*W
    per image; program pid covers block pid % BLOCKS of image pid // BLOCKS."""
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid // BLOCKS
    i = (pid % BLOCKS) * BLOCK + tl.arange(0, BLOCK)  # int64 element index (c, h, w), w fastest
    mask = i < ELEMENTS
    # Decoded without the products H*W and C*H*W, which int32 arguments would overflow.
    q = i // W
    w = i % W
    h = q % H
    c = q // H
    va = tl.load(a_ptr + pid_n * san + h * sah + w * saw + c * sac, mask=mask, other=0.0).to(ACC)
    vb = tl.load(b_ptr + pid_n * sbn + h * sbh + w * sbw + c * sbc, mask=mask, other=0.0).to(ACC)
    g = tl.load(scale_ptr + pid_n).to(ACC) * (va - vb)
    if HAS_DA:
        tl.store(da_ptr + pid_n * sdn + h * sdh + w * sdw + c * sdc, g.to(da_ptr.dtype.element_ty), mask=mask)
    if HAS_DB:
        tl.store(db_ptr + pid_n * sen + h * seh + w * sew + c * sec, (-g).to(db_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=64)
def _constants(acc: torch.dtype, device: torch.device, data_range: float, count: int) -> torch.Tensor:
    """The kernels' float constants in the accumulation dtype: 1 / data range, the luma weights and
    offset, and the number of compared values per image (exact in fp64). Cached: a training loss
    calls this every step with the same shapes, and each new tensor is a blocking host-to-GPU copy.
    Read-only for the kernels."""
    return torch.tensor([1.0 / data_range, *Y_WEIGHTS, Y_OFFSET, float(count)], dtype=acc, device=device)


def partial_grid(images: int, per_image: int) -> tuple[int, ...]:
    """The one-dimensional grid of the per-block kernels: ``images`` x the blocks of ``per_image``
    pixels (forward) or elements (backward), all on axis 0 (CUDA's limit there is 2**31 - 1)."""
    return checked_grid(images * triton.cdiv(per_image, _BLOCK))


def reduce_squared_error(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    data_range: float = 1.0,
    y_channel: bool = False,
    crop_border: int = 0,
    psnr: bool = False,
    reduction: str = "none",
) -> torch.Tensor:
    """MSE (or PSNR in dB with ``psnr``) per image, (N,), or their mean for ``reduction="mean"``,
    in fp32 (fp64 for fp64 inputs). a, b: (N, C, H, W), any memory format; ``y_channel`` compares
    the BT.601 luma of RGB inputs; ``crop_border`` pixels are dropped on each side."""
    n, c, h, w = a.shape
    hc, wc = h - 2 * crop_border, w - 2 * crop_border
    blocks = triton.cdiv(hc * wc, _BLOCK)
    acc = acc_dtype(a.dtype)
    consts = _constants(acc, a.device, data_range, (1 if y_channel else c) * hc * wc)
    part = torch.empty((n, blocks), dtype=acc, device=a.device)
    _sq_err_partial_kernel[partial_grid(n, hc * wc)](
        a, b, part, consts, c, crop_border, wc, hc * wc, blocks, *nhwc_strides(a), *nhwc_strides(b),
        Y_CHANNEL=y_channel, ACC=tl_acc_dtype(a.dtype), BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )
    mean = reduction == "mean" and not psnr  # a PSNR's mean is over the images' PSNRs, below
    out = torch.empty(() if mean else (n,), dtype=acc, device=a.device)
    _finish_kernel[(1,)](part, out, consts, n, blocks, MEAN=mean, ACC=tl_acc_dtype(a.dtype), BLOCK=1024, num_warps=4)
    if not psnr:
        return out
    out = -10.0 * torch.log10(out)  # 10 * log10(1 / mse), with torch's accurate log10
    return out.mean() if reduction == "mean" else out


def mse_backward(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, needs: tuple[bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the per-image MSE (N,) w.r.t. a and b given ``grad`` (N,), in the inputs' dtypes."""
    n, c, h, w = a.shape
    scale = (grad.to(acc_dtype(a.dtype)) * (2.0 / (c * h * w))).contiguous()
    da = torch.empty_like(a) if needs[0] else None
    db = torch.empty_like(b) if needs[1] else None
    da_arg = da if da is not None else a
    db_arg = db if db is not None else b
    blocks = triton.cdiv(c * h * w, _BLOCK)
    _mse_bwd_kernel[partial_grid(n, c * h * w)](
        a, b, scale, da_arg, db_arg, h, w, c * h * w, blocks,
        *nhwc_strides(a), *nhwc_strides(b), *nhwc_strides(da_arg), *nhwc_strides(db_arg),
        HAS_DA=needs[0], HAS_DB=needs[1], ACC=tl_acc_dtype(a.dtype), BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )
    return da, db


class MSEFunction(torch.autograd.Function):
    """mse(a, b, reduction) with a Triton backward; saves a and b."""

    @staticmethod
    def forward(ctx, a, b, reduction):
        ctx.reduction = reduction
        ctx.save_for_backward(a, b)
        return reduce_squared_error(a, b, reduction=reduction)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        n = a.shape[0]
        per_image = grad.expand(n) / n if ctx.reduction == "mean" else grad
        da, db = mse_backward(per_image, a, b, ctx.needs_input_grad[:2])
        return da, db, None


def psnr(
    sr: torch.Tensor, hr: torch.Tensor, data_range: float, y_channel: bool, crop_border: int, reduction: str
) -> torch.Tensor:
    """PSNR in dB per image (N,) or their mean; fp32 (fp64 for fp64 inputs)."""
    return reduce_squared_error(
        sr, hr, data_range=data_range, y_channel=y_channel, crop_border=crop_border, psnr=True, reduction=reduction
    )
