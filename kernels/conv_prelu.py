"""conv2d_prelu: fused conv2d (stride 1, 'same') + bias + pixel shuffle + PReLU + residual, on the
generic conv + epilogue kernels of :mod:`.conv`.

What is PReLU's own: the forward runs :func:`.conv.conv_forward` with the ``ACT_PRELU`` epilogue
and saves the pre-activation z only when a gradient needs it (x, weight, slope and z are saved
for backward); the backward folds PReLU's derivative and the un-shuffle into the conv backward's
upstream-gradient loads (``fastsr_triton::conv2d_backward`` with the slope), casts the bias and
slope gradients to their parameters' dtypes, and passes the upstream gradient on as the
residual's gradient.

One entry point, eager and under ``torch.compile(fullgraph=True)`` alike: the
``torch.library.triton_op`` ``fastsr_triton::conv2d_prelu`` with ``register_autograd``.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from .conv import ACT_PRELU, conv2d_backward_op, conv_forward


@triton_op("fastsr_triton::conv2d_prelu", mutates_args=())
def conv2d_prelu_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    slope: torch.Tensor | None,
    residual: torch.Tensor | None,
    shuffle: int,
    store_preactivation: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, pre-activation z or a 0-element tensor): custom ops cannot return None. Pass
    ``store_preactivation`` when a gradient of x, weight, bias or slope will be asked for."""
    out, z = conv_forward(x, weight, bias, slope, residual, shuffle, store_preactivation, act=ACT_PRELU)
    return out, (z if z is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, slope, _residual, shuffle, _store = inputs
    z = output[1]
    ctx.shuffle = shuffle
    ctx.has_slope = slope is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.slope_dtype = None if slope is None else slope.dtype
    ctx.save_for_backward(x, weight, slope, z if z.numel() else None)


def _backward(ctx, grad_out, _grad_z):
    x, weight, slope, z = ctx.saved_tensors
    need_x, need_w, need_b, need_s, need_r = ctx.needs_input_grad[:5]
    need_s = need_s and ctx.has_slope
    dx, dw, db, dslope = conv2d_backward_op(grad_out, x, weight, slope, z, ctx.shuffle, need_x, need_w, need_b, need_s)
    return (
        dx if need_x else None,
        dw if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        dslope.to(ctx.slope_dtype) if need_s else None,
        grad_out if need_r else None,
        None,
        None,
    )


conv2d_prelu_op.register_autograd(_backward, setup_context=_setup_context)
