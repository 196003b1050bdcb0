"""The engine of the tile pipeline: a model prepared for inference on batches of tiles.

:class:`Upscaler` owns its copy of the model on a device in a dtype (BatchNorm folded and
channels_last by :func:`fastsr.optimize`), the CUDA stream its batches run on, and the last step
to uint8/uint16. It knows nothing about files: :mod:`.memory` and :mod:`.files` feed it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..fusion import optimize
from ..ops.functional import to_uint8
from ..tiling import model_scale, receptive_field

log = logging.getLogger("fastsr")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_default_lock = threading.Lock()
_default_models: dict[str, nn.Module] = {}


class UpscaleError(UserError):
    """A bad argument to upscale_image / upscale_file (tile, halo, device, dtype, paths)."""


class NonFiniteOutputError(UpscaleError):
    """The model produced NaN or infinity: broken weights (or a dtype too narrow for them). Raised
    on the first batch, before a black or garbage image is written."""


def model_name(model) -> str:
    """How a message names the model the user passed: its file or embedded name, else its class."""
    if model is None:
        return "default"
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return type(model).__name__


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UpscaleError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UpscaleError("device cuda requested but no CUDA GPU is available (torch.cuda.is_available() is False)")
    if dev.type not in ("cpu", "cuda"):
        raise UpscaleError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UpscaleError(f"unsupported compute dtype {dtype}; use fp32, fp16 or bf16")
        return dtype
    if str(dtype) not in DTYPES:
        raise UpscaleError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return DTYPES[str(dtype)]


def _load(model: nn.Module | str | os.PathLike | None) -> nn.Module:
    from ..models.checkpoint import EMBEDDED, ModelFileError, load_model

    if isinstance(model, nn.Module):
        return model
    name = "default" if model is None else str(model)
    try:
        if name in EMBEDDED:
            # Loaded once per process; every call works on its own copy (see Upscaler).
            with _default_lock:
                if name not in _default_models:
                    _default_models[name] = load_model(name)
                return _default_models[name]
        return load_model(name)
    except ModelFileError as exc:
        raise UserError(str(exc)) from None


def model_digest(model: nn.Module) -> str:
    """A hash of the model's architecture config and weights (identifies it in resume manifests)."""
    h = hashlib.sha256(json.dumps(getattr(model, "config", type(model).__name__), sort_keys=True).encode())
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Upscaler:
    """A model prepared for inference: its own copy on ``device`` in ``dtype`` (BN folded and
    channels_last where fastsr.optimize provides it), its ``scale``, receptive ``radius`` and the
    ``align`` its tile windows need (the model's ``input_alignment``, else 1).

    ``forward(x)``: (B, C, h, w) float in [0, 1] on the device -> (B, C, h*s, w*s) float, C in
    1..4: gray is run as RGB and averaged back, alpha is upscaled with bicubic.
    ``run_uint(batch)``: (B, h, w, C) uint8/uint16 numpy -> (B, h*s, w*s, C) same dtype numpy.
    """

    def __init__(self, model=None, *, device=None, dtype=None, backend: str | None = None) -> None:
        if not isinstance(model, (nn.Module, str, os.PathLike)) and model is not None:
            raise UpscaleError(f"model must be a torch module, a model file or an embedded model name, got "
                               f"{type(model).__name__}")
        source = _load(model)
        self.name = model_name(model)
        if not any(isinstance(m, nn.Conv2d) for m in source.modules()):  # e.g. an nn.Linear: no image model
            raise UpscaleError(f"model {self.name} has no convolution: not an image super-resolution model")
        self.finite_checked = False  # the first batch's output is checked for NaN/Inf (check_finite)
        self.device, self.dtype, self.backend = resolve_device(device), resolve_dtype(dtype), backend
        self.scale, self.radius = model_scale(source), receptive_field(source)
        # Models that pixel-unshuffle their input need windows on its grid (fastsr.tiling).
        self.align = int(getattr(source, "input_alignment", 1))
        self.in_channels = int(getattr(source, "config", {}).get("in_channels", 3))
        self.source = source
        net = copy.deepcopy(source).eval().to(self.device)
        net = optimize(net).to(self.device, self.dtype)  # BN folded, channels_last (fastsr models)
        self.net = net.to(memory_format=torch.channels_last)
        self.stream = None
        if self.device.type == "cuda":
            # Batches run on their own stream (copies overlap other threads' work); it must see
            # the weights that were just copied on the default stream.
            self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def halo(self, halo: int | str, channels: int) -> int:
        """The halo for ``halo`` ("auto" = the receptive field; bicubic alpha needs 2)."""
        need = max(self.radius, 2 if channels in (2, 4) else 0)
        if halo == "auto" or halo is None:
            return need
        try:
            value = int(halo)
        except (TypeError, ValueError):
            raise UpscaleError(f"halo must be 'auto' or a number of pixels, got {halo!r}") from None
        if value < 0:
            raise UpscaleError(f"halo must be >= 0, got {value}")
        if value < need:
            log.warning("halo %d is smaller than the model's receptive field radius %d: tiles will not match "
                        "whole-image output near their edges (seams)", value, need)
        return value

    def _backend(self):
        if self.backend in (None, "auto"):
            return nullcontext()
        from ..ops.dispatch import use_backend

        return use_backend(self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        color = x[:, :-1] if channels in (2, 4) else x
        if color.shape[1] == 1 and self.in_channels == 3:
            color = color.expand(-1, 3, -1, -1)
        with self._backend():
            out = self.net(color.to(self.dtype).contiguous(memory_format=torch.channels_last))
        if channels in (1, 2) and self.in_channels == 3:
            out = out.mean(dim=1, keepdim=True)
        if channels in (2, 4):
            alpha = F.interpolate(x[:, -1:].float(), scale_factor=self.scale, mode="bicubic", align_corners=False)
            out = torch.cat([out.to(alpha.dtype), alpha.clamp(0, 1)], dim=1)
        return out

    def check_finite(self, y: torch.Tensor) -> None:
        """Stop on NaN/Inf in the first batch's output: converted to integers they would be black (or
        saturated) pixels and the run would end with exit 0. One check per Upscaler: the model does
        not change, and a second pass over every output would cost time on the GPU."""
        if self.finite_checked:
            return
        if not bool(torch.isfinite(y).all()):
            dtype = str(self.dtype).removeprefix("torch.")
            hint = "; try --dtype fp32" if self.dtype != torch.float32 else ""
            raise NonFiniteOutputError(f"model {self.name} produced NaN or infinite values on the first tiles "
                                       f"({dtype}): its weights are broken or overflow{hint}")
        self.finite_checked = True

    def run_uint(self, batch: np.ndarray) -> np.ndarray:
        """(B, h, w, C) uint8/uint16 -> (B, h*s, w*s, C) of the same dtype (rounded, clamped)."""
        maxval = 255.0 if batch.dtype == np.uint8 else 65535.0
        host = torch.from_numpy(batch if batch.dtype == np.uint8 else batch.astype(np.int32))
        with torch.inference_mode(), (torch.cuda.stream(self.stream) if self.stream else nullcontext()):
            if self.stream is not None:
                host = host.pin_memory()
            x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC memory = channels_last
            y = self.forward(x.float().div_(maxval))
            self.check_finite(y)
            if batch.dtype == np.uint8:  # every backend's to_uint8: one pass on cpp and triton
                y = to_uint8(y, backend=self.backend)
            else:
                y = y.float().clamp_(0, 1).mul_(maxval).round_().permute(0, 2, 3, 1).to(torch.int32)
            if self.stream is not None:
                out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
                out.copy_(y, non_blocking=True)
                self.stream.synchronize()
            else:
                out = y.contiguous()
        array = out.numpy()
        return array if batch.dtype == np.uint8 else array.astype(np.uint16)
