"""The generic conv + epilogue kernels of the fused conv ops (:mod:`.conv_prelu`, :mod:`.conv_silu`):
conv2d (stride 1, 'same') + bias + pixel shuffle + activation + residual, forward and backward.

Forward: one implicit-GEMM kernel, M = N*H*W output pixels, N = C_out, K = KS*KS*C_in.
The reduction index is flattened over (kh, kw, c) with c fastest, so the 9x9 head with
C_in = 3 is 243 reduction elements (four BLOCK_K = 64 steps) instead of 81 mostly masked
per-tap iterations, and for C_in = 64 each BLOCK_K = 64 step is one tap with contiguous
channels (a vector load in channels_last). 'same' padding is a load mask, never a padded copy.
The epilogue (bias, pixel-shuffle address, activation ``ACT``: PReLU, SiLU or SPAN's attention,
residual add, cast) runs on the fp32 accumulator before the single store. The pixel count M is
passed from the host (Triton types an int argument >= 2**31 as int64) and pixel offsets are
int64, so gigapixel tensors index correctly.

Backward (all Triton):
* input gradient: the same implicit GEMM over (kh, kw, co) reading the weights flipped and
  transposed by index arithmetic; the upstream gradient is loaded through
  :func:`.common.load_upstream_grad`, which un-shuffles and applies the PReLU derivative on the fly;
* weight gradient: a split-K GEMM over output pixels, dW[co, (kh, kw, c)] = dz^T @ im2col(x),
  whose programs with pid_n == 0 also emit the bias and PReLU-slope partial sums (the dz tile is
  already in registers); partials are summed on the host in a fixed order (deterministic);
* residual gradient: the upstream gradient itself (the ops' autograd formulas return it).
SiLU and the attention have no derivative here: :mod:`.conv_silu` applies theirs first and calls
the backward without an activation.

The kernels are launched through ``wrap_triton``, so the same launchers run eagerly and inside the
ops' ``torch.library.triton_op`` under ``torch.compile``; ``fastsr_triton::conv2d_backward`` is
the traceable backward the ops' ``register_autograd`` formulas call.

Every ``@triton.jit`` helper here is inlined into the kernel that calls it (no call overhead).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastsr.layout import acc_dtype, memory_format_of

from .common import (
    check_index_range,
    check_interpreter_dtype,
    checked_grid,
    dot_precision,
    interpreting,
    load_upstream_grad,
    nhwc_strides,
    pixel_coords,
    tl_acc_dtype,
)


def _configs(shapes: list[tuple[int, ...]], interpret_shape: tuple[int, int, int]) -> list[triton.Config]:
    """GPU: a small config space (num_warps <= 4: Inductor's flattened conv loop is known to give
    wrong results with 8 warps). Interpreter: one config with the largest blocks, because the
    interpreter's cost is per program instance and loop iteration, not per element.
    ``FASTSR_TRITON_AUTOTUNE=0`` (the correctness steps of the GPU check): only the last, smallest
    config, which fits every dtype: compiling the whole space for every shape a test suite meets
    would take minutes."""
    if interpreting():
        bm, bn, bk = interpret_shape
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=1)]
    if os.environ.get("FASTSR_TRITON_AUTOTUNE", "1") == "0":
        shapes = shapes[-1:]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


# Every reduction-over-(kh, kw, c) block size divides _TAP_QUANTUM, so "channels % _TAP_QUANTUM == 0"
# means every block lies inside one tap (TAP_ALIGNED) whatever config the autotuner picks.
_TAP_QUANTUM = 64
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_N = 16 (the tl.dot minimum) is for the
# 64 -> 3 tail conv, whose N = 3 would waste most of a wider tile. The last, small config is the one
# of FASTSR_TRITON_AUTOTUNE=0 and fits every dtype.
_FWD_SHAPES = [(128, 64, 64, 4, 3), (128, 128, 32, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 32, 64, 4, 4),
               (256, 64, 32, 4, 3), (128, 16, 64, 4, 4), (256, 16, 64, 4, 3), (32, 64, 32, 4, 1), (32, 32, 32, 4, 1)]
_FWD_CONFIGS = _configs(_FWD_SHAPES, (128, 64, 64))
# fp32/fp64 inputs take IEEE FMA dots, which need far more registers than bf16/fp16 tensor-core dots.
# Compiled for sm_90 (Triton 3.9, ptxas -v, fp32, num_warps 4), every forward config above but these
# spills 0.1-90 KB per thread and takes 11-63 s to compile; these two use 168-174 registers and
# spill nothing (wgrad: 32x32x32 uses 207, no spill; its larger configs spill 3-12 KB). So fp32/fp64
# autotune over these only, and bf16/fp16 over the others (see _autotuned_by_dtype).
IEEE_FWD_SHAPES = {(32, 64, 32, 4, 1), (32, 32, 32, 4, 1)}
IEEE_WGRAD_SHAPES = {(32, 32, 32, 4, 1)}
IEEE_ONLY = {(32, 64, 32, 4, 1)}  # not worth a compile for bf16/fp16, whose larger tiles do not spill
# Weight gradient: M = C_out (BLOCK_M = 16 for the 3-channel tail), N = KS*KS*C_in (BLOCK_N divides
# _TAP_QUANTUM), K = pixels (BLOCK_K divides _SPLIT_QUANTUM).
_WGRAD_CONFIGS = _configs(
    [(64, 64, 64, 4, 3), (128, 64, 32, 4, 3), (64, 32, 128, 4, 3), (32, 64, 128, 4, 3), (16, 64, 128, 4, 3),
     (32, 32, 32, 4, 1)],
    (64, 64, 256),
)
_SPLIT_QUANTUM = 256

# The activations of the forward kernel (its ACT argument; the kernel compares the literals).
ACT_PRELU, ACT_SILU, ACT_ATTENTION = 0, 1, 2


# ---------------------------------------------------------------- @triton.jit helpers (inlined)


@triton.jit
def _k_block_coords(k0, C, K_TOTAL, KS: tl.constexpr, BLOCK: tl.constexpr, TAP_ALIGNED: tl.constexpr):
    """(c, kh, kw, mask) of the reduction block k0 + [0, BLOCK) of a K axis flattened as
    (kh, kw, c), c fastest. With TAP_ALIGNED (C a multiple of BLOCK) the block lies inside one tap:
    kh, kw are uniform and c is contiguous, which the compiler can see (vector loads in
    channels_last); otherwise every element decodes its own tap (small C, e.g. the 9x9 head)."""
    if TAP_ALIGNED:
        tap = k0 // C
        c = k0 % C + tl.arange(0, BLOCK)
        kh = tl.full((BLOCK,), 0, tl.int32) + tap // KS
        kw = tl.full((BLOCK,), 0, tl.int32) + tap % KS
        mask = tl.full((BLOCK,), 1, tl.int1)
    else:
        k = k0 + tl.arange(0, BLOCK)
        c = k % C
        tap = k // C
        kh = tap // KS
        kw = tap % KS
        mask = k < K_TOTAL
    return c, kh, kw, mask


@triton.jit
def _load_im2col(x_ptr, x_base, h, w, p_mask, c, kh, kw, k_mask, H, W, sxh, sxw, sxc, KS: tl.constexpr):
    """The im2col tile x[p, (kh, kw, c)] = x[n, h + kh - PAD, w + kw - PAD, c] for pixels p (rows;
    ``x_base`` = n * sxn, int64) and reduction elements (columns); 'same' padding as the load mask."""
    PAD: tl.constexpr = KS // 2
    ih = h[:, None] + kh[None, :] - PAD
    iw = w[:, None] + kw[None, :] - PAD
    mask = p_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    # int64 channel offset: an NCHW channel stride is H*W, and c * H*W passes 2**31 in large images.
    c_off = c[None, :].to(tl.int64) * sxc
    return tl.load(x_ptr + x_base[:, None] + ih * sxh + iw * sxw + c_off, mask=mask, other=0.0)


@triton.jit
def _fwd_gemm(
    x_ptr, w_ptr, x_base, oh, ow, m_mask, co, co_mask, H, W, C_in,
    sxh, sxw, sxc, swo, swi, swh, sww,
    KS: tl.constexpr, TAP_ALIGNED: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc[p, co] = sum over (kh, kw, c) of im2col(x)[p, (kh, kw, c)] * W[co, c, kh, kw]: the
    forward's implicit GEMM, in the ACC dtype."""
    K_TOTAL = KS * KS * C_in
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K_TOTAL, BLOCK_K):
        c, kh, kw, k_mask = _k_block_coords(k0, C_in, K_TOTAL, KS, BLOCK_K, TAP_ALIGNED)
        a = _load_im2col(x_ptr, x_base, oh, ow, m_mask, c, kh, kw, k_mask, H, W, sxh, sxw, sxc, KS)
        b_off = co[None, :] * swo + c[:, None] * swi + kh[:, None] * swh + kw[:, None] * sww
        b = tl.load(w_ptr + b_off, mask=k_mask[:, None] & co_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _shuffled_coords(oh, ow, co, R: tl.constexpr):
    """(yh, yw, oc): where conv output channel co (columns) of output pixel (oh, ow) (rows) lands
    after a pixel shuffle by R: channel oc = co // R**2 (1-D), row oh*R + i, column ow*R + j, with
    (i, j) = divmod(co % R**2, R)."""
    sub = co % (R * R)
    yh = oh[:, None] * R + (sub // R)[None, :]
    yw = ow[:, None] * R + (sub % R)[None, :]
    return yh, yw, co // (R * R)


@triton.jit
def _activate(acc, slope_ptrs, res_ptr, res_off, co_mask, mask,
              HAS_SLOPE: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr):
    """The activation and residual on the accumulator: ACT_PRELU (PReLU with a per-column slope,
    then + residual), ACT_SILU, or ACT_ATTENTION (SPAN's (y + res) * (sigmoid(y) - 0.5), the
    residual being the skip); the last two need R == 1. The residual is read only with HAS_RES."""
    if HAS_SLOPE:
        s = tl.load(slope_ptrs, mask=co_mask, other=0.0).to(ACC)
        acc = tl.where(acc > 0, acc, acc * s[None, :])
    if HAS_RES:
        res = tl.load(res_ptr + res_off, mask=mask, other=0.0).to(ACC)
    if ACT == 0:  # ACT_PRELU
        if HAS_RES:
            acc += res
    else:
        sig = 1.0 / (1.0 + tl.exp(-acc))
        if ACT == 1:  # ACT_SILU
            acc = acc * sig
        else:  # ACT_ATTENTION
            acc = (acc + res) * (sig - 0.5)
    return acc


# ---------------------------------------------------------------- kernels


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, slope_ptr, res_ptr, out_ptr, z_ptr,
    M, H, W, C_in, C_out,
    sxn, sxh, sxw, sxc,
    swo, swi, swh, sww,
    son, soh, sow, soc,
    srn, srh, srw, src,
    szn, szh, szw, szc,
    slope_stride,
    KS: tl.constexpr, R: tl.constexpr, TAP_ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SLOPE: tl.constexpr, HAS_RES: tl.constexpr, STORE_Z: tl.constexpr,
    ACT: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = act(conv(x, w) + b) (+ residual), stored pixel-shuffled by R; with STORE_Z also the
    pre-activation z. ACT as in :func:`_activate`."""
    pid_m = tl.program_id(0).to(tl.int64)  # int64: N*H*W*C can pass 2**31 (gigapixel tiles)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n, oh, ow = pixel_coords(offs_m, H, W)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_mask = co < C_out
    acc = _fwd_gemm(x_ptr, w_ptr, n * sxn, oh, ow, m_mask, co, co_mask, H, W, C_in, sxh, sxw, sxc,
                    swo, swi, swh, sww, KS, TAP_ALIGNED, ACC, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    # Epilogue, in registers: bias -> pixel-shuffle address -> (save z) -> activation, residual -> cast.
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_mask, other=0.0).to(ACC)[None, :]
    yh, yw, oc = _shuffled_coords(oh, ow, co, R)
    mask = m_mask[:, None] & co_mask[None, :]
    nn = n[:, None]
    ocb = oc[None, :].to(tl.int64)  # int64, as the channel offsets of _load_im2col
    if STORE_Z:
        tl.store(z_ptr + nn * szn + yh * szh + yw * szw + ocb * szc, acc.to(z_ptr.dtype.element_ty), mask=mask)
    acc = _activate(acc, slope_ptr + oc * slope_stride, res_ptr, nn * srn + yh * srh + yw * srw + ocb * src,
                    co_mask, mask, HAS_SLOPE, HAS_RES, ACT, ACC)
    tl.store(out_ptr + nn * son + yh * soh + yw * sow + ocb * soc, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_input_kernel(
    g_ptr, z_ptr, slope_ptr, w_ptr, dx_ptr,
    M, H, W, C_in, C_out,
    sgn, sgh, sgw, sgc,
    szn, szh, szw, szc,
    swo, swi, swh, sww,
    sdn, sdh, sdw, sdc,
    slope_stride,
    KS: tl.constexpr, R: tl.constexpr, HAS_SLOPE: tl.constexpr, TAP_ALIGNED: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[n, h, w, c] = sum_{kh, kw, co} dz[n, h + PAD - kh, w + PAD - kw, co] * W[co, c, kh, kw]:
    a 'same' conv of dz with the flipped, transposed weights; M = input pixels, N = C_in,
    K = KS*KS*C_out flattened over (kh, kw, co)."""
    PAD: tl.constexpr = KS // 2
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n, ih, iw = pixel_coords(offs_m, H, W)

    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = ci < C_in

    K_TOTAL = KS * KS * C_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K_TOTAL, BLOCK_K):
        co, kh, kw, k_mask = _k_block_coords(k0, C_out, K_TOTAL, KS, BLOCK_K, TAP_ALIGNED)
        oh = ih[:, None] + PAD - kh[None, :]
        ow = iw[:, None] + PAD - kw[None, :]
        a_mask = m_mask[:, None] & k_mask[None, :] & (oh >= 0) & (oh < H) & (ow >= 0) & (ow < W)
        dz, _ = load_upstream_grad(
            g_ptr, z_ptr, slope_ptr, n[:, None], oh, ow, co[None, :], a_mask,
            sgn, sgh, sgw, sgc, szn, szh, szw, szc, slope_stride, R, HAS_SLOPE, ACC,
        )
        b_off = co[:, None] * swo + ci[None, :] * swi + kh[:, None] * swh + kw[:, None] * sww
        b = tl.load(w_ptr + b_off, mask=k_mask[:, None] & ci_mask[None, :], other=0.0)
        # dz is rounded to the weight dtype for the tensor-core product, as the reference does.
        acc = tl.dot(dz.to(b.dtype), b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)

    mask = m_mask[:, None] & ci_mask[None, :]
    off = n[:, None] * sdn + ih[:, None] * sdh + iw[:, None] * sdw + ci[None, :].to(tl.int64) * sdc
    tl.store(dx_ptr + off, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_weight_kernel(
    g_ptr, z_ptr, slope_ptr, x_ptr, dw_ptr, db_ptr, dslope_ptr,
    M, H, W, C_in, C_out, PIX_PER_SPLIT,
    sgn, sgh, sgw, sgc,
    szn, szh, szw, szc,
    sxn, sxh, sxw, sxc,
    slope_stride,
    KS: tl.constexpr, R: tl.constexpr, HAS_SLOPE: tl.constexpr, TAP_ALIGNED: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Split-K partial of dW[co, (kh, kw, c)] = sum_p dz[p, co] * x[p + (kh, kw) - PAD, c] over the
    pixels p of split ``pid_s``, into dw_ptr[pid_s, co, k]. Programs with pid_n == 0 also write the
    per-channel partial sums of dz (bias grad) and of g*min(z, 0) (slope grad) into
    db_ptr / dslope_ptr[pid_s, co]."""
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2).to(tl.int64)
    co = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    co_mask = co < C_out
    K_TOTAL = KS * KS * C_in
    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c, kh, kw, k_mask = _k_block_coords(pid_n * BLOCK_N, C_in, K_TOTAL, KS, BLOCK_N, TAP_ALIGNED)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    db = tl.zeros((BLOCK_M,), dtype=ACC)
    dslope = tl.zeros((BLOCK_M,), dtype=ACC)
    start = pid_s * PIX_PER_SPLIT
    for p0 in range(0, PIX_PER_SPLIT, BLOCK_K):
        p = start + p0 + tl.arange(0, BLOCK_K)  # int64 pixel index
        p_mask = p < M
        n, h, w = pixel_coords(p, H, W)
        dz, neg = load_upstream_grad(
            g_ptr, z_ptr, slope_ptr, n[None, :], h[None, :], w[None, :], co[:, None],
            co_mask[:, None] & p_mask[None, :], sgn, sgh, sgw, sgc, szn, szh, szw, szc, slope_stride, R, HAS_SLOPE, ACC,
        )
        db += tl.sum(dz, axis=1)
        dslope += tl.sum(neg, axis=1)
        xt = _load_im2col(x_ptr, n * sxn, h, w, p_mask, c, kh, kw, k_mask, H, W, sxh, sxw, sxc, KS)
        acc = tl.dot(dz.to(xt.dtype), xt, acc, input_precision=DOT_PRECISION, out_dtype=ACC)

    out_off = pid_s * C_out * K_TOTAL + co[:, None] * K_TOTAL + k[None, :]
    tl.store(dw_ptr + out_off, acc, mask=co_mask[:, None] & k_mask[None, :])
    if pid_n == 0:
        tl.store(db_ptr + pid_s * C_out + co, db, mask=co_mask)
        tl.store(dslope_ptr + pid_s * C_out + co, dslope, mask=co_mask)


# ---------------------------------------------------------------- autotuning and grids


def _shape_of(config: triton.Config) -> tuple[int, int, int, int, int]:
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages


def _autotuned_by_dtype(fn, configs: list[triton.Config], ieee_shapes: set) -> dict:
    """Two autotuners of ``fn``: [True] over ``ieee_shapes`` for fp32/fp64 inputs, [False] over the
    other configs for bf16/fp16. Chosen on the host by dtype (see is_ieee), so nothing dtype-dependent
    runs inside the autotuner (under torch.compile Dynamo would trace it). A single config (the
    interpreter's, FASTSR_TRITON_AUTOTUNE=0's) serves both."""
    ieee = [c for c in configs if _shape_of(c) in ieee_shapes] or configs
    low = [c for c in configs if _shape_of(c) not in IEEE_ONLY] or configs
    return {flag: triton.autotune(chosen, key=["C_in", "C_out", "KS", "R"])(fn)
            for flag, chosen in ((True, ieee), (False, low))}


def is_ieee(t: torch.Tensor) -> bool:
    """fp32/fp64 tensors take IEEE FMA dots (and the configs that fit their registers)."""
    return t.dtype in (torch.float32, torch.float64)


_fwd = _autotuned_by_dtype(_conv_fwd_kernel, _FWD_CONFIGS, IEEE_FWD_SHAPES)
_bwd_input = _autotuned_by_dtype(_conv_bwd_input_kernel, _FWD_CONFIGS, IEEE_FWD_SHAPES)
_bwd_weight = _autotuned_by_dtype(_conv_bwd_weight_kernel, _WGRAD_CONFIGS, IEEE_WGRAD_SHAPES)


def _slope_stride(slope: torch.Tensor | None) -> int:
    """0 broadcasts a single slope to every channel; 1 indexes a per-channel slope."""
    return 0 if slope is None or slope.numel() == 1 else slope.stride(0)


def pixel_grid(pixels: int, channels: int):
    """Grid of the implicit-GEMM forward and input-gradient kernels for the autotuner: pixel blocks
    on axis 0 (CUDA allows 2**31 - 1 there), channel blocks on axis 1 (65535)."""

    def grid(meta):
        return checked_grid(triton.cdiv(pixels, meta["BLOCK_M"]), triton.cdiv(channels, meta["BLOCK_N"]))

    return grid


def weight_grad_grid(c_out: int, k_total: int, splits: int):
    """Grid of the weight-gradient kernel: output-channel blocks, reduction blocks (KS*KS*C_in) and
    split-K chunks of pixels (a few per SM, see :func:`_weight_grad_splits`): all small."""

    def grid(meta):
        return checked_grid(triton.cdiv(c_out, meta["BLOCK_M"]), triton.cdiv(k_total, meta["BLOCK_N"]), splits)

    return grid


def _weight_grad_splits(pixels: int, tiles: int, device: torch.device) -> int:
    """Pixels per split-K chunk for the weight gradient: enough programs to fill the GPU
    (about 4 per SM), at least 1024 pixels each; a single chunk under the interpreter."""
    if interpreting() or device.type != "cuda":
        return triton.cdiv(pixels, _SPLIT_QUANTUM) * _SPLIT_QUANTUM
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(triton.cdiv(4 * sms, tiles), triton.cdiv(pixels, 1024)))
    chunk = triton.cdiv(pixels, splits)
    return triton.cdiv(chunk, _SPLIT_QUANTUM) * _SPLIT_QUANTUM


# ---------------------------------------------------------------- host launchers


def conv_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    slope: torch.Tensor | None,
    residual: torch.Tensor | None,
    shuffle: int,
    store_preactivation: bool = False,
    act: int = ACT_PRELU,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused forward kernel.

    x (N, C_in, H, W); weight (C_out, C_in, K, K); bias (C_out,) or None; slope (1,) or
    (C_out / shuffle**2,) or None; residual like the output or None (with ``act=ACT_ATTENTION``:
    the skip). Returns the output (N, C_out / shuffle**2, H*shuffle, W*shuffle) in x's dtype and
    memory format, and, when ``store_preactivation`` and there is an activation, the
    pre-activation z (same shape, for the activation's backward; else None).
    """
    check_interpreter_dtype(x.dtype)
    n, c_in, h, w = x.shape
    c_out, ks = weight.shape[0], weight.shape[-1]
    out_shape = (n, c_out // (shuffle * shuffle), h * shuffle, w * shuffle)
    fmt = memory_format_of(x)
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    store_z = store_preactivation and (slope is not None or act != ACT_PRELU)
    z = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=fmt) if store_z else out
    res = residual if residual is not None else out
    check_index_range(weight, "the weight")
    # The B tile is [reduction (kh, kw, c), C_out]: weights stored (kh, kw, c, co), co fastest, make
    # its loads coalesced (a tiny copy; the kernel reads any strides, this is only for speed).
    weight_t = weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    # wrap_triton: the same launch works eagerly and when traced inside the ops' triton_op.
    wrap_triton(_fwd[is_ieee(x)])[pixel_grid(n * h * w, c_out)](
        x, weight_t, bias if bias is not None else out, slope if slope is not None else out, res, out, z,
        n * h * w, h, w, c_in, c_out,
        *nhwc_strides(x), *weight_t.stride(), *nhwc_strides(out), *nhwc_strides(res), *nhwc_strides(z),
        _slope_stride(slope),
        KS=ks, R=shuffle, TAP_ALIGNED=c_in % _TAP_QUANTUM == 0,
        HAS_BIAS=bias is not None, HAS_SLOPE=slope is not None, HAS_RES=residual is not None, STORE_Z=store_z,
        ACT=act, ACC=tl_acc_dtype(x.dtype), DOT_PRECISION=dot_precision(x.dtype),
    )
    return out, (z if store_z else None)


def _input_grad(grad_out, x, weight, slope, z_arg, slope_arg, consts: dict) -> torch.Tensor:
    """dx, in x's dtype and memory format (``z_arg``/``slope_arg``: z and slope or placeholders)."""
    n, c_in, h, w = x.shape
    dx = torch.empty_like(x, memory_format=memory_format_of(x))
    # B tile [reduction (kh, kw, co), C_in]: weights stored (kh, kw, co, c), c fastest (coalesced).
    weight_t = weight.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    wrap_triton(_bwd_input[is_ieee(grad_out)])[pixel_grid(n * h * w, c_in)](
        grad_out, z_arg, slope_arg, weight_t, dx,
        n * h * w, h, w, c_in, weight.shape[0],
        *nhwc_strides(grad_out), *nhwc_strides(z_arg), *weight_t.stride(), *nhwc_strides(dx),
        _slope_stride(slope), TAP_ALIGNED=weight.shape[0] % _TAP_QUANTUM == 0, **consts,
    )
    return dx


def _weight_grad_partials(grad_out, x, weight, slope, z_arg, slope_arg, consts: dict) -> tuple:
    """Per-split partial sums (dW (splits, C_out, KS*KS*C_in), dbias and g*min(z, 0) (splits, C_out)),
    in the accumulation dtype; the caller sums them over splits, in a fixed order."""
    n, c_in, h, w = x.shape
    c_out, ks = weight.shape[0], weight.shape[-1]
    pixels, k_total = n * h * w, ks * ks * c_in
    chunk = _weight_grad_splits(pixels, triton.cdiv(c_out, 64) * triton.cdiv(k_total, 64), x.device)
    splits = triton.cdiv(pixels, chunk)
    acc = acc_dtype(x.dtype)
    dw_part = torch.empty((splits, c_out, k_total), dtype=acc, device=x.device)
    db_part = torch.empty((splits, c_out), dtype=acc, device=x.device)
    ds_part = torch.empty((splits, c_out), dtype=acc, device=x.device)
    wrap_triton(_bwd_weight[is_ieee(x)])[weight_grad_grid(c_out, k_total, splits)](
        grad_out, z_arg, slope_arg, x, dw_part, db_part, ds_part,
        pixels, h, w, c_in, c_out, chunk,
        *nhwc_strides(grad_out), *nhwc_strides(z_arg), *nhwc_strides(x),
        _slope_stride(slope), TAP_ALIGNED=c_in % _TAP_QUANTUM == 0, **consts,
    )
    return dw_part, db_part, ds_part


def conv_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    slope: torch.Tensor | None,
    z: torch.Tensor | None,
    shuffle: int,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dweight, dbias, dslope) for the flags ``needs`` (same order).

    grad_out has the forward output's shape; z is the saved pre-activation (None without an
    activation). dbias and dslope are summed from fp32 per-split partials in a fixed order.
    """
    need_x, need_w, need_b, need_s = needs
    z_arg = z if z is not None else grad_out
    slope_arg = slope if slope is not None else grad_out
    consts = dict(KS=weight.shape[-1], R=shuffle, HAS_SLOPE=slope is not None, ACC=tl_acc_dtype(x.dtype),
                  DOT_PRECISION=dot_precision(x.dtype))
    dx = _input_grad(grad_out, x, weight, slope, z_arg, slope_arg, consts) if need_x else None
    dw = db = dslope = None
    if need_w or need_b or need_s:
        dw_part, db_part, ds_part = _weight_grad_partials(grad_out, x, weight, slope, z_arg, slope_arg, consts)
        if need_w:
            c_out, ks, c_in = weight.shape[0], weight.shape[-1], x.shape[1]
            # (C_out, (kh, kw, c)) -> (C_out, C_in, KH, KW)
            dw = dw_part.sum(0).view(c_out, ks, ks, c_in).permute(0, 3, 1, 2).to(weight.dtype)
            dw = dw.contiguous(memory_format=memory_format_of(weight))
        if need_b:
            db = db_part.sum(0)
        if need_s:
            per_co = ds_part.sum(0)
            dslope = per_co.view(-1, shuffle * shuffle).sum(1) if slope.numel() > 1 else per_co.sum().view(1)
    return dx, dw, db, dslope


@triton_op("fastsr_triton::conv2d_backward", mutates_args=())
def conv2d_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    slope: torch.Tensor | None,
    z: torch.Tensor | None,
    shuffle: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    need_s: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Traceable :func:`conv_backward` for the ops' autograd formulas: (dx, dweight, dbias, dslope),
    each a 0-element tensor when not needed (custom ops cannot return None)."""
    grads = conv_backward(grad_out, x, weight, slope, z, shuffle, (need_x, need_w, need_b, need_s))
    return tuple(g if g is not None else x.new_empty(0, dtype=torch.float32) for g in grads)
