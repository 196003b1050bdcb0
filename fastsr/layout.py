"""The layout rules every backend shares: which memory format an op's output takes, and which
dtype it accumulates in.

This module is the one home of these rules in Python: the dispatcher (:mod:`fastsr.ops.dispatch`),
the ``triton`` backend (``fastsr.kernels``) and the ``cpp`` backend's fake kernels
(``fastsr.csrc.backend``) all import it, so torch.compile sees the strides the kernels produce.
``csrc/common.h`` mirrors it in C++ (``output_format``, ``acc_type``): change both together. It
imports torch only, so any backend may import it (docs/architecture.md, "Allowed arrows").
"""

from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """True when ``x`` is a 4-D tensor whose channels are adjacent in memory (stride 1) and which is
    not plain NCHW-contiguous: a channels_last tensor, or a channel slice ``buf[:, :k]`` of one (as
    PyTorch's own ops decide). A channels_last tensor with C == 1 or H == W == 1 is also
    NCHW-contiguous and counts as NCHW."""
    return x.dim() == 4 and x.stride(1) == 1 and not x.is_contiguous()


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format of an op's output for the input ``x``: channels_last in, channels_last out
    (:func:`is_channels_last`), else NCHW."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and reduction result) dtype for inputs of ``dtype``: fp32, except that fp64
    stays fp64 (gradcheck's precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)`` (None stays None), skipping the call when ``t`` already has ``dtype``: that
    call returns ``t`` itself but costs ~1 us of argument parsing, several times per layer in a
    training step's forward, and the host's time per layer is what a GPU step waits on."""
    return t if t is None or t.dtype == dtype else t.to(dtype)
