"""Fused conv2d (stride 1, 'same') + bias + SiLU, or + SPAN's parameter-free attention.

``silu(y)`` or ``(y + skip) * (sigmoid(y) - 0.5)`` with ``y = conv2d(x, weight, bias)``.

Forward: the implicit-GEMM kernel of :mod:`.conv_prelu` with its ``ACT`` epilogue (``ACT_SILU`` /
``ACT_ATTENTION``): the sigmoid is applied to the fp32 accumulator before the single store, the
skip read in the epilogue as a residual is. Backward: the activation's derivative
(:func:`fastsr.ops.reference.sigmoid_gate_backward`, one elementwise pass over the saved
pre-activation), then the conv backward kernels of :mod:`.conv_prelu` without an activation.

Front doors as for conv_prelu: ``ConvSiLUFunction`` (eager autograd) and the
``torch.library.triton_op`` ``fastsr_triton::conv2d_silu`` with ``register_autograd`` for
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from fastsr.ops.reference import sigmoid_gate_backward

from .conv_prelu import ACT_ATTENTION, ACT_SILU, conv_prelu_backward, conv_prelu_forward


def conv_silu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, skip: torch.Tensor | None,
                      store_preactivation: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output, pre-activation y or None): x (N, C_in, H, W), weight (C_out, C_in, K, K), bias
    (C_out,) or None, skip (N, C_out, H, W) or None; output (N, C_out, H, W) in x's dtype and
    memory format."""
    act = ACT_SILU if skip is None else ACT_ATTENTION
    return conv_prelu_forward(x, weight, bias, None, skip, 1, store_preactivation, act=act)


def conv_silu_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor,
                       skip: torch.Tensor | None, needs: tuple[bool, bool, bool, bool]) -> tuple:
    """(dx, dweight, dbias, dskip) for the flags ``needs`` (same order); ``pre`` is the saved conv output."""
    grad_pre, grad_skip = sigmoid_gate_backward(grad_out, pre, skip)
    need_x, need_w, need_b, need_skip = needs
    dx, dw, db, _ = conv_prelu_backward(grad_pre, x, weight, None, None, 1, (need_x, need_w, need_b, False))
    return dx, dw, db, grad_skip if need_skip else None


class ConvSiLUFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves x, weight, the skip and (under autograd) the pre-activation."""

    @staticmethod
    def forward(ctx, x, weight, bias, skip):
        out, pre = conv_silu_forward(x, weight, bias, skip, store_preactivation=any(ctx.needs_input_grad))
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, pre, skip)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, pre, skip = ctx.saved_tensors
        dx, dw, db, dskip = conv_silu_backward(grad_out, x, weight, pre, skip, ctx.needs_input_grad[:4])
        return dx, dw, None if db is None else db.to(ctx.bias_dtype), dskip


# ---------------------------------------------------------------- torch.library op (torch.compile)


@triton_op("fastsr_triton::conv2d_silu", mutates_args=())
def conv2d_silu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, skip: torch.Tensor | None,
                   store_preactivation: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Traceable forward: (output, pre-activation or a 0-element tensor)."""
    out, pre = conv_silu_forward(x, weight, bias, skip, store_preactivation)
    return out, (pre if pre is not None else x.new_empty(0))


def _op_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, skip, _store = inputs
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, output[1], skip)


def _op_backward(ctx, grad_out, _grad_pre):
    x, weight, pre, skip = ctx.saved_tensors
    need_x, need_w, need_b, need_skip = ctx.needs_input_grad[:4]
    grad_pre, grad_skip = sigmoid_gate_backward(grad_out, pre, skip)
    dx, dw, db, _ = torch.ops.fastsr_triton.conv2d_prelu_backward(
        grad_pre, x, weight, None, None, 1, need_x, need_w, need_b, False)
    return (dx if need_x else None, dw if need_w else None, db.to(ctx.bias_dtype) if need_b else None,
            grad_skip if need_skip else None, None)


conv2d_silu_op.register_autograd(_op_backward, setup_context=_op_setup_context)
