"""SRGAN losses: pixel loss, VGG19 content loss and the adversarial (BCE-with-logits) losses.

The VGG19 feature stack is built here with plain ``torch.nn`` from a local weights file in
torchvision's format (``features.N.weight`` / ``features.N.bias``), so neither torchvision nor a
download is needed. Layer names follow the SRGAN paper: ``conv5_4`` is phi_{5,4}, "the feature map
obtained by the 4th convolution (after activation) before the 5th max-pooling layer".
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .nn import ConvPReLU
from .ops import functional

# VGG19 ("E"): convolutions per block; every block ends with a 2x2 max-pool.
_VGG19_BLOCKS = (2, 2, 4, 4, 4)
# ImageNet statistics the torchvision weights were trained with (inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The paper rescales the VGG feature maps by 1/12.75 "to obtain VGG losses of a scale comparable to the MSE loss".
PAPER_FEATURE_SCALE = 1.0 / 12.75


class VGGWeightsError(UserError, ValueError):
    """The VGG19 weights file is missing or not in torchvision's VGG19 layout."""


def vgg19_layer_indices() -> dict[str, tuple[int, int]]:
    """``{"conv{b}_{k}": (conv_index, relu_index)}`` in torchvision's ``vgg19().features`` numbering."""
    names, index = {}, 0
    for block, convs in enumerate(_VGG19_BLOCKS, start=1):
        for k in range(1, convs + 1):
            names[f"conv{block}_{k}"] = (index, index + 1)
            index += 2
        index += 1  # the max-pool closing the block
    return names


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VGGWeightsError(f"VGG19 weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only: a .pth from elsewhere must not be able to run code when loaded.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for corrupt files
        raise VGGWeightsError(f"{path}: not a readable weights file ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise VGGWeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    # Accept the bare feature stack too ("0.weight") and DataParallel's "module." prefix.
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if not key.startswith("features."):
            key = "features." + key
        out[key] = value
    return out


def _vgg_conv(state: dict[str, torch.Tensor], i: int, c_in: int, relu: bool) -> ConvPReLU:
    """VGG19's conv ``features.{i}`` (3x3, bias) with its ReLU when ``relu``, weights from ``state``."""
    weight, bias = state.get(f"features.{i}.weight"), state.get(f"features.{i}.bias")
    if weight is None or bias is None:
        raise VGGWeightsError(f"features.{i}.weight/bias missing: not torchvision's VGG19 layout")
    if weight.dim() != 4 or weight.shape[1] != c_in or weight.shape[2:] != (3, 3) or bias.shape != (weight.shape[0],):
        raise VGGWeightsError(f"features.{i}.weight has shape {tuple(weight.shape)}, expected "
                              f"(C, {c_in}, 3, 3): not torchvision's VGG19 layout")
    layer = ConvPReLU(c_in, weight.shape[0], 3, activation="relu" if relu else None)
    with torch.no_grad():
        layer.conv.weight.copy_(weight)
        layer.conv.bias.copy_(bias)
    return layer


class VGGFeatures(nn.Module):
    """VGG19 up to one layer: (N, 3, H, W) RGB in [0, 1] -> feature map, frozen, eval mode.

    The input is normalised with the ImageNet statistics inside the module. ``layer`` is
    ``conv{block}_{k}`` (after its ReLU, as in the paper) or ``conv{block}_{k}_prerelu``
    (before it, as ESRGAN uses). Channel widths are read from the weights file, so any
    VGG19-shaped network in torchvision's key layout loads.
    """

    def __init__(self, state: dict[str, torch.Tensor], layer: str = "conv5_4") -> None:
        super().__init__()
        indices = vgg19_layer_indices()
        base = layer.removesuffix("_prerelu")
        if base not in indices:
            raise VGGWeightsError(f"unknown VGG19 layer {layer!r}; choose one of {', '.join(indices)} "
                                  "(optionally with the suffix _prerelu)")
        conv_index, relu_index = indices[base]
        last = conv_index if layer.endswith("_prerelu") else relu_index
        conv_positions = {i for i, _ in indices.values()}
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(last + 1):
            if i in conv_positions:
                # Conv + its ReLU as one fused op (fastsr's conv2d_prelu with slope 0); the ReLU's own
                # index is then skipped. A "_prerelu" layer ends on a conv without activation.
                relu = i + 1 <= last
                layers.append(_vgg_conv(state, i, c_in, relu))
                c_in = layers[-1].conv.out_channels
            elif i - 1 not in conv_positions:
                layers.append(nn.MaxPool2d(2, 2))
        self.layer = layer
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGGFeatures:
        # Frozen feature extractor: it stays in eval mode whatever the caller does.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.features(x)

    @classmethod
    def from_file(cls, path: str | os.PathLike, layer: str = "conv5_4") -> VGGFeatures:
        """Load torchvision-format VGG19 weights (``.pth``/``.pt`` state dict or ``.safetensors``)."""
        return cls(_read_state_dict(Path(path)), layer)


class ContentLoss(nn.Module):
    """SRGAN content loss: MSE between (scaled) VGG features of SR and HR, or plain pixel MSE.

    ``features=None`` gives the pixel-MSE content loss (the paper's SRGAN-MSE). With VGG
    features, both maps are multiplied by ``feature_scale`` (1/12.75 in the paper) first.
    Returns an fp32 scalar.
    """

    def __init__(self, features: VGGFeatures | None, feature_scale: float = PAPER_FEATURE_SCALE) -> None:
        super().__init__()
        self.features = features
        self.feature_scale = feature_scale

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if self.features is None:
            return functional.mse(sr.float(), hr.float())
        with torch.no_grad():
            target = self.features(hr.to(sr.dtype))
        pred = self.features(sr)
        return (pred.float() * self.feature_scale - target.float() * self.feature_scale).square().mean()


def pixel_loss(sr: torch.Tensor, hr: torch.Tensor, kind: str) -> torch.Tensor:
    """``"mse"`` or ``"l1"`` between (N, 3, H, W) images, as an fp32 scalar."""
    if kind == "l1":
        return (sr.float() - hr.float()).abs().mean()
    if kind == "mse":
        return functional.mse(sr.float(), hr.float())
    raise ValueError(f"pixel loss must be 'mse' or 'l1', got {kind!r}")


def adversarial_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """BCE-with-logits against an all-real (1) or all-fake (0) target; (N,) logits -> fp32 scalar.

    The generator uses ``real=True`` on its fakes: the paper's -log D(G(x)) (non-saturating).
    """
    logits = logits.float()
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)
