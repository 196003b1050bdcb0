"""Read generator checkpoints written by other super-resolution code bases and convert them to fastsr models.

Known formats (detected from the state-dict keys, in this order; sizes and scale inferred from tensor shapes):

* ``lornatang`` - Lornatang SRGAN-PyTorch's SRResNet / SRGAN generator: ``conv1.0``, ``conv1.1``,
  ``trunk.N.rcb.{0..4}``, ``conv2.{0,1}``, ``upsampling.N.upsample_block.{0,2}``, ``conv3``;
  x2/x4/x8 -> :class:`~fastsr.models.variants.PeerSRResNet` with ``output="clamp"``.
* ``rrdbnet`` - BasicSR / Real-ESRGAN RRDBNet (``RealESRGAN_x4plus.pth``, ``_x2plus``, ``_anime_6B``):
  ``conv_first``, ``body.N.rdbK.convJ``, ``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``,
  ``conv_last`` -> :class:`~fastsr.models.rrdbnet.RRDBNet`. conv_first's input channels tell the
  scale: 16x / 4x the output channels is Real-ESRGAN's pixel-unshuffled x1 / x2, else x4.
* ``esrgan`` - original ESRGAN (old architecture, a flattened ``model`` Sequential):
  ``model.0`` (conv_first), ``model.1.sub.N.RDBK.convJ.0`` (blocks), ``model.1.sub.<N blocks>``
  (conv_body), upsampling convs at ``model.3``, ``model.6`` (, ``model.9`` for x8) after their
  nearest x2 upsamplings (none for 1x models, one for 2x), then the HR conv and the last conv two
  and four places after the last of them (``model.8``, ``model.10`` for x4) -> RRDBNet x1/x2/x4/x8
  (and pixel-unshuffled x1/x2).
* ``esrgan_new`` - BSRGAN / RealSR / ESRGAN "new architecture": ``conv_first``,
  ``RRDB_trunk.N.RDBK.convJ``, ``trunk_conv``, ``upconv1``, ``upconv2``, ``HRconv``, ``conv_last``
  -> RRDBNet x4 (BSRGANx2, with ``upconv1`` only: x2).
* ``basicsr`` - BasicSR's MSRResNet: ``conv_first``, ``body.N.conv1/conv2``, ``upconv1``, ``upconv2``,
  ``conv_hr``, ``conv_last``; x2/x3/x4 -> :class:`~fastsr.models.variants.MSRResNet`. Detected
  after the RRDB layouts and by ``body.0.conv1`` as well, so a BSRGAN file (which also has
  conv_first / upconv1 / conv_last) is never taken for one.
* ``compact`` - Real-ESRGAN's SRVGGNetCompact (``realesr-general-x4v3``, ``realesr-animevideov3``):
  ``body.N.weight/bias``, convs at even N, PReLU weights at odd N, the last conv to
  ``C * scale**2`` channels -> :class:`~fastsr.models.compact.SRVGGNetCompact`. ReLU / LeakyReLU
  variants leave no activation weights to tell them apart, so they are refused.
* ``span`` - SPAN (NTIRE 2024 efficient SR; the SPAN repository's and spandrel's layout):
  ``conv_1``, ``block_1`` ... ``block_6`` (``c1_r``, ``c2_r``, ``c3_r``), ``conv_2`` (each a
  Conv3XC: ``sk``, ``conv.0/1/2``, ``eval_conv``), ``conv_cat``, ``upsampler.0``; a ``no_norm``
  entry means a model trained without the input normalisation -> :class:`~fastsr.models.span.SPAN`,
  every Conv3XC merged into one 3x3 conv from ``sk`` and ``conv.*`` (``eval_conv`` is ignored).
* ``leftthomas`` - leftthomas SRGAN's generator: ``block1`` ... ``block8``
  -> :class:`~fastsr.models.variants.PeerSRResNet` with ``output="tanh"``.
* ``fastsr`` - a bare fastsr :class:`~fastsr.SRResNet` state dict (e.g. fastsr's training checkpoint).

Other architectures load through `spandrel <https://github.com/chaiNNer-org/spandrel>`_ when it is
installed (the ``spandrel`` extra): a checkpoint that no format above matches, or that matches one
in a variant fastsr does not build (ESRGAN+, RRDBNets with other upsampling layouts), goes to
``spandrel.ModelLoader().load_from_state_dict`` and comes back as spandrel's own torch module
(``descriptor.model``), which fastsr can run but not save as a fastsr model file. spandrel needs
torchvision, and installing it from the package index pulls a CUDA build of torch over a CPU one:
install it with ``pip install --no-deps spandrel einops`` next to a torchvision that matches the
installed torch.

Containers: a bare state dict, or a dict holding it under ``params_ema`` / ``params`` (BasicSR),
``ema_state_dict`` / ``state_dict`` (Lornatang ``.pth.tar``), ``ema`` / ``model`` (fastsr); the EMA
weights are preferred when both are there. ``module.`` (DataParallel) and ``_orig_mod.``
(torch.compile) key prefixes are removed. Pickled files load with ``torch.load(weights_only=True)``,
so a checkpoint cannot run code (spandrel is handed the tensors, never the file).
"""

from __future__ import annotations

import os
import pickle
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import UserError
from . import registry
from .compact import SRVGGNET_COMPACT_ARCH
from .registry import ModelFileError, build_model, count_indices, shuffle_factor
from .rrdbnet import RRDBNET_ARCH, scale_layout
from .span import NUM_BLOCKS as SPAN_BLOCKS
from .span import SPAN_ARCH, merge_conv3xc
from .srresnet import SRRESNET_ARCH
from .variants import MSRRESNET_ARCH, PEER_SRRESNET_ARCH, msrresnet_scale

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


class NoNativeFormatError(CheckpointFormatError):
    """No fastsr format builds the checkpoint: its keys match none, or they match one in a variant
    fastsr does not build. The cases where spandrel, when installed, is asked instead."""


def _listing(keys: list[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


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
    ups = count_indices(state, r"upsampling\.(\d+)\.upsample_block\.0\.weight")
    _check_x2_upsampling(state, [f"upsampling.{i}.upsample_block.0.weight" for i in range(ups)], channels,
                         "Lornatang SRGAN-PyTorch checkpoint")
    config = {"arch": PEER_SRRESNET_ARCH, "scale": _doubling_scale(ups, "Lornatang SRGAN-PyTorch checkpoint"),
              "num_blocks": count_indices(state, r"trunk\.(\d+)\.rcb\.0\.weight"), "channels": channels,
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
    ups = count_indices(state, r"block8\.(\d+)\.conv\.weight")
    what = "leftthomas SRGAN checkpoint"
    _check_x2_upsampling(state, [f"block8.{i}.conv.weight" for i in range(ups)], channels, what)
    config = {"arch": PEER_SRRESNET_ARCH, "scale": _doubling_scale(ups, what),
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
    try:
        scale = msrresnet_scale(channels, _shape(state, "upconv1.weight")[0], "upconv2.weight" in state)
    except ValueError as exc:
        raise CheckpointFormatError(f"BasicSR MSRResNet checkpoint: {exc}") from None
    config = {"arch": MSRRESNET_ARCH, "scale": scale,
              "num_blocks": count_indices(state, r"body\.(\d+)\.conv1\.weight"), "channels": channels,
              "in_channels": in_channels}
    # fastsr's MSRResNet keeps BasicSR's module names; each conv sits inside a fused ConvPReLU.
    layer = r"(conv_first|body\.\d+\.conv[12]|upconv[12]|conv_hr|conv_last)"
    return config, _regex_rule([(rf"{layer}\.(weight|bias)", r"\1.conv.\2")])


def _rrdb_config(state: Mapping[str, torch.Tensor], what: str, first: str, last: str, growth: str,
                 block_pattern: str, num_upsamplings: int) -> dict:
    """The RRDBNet config of an ESRGAN-family checkpoint, from its first conv ``first``, last conv
    ``last``, first dense conv ``growth``, the regex counting its blocks and its upsampling convs."""
    channels, conv_in = _shape(state, first)[:2]
    out_channels, growth_channels = _shape(state, last)[0], _shape(state, growth)[0]
    # Real-ESRGAN's x1 / x2 models pixel-unshuffle the input by 4 / 2 in front of the x4 network.
    try:
        scale, in_channels, unshuffle = scale_layout(conv_in, out_channels, num_upsamplings)
    except ValueError as exc:  # a layout fastsr's RRDBNet does not build: spandrel may
        raise NoNativeFormatError(f"{what}: {exc}") from None
    plain = {} if unshuffle is None else {"unshuffle": unshuffle}
    return {"arch": RRDBNET_ARCH, "scale": scale, "num_blocks": count_indices(state, block_pattern),
            "channels": channels, "growth": growth_channels, "in_channels": in_channels, "out_channels": out_channels,
            **plain}


def _rrdbnet(state: Mapping[str, torch.Tensor]) -> tuple[dict, Rule]:
    ups = count_indices(state, r"conv_up(\d+)\.weight")
    config = _rrdb_config(state, "BasicSR/Real-ESRGAN RRDBNet checkpoint", "conv_first.weight", "conv_last.weight",
                          "body.0.rdb1.conv1.weight", r"body\.(\d+)\.rdb1\.conv1\.weight", ups)
    # fastsr's RRDBNet keeps BasicSR's module names; each conv sits inside a fused ConvPReLU.
    layer = r"(conv_first|body\.\d+\.rdb[123]\.conv[1-5]|conv_body|conv_up\d+|conv_hr|conv_last)"
    return config, _regex_rule([(rf"{layer}\.(weight|bias)", r"\1.conv.\2")])


def _esrgan(state: Mapping[str, torch.Tensor]) -> tuple[dict, Rule]:
    what = "original ESRGAN checkpoint"
    if any(".conv1x1." in key for key in state):
        raise NoNativeFormatError(f"{what}: ESRGAN+ (conv1x1 paths in the dense blocks); fastsr builds the plain "
                                  "RRDBNet")
    # The flattened Sequential: conv, the blocks' shortcut, [upsample, conv, lrelu] per x2 step,
    # HR conv, lrelu, last conv; only convs have weights.
    top = sorted({int(m.group(1)) for key in state if (m := re.fullmatch(r"model\.(\d+)\.weight", key))})
    last = top[-1]
    ups = (last - 4) // 3
    if (last - 4) % 3 or top != [0, *(3 * k for k in range(1, ups + 1)), last - 2, last]:
        raise NoNativeFormatError(
            f"{what}: convs at model.{', '.join(map(str, top))}; fastsr reads the nearest-upsampling layout (first "
            "conv at model.0, upsampling convs at model.3, 6[, 9], then the HR and last convs 2 and 4 further)")
    config = _rrdb_config(state, what, "model.0.weight", f"model.{last}.weight", "model.1.sub.0.RDB1.conv1.0.weight",
                          r"model\.1\.sub\.(\d+)\.RDB1\.conv1\.0\.weight", ups)
    num_blocks = config["num_blocks"]
    return config, _regex_rule([
        (r"model\.0\.(weight|bias)", r"conv_first.conv.\1"),
        (r"model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)", r"body.\1.rdb\2.conv\3.conv.\4"),
        (rf"model\.1\.sub\.{num_blocks}\.(weight|bias)", r"conv_body.conv.\1"),
        *((rf"model\.{3 * k}\.(weight|bias)", rf"conv_up{k}.conv.\1") for k in range(1, ups + 1)),
        (rf"model\.{last - 2}\.(weight|bias)", r"conv_hr.conv.\1"),
        (rf"model\.{last}\.(weight|bias)", r"conv_last.conv.\1"),
    ])


def _esrgan_new(state: Mapping[str, torch.Tensor]) -> tuple[dict, Rule]:
    ups = count_indices(state, r"upconv(\d+)\.weight")
    config = _rrdb_config(state, "BSRGAN/RealSR/ESRGAN new-architecture checkpoint", "conv_first.weight",
                          "conv_last.weight", "RRDB_trunk.0.RDB1.conv1.weight",
                          r"RRDB_trunk\.(\d+)\.RDB1\.conv1\.weight", ups)
    return config, _regex_rule([
        (r"conv_first\.(weight|bias)", r"conv_first.conv.\1"),
        (r"RRDB_trunk\.(\d+)\.RDB([123])\.conv([1-5])\.(weight|bias)", r"body.\1.rdb\2.conv\3.conv.\4"),
        (r"trunk_conv\.(weight|bias)", r"conv_body.conv.\1"),
        (r"upconv(\d+)\.(weight|bias)", r"conv_up\1.conv.\2"),
        (r"HRconv\.(weight|bias)", r"conv_hr.conv.\1"),
        (r"conv_last\.(weight|bias)", r"conv_last.conv.\1"),
    ])


def _compact(state: Mapping[str, torch.Tensor]) -> tuple[dict, Rule]:
    what = "Real-ESRGAN SRVGGNetCompact checkpoint"
    layers = {int(m.group(1)): state[key] for key in state if (m := re.fullmatch(r"body\.(\d+)\.weight", key))}
    last = max(layers)
    convs = sorted(i for i, w in layers.items() if w.dim() == 4)
    slopes = sorted(i for i, w in layers.items() if w.dim() == 1)
    if not slopes:
        raise NoNativeFormatError(f"{what}: no PReLU weights (body.1.weight, body.3.weight, ...), so its activations "
                                  "are ReLU or LeakyReLU, and nothing in the file tells which; fastsr reads the "
                                  "PReLU models (realesr-general-x4v3, realesr-animevideov3)")
    if convs != list(range(0, last + 1, 2)) or slopes != list(range(1, last, 2)):
        raise NoNativeFormatError(f"{what}: expected convs at even body.N and PReLU weights at odd N; found convs at "
                                  f"{convs} and 1-d weights at {slopes}")
    channels, in_channels = _shape(state, "body.0.weight")[:2]
    scale = _shuffle_scale(_shape(state, f"body.{last}.weight")[0], in_channels, f"{what}: body.{last}")
    config = {"arch": SRVGGNET_COMPACT_ARCH, "scale": scale, "num_convs": len(convs) - 2, "channels": channels,
              "in_channels": in_channels, "out_channels": in_channels}

    def rule(key: str) -> str | None:
        # fastsr's body.k is conv 2k with PReLU 2k + 1; the last conv (shuffle and skip fused) is conv_last.
        if not (m := re.fullmatch(r"body\.(\d+)\.(weight|bias)", key)):
            return None
        i, name = int(m.group(1)), m.group(2)
        if i == last:
            return f"conv_last.conv.{name}"
        if i % 2 == 0:
            return f"body.{i // 2}.conv.{name}"
        return f"body.{i // 2}.slope" if name == "weight" else None

    return config, rule


def _shuffle_scale(conv_out: int, channels: int, what: str) -> int:
    """The pixel-shuffle factor r of a conv with ``conv_out`` = ``channels`` * r**2 output channels."""
    scale = shuffle_factor(conv_out, channels)
    if scale is None:
        raise CheckpointFormatError(f"{what} has {conv_out} output channels, not {channels} x scale**2")
    return scale


def _span(state: Mapping[str, torch.Tensor]) -> tuple[dict, Rule]:
    what = "SPAN checkpoint"
    channels, in_channels = _shape(state, "conv_1.sk.weight")[:2]
    # The output channels are not stored apart from the scale: as spandrel, assume they equal the input's.
    scale = _shuffle_scale(_shape(state, "upsampler.0.weight")[0], in_channels, f"{what}: upsampler.0")
    norm = "no_norm" not in state  # spandrel / traiNNer-redux mark a model trained without normalisation
    if norm and in_channels != 3:
        raise CheckpointFormatError(f"{what}: {in_channels} input channels, but the published input normalisation "
                                    "has 3 channel means (and the file has no no_norm entry)")
    config = {"arch": SPAN_ARCH, "scale": scale, "channels": channels, "in_channels": in_channels,
              "out_channels": in_channels, "norm": norm}
    return config, _regex_rule([
        (rf"({_SPAN_CONV3XC})\.conv\.(weight|bias)", r"\1.conv.\2"),  # merged by _span_merge
        (r"conv_cat\.(weight|bias)", r"conv_cat.conv.\1"),
        (r"upsampler\.0\.(weight|bias)", r"upsampler.conv.\1"),
    ])


_SPAN_CONV3XC = rf"conv_[12]|block_[1-{SPAN_BLOCKS}]\.c[123]_r"
_CONV3XC_KEY = re.compile(rf"({_SPAN_CONV3XC})\.(sk|conv\.[012]|eval_conv)\.(weight|bias)")
_CONV3XC_PARTS = ("sk.weight", "sk.bias", *(f"conv.{i}.{name}" for i in range(3) for name in ("weight", "bias")))


def _span_merge(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A SPAN training state dict with each Conv3XC (``P.sk``, ``P.conv.0/1/2``) replaced by its
    merged 3x3 conv ``P.conv.weight/bias``; ``P.eval_conv`` and ``no_norm`` dropped (read, if
    at all, by the config)."""
    merged, groups = {}, {}
    for key, value in state.items():
        if key == "no_norm":
            continue
        if not (m := _CONV3XC_KEY.fullmatch(key)):
            merged[key] = value
            continue
        parts = groups.setdefault(m.group(1), {})
        if m.group(2) != "eval_conv":  # possibly stale: the training forward never reads it
            parts[f"{m.group(2)}.{m.group(3)}"] = value
    for prefix, parts in groups.items():
        missing = [p for p in _CONV3XC_PARTS if p not in parts]
        if missing:
            raise CheckpointFormatError(f"SPAN checkpoint: {prefix} lacks {', '.join(missing)} (fastsr merges a "
                                        "Conv3XC from sk and conv.0/1/2, never from eval_conv)")
        merged[f"{prefix}.conv.weight"], merged[f"{prefix}.conv.bias"] = merge_conv3xc(
            parts["sk.weight"], parts["sk.bias"], [parts[f"conv.{i}.weight"] for i in range(3)],
            [parts[f"conv.{i}.bias"] for i in range(3)])
    return merged


def _fastsr(state: Mapping[str, torch.Tensor]) -> tuple[dict, Rule]:
    # fastsr's own layout: the registered architecture whose keys these are reads its config.
    try:
        config = registry.detect(state)
    except ValueError as exc:
        raise CheckpointFormatError(f"{FORMATS['fastsr'].description}: {exc}") from None
    if config is None:
        raise CheckpointFormatError(f"{FORMATS['fastsr'].description}: the keys of no fastsr architecture")
    return config, lambda key: key


def _regex_rule(rules: list[tuple[str, str]]) -> Rule:
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]

    def rule(key: str) -> str | None:
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                return pattern.sub(replacement, key)
        return None

    return rule


@dataclass(frozen=True)
class Format:
    """A peer's checkpoint layout: a state dict holding all of ``keys`` is in it; ``convert`` gives
    the fastsr config its tensors imply and the rename rule; ``merge`` (if any) rewrites the state
    dict first, where several peer tensors make one fastsr tensor."""

    description: str
    keys: tuple[str, ...]
    convert: Callable[[Mapping[str, torch.Tensor]], tuple[dict, Rule]]
    merge: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


# Detection order matters where layouts share names: the RRDB layouts come before MSRResNet,
# whose conv_first / upconv1 / conv_last the BSRGAN layout also has. The layout an architecture
# was published with is named after it (RRDBNET_ARCH, SPAN_ARCH); "fastsr" is SRResNet's own.
FORMATS: dict[str, Format] = {
    "lornatang": Format("Lornatang SRGAN-PyTorch SRResNet/SRGAN generator", ("conv1.0.weight", "trunk.0.rcb.0.weight"),
                        _lornatang),
    RRDBNET_ARCH: Format("BasicSR/Real-ESRGAN RRDBNet", ("conv_first.weight", "body.0.rdb1.conv1.weight",
                                                      "conv_body.weight", "conv_last.weight"), _rrdbnet),
    "esrgan": Format("original ESRGAN RRDBNet (old architecture)",
                     ("model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"), _esrgan),
    "esrgan_new": Format("BSRGAN/RealSR/ESRGAN new-architecture RRDBNet",
                         ("conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight",
                          "conv_last.weight"), _esrgan_new),
    "basicsr": Format("BasicSR MSRResNet", ("conv_first.weight", "body.0.conv1.weight", "upconv1.weight",
                                            "conv_last.weight"), _basicsr),
    "compact": Format("Real-ESRGAN SRVGGNetCompact", ("body.0.weight", "body.0.bias", "body.2.weight"), _compact),
    SPAN_ARCH: Format("SPAN", ("conv_1.sk.weight", "block_1.c1_r.sk.weight", "conv_cat.weight", "upsampler.0.weight"),
                   _span, merge=_span_merge),
    "leftthomas": Format("leftthomas SRGAN generator", ("block1.0.weight", "block7.0.weight"), _leftthomas),
    "fastsr": Format("fastsr SRResNet state dict", registry.get(SRRESNET_ARCH).keys, _fastsr),
}
_SPANDREL_HINT = ("other architectures load through spandrel when it is installed: pip install --no-deps spandrel "
                  "einops, next to a torchvision that matches torch")


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """The name of the first format (a key of :data:`FORMATS`) whose identifying keys ``state`` has;
    :class:`NoNativeFormatError` saying what the keys look like and which format came closest."""
    for name, spec in FORMATS.items():
        if all(k in state for k in spec.keys):
            return name
    prefixes = Counter(key.split(".", 1)[0] for key in state)
    shown = ", ".join(f"{prefix} ({n})" for prefix, n in prefixes.most_common(8))
    known = "; ".join(f"{spec.description} ({', '.join(spec.keys)})" for spec in FORMATS.values())
    raise NoNativeFormatError(f"unknown checkpoint format: {len(state)} tensors under {shown}; keys "
                              f"{_listing(sorted(state), 6)}; {_closest_format(state)}. Known formats and their "
                              f"identifying keys: {known}")


def _closest_format(state: Mapping[str, torch.Tensor]) -> str:
    """Which format's identifying keys ``state`` has most of (by share; ties: the one more of its
    keys live under, then detection order), and which of them it lacks, as a phrase."""
    def score(spec: Format) -> tuple[float, int]:
        heads = {key.split(".", 1)[0] for key in spec.keys}
        return sum(k in state for k in spec.keys) / len(spec.keys), sum(k.split(".", 1)[0] in heads for k in state)

    best = max(FORMATS.values(), key=score)
    if score(best)[0] == 0:
        return "it has none of the identifying keys of a known format"
    has = [k for k in best.keys if k in state]
    lacks = [k for k in best.keys if k not in state]
    return f"closest: {best.description} (has {', '.join(has)}; lacks {', '.join(lacks)})"


def convert_state_dict(state: Mapping[str, torch.Tensor], *, fmt: str | None = None) -> nn.Module:
    """Build the fastsr model for a peer's generator state dict and load its weights; eval mode.

    ``fmt`` names the format (see :data:`FORMATS`); ``None`` detects it from the keys, and a state
    dict that no format builds (:class:`NoNativeFormatError`) goes to spandrel when it is installed
    (module docstring), which returns its own torch module. A conv bias in front of a BatchNorm
    (leftthomas) is folded into the BatchNorm's running mean, which is exact in eval and training
    mode. Raises :class:`CheckpointFormatError` listing any key it cannot place, any weight the
    model still lacks and any tensor whose shape does not fit.
    """
    if fmt is not None and fmt not in FORMATS:
        raise CheckpointFormatError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    try:
        return _convert(state, fmt or detect_format(state))
    except NoNativeFormatError as exc:
        if fmt is not None:
            raise
        return _spandrel_model(state, exc)


def _spandrel_model(state: Mapping[str, torch.Tensor], reason: NoNativeFormatError) -> nn.Module:
    """spandrel's module for ``state`` in eval mode, or ``reason`` (extended) when it has none."""
    try:  # here, not at the top: spandrel is optional (the spandrel extra) and heavy (torchvision)
        import spandrel
    except ImportError:
        raise NoNativeFormatError(f"{reason} ({_SPANDREL_HINT})") from None
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(dict(state))
    except Exception as exc:  # spandrel.UnsupportedModelError, or an architecture's own error on odd tensors
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NoNativeFormatError(f"{reason}; spandrel cannot load it either: {first_line}") from None
    return descriptor.model.eval()


def _convert(state: Mapping[str, torch.Tensor], fmt: str) -> nn.Module:
    """The fastsr model of format ``fmt`` with the weights of ``state``; eval mode."""
    spec = FORMATS[fmt]
    config, rule = spec.convert(state)
    if spec.merge is not None:
        state = spec.merge(state)
    model = build_model(config)
    target = model.state_dict()
    converted = _place(state, rule, target, f"{spec.description} checkpoint", config)
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in converted.items()})
    return model.eval()


def _place(state: Mapping[str, torch.Tensor], rule: Rule, target: Mapping[str, torch.Tensor], what: str,
           config: dict) -> dict[str, torch.Tensor]:
    """``state`` renamed by ``rule`` into the keys of ``target`` (the model's state dict), conv
    biases in front of a BatchNorm folded into its running mean; every key placed, every target
    key filled, every shape right, or :class:`CheckpointFormatError`."""
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
        raise CheckpointFormatError(f"{what}: cannot place these keys in the fastsr model {config}: "
                                    f"{_listing(unplaced)}")
    for mean_key, bias in folded_biases.items():
        if mean_key in converted:  # otherwise it is reported as missing below
            # BN(conv(x) + b) with running mean m equals BN(conv(x)) with running mean m - b.
            converted[mean_key] = converted[mean_key].double() - bias.double()
    missing = sorted(set(target) - set(converted))
    if missing:
        raise CheckpointFormatError(f"{what}: no weights for {_listing(missing)}")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(target[k].shape)})"
             for k, v in converted.items() if v.shape != target[k].shape]
    if wrong:
        raise CheckpointFormatError(f"{what}: tensor shapes do not fit: {_listing(wrong)}")
    return converted


def load_checkpoint(path: str | os.PathLike, *, prefer_ema: bool = True, fmt: str | None = None) -> nn.Module:
    """Load a peer's generator checkpoint (``.pth``, ``.pt``, ``.pth.tar`` or a safetensors file
    without fastsr metadata) as a fastsr model (or spandrel's module, see :func:`convert_state_dict`)
    in eval mode on the CPU."""
    path = Path(path)
    if is_torch_file(path):
        obj = read_torch_file(path)
    else:
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
        raise type(exc)(f"{path}: {exc}") from None
