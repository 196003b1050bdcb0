"""Read generator checkpoints written by other SRGAN code bases and convert them to fastsr models.

Known formats (detected from the state-dict keys; sizes and scale inferred from tensor shapes):

* ``lornatang`` - Lornatang SRGAN-PyTorch's SRResNet / SRGAN generator: ``conv1.0``, ``conv1.1``,
  ``trunk.N.rcb.{0..4}``, ``conv2.{0,1}``, ``upsampling.N.upsample_block.{0,2}``, ``conv3``;
  x2/x4/x8 -> :class:`~fastsr.models.variants.PeerSRResNet` with ``output="clamp"``.
* ``basicsr`` - BasicSR's MSRResNet: ``conv_first``, ``body.N.conv1/conv2``, ``upconv1``, ``upconv2``,
  ``conv_hr``, ``conv_last``; x2/x3/x4 -> :class:`~fastsr.models.variants.MSRResNet`.
* ``leftthomas`` - leftthomas SRGAN's generator: ``block1`` ... ``block8``
  -> :class:`~fastsr.models.variants.PeerSRResNet` with ``output="tanh"``.
* ``fastsr`` - a bare fastsr :class:`~fastsr.SRResNet` state dict (e.g. fastsr's training checkpoint).

Containers: a bare state dict, or a dict holding it under ``params_ema`` / ``params`` (BasicSR),
``ema_state_dict`` / ``state_dict`` (Lornatang ``.pth.tar``), ``ema`` / ``model`` (fastsr); the EMA
weights are preferred when both are there. ``module.`` (DataParallel) and ``_orig_mod.``
(torch.compile) key prefixes are removed. Pickled files load with ``torch.load(weights_only=True)``,
so a checkpoint cannot run code.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .checkpoint import ModelFileError, build_model

# Where containers keep the generator weights, most preferred first.
_EMA_CONTAINER_KEYS = ("params_ema", "ema_state_dict", "ema")
_RAW_CONTAINER_KEYS = ("params", "state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")
# Entries of a state dict that are bookkeeping, not weights (torch.optim.swa_utils.AveragedModel).
_IGNORED_KEYS = ("n_averaged",)
_BN_STATS = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_LIST_LIMIT = 12


class CheckpointFormatError(ModelFileError, UserError):
    """A checkpoint is in no format fastsr knows, or its tensors do not fit the detected format."""


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f", ... ({len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else "")


def is_torch_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` was written by ``torch.save`` (a zip archive, or a legacy raw pickle)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def read_torch_file(path: str | os.PathLike) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors as :class:`ModelFileError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # it holds more than tensors: say so, never suggest weights_only=False
        wanted = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = (f"it would import {wanted.group(1)} when loaded" if wanted
                else "it holds Python objects, not just tensors")
        raise ModelFileError(f"{path}: refused: {what}; fastsr reads weights only and never runs code from a model "
                             "file (save the state dict, or use .safetensors)") from None
    except Exception as exc:  # RuntimeError for corrupt archives
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path}: cannot read it with torch.load(weights_only=True): {first_line}") from None


def extract_state_dict(obj: object, *, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """The generator state dict inside a loaded checkpoint (see the module docstring), prefixes removed."""
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"checkpoint holds a {type(obj).__name__}, not a state dict or a dict of them")
    order = _EMA_CONTAINER_KEYS + _RAW_CONTAINER_KEYS if prefer_ema else _RAW_CONTAINER_KEYS + _EMA_CONTAINER_KEYS
    found = [k for k in order if isinstance(obj.get(k), Mapping) and obj[k]]
    # Containers first: a training checkpoint (fastsr's own: ema, model, torch_rng, ...) also holds
    # top-level tensors that are not weights.
    if found:
        obj = obj[found[0]]
    elif not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointFormatError(
            f"found no generator weights in the checkpoint: its top-level keys are {_listing(list(obj))}; "
            f"expected a state dict or one under {', '.join(order)}")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor) or key in _IGNORED_KEYS:
            continue
        changed = True
        while changed:  # prefixes can nest: module._orig_mod.conv1...
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        state[key] = value
    return state


# A format: how to recognise it, the fastsr config its tensors imply, and a rename rule
# (peer key -> fastsr key, or None when the key has no place in the fastsr model).
Rule = Callable[[str], "str | None"]


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct N matching ``pattern`` (a regex with one group) among the keys."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.fullmatch(k))})


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointFormatError(f"the checkpoint lacks {key!r}")
    return tuple(state[key].shape)


def _doubling_scale(num_blocks: int, what: str) -> int:
    if num_blocks not in (1, 2, 3):
        raise CheckpointFormatError(f"{what}: {num_blocks} x2 upsampling blocks; fastsr supports 1, 2 or 3 (x2/x4/x8)")
    return 2 ** num_blocks


def _check_x2_upsampling(state: Mapping[str, torch.Tensor], keys: list[str], channels: int, what: str) -> None:
    for key in keys:
        out = _shape(state, key)[0]
        if out != 4 * channels:
            # Lornatang's x3 model puts 9C channels into PixelShuffle(2), which cannot run.
            raise CheckpointFormatError(f"{what}: {key} has {out} output channels; an x2 upsampling step needs "
                                        f"4 x {channels} (only x2/x4/x8 checkpoints of this format are supported)")


def _lornatang(state: Mapping[str, torch.Tensor]) -> tuple[dict, Rule]:
    channels, in_channels = _shape(state, "conv1.0.weight")[:2]
    ups = _count(state, r"upsampling\.(\d+)\.upsample_block\.0\.weight")
    _check_x2_upsampling(state, [f"upsampling.{i}.upsample_block.0.weight" for i in range(ups)], channels,
                         "Lornatang SRGAN-PyTorch checkpoint")
    config = {"arch": "peer_srresnet", "scale": _doubling_scale(ups, "Lornatang SRGAN-PyTorch checkpoint"),
              "num_blocks": _count(state, r"trunk\.(\d+)\.rcb\.0\.weight"), "channels": channels,
              "in_channels": in_channels, "output": "clamp"}
    rules = [
        (r"conv1\.0\.(weight|bias)", r"head.conv.\1"),
        (r"conv1\.1\.weight", "head.slope"),
        (r"trunk\.(\d+)\.rcb\.0\.(weight|bias)", r"body.\1.conv1.conv.\2"),
        (rf"trunk\.(\d+)\.rcb\.1\.{_BN_STATS}", r"body.\1.conv1.bn.\2"),
        (r"trunk\.(\d+)\.rcb\.2\.weight", r"body.\1.conv1.slope"),
        (r"trunk\.(\d+)\.rcb\.3\.(weight|bias)", r"body.\1.conv2.conv.\2"),
        (rf"trunk\.(\d+)\.rcb\.4\.{_BN_STATS}", r"body.\1.conv2.bn.\2"),
        (r"conv2\.0\.(weight|bias)", r"body_tail.conv.\1"),
        (rf"conv2\.1\.{_BN_STATS}", r"body_tail.bn.\1"),
        (r"upsampling\.(\d+)\.upsample_block\.0\.(weight|bias)", r"upsample.\1.conv.conv.\2"),
        (r"upsampling\.(\d+)\.upsample_block\.2\.weight", r"upsample.\1.conv.slope"),
        (r"conv3\.(weight|bias)", r"tail.conv.\1"),
    ]
    return config, _regex_rule(rules)


def _leftthomas(state: Mapping[str, torch.Tensor]) -> tuple[dict, Rule]:
    channels, in_channels = _shape(state, "block1.0.weight")[:2]
    ups = _count(state, r"block8\.(\d+)\.conv\.weight")
    what = "leftthomas SRGAN checkpoint"
    _check_x2_upsampling(state, [f"block8.{i}.conv.weight" for i in range(ups)], channels, what)
    config = {"arch": "peer_srresnet", "scale": _doubling_scale(ups, what),
              "num_blocks": 5, "channels": channels, "in_channels": in_channels, "output": "tanh"}

    def rule(key: str) -> str | None:
        if m := re.fullmatch(r"block([2-6])\.(conv1|bn1|prelu|conv2|bn2)\.(\w+)", key):
            block, layer, name = int(m.group(1)) - 2, m.group(2), m.group(3)
            target = {"conv1": "conv1.conv", "bn1": "conv1.bn", "prelu": "conv1.slope",
                      "conv2": "conv2.conv", "bn2": "conv2.bn"}[layer]
            return f"body.{block}.{target}" if layer == "prelu" else f"body.{block}.{target}.{name}"
        if m := re.fullmatch(rf"block8\.{ups}\.(weight|bias)", key):  # the 9x9 output conv follows the upsamplers
            return f"tail.conv.{m.group(1)}"
        return _regex_rule([
            (r"block1\.0\.(weight|bias)", r"head.conv.\1"),
            (r"block1\.1\.weight", "head.slope"),
            (r"block7\.0\.(weight|bias)", r"body_tail.conv.\1"),
            (rf"block7\.1\.{_BN_STATS}", r"body_tail.bn.\1"),
            (r"block8\.(\d+)\.conv\.(weight|bias)", r"upsample.\1.conv.conv.\2"),
            (r"block8\.(\d+)\.prelu\.weight", r"upsample.\1.conv.slope"),
        ])(key)

    return config, rule


def _basicsr(state: Mapping[str, torch.Tensor]) -> tuple[dict, Rule]:
    channels, in_channels = _shape(state, "conv_first.weight")[:2]
    if "upconv2.weight" in state:
        scale = 4
    else:
        ratio = _shape(state, "upconv1.weight")[0] // channels
        scale = math.isqrt(ratio)
        if scale * scale != ratio or scale not in (2, 3):
            raise CheckpointFormatError(f"BasicSR MSRResNet checkpoint: upconv1 has {ratio} x {channels} output "
                                        "channels; expected 4x (x2) or 9x (x3)")
    config = {"arch": "msrresnet", "scale": scale, "num_blocks": _count(state, r"body\.(\d+)\.conv1\.weight"),
              "channels": channels, "in_channels": in_channels}
    # fastsr's MSRResNet keeps BasicSR's module names; each conv sits inside a fused ConvPReLU.
    layer = r"(conv_first|body\.\d+\.conv[12]|upconv[12]|conv_hr|conv_last)"
    return config, _regex_rule([(rf"{layer}\.(weight|bias)", r"\1.conv.\2")])


def _fastsr(state: Mapping[str, torch.Tensor]) -> tuple[dict, Rule]:
    channels, in_channels = _shape(state, "head.conv.weight")[:2]
    ups = _count(state, r"upsample\.(\d+)\.conv\.conv\.weight")
    config = {"arch": "srresnet", "scale": _doubling_scale(ups, "fastsr SRResNet state dict"),
              "num_blocks": _count(state, r"body\.(\d+)\.conv1\.conv\.weight"), "channels": channels,
              "in_channels": in_channels}
    return config, lambda key: key


def _regex_rule(rules: list[tuple[str, str]]) -> Rule:
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]

    def rule(key: str) -> str | None:
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                return pattern.sub(replacement, key)
        return None

    return rule


# name -> (description, keys that identify it, converter)
FORMATS: dict[str, tuple[str, tuple[str, ...], Callable]] = {
    "lornatang": ("Lornatang SRGAN-PyTorch SRResNet/SRGAN generator", ("conv1.0.weight", "trunk.0.rcb.0.weight"),
                  _lornatang),
    "basicsr": ("BasicSR MSRResNet", ("conv_first.weight", "conv_last.weight", "upconv1.weight"), _basicsr),
    "leftthomas": ("leftthomas SRGAN generator", ("block1.0.weight", "block7.0.weight"), _leftthomas),
    "fastsr": ("fastsr SRResNet state dict", ("head.conv.weight", "body_tail.conv.weight"), _fastsr),
}


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """The name of the format (a key of :data:`FORMATS`) whose identifying keys ``state`` has."""
    for name, (_, keys, _) in FORMATS.items():
        if all(k in state for k in keys):
            return name
    known = "; ".join(f"{desc} ({', '.join(keys)})" for desc, keys, _ in FORMATS.values())
    raise CheckpointFormatError(f"unknown checkpoint format: none of its keys could be placed. Its keys: "
                                f"{_listing(sorted(state))}. Known formats and their keys: {known}")


def convert_state_dict(state: Mapping[str, torch.Tensor], *, fmt: str | None = None) -> nn.Module:
    """Build the fastsr model for a peer's generator state dict and load its weights; eval mode.

    ``fmt`` names the format (see :data:`FORMATS`); ``None`` detects it from the keys. A conv bias
    in front of a BatchNorm (leftthomas) is folded into the BatchNorm's running mean, which is exact
    in eval and training mode. Raises :class:`CheckpointFormatError` listing any key it cannot place,
    any weight the model still lacks and any tensor whose shape does not fit.
    """
    fmt = detect_format(state) if fmt is None else fmt
    if fmt not in FORMATS:
        raise CheckpointFormatError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    description, _, converter = FORMATS[fmt]
    config, rule = converter(state)
    model = build_model(config)
    target = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    folded_biases: dict[str, torch.Tensor] = {}
    unplaced = []
    for key, value in state.items():
        new_key = rule(key)
        if new_key is not None and new_key not in target and new_key.endswith(".conv.bias"):
            bn_mean = new_key[: -len("conv.bias")] + "bn.running_mean"
            if bn_mean in target:
                folded_biases[bn_mean] = value
                continue
        if new_key is None or new_key not in target:
            unplaced.append(key)
            continue
        converted[new_key] = value
    if unplaced:
        raise CheckpointFormatError(f"{description} checkpoint: cannot place these keys in the fastsr model "
                                    f"{config}: {_listing(unplaced)}")
    for mean_key, bias in folded_biases.items():
        if mean_key in converted:  # otherwise it is reported as missing below
            # BN(conv(x) + b) with running mean m equals BN(conv(x)) with running mean m - b.
            converted[mean_key] = converted[mean_key].double() - bias.double()
    missing = sorted(set(target) - set(converted))
    if missing:
        raise CheckpointFormatError(f"{description} checkpoint: no weights for {_listing(missing)}")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(target[k].shape)})"
             for k, v in converted.items() if v.shape != target[k].shape]
    if wrong:
        raise CheckpointFormatError(f"{description} checkpoint: tensor shapes do not fit: {_listing(wrong)}")
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in converted.items()})
    return model.eval()


def load_checkpoint(path: str | os.PathLike, *, prefer_ema: bool = True, fmt: str | None = None) -> nn.Module:
    """Load a peer's generator checkpoint (``.pth``, ``.pt``, ``.pth.tar`` or a safetensors file
    without fastsr metadata) as a fastsr model in eval mode on the CPU."""
    path = Path(path)
    if is_torch_file(path):
        obj = read_torch_file(path)
    else:
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelFileError(f"{path}: neither a torch.save file nor a readable safetensors file ({exc})") from None
    return convert_checkpoint(obj, path, prefer_ema=prefer_ema, fmt=fmt)


def convert_checkpoint(obj: object, path: str | os.PathLike, *, prefer_ema: bool = True,
                       fmt: str | None = None) -> nn.Module:
    """:func:`convert_state_dict` of the state dict in ``obj`` (a loaded checkpoint read from ``path``,
    which only names the file in errors)."""
    try:
        return convert_state_dict(extract_state_dict(obj, prefer_ema=prefer_ema), fmt=fmt)
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{path}: {exc}") from None
