"""The SRGAN discriminator (Ledig et al. 2017)."""

from __future__ import annotations

import torch
from torch import nn

from .registry import Architecture, StateDict, register

DISCRIMINATOR_ARCH = "discriminator"


class Discriminator(nn.Module):
    """(N, 3, H, W) image -> (N,) real/fake logit.

    Eight 3x3 conv layers 64 -> 512 with strides 1, 2 alternating, BatchNorm after all but the
    first, LeakyReLU(0.2); then Dense(1024), LeakyReLU(0.2), Dense(1). The paper's 96x96 crops
    leave a 6x6 map; other input sizes are pooled to 6x6 so the dense layers always fit.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64) -> None:
        super().__init__()
        self.config = {"arch": DISCRIMINATOR_ARCH, "in_channels": in_channels, "channels": channels}
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(8):
            c_out = channels * 2 ** (i // 2)
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=1 + i % 2, padding=1, bias=i == 0))
            if i > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * 36, 1024), nn.LeakyReLU(0.2, inplace=True), nn.Linear(1024, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x))).squeeze(1)


def infer_config(state: StateDict) -> dict:
    """The Discriminator config (without ``"arch"``) whose state dict ``state`` is: its first conv's shape."""
    channels, in_channels = state["features.0.weight"].shape[:2]
    return {"in_channels": in_channels, "channels": channels}


register(Architecture(DISCRIMINATOR_ARCH, Discriminator, keys=("features.0.weight", "classifier.1.weight"),
                      infer=infer_config))
