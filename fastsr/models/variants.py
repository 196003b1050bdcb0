"""Generator architectures of other SRGAN code bases, built from :mod:`fastsr.nn` fused layers.

Checkpoints from those code bases (see :mod:`fastsr.models.peers`) load into these classes, and
:func:`fastsr.save_model` / :func:`fastsr.load_model` round-trip them like :class:`SRResNet`.

* :class:`MSRResNet` - BasicSR's "modified SRResNet": no BatchNorm, ReLU residual blocks,
  LeakyReLU(0.1) elsewhere, a bilinear upscale of the input added to the output; x2, x3, x4.
* :class:`PeerSRResNet` - the SRGAN paper's SRResNet (exactly :class:`SRResNet`) followed by the
  output mapping another code base applies: ``"clamp"`` to [0, 1] (Lornatang SRGAN-PyTorch) or
  ``"tanh"``, ``(tanh(y) + 1) / 2`` (leftthomas SRGAN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import ConvPReLU
from .registry import Architecture, StateDict, count_indices, register
from .srresnet import SRResNet

MSRRESNET_ARCH = "msrresnet"
PEER_SRRESNET_ARCH = "peer_srresnet"
# BasicSR's MSRResNet uses LeakyReLU with this slope everywhere except inside the residual blocks.
_LEAKY = {"activation": "leaky_relu", "negative_slope": 0.1}


class _ResidualBlockNoBN(nn.Module):
    """conv3x3 - ReLU - conv3x3, + skip; both convs with bias, no BatchNorm (EDSR style)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvPReLU(channels, channels, 3, activation="relu")
        self.conv2 = ConvPReLU(channels, channels, 3, activation=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x), residual=x)


class MSRResNet(nn.Module):
    """BasicSR's modified SRResNet: (N, C, H, W) -> (N, C, H*scale, W*scale), C = ``in_channels``.

    3x3 conv + LeakyReLU(0.1); ``num_blocks`` x [conv3x3 - ReLU - conv3x3, + skip];
    x2/x3: one conv C -> C*s*s, PixelShuffle(s), LeakyReLU; x4: two such x2 steps;
    3x3 conv + LeakyReLU; 3x3 conv to ``in_channels``, plus the bilinear upscale of the input.
    Module names follow BasicSR's (``conv_first``, ``body.N.conv1``, ``upconv1``, ...), each a
    fused :class:`~fastsr.nn.ConvPReLU`.
    """

    def __init__(self, scale: int = 4, num_blocks: int = 16, channels: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        if scale not in (2, 3, 4):
            raise ValueError(f"MSRResNet scale must be 2, 3 or 4, got {scale}")
        self.config = {"arch": MSRRESNET_ARCH, "scale": scale, "num_blocks": num_blocks, "channels": channels,
                       "in_channels": in_channels}
        self.scale = scale
        self.conv_first = ConvPReLU(in_channels, channels, 3, **_LEAKY)
        self.body = nn.Sequential(*(_ResidualBlockNoBN(channels) for _ in range(num_blocks)))
        step = 2 if scale == 4 else scale
        self.upconv1 = ConvPReLU(channels, channels * step * step, 3, shuffle=step, **_LEAKY)
        self.upconv2 = ConvPReLU(channels, channels * 4, 3, shuffle=2, **_LEAKY) if scale == 4 else None
        self.conv_hr = ConvPReLU(channels, channels, 3, **_LEAKY)
        self.conv_last = ConvPReLU(channels, in_channels, 3, activation=None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming init scaled by 0.1 (as BasicSR does): the residual blocks start near identities
        and the output starts near the bilinear upscale."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
                module.weight.mul_(0.1)
                if module.bias is not None:
                    module.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(self.conv_first(x))
        out = self.upconv1(out)
        if self.upconv2 is not None:
            out = self.upconv2(out)
        base = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.conv_last(self.conv_hr(out), residual=base)


class PeerSRResNet(SRResNet):
    """:class:`SRResNet` plus an output mapping: ``"clamp"`` (to [0, 1]) or ``"tanh"`` ((tanh + 1) / 2).

    Same layers and state-dict keys as :class:`SRResNet`; only ``forward``'s last step differs.
    """

    OUTPUTS = ("clamp", "tanh")

    def __init__(self, scale: int = 4, num_blocks: int = 16, channels: int = 64, in_channels: int = 3,
                 output: str = "clamp") -> None:
        if output not in self.OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(self.OUTPUTS)}, got {output!r}")
        super().__init__(scale=scale, num_blocks=num_blocks, channels=channels, in_channels=in_channels)
        self.config = {**self.config, "arch": PEER_SRRESNET_ARCH, "output": output}
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.output == "clamp":
            return y.clamp(0.0, 1.0)
        return (torch.tanh(y) + 1.0) / 2.0


def msrresnet_scale(channels: int, upconv1_out: int, has_upconv2: bool) -> int:
    """The scale of an MSRResNet with ``channels`` features whose first upsampling conv writes
    ``upconv1_out`` channels (x4: two x2 steps, ``has_upconv2``); ValueError if none fits."""
    if has_upconv2:
        return 4
    ratio = upconv1_out // channels
    scale = math.isqrt(ratio)
    if scale * scale != ratio or scale not in (2, 3):
        raise ValueError(f"upconv1 has {ratio} x {channels} output channels; expected 4x (x2) or 9x (x3)")
    return scale


def infer_msrresnet_config(state: StateDict) -> dict:
    """The MSRResNet config (without ``"arch"``) whose state dict ``state`` is, from its tensor shapes."""
    channels, in_channels = state["conv_first.conv.weight"].shape[:2]
    scale = msrresnet_scale(channels, state["upconv1.conv.weight"].shape[0], "upconv2.conv.weight" in state)
    return {"scale": scale, "num_blocks": count_indices(state, r"body\.(\d+)\.conv1\.conv\.weight"),
            "channels": channels, "in_channels": in_channels}


register(Architecture(MSRRESNET_ARCH, MSRResNet, keys=("conv_first.conv.weight", "body.0.conv1.conv.weight",
                                                       "upconv1.conv.weight", "conv_last.conv.weight"),
                      infer=infer_msrresnet_config))
# No detector: the output mapping leaves no trace in the weights, which are SRResNet's (detected as it).
register(Architecture(PEER_SRRESNET_ARCH, PeerSRResNet))
