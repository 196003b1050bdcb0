"""fastsr's model file: safetensors weights with the architecture config in the metadata.

Loading never unpickles anything, so a model file from a stranger cannot run code.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_path

# A fastsr file may hold any registered architecture: importing every model module registers them
# all (the loaders peers and ncnn import the ones they build; the discriminator only this module).
from . import compact, discriminator, peers, rrdbnet, span, srresnet, variants  # noqa: F401
from .ncnn import load_ncnn

# ModelFileError lives in the registry, below every loader; build_model is the registry's.
from .registry import ModelFileError, build_model

FORMAT = "fastsr-model-v1"
# Embedded models: name -> file shipped in fastsr/models/weights/.
EMBEDDED = {"default": "srresnet_x4_default.safetensors"}


def save_model(model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` (its ``config`` and state dict) to ``path``, atomically.

    ``dtype`` (e.g. ``torch.float16``) stores the floating tensors at that precision.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; only fastsr models can be saved")
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "config": json.dumps(config)})


def embedded_path(name: str) -> Path:
    """The file of the embedded model ``name`` (a key of :data:`EMBEDDED`)."""
    return Path(str(resources.files("fastsr.models") / "weights" / EMBEDDED[name]))


TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt")


def load_model(name_or_path: str | os.PathLike = "default", *, device: str | torch.device = "cpu") -> nn.Module:
    """Load an embedded model by name (``"default"``) or a model file; returns it in eval mode.

    Besides fastsr's own files, generator checkpoints of other SRGAN code bases (``.pth``, ``.pt``,
    ``.pth.tar``, safetensors without fastsr metadata) are detected and converted; see
    :mod:`fastsr.models.peers`; an ncnn ``.param`` (Real-ESRGAN's) loads with its ``.bin``, see
    :mod:`fastsr.models.ncnn`.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelFileError(f"model must be an embedded model's name or a model file's path, got "
                             f"{type(name_or_path).__name__} ({name_or_path!r})")
    path = embedded_path(str(name_or_path)) if str(name_or_path) in EMBEDDED else Path(name_or_path)
    if not path.is_file():
        known = ", ".join(EMBEDDED)
        raise ModelFileError(f"model file not found: {path} (embedded models: {known})")
    if path.suffix == ".param":  # an ncnn graph, its .bin beside it
        return load_ncnn(path).to(device)
    if peers.is_torch_file(path):
        return peers.load_checkpoint(path).to(device)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        if path.suffix.lower() in TORCH_SUFFIXES:  # named as a torch.save file, and it is not one
            raise ModelFileError(f"{path}: not a readable PyTorch checkpoint (neither a torch.save archive nor "
                                 "a safetensors file)") from None
        raise ModelFileError(f"{path}: not a readable safetensors model file ({exc})") from None
    if metadata.get("format") != FORMAT:
        return peers.convert_checkpoint(tensors, path).to(device)
    model = build_model(json.loads(metadata["config"]))
    reference = model.state_dict()
    tensors = {k: v.to(reference[k].dtype) if k in reference else v for k, v in tensors.items()}
    model.load_state_dict(tensors)
    return model.to(device).eval()
