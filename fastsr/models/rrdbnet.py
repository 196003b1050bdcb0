"""ESRGAN's generator, RRDBNet (Wang et al. 2018), as used by ESRGAN, Real-ESRGAN, BSRGAN and RealSR.

Built from :mod:`fastsr.nn` fused layers, with BasicSR's module names (``conv_first``,
``body.N.rdb1.conv1``, ``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``), so
a BasicSR checkpoint maps one key to one key; :mod:`fastsr.models.peers` reads the other layouts.

:func:`fastsr.optimize` calls :meth:`RRDBNet.optimize_for_inference`, which rewrites the model
into its inference form (same outputs up to float rounding, different weights):

* the 0.2 residual scales go into the weights of each dense block's last conv, so
  ``0.2 * conv5(f) + x`` is one fused conv with a residual; an RRDB's own scale folds into its
  third block: ``0.2 (0.2 c5 + y) + x = 0.04 c5 + (x + 0.2 y)``;
* each nearest x2 upsampling + 3x3 conv becomes one low-resolution conv to 4x the channels with
  the pixel shuffle and LeakyReLU in its epilogue (:func:`fastsr.nn.fold_nearest_upsampling`):
  no upsampled tensor is built, and the conv runs on fastsr's fused conv+shuffle path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import ConvPReLU, fold_nearest_upsampling
from .registry import Architecture, StateDict, count_indices, register

RRDBNET_ARCH = "rrdbnet"

# Every activation of the ESRGAN family is LeakyReLU(0.2); every residual is scaled by 0.2.
_LEAKY = {"activation": "leaky_relu", "negative_slope": 0.2}
RESIDUAL_SCALE = 0.2


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each reading the concatenation of the block input and all earlier outputs:
    x_k = lrelu(conv_k(cat(x, x_1, ..., x_{k-1}))) for k < 5; returns 0.2 * conv_5(cat(...)) + x.

    (N, channels, H, W) -> same; ``growth`` channels per inner conv.
    """

    def __init__(self, channels: int = 64, growth: int = 32) -> None:
        super().__init__()
        for k in range(1, 5):
            self.add_module(f"conv{k}", ConvPReLU(channels + (k - 1) * growth, growth, 3, **_LEAKY))
        self.conv5 = ConvPReLU(channels + 4 * growth, channels, 3, activation=None)
        self.scale_folded = False  # True once conv5's weights carry the 0.2 (inference form)

    def dense_features(self, x: torch.Tensor) -> torch.Tensor:
        """cat(x, x_1, ..., x_4): what conv5 reads, (N, channels + 4 growth, H, W).

        Without autograd (inference) the features are written into one preallocated channels_last
        buffer and each conv reads its leading channels in place (fastsr's convs take channel
        slices without a copy): 1 + 4 slice copies instead of four ever-growing concatenations.
        Under autograd the in-place writes would invalidate saved inputs, so it concatenates.
        """
        convs = (self.conv1, self.conv2, self.conv3, self.conv4)
        if torch.is_grad_enabled():
            features = [x]
            for conv in convs:
                features.append(conv(torch.cat(features, 1)))
            return torch.cat(features, 1)
        n, c, h, w = x.shape
        growth = self.conv1.conv.out_channels
        buffer = torch.empty((n, c + 4 * growth, h, w), dtype=x.dtype, device=x.device,
                             memory_format=torch.channels_last)
        buffer[:, :c] = x
        for k, conv in enumerate(convs):
            start = c + k * growth
            buffer[:, start:start + growth] = conv(buffer[:, :start])
        return buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_folded:
            return self.conv5(self.dense_features(x), residual=x)
        return self.conv5(self.dense_features(x)) * RESIDUAL_SCALE + x

    @torch.no_grad()
    def fold_scale(self, factor: float) -> None:
        """Multiply conv5's weight and bias by ``factor`` (exact up to one rounding per weight)."""
        self.conv5.conv.weight.mul_(factor)
        if self.conv5.conv.bias is not None:
            self.conv5.conv.bias.mul_(factor)


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, then 0.2 * their output + x."""

    def __init__(self, channels: int = 64, growth: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(channels, growth)
        self.rdb2 = ResidualDenseBlock(channels, growth)
        self.rdb3 = ResidualDenseBlock(channels, growth)
        self.scale_folded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scale_folded:
            return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x
        y = self.rdb2(self.rdb1(x))
        # 0.2 * (0.2 conv5(f) + y) + x with the 0.04 in rdb3.conv5's weights: one fused conv.
        return self.rdb3.conv5(self.rdb3.dense_features(y), residual=torch.add(x, y, alpha=RESIDUAL_SCALE))

    def fold_scales(self) -> None:
        """Switch to the inference form: every residual scale lives in a conv5's weights."""
        if self.scale_folded:
            return
        self.rdb1.fold_scale(RESIDUAL_SCALE)
        self.rdb2.fold_scale(RESIDUAL_SCALE)
        self.rdb3.fold_scale(RESIDUAL_SCALE * RESIDUAL_SCALE)
        self.rdb1.scale_folded = self.rdb2.scale_folded = True
        self.scale_folded = True


class RRDBNet(nn.Module):
    """RRDBNet: (N, C_in, H, W) in [0, 1] -> (N, C_out, H*scale, W*scale).

    conv_first; ``num_blocks`` RRDBs; conv_body + skip; ``log2(scale * unshuffle)`` x [nearest x2
    upsampling, 3x3 conv, LeakyReLU]; conv_hr + LeakyReLU; conv_last. Scales 1 and 2 (Real-ESRGAN's
    x1/x2 models) first pixel-unshuffle the input by ``unshuffle`` = 4 / 2 and then upsample x4, as
    BasicSR does; ``unshuffle=1`` builds them plainly, as the original ESRGAN code and BSRGAN do
    (the community 1x models, BSRGANx2: 0 / 1 upsampling). Scale 8 (original ESRGAN x8 models)
    upsamples three times. x4plus (23 blocks, 64 channels, growth 32) has 16,697,987 parameters.
    """

    def __init__(self, scale: int = 4, num_blocks: int = 23, channels: int = 64, growth: int = 32,
                 in_channels: int = 3, out_channels: int = 3, unshuffle: int | None = None) -> None:
        super().__init__()
        if scale not in (1, 2, 4, 8):
            raise ValueError(f"RRDBNet scale must be 1, 2, 4 or 8, got {scale}")
        default_unshuffle = {1: 4, 2: 2}.get(scale, 1)
        if unshuffle not in (None, 1, default_unshuffle):
            raise ValueError(f"RRDBNet x{scale} pixel-unshuffles by {default_unshuffle} or not at all (1), "
                             f"got unshuffle={unshuffle}")
        self.config = {"arch": RRDBNET_ARCH, "scale": scale, "num_blocks": num_blocks, "channels": channels,
                       "growth": growth, "in_channels": in_channels, "out_channels": out_channels}
        self.scale = scale
        self.unshuffle = default_unshuffle if unshuffle is None else unshuffle
        if self.unshuffle != default_unshuffle:
            self.config["unshuffle"] = self.unshuffle
        self.conv_first = ConvPReLU(in_channels * self.unshuffle**2, channels, 3, activation=None)
        self.body = nn.Sequential(*(RRDB(channels, growth) for _ in range(num_blocks)))
        self.conv_body = ConvPReLU(channels, channels, 3, activation=None)
        self.num_upsamplings = int(math.log2(scale * self.unshuffle))
        for i in range(1, self.num_upsamplings + 1):
            self.add_module(f"conv_up{i}", ConvPReLU(channels, channels, 3, **_LEAKY))
        self.conv_hr = ConvPReLU(channels, channels, 3, **_LEAKY)
        self.conv_last = ConvPReLU(channels, out_channels, 3, activation=None)
        self.upsampling_folded = False  # True: each conv_up is an LR conv + pixel shuffle

    def upsampling_convs(self) -> list[ConvPReLU]:
        return [getattr(self, f"conv_up{i}") for i in range(1, self.num_upsamplings + 1)]

    @property
    def input_alignment(self) -> int:
        """Tiles of an unshuffling model must start on its unshuffle grid (fastsr.tiling)."""
        return self.unshuffle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            return self._forward_unshuffled(x)
        return self._forward_features(x)

    def _forward_unshuffled(self, x: torch.Tensor) -> torch.Tensor:
        """x1/x2: any size, as Real-ESRGAN runs them: the bottom/right edge reflect-padded to a
        multiple of the unshuffle factor (replicated where the image is too small to reflect),
        the output cropped back."""
        h, w, a = x.shape[-2], x.shape[-1], self.unshuffle
        pad_h, pad_w = -h % a, -w % a
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        out = self._forward_features(F.pixel_unshuffle(x, a))
        return out[..., : h * self.scale, : w * self.scale]

    def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv_first(x)
        features = self.conv_body(self.body(features), residual=features)
        for conv in self.upsampling_convs():
            if not self.upsampling_folded:
                features = F.interpolate(features, scale_factor=2, mode="nearest")
            features = conv(features)
        return self.conv_last(self.conv_hr(features))

    @torch.no_grad()
    def optimize_for_inference(self) -> None:
        """Rewrite in place into the inference form (module docstring); idempotent.

        The state dict changes (conv_up weights have 4x the output channels), so save the model
        before, not after.
        """
        for block in self.body:
            block.fold_scales()
        if self.upsampling_folded:
            return
        for i, old in enumerate(self.upsampling_convs(), start=1):
            weight, bias = fold_nearest_upsampling(old.conv.weight, old.conv.bias)
            new = ConvPReLU(old.conv.in_channels, weight.shape[0], 3, bias=bias is not None, shuffle=2, **_LEAKY)
            new = new.to(device=weight.device, dtype=weight.dtype)
            new.conv.weight.copy_(weight)
            if bias is not None:
                new.conv.bias.copy_(bias)
            setattr(self, f"conv_up{i}", new)
        self.upsampling_folded = True


def scale_layout(conv_in: int, out_channels: int, num_upsamplings: int) -> tuple[int, int, int | None]:
    """(scale, in_channels, unshuffle) of the RRDBNet whose conv_first reads ``conv_in`` channels,
    whose conv_last writes ``out_channels`` and which has ``num_upsamplings`` upsampling convs;
    ``unshuffle`` is None where it is the scale's default (a config then leaves it out).

    The weights do not store the input channels apart from the unshuffle: an input of 16x / 4x the
    output channels is read as Real-ESRGAN's pixel-unshuffled x1 / x2 (in_channels = out_channels),
    as BasicSR builds them. ValueError when no RRDBNet has these shapes.
    """
    ratio, rest = divmod(conv_in, out_channels)
    unshuffle = {16: 4, 4: 2}.get(ratio, 1) if rest == 0 else 1
    if unshuffle > 1 and num_upsamplings == 2:
        return 4 // unshuffle, conv_in // unshuffle**2, None
    if unshuffle == 1 and num_upsamplings in (0, 1, 2, 3):
        scale = 2**num_upsamplings
        return scale, conv_in, (1 if scale < 4 else None)  # a 1x / 2x model without Real-ESRGAN's unshuffle
    raise ValueError(f"{num_upsamplings} upsampling convs, {conv_in} input and {out_channels} output channels; "
                     "fastsr's RRDBNet builds x1, x2, x4 and x8 (0 to 3 upsampling convs) and Real-ESRGAN's "
                     "pixel-unshuffled x1 / x2 (2 convs, 16x / 4x the input channels)")


def infer_config(state: StateDict) -> dict:
    """The RRDBNet config (without ``"arch"``) whose state dict ``state`` is (see :func:`scale_layout`);
    of the model before :meth:`RRDBNet.optimize_for_inference`, whose weights these are."""
    channels, conv_in = state["conv_first.conv.weight"].shape[:2]
    out_channels = state["conv_last.conv.weight"].shape[0]
    scale, in_channels, unshuffle = scale_layout(conv_in, out_channels,
                                                 count_indices(state, r"conv_up(\d+)\.conv\.weight"))
    config = {"scale": scale, "num_blocks": count_indices(state, r"body\.(\d+)\.rdb1\.conv1\.conv\.weight"),
              "channels": channels, "growth": state["body.0.rdb1.conv1.conv.weight"].shape[0],
              "in_channels": in_channels, "out_channels": out_channels}
    return config if unshuffle is None else {**config, "unshuffle": unshuffle}


register(Architecture(RRDBNET_ARCH, RRDBNet, keys=("conv_first.conv.weight", "body.0.rdb1.conv1.conv.weight",
                                                   "conv_body.conv.weight", "conv_last.conv.weight"),
                      infer=infer_config))
