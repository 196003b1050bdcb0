"""Real-ESRGAN's SRVGGNetCompact (``realesr-general-x4v3``, ``realesr-animevideov3``).

A plain VGG-style stack at low resolution: 3x3 conv + PReLU, ``num_convs`` x [3x3 conv + PReLU],
a 3x3 conv to ``out_channels * scale**2`` channels, pixel shuffle, plus the nearest-neighbour
upscale of the input. Real-ESRGAN names its layers ``body.N`` (even N convs, odd N their PReLUs);
here conv ``2k`` and PReLU ``2k + 1`` are one fused :class:`~fastsr.nn.ConvPReLU`, ``body.k``, and
the last conv, with the pixel shuffle and the added input fused in, is ``conv_last``.

``output_scale``: the network's output resized by ``output_scale / scale`` (bicubic), as
Real-ESRGAN's x2 and x3 ncnn files of realesr-animevideov3 do with its x4 network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import BicubicDownscale, ConvPReLU
from .registry import Architecture, StateDict, count_indices, register, shuffle_factor

SRVGGNET_COMPACT_ARCH = "srvggnet_compact"


class SRVGGNetCompact(nn.Module):
    """(N, C_in, H, W) in [0, 1] -> (N, C_out, H*s, W*s), s = ``output_scale`` or ``scale``;
    per-channel PReLU slopes.

    ``realesr-animevideov3``: 16 convs of 64 channels (``num_convs=16``), x4: 621,424 parameters;
    ``realesr-general-x4v3``: ``num_convs=32``. ``output_scale`` (1 .. scale - 1): a bicubic
    downscale of the x``scale`` result (the x2/x3 animevideov3 models); ``self.scale`` is then it.
    """

    def __init__(self, scale: int = 4, num_convs: int = 16, channels: int = 64, in_channels: int = 3,
                 out_channels: int = 3, output_scale: int | None = None) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError(f"SRVGGNetCompact scale must be >= 1, got {scale}")
        if out_channels != in_channels:
            raise ValueError("SRVGGNetCompact adds the upscaled input, so in_channels must equal out_channels")
        if output_scale is not None and not 1 <= output_scale < scale:
            raise ValueError(f"SRVGGNetCompact output_scale must be in 1..{scale - 1}, got {output_scale}")
        self.config = {"arch": SRVGGNET_COMPACT_ARCH, "scale": scale, "num_convs": num_convs, "channels": channels,
                       "in_channels": in_channels, "out_channels": out_channels}
        if output_scale is not None:
            self.config["output_scale"] = output_scale
        self.network_scale = scale
        self.scale = output_scale or scale
        convs = [ConvPReLU(in_channels, channels, 3, num_slopes=channels)]
        convs += [ConvPReLU(channels, channels, 3, num_slopes=channels) for _ in range(num_convs)]
        self.body = nn.Sequential(*convs)
        self.conv_last = ConvPReLU(channels, out_channels * scale * scale, 3, activation=None, shuffle=scale)
        self.resize = BicubicDownscale(output_scale / scale) if output_scale is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.interpolate(x, scale_factor=self.network_scale, mode="nearest")
        out = self.conv_last(self.body(x), residual=base)
        return out if self.resize is None else self.resize(out)


def infer_config(state: StateDict) -> dict:
    """The SRVGGNetCompact config (without ``"arch"``) whose state dict ``state`` is; without an
    ``output_scale``, which has no weights (such a model's state dict is its x``scale`` network's)."""
    channels, in_channels = state["body.0.conv.weight"].shape[:2]
    conv_out = state["conv_last.conv.weight"].shape[0]
    scale = shuffle_factor(conv_out, in_channels)  # out_channels equals in_channels (the added input)
    if scale is None:
        raise ValueError(f"conv_last has {conv_out} output channels, not {in_channels} x scale**2")
    return {"scale": scale, "num_convs": count_indices(state, r"body\.(\d+)\.conv\.weight") - 1,
            "channels": channels, "in_channels": in_channels, "out_channels": in_channels}


register(Architecture(SRVGGNET_COMPACT_ARCH, SRVGGNetCompact,
                      keys=("body.0.conv.weight", "body.0.slope", "conv_last.conv.weight"), infer=infer_config))
