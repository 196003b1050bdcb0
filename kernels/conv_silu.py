"""conv2d_silu: fused conv2d (stride 1, 'same') + bias + SiLU, or + SPAN's parameter-free attention,
on the generic conv + epilogue kernels of :mod:`.conv`.

``silu(y)`` or ``(y + skip) * (sigmoid(y) - 0.5)`` with ``y = conv2d(x, weight, bias)``.

Forward: :func:`.conv.conv_forward` with the ``ACT_SILU`` / ``ACT_ATTENTION`` epilogue: the
sigmoid is applied to the fp32 accumulator before the single store, the skip read in the epilogue
as a residual is. What is the activation's own is its backward: its derivative
(``_sigmoid_gate_bwd_kernel``, one elementwise pass over the saved pre-activation, traceable as
``fastsr_triton::sigmoid_gate_backward``), then the conv backward of :mod:`.conv` without an
activation.

One entry point, eager and under ``torch.compile(fullgraph=True)`` alike: the
``torch.library.triton_op`` ``fastsr_triton::conv2d_silu`` with ``register_autograd``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastsr.layout import memory_format_of

from .common import checked_grid, tl_acc_dtype
from .conv import ACT_ATTENTION, ACT_SILU, conv2d_backward_op, conv_forward

_BLOCK = 1024


@triton.jit
def _sigmoid_gate_bwd_kernel(g_ptr, y_ptr, skip_ptr, dy_ptr, dskip_ptr, N, HAS_SKIP: tl.constexpr,
                             ACC: tl.constexpr, BLOCK: tl.constexpr):
    """d/dy of (y + a) * (sigmoid(y) - b) = gate + (y + a) sig (1 - sig), d/da = gate, with
    sig = sigmoid(y), gate = sig - b; (a, b) = (0, 0) for SiLU, (skip, 0.5) with a skip. All tensors
    dense in one memory format, so a flat index serves every one."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    sig = 1.0 / (1.0 + tl.exp(-y))
    if HAS_SKIP:
        gate = sig - 0.5
        shifted = y + tl.load(skip_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(dskip_ptr + offs, (g * gate).to(dskip_ptr.dtype.element_ty), mask=mask)
    else:
        gate = sig
        shifted = y
    tl.store(dy_ptr + offs, (g * (gate + shifted * sig * (1.0 - sig))).to(dy_ptr.dtype.element_ty), mask=mask)


def sigmoid_gate_backward(grad: torch.Tensor, y: torch.Tensor,
                          skip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_y, grad_skip or None) of conv2d_silu's activation at the conv output ``y``, in y's
    dtype and memory format (grad_skip in skip's dtype)."""
    fmt = memory_format_of(y)
    yc = y.contiguous(memory_format=fmt)
    g = grad.to(y.dtype).contiguous(memory_format=fmt)
    s = None if skip is None else skip.to(y.dtype).contiguous(memory_format=fmt)
    dy = torch.empty_like(yc, memory_format=fmt)
    ds = None if skip is None else torch.empty_like(yc, memory_format=fmt)
    n = yc.numel()
    wrap_triton(_sigmoid_gate_bwd_kernel)[checked_grid(triton.cdiv(n, _BLOCK))](
        g, yc, yc if s is None else s, dy, dy if ds is None else ds, n,
        HAS_SKIP=skip is not None, ACC=tl_acc_dtype(y.dtype), BLOCK=_BLOCK,
    )
    return dy, None if ds is None else ds.to(skip.dtype)


@triton_op("fastsr_triton::sigmoid_gate_backward", mutates_args=())
def sigmoid_gate_backward_op(grad: torch.Tensor, y: torch.Tensor,
                             skip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Traceable :func:`sigmoid_gate_backward`: (grad_y, grad_skip or a 0-element tensor)."""
    dy, ds = sigmoid_gate_backward(grad, y, skip)
    return dy, (ds if ds is not None else y.new_empty(0))


@triton_op("fastsr_triton::conv2d_silu", mutates_args=())
def conv2d_silu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, skip: torch.Tensor | None,
                   store_preactivation: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, pre-activation y or a 0-element tensor): x (N, C_in, H, W), weight (C_out, C_in, K, K),
    bias (C_out,) or None, skip (N, C_out, H, W) or None; output (N, C_out, H, W) in x's dtype and
    memory format. Pass ``store_preactivation`` when a gradient will be asked for."""
    act = ACT_SILU if skip is None else ACT_ATTENTION
    out, pre = conv_forward(x, weight, bias, None, skip, 1, store_preactivation, act=act)
    return out, (pre if pre is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, skip, _store = inputs
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, output[1], skip)


def _backward(ctx, grad_out, _grad_pre):
    x, weight, pre, skip = ctx.saved_tensors
    need_x, need_w, need_b, need_skip = ctx.needs_input_grad[:4]
    grad_pre, grad_skip = sigmoid_gate_backward_op(grad_out, pre, skip)
    dx, dw, db, _ = conv2d_backward_op(grad_pre, x, weight, None, None, 1, need_x, need_w, need_b, False)
    return (dx if need_x else None, dw if need_w else None, db.to(ctx.bias_dtype) if need_b else None,
            grad_skip if need_skip else None, None)


conv2d_silu_op.register_autograd(_backward, setup_context=_setup_context)
