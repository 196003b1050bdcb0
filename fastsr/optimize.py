"""Inference-time model rewriting: BatchNorm folding and channels_last.

``fuse_for_inference(model)`` (exported as ``fastsr.optimize(model)``) folds every eval-mode
BatchNorm of a :class:`fastsr.nn.ConvPReLU` into its convolution for good: the conv is replaced
by one whose weight is scaled per output channel and whose bias absorbs the BatchNorm shift, and
the BatchNorm is dropped, so each layer is one fused ``conv2d_prelu`` call with no per-call
folding work. The model is switched to eval mode and channels_last memory format (the layout
the CPU convolutions and the ``cpp`` epilogues are fastest in), and :func:`channels_last_at_entry`
converts an NCHW input once, at the model's entry, so callers need not care about memory formats.
"""

from __future__ import annotations

import torch
from torch import nn

from .nn import ConvPReLU


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Fold BatchNorm into the convs of ``model``'s ConvPReLU layers, in place; returns ``model``.

    Uses the BatchNorm running statistics (eval semantics), so outputs in eval mode are unchanged
    up to float rounding. The model is left in eval mode and channels_last; training it again
    afterwards trains the folded convs (there is no BatchNorm any more).
    """
    for module in model.modules():
        if isinstance(module, ConvPReLU) and module.bn is not None:
            weight, bias = module.folded_weight_bias()
            old = module.conv
            conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                             padding=old.padding, dilation=old.dilation, groups=old.groups, bias=True,
                             device=old.weight.device, dtype=old.weight.dtype)
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
            module.conv = conv
            module.bn = None
    return channels_last_at_entry(model.eval().to(memory_format=torch.channels_last))


def _input_to_channels_last(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def channels_last_at_entry(model: nn.Module) -> nn.Module:
    """Make ``model`` convert a 4-D NCHW input to channels_last once, before its first layer.

    Without it an NCHW input keeps every layer in NCHW (each op's output follows its input's
    format), which on CPU is up to 1.6x slower for the same model. Idempotent; returns ``model``.
    The output is channels_last, as PyTorch's own convolutions give for channels_last weights.
    """
    if not getattr(model, "_fastsr_channels_last_entry", False):
        model.register_forward_pre_hook(_input_to_channels_last)
        model._fastsr_channels_last_entry = True
    return model
