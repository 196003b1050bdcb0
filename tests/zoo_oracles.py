"""Plain torch oracles of the ESRGAN family, SRVGGNetCompact and SPAN, written from the published
architectures with the published module names (their state dicts have exactly the published keys).

Used by tests/test_zoo_loading.py (loading each layout), tests/test_zoo_fused.py (the fused
inference forms) and benchmarks/test_zoo.py (the plain modules fastsr is compared with).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from cases import randomize
from torch import nn

C, G = 8, 4  # feature and growth channels of the small test models


def conv(c_in: int, c_out: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, 1, k // 2)


# ------------------------------------------------------------------------------------------------
# Oracles: BasicSR/Real-ESRGAN RRDBNet and BSRGAN/RealSR's "new architecture" (same arithmetic,
# other names), the original ESRGAN's flattened Sequential


class DenseBlock(nn.Module):
    """ResidualDenseBlock(_5C): conv1..conv5, LeakyReLU(0.2) after the first four, 0.2 * x5 + x."""

    def __init__(self, c: int, g: int) -> None:
        super().__init__()
        for k in range(1, 6):
            self.add_module(f"conv{k}", conv(c + (k - 1) * g, c if k == 5 else g))

    def forward(self, x):
        features = [x]
        for k in range(1, 5):
            features.append(F.leaky_relu(getattr(self, f"conv{k}")(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, c: int, g: int, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        for name in names:
            self.add_module(name, DenseBlock(c, g))

    def forward(self, x):
        out = x
        for name in self.names:
            out = getattr(self, name)(out)
        return out * 0.2 + x


class BasicSRRRDBNet(nn.Module):
    """basicsr.archs.rrdbnet_arch.RRDBNet: x4, and x2 / x1 by pixel-unshuffling the input first."""

    def __init__(self, scale: int = 4, c: int = C, blocks: int = 2, g: int = G, in_ch: int = 3, out_ch: int = 3):
        super().__init__()
        self.scale = scale
        self.conv_first = conv(in_ch * {1: 16, 2: 4}.get(scale, 1), c)
        self.body = nn.Sequential(*(RRDB(c, g, ("rdb1", "rdb2", "rdb3")) for _ in range(blocks)))
        self.conv_body = conv(c, c)
        self.conv_up1, self.conv_up2, self.conv_hr = conv(c, c), conv(c, c), conv(c, c)
        self.conv_last = conv(c, out_ch)

    def forward(self, x):
        if self.scale in (1, 2):
            x = F.pixel_unshuffle(x, 4 // self.scale)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for up in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class NewArchRRDBNet(nn.Module):
    """BSRGAN / RealSR / ESRGAN's RRDBNet_arch: x4 with upconv1 + upconv2; BSRGAN's x2 only upconv1."""

    def __init__(self, scale: int = 4, c: int = C, blocks: int = 2, g: int = G) -> None:
        super().__init__()
        self.conv_first = conv(3, c)
        self.RRDB_trunk = nn.Sequential(*(RRDB(c, g, ("RDB1", "RDB2", "RDB3")) for _ in range(blocks)))
        self.trunk_conv = conv(c, c)
        self.ups = int(math.log2(scale))
        for i in range(1, self.ups + 1):
            self.add_module(f"upconv{i}", conv(c, c))
        self.HRconv = conv(c, c)
        self.conv_last = conv(c, 3)

    def forward(self, x):
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.RRDB_trunk(fea))
        for i in range(1, self.ups + 1):
            fea = F.leaky_relu(getattr(self, f"upconv{i}")(F.interpolate(fea, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.HRconv(fea), 0.2))


class OldDenseBlock(nn.Module):
    """The old architecture's ResidualDenseBlock_5C: each conv a conv_block Sequential (conv[, lrelu]),
    so its keys are convK.0.weight; ESRGAN+ adds a conv1x1 path."""

    def __init__(self, c: int, g: int, plus: bool = False) -> None:
        super().__init__()
        if plus:
            self.conv1x1 = nn.Conv2d(c, g, 1, bias=False)
        for k in range(1, 5):
            self.add_module(f"conv{k}", nn.Sequential(conv(c + (k - 1) * g, g), nn.LeakyReLU(0.2)))
        self.conv5 = nn.Sequential(conv(c + 4 * g, c))

    def forward(self, x):
        features = [x]
        for k in range(1, 5):
            features.append(getattr(self, f"conv{k}")(torch.cat(features, 1)))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class OldRRDB(nn.Module):
    def __init__(self, c: int, g: int, plus: bool = False) -> None:
        super().__init__()
        self.RDB1, self.RDB2, self.RDB3 = (OldDenseBlock(c, g, plus) for _ in range(3))

    def forward(self, x):
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class ShortcutBlock(nn.Module):
    def __init__(self, sub: nn.Module) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, x):
        return x + self.sub(x)


class OldESRGAN(nn.Module):
    """The original ESRGAN (architecture.RRDBNet + block.sequential, which flattens everything):
    model = [conv, Shortcut(RRDBs..., conv), (Upsample, conv, lrelu) per x2, conv, lrelu, conv].
    ``unshuffle``: a Real-ESRGAN x2 / x1 model in this layout (as converted for ESRGAN tools)."""

    def __init__(self, scale: int = 4, c: int = C, blocks: int = 2, g: int = G, plus: bool = False,
                 unshuffle: int = 1) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        body = nn.Sequential(*(OldRRDB(c, g, plus) for _ in range(blocks)), conv(c, c))
        layers = [conv(3 * unshuffle**2, c), ShortcutBlock(body)]
        for _ in range(int(math.log2(scale * unshuffle))):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv(c, c), nn.LeakyReLU(0.2)]
        layers += [conv(c, c), nn.LeakyReLU(0.2), conv(c, 3)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x)


# ------------------------------------------------------------------------------------------------
# Oracles: Real-ESRGAN's SRVGGNetCompact and SPAN (training form)


class RealESRGANCompact(nn.Module):
    """realesrgan.archs.srvgg_arch.SRVGGNetCompact."""

    def __init__(self, num_conv: int = 2, upscale: int = 4, c: int = C, in_ch: int = 3, act: str = "prelu") -> None:
        super().__init__()
        self.upscale = upscale
        self.body = nn.ModuleList()
        for c_in in (in_ch, *(c,) * num_conv):
            self.body.append(nn.Conv2d(c_in, c, 3, 1, 1))
            self.body.append({"prelu": lambda: nn.PReLU(c), "relu": nn.ReLU}[act]())
        self.body.append(nn.Conv2d(c, in_ch * upscale * upscale, 3, 1, 1))
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x):
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.upscale, mode="nearest")


class Conv3XC(nn.Module):
    """SPAN's re-parameterisable conv in its training form: conv.2(conv.1(conv.0(pad(x)))) + sk(x),
    gain 2; ``eval_conv`` is only stored (the published eval mode recomputes it)."""

    def __init__(self, c_in: int, c_out: int, gain: int = 2) -> None:
        super().__init__()
        self.sk = nn.Conv2d(c_in, c_out, 1)
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_in * gain, 1), nn.Conv2d(c_in * gain, c_out * gain, 3),
                                  nn.Conv2d(c_out * gain, c_out, 1))
        self.eval_conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x):
        return self.conv(F.pad(x, (1, 1, 1, 1))) + self.sk(x)


class SPAB(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1_r, self.c2_r, self.c3_r = Conv3XC(c, c), Conv3XC(c, c), Conv3XC(c, c)
        self.act1 = nn.SiLU(inplace=True)  # as published: in place, so out1 below is returned activated
        self.act2 = nn.LeakyReLU(0.1, inplace=True)  # published but unused

    def forward(self, x):
        out1 = self.c1_r(x)
        out1_act = self.act1(out1)
        out2_act = self.act1(self.c2_r(out1_act))
        out3 = self.c3_r(out2_act)
        sim_att = torch.sigmoid(out3) - 0.5
        return (out3 + x) * sim_att, out1, sim_att


class SPANOracle(nn.Module):
    """SPAN (hongyuanyu/SPAN span_arch.py; spandrel's ``no_norm`` buffer for norm=False)."""

    def __init__(self, scale: int = 4, c: int = C, in_ch: int = 3, norm: bool = True) -> None:
        super().__init__()
        self.mean = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)
        if not norm:
            self.register_buffer("no_norm", torch.zeros(1))
        self.norm = norm
        self.conv_1 = Conv3XC(in_ch, c)
        for i in range(1, 7):
            self.add_module(f"block_{i}", SPAB(c))
        self.conv_cat = nn.Conv2d(4 * c, c, 1)
        self.conv_2 = Conv3XC(c, c)
        self.upsampler = nn.Sequential(nn.Conv2d(c, in_ch * scale * scale, 3, 1, 1), nn.PixelShuffle(scale))

    def forward(self, x):
        if self.norm:
            x = (x - self.mean.type_as(x)) * 255.0
        out_feature = self.conv_1(x)
        out_b1, _, _ = self.block_1(out_feature)
        out = out_b1
        for i in range(2, 6):
            out, _, _ = getattr(self, f"block_{i}")(out)
        out_b6, out_b5_2, _ = self.block_6(out)
        out = self.conv_cat(torch.cat([out_feature, self.conv_2(out_b6), out_b1, out_b5_2], 1))
        return self.upsampler(out)


# ------------------------------------------------------------------------------------------------
# Random weights


@torch.no_grad()
def span_oracle(scale: int = 4, norm: bool = True, seed: int = 0, channels: int = C) -> SPANOracle:
    """A random SPAN whose first conv undoes the x255 of the input normalisation, as a trained one
    does: with order-1 features the network is as well conditioned as the real models. The
    published models have 48 channels; the tests use 8."""
    oracle = randomize(SPANOracle(scale, c=channels, norm=norm), seed)
    if norm:
        oracle.conv_1.sk.weight.div_(255)
        oracle.conv_1.conv[0].weight.div_(255)
    return oracle
