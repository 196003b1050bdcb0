"""SRResNet, the SRGAN generator (Ledig et al. 2017), exactly as in the paper."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn import ConvPReLU, ResidualBlock, UpsampleBlock
from .registry import Architecture, StateDict, count_indices, register

SRRESNET_ARCH = "srresnet"


class SRResNet(nn.Module):
    """SRGAN generator: (N, 3, H, W) in [0, 1] -> (N, 3, H*scale, W*scale).

    9x9 conv + PReLU; ``num_blocks`` residual blocks; 3x3 conv - BN + global skip;
    log2(scale) x [3x3 conv C -> 4C, PixelShuffle(2), PReLU]; 9x9 conv to 3 channels.
    At scale 4 with 16 blocks of 64 channels it has 1,547,350 trainable parameters.
    """

    def __init__(self, scale: int = 4, num_blocks: int = 16, channels: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        if scale not in (2, 4, 8):
            raise ValueError(f"SRResNet scale must be 2, 4 or 8, got {scale}")
        self.config = {"arch": SRRESNET_ARCH, "scale": scale, "num_blocks": num_blocks, "channels": channels,
                       "in_channels": in_channels}
        self.scale = scale
        self.head = ConvPReLU(in_channels, channels, 9)
        self.body = nn.Sequential(*(ResidualBlock(channels) for _ in range(num_blocks)))
        self.body_tail = ConvPReLU(channels, channels, 3, bias=False, batch_norm=True, activation=None)
        self.upsample = nn.Sequential(*(UpsampleBlock(channels) for _ in range(int(math.log2(scale)))))
        self.tail = ConvPReLU(channels, in_channels, 9, activation=None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming init, plus two standard tricks that speed up early training:
        the last BN of each residual block starts at zero (blocks start as identities), and
        the upsampling convs use ICNR (each sub-pixel starts equal: no checkerboard), and the
        output conv starts small."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.25, nonlinearity="leaky_relu")
                if module.bias is not None:
                    module.bias.zero_()
        for block in self.body:
            block.conv2.bn.weight.zero_()
        self.tail.conv.weight.mul_(0.1)  # start near a flat image rather than at +-1
        for block in self.upsample:
            conv, r = block.conv.conv, block.conv.shuffle
            base = conv.weight[:: r * r].clone()
            conv.weight.copy_(base.repeat_interleave(r * r, dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        x = self.body_tail(self.body(features), residual=features)
        return self.tail(self.upsample(x))


def infer_config(state: StateDict) -> dict:
    """The SRResNet config (without ``"arch"``) whose state dict ``state`` is, from its tensor shapes."""
    channels, in_channels = state["head.conv.weight"].shape[:2]
    upsamplings = count_indices(state, r"upsample\.(\d+)\.conv\.conv\.weight")
    if upsamplings not in (1, 2, 3):
        raise ValueError(f"{upsamplings} x2 upsampling blocks; fastsr supports 1, 2 or 3 (x2/x4/x8)")
    return {"scale": 2**upsamplings, "num_blocks": count_indices(state, r"body\.(\d+)\.conv1\.conv\.weight"),
            "channels": channels, "in_channels": in_channels}


# PeerSRResNet (variants) has the same keys: its state dicts are detected as this architecture.
register(Architecture(SRRESNET_ARCH, SRResNet, keys=("head.conv.weight", "body_tail.conv.weight"),
                      infer=infer_config))
