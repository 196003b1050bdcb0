"""The architecture registry, at the bottom of :mod:`fastsr.models`.

Each model module registers its architectures once, at import: the name stored as ``"arch"`` in a
model's ``config`` (and in fastsr's model files), the builder that takes the rest of that config,
and optionally how to recognise the architecture's own state dict and read its config from the
tensor shapes. The loaders above the model modules (:mod:`~fastsr.models.checkpoint` for fastsr's
files, :mod:`~fastsr.models.peers` for other code bases' layouts, :mod:`~fastsr.models.ncnn`) build
through it, so an architecture's name is written in one place and no loader imports another
loader to build a model.

This module imports nothing of :mod:`fastsr.models` (only torch, the standard library and
:mod:`fastsr.errors`), so every module of the package may import it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError

StateDict = Mapping[str, torch.Tensor]


class ModelFileError(UserError, ValueError):
    """A model file is missing, unreadable or not in a format fastsr knows (a UserError: one line,
    exit 2; still a ValueError for callers that caught it as one)."""


@dataclass(frozen=True)
class Architecture:
    """A model architecture fastsr builds.

    ``name``: the ``"arch"`` entry of its configs. ``builder``: called with the config's other
    entries as keyword arguments (usually the model class). ``keys``: entries its state dict
    always has and no other detectable architecture's has, and ``infer``: the config (without ``"arch"``)
    that state dict's tensor shapes imply, raising ValueError when they fit no model it builds;
    both empty when the weights do not tell the config (then no state dict is detected as it).
    Settings that leave no trace in the weights take their defaults (see each ``infer``).
    """

    name: str
    builder: Callable[..., nn.Module]
    keys: tuple[str, ...] = ()
    infer: Callable[[StateDict], dict] | None = None

    def __post_init__(self) -> None:
        if bool(self.keys) != (self.infer is not None):
            raise ValueError(f"architecture {self.name!r}: give both keys and infer, or neither")

    @property
    def title(self) -> str:
        """The builder's name for messages (the model class, e.g. ``RRDBNet``)."""
        return getattr(self.builder, "__name__", self.name)

    def detect(self, state: StateDict) -> dict | None:
        """The config of the model ``state`` fills, or None when ``state`` lacks one of :attr:`keys`."""
        if self.infer is None or not all(key in state for key in self.keys):
            return None
        return {"arch": self.name, **self.infer(state)}


_ARCHITECTURES: dict[str, Architecture] = {}


def _qualified(builder: Callable[..., nn.Module]) -> str:
    return f"{getattr(builder, '__module__', '')}.{getattr(builder, '__qualname__', repr(builder))}"


def register(architecture: Architecture) -> Architecture:
    """Add ``architecture`` (once per name; the same builder again, as on a module reload, replaces it)."""
    known = _ARCHITECTURES.get(architecture.name)
    if known is not None and _qualified(known.builder) != _qualified(architecture.builder):
        raise ValueError(f"architecture {architecture.name!r} is already registered by {_qualified(known.builder)}")
    _ARCHITECTURES[architecture.name] = architecture
    return architecture


def names() -> list[str]:
    """The registered architecture names, sorted (independent of the order modules were imported in)."""
    return sorted(_ARCHITECTURES)


def get(name: object) -> Architecture:
    """The architecture called ``name``; :class:`ModelFileError` naming the known ones otherwise."""
    if not isinstance(name, str) or name not in _ARCHITECTURES:
        raise ModelFileError(f"unknown architecture {name!r}; known: {', '.join(names())}")
    return _ARCHITECTURES[name]


def build_model(config: Mapping[str, object]) -> nn.Module:
    """Instantiate the architecture described by ``config`` (as stored in a model file: ``"arch"``
    and the builder's keyword arguments)."""
    config = dict(config)
    return get(config.pop("arch", None)).builder(**config)


def detect(state: StateDict) -> dict | None:
    """The config of the first registered architecture whose own state-dict layout ``state`` is
    in (see :class:`Architecture`), or None. The layouts are disjoint (tests/test_registry.py)."""
    for architecture in _ARCHITECTURES.values():
        config = architecture.detect(state)
        if config is not None:
            return config
    return None


def count_indices(state: StateDict, pattern: str) -> int:
    """Number of distinct N matching ``pattern`` (a regex with one group) among the keys of ``state``."""
    regex = re.compile(pattern)
    return len({m.group(1) for key in state if (m := regex.fullmatch(key))})


def shuffle_factor(conv_out: int, channels: int) -> int | None:
    """The pixel-shuffle factor r of a conv with ``conv_out`` = ``channels`` * r**2 output channels, or None."""
    squared, rest = divmod(conv_out, channels)
    factor = math.isqrt(squared)
    return None if rest or factor * factor != squared else factor
