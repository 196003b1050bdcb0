"""SPAN, the Swift Parameter-free Attention Network (Wan et al., NTIRE 2024 efficient SR winner), for inference.

The published model trains every 3x3 conv as a ``Conv3XC``: a 1x1 skip conv ``sk`` plus a
1x1 -> 3x3 -> 1x1 chain ``conv.0/1/2`` applied to the zero-padded input, and keeps an
``eval_conv`` that its eval mode refreshes from them. All of it is linear, so here each Conv3XC
is one 3x3 conv (:class:`~fastsr.nn.ConvPReLU`, or :class:`~fastsr.nn.ConvSiLU` inside the blocks,
where SiLU and the attention are fused into it), its weights merged from ``sk`` and ``conv.*`` on loading
by :func:`merge_conv3xc`; ``eval_conv`` is never read (a training checkpoint may hold a stale one).

Module names follow the published ones (``conv_1``, ``block_N.c{1,2,3}_r``, ``conv_2``,
``conv_cat``, ``upsampler``), each layer's conv at ``<name>.conv``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn import ConvPReLU, ConvSiLU
from .registry import Architecture, StateDict, register, shuffle_factor

SPAN_ARCH = "span"

NUM_BLOCKS = 6
# The published normalisation: (x - rgb_mean) * img_range before the first conv, and no
# de-normalisation after the last (the network learns to output [0, 1] directly).
IMG_RANGE = 255.0
RGB_MEAN = (0.4488, 0.4371, 0.4040)


def merge_conv3xc(sk_weight: torch.Tensor, sk_bias: torch.Tensor, weights: Sequence[torch.Tensor],
                  biases: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The single 3x3 conv (weight, bias) equal to a training-form Conv3XC:
    ``conv.2(conv.1(conv.0(pad(x, 1)))) + sk(x)``, with ``weights``/``biases`` those of conv.0/1/2.

    Exact with zero padding: the input is padded before the 1x1 ``conv.0``, so its bias fills the
    border too and reaches ``conv.1`` as a constant field, i.e. as part of the merged bias.
    Computed in float64, returned in float32 (float64 for float64 inputs): merged fp16 weights
    are not rounded to fp16 again.
    """
    (w1, w2, w3), (b1, b2, b3) = [w.double() for w in weights], [b.double() for b in biases]
    if w1.shape[2:] != (1, 1) or w2.shape[2:] != (3, 3) or w3.shape[2:] != (1, 1) or sk_weight.shape[2:] != (1, 1):
        raise ValueError("a Conv3XC is a 1x1 skip conv plus a 1x1 -> 3x3 -> 1x1 chain; got kernel shapes "
                         f"{[tuple(w.shape[2:]) for w in (sk_weight, w1, w2, w3)]}")
    weight = torch.einsum("on,nmuv,mi->oiuv", w3[:, :, 0, 0], w2, w1[:, :, 0, 0])
    weight[:, :, 1, 1] += sk_weight.double()[:, :, 0, 0]
    inner_bias = w2.sum((2, 3)) @ b1 + b2
    bias = w3[:, :, 0, 0] @ inner_bias + b3 + sk_bias.double()
    dtype = torch.promote_types(sk_weight.dtype, torch.float32)
    return weight.to(dtype), bias.to(dtype)


class SPAB(nn.Module):
    """Swift parameter-free attention block: three 3x3 convs with SiLU between them; the last
    conv's output ``y`` gates ``y + x`` by ``sigmoid(y) - 0.5``. Returns that and the first
    conv's SiLU-activated output (the published block applies SiLU in place, so the "first conv
    output" it hands to ``conv_cat`` is already activated).

    Three fused ops (:func:`fastsr.functional.conv2d_silu`): conv + SiLU twice, then conv + the
    attention, which reads the block input as its skip."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1_r = ConvSiLU(channels, channels, 3)
        self.c2_r = ConvSiLU(channels, channels, 3)
        self.c3_r = ConvSiLU(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.c1_r(x)
        return self.c3_r(self.c2_r(first), skip=x), first


class SPAN(nn.Module):
    """(N, C_in, H, W) in [0, 1] -> (N, C_out, H*scale, W*scale).

    ``norm``: normalise the input as published (``(x - rgb_mean) * img_range``); checkpoints
    trained without it (spandrel's and traiNNer-redux's ``no_norm`` buffer) set it False.
    conv_1; six SPABs; conv_2 on the last block's output; a 1x1 ``conv_cat`` over
    [conv_1 out, conv_2 out, block 1 out, block 6's first activation]; a 3x3 conv to
    ``out_channels * scale**2`` with the pixel shuffle fused (``upsampler``).
    """

    def __init__(self, scale: int = 4, channels: int = 48, in_channels: int = 3, out_channels: int = 3, *,
                 norm: bool = True, img_range: float = IMG_RANGE, rgb_mean: Sequence[float] = RGB_MEAN) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError(f"SPAN scale must be >= 1, got {scale}")
        if norm and len(rgb_mean) != in_channels:
            raise ValueError(f"SPAN normalises with one mean per input channel: {len(rgb_mean)} means for "
                             f"{in_channels} channels")
        self.config = {"arch": SPAN_ARCH, "scale": scale, "channels": channels, "in_channels": in_channels,
                       "out_channels": out_channels, "norm": norm, "img_range": float(img_range),
                       "rgb_mean": [float(m) for m in rgb_mean]}
        self.scale = scale
        self.norm = norm
        self.img_range = float(img_range)
        self.register_buffer("rgb_mean", torch.tensor(self.config["rgb_mean"]).view(1, -1, 1, 1), persistent=False)
        self.conv_1 = ConvPReLU(in_channels, channels, 3, activation=None)
        for i in range(1, NUM_BLOCKS + 1):
            self.add_module(f"block_{i}", SPAB(channels))
        # Registered in forward order (conv_2 before conv_cat): tiling reads the layers in this order.
        self.conv_2 = ConvPReLU(channels, channels, 3, activation=None)
        self.conv_cat = ConvPReLU(4 * channels, channels, 1, activation=None)
        self.upsampler = ConvPReLU(channels, out_channels * scale * scale, 3, activation=None, shuffle=scale)

    def blocks(self) -> list[SPAB]:
        return [getattr(self, f"block_{i}") for i in range(1, NUM_BLOCKS + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm:
            x = (x - self.rgb_mean.to(x.dtype)) * self.img_range
        features = self.conv_1(x)
        first_block, *middle, last_block = self.blocks()
        out_b1, _ = first_block(features)
        out = out_b1
        for block in middle:
            out, _ = block(out)
        out, last_first = last_block(out)
        out = self.conv_cat(torch.cat([features, self.conv_2(out), out_b1, last_first], 1))
        return self.upsampler(out)


def infer_config(state: StateDict) -> dict:
    """The SPAN config (without ``"arch"``) whose state dict ``state`` is (the merged inference
    form). The input normalisation has no weights: the published one is assumed, and the output
    channels, stored only times the scale squared, are taken equal to the input's (as spandrel does)."""
    channels, in_channels = state["conv_1.conv.weight"].shape[:2]
    conv_out = state["upsampler.conv.weight"].shape[0]
    scale = shuffle_factor(conv_out, in_channels)
    if scale is None:
        raise ValueError(f"upsampler has {conv_out} output channels, not {in_channels} x scale**2")
    return {"scale": scale, "channels": channels, "in_channels": in_channels, "out_channels": in_channels,
            "norm": True, "img_range": IMG_RANGE, "rgb_mean": list(RGB_MEAN)}


register(Architecture(SPAN_ARCH, SPAN, keys=("conv_1.conv.weight", "block_1.c1_r.conv.weight", "conv_cat.conv.weight",
                                             "upsampler.conv.weight"), infer=infer_config))
