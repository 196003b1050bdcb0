"""Inference-time model rewriting: BatchNorm folding and channels_last.

``fuse_for_inference(model)`` (exported as ``fastsr.optimize(model)``) folds every eval-mode
BatchNorm of a :class:`fastsr.nn.ConvPReLU` into its convolution for good: the conv is replaced
by one whose weight is scaled per output channel and whose bias absorbs the BatchNorm shift, and
the BatchNorm is dropped, so each layer is one fused ``conv2d_prelu`` call with no per-call
folding work. The model is switched to eval mode and channels_last memory format (the layout
the CPU convolutions and the ``cpp`` epilogues are fastest in).
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
    return model.eval().to(memory_format=torch.channels_last)
