"""The ``cpp`` backend: the ops of the C++/CUDA extension in ``csrc/``, their fake kernels and autograd.

Nothing happens at import time. The first :func:`availability` call (or the first op) loads the
extension through :mod:`fastsr.csrc.build` (which compiles it on first use into a cache folder
keyed by the ISA, sources, flags, torch and compiler, and remembers a failed build), then this
module registers the Python side of the ops. The CUDA part is compiled only when torch is a CUDA
build and a CUDA toolkit is found.

The ops are registered as ``torch.ops.fastsr.*`` (``TORCH_LIBRARY(fastsr, m)`` in C++); this
module adds their fake (meta) kernels and autograd formulas, so they run in eager mode, under
``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch

from fastsr.layout import acc_dtype, memory_format_of

# Build state, filled by _build() once per process.
_lock = threading.RLock()
_state: dict = {"attempted": False, "ok": False, "reason": "not built yet (builds on first use)", "with_cuda": False}
_loaded = False  # plain global read on every op call (cheap, and torch.compile guards on it)


def _build(retry: bool = False) -> None:
    """Load the extension (building it if needed) and register its ops' Python side, once per
    process; on failure record the one-line reason. ``retry`` tries again after a failure."""
    global _loaded
    from fastsr.csrc import build

    with _lock:
        if _state["attempted"] and not (retry and not _state["ok"]):
            return
        _state["attempted"] = True
        start = time.perf_counter()
        try:
            plan, cached = build.build(retry=retry)
        except build.BuildError as exc:
            _state.update(ok=False, reason=str(exc))
            return
        _register_python_side()
        _state.update(ok=True, reason="loaded from the build cache" if cached else "built", isa=plan.isa,
                      build_dir=str(plan.build_dir), with_cuda=plan.with_cuda, cached=cached,
                      seconds=round(time.perf_counter() - start, 1))
        _loaded = True


def availability(device_type: str) -> tuple[bool, str]:
    """Whether the extension serves ``device_type`` ("cpu" or "cuda") tensors, and if not, why.

    The first call builds the extension (a minute or more; cached on disk afterwards).
    """
    _build()
    if not _state["ok"]:
        return False, _state["reason"]
    if device_type == "cpu":
        return True, f"C++ extension {_state['reason']}, {_state['isa']} ({_state['build_dir']})"
    if device_type == "cuda":
        if not _state["with_cuda"]:
            why = "torch is a CPU-only build" if not torch.version.cuda else "no CUDA toolkit (nvcc) was found"
            return False, f"the extension was built without CUDA ({why})"
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, f"C++/CUDA extension {_state['reason']} ({_state['build_dir']})"
    return False, f"no kernels for device type {device_type!r}"


def build_info(build: bool = False) -> dict:
    """The extension's build state for ``fastsr info``; ``build=True`` builds it now, retrying a
    remembered failure.

    Keys: ``built`` (True / False / None = not attempted in this process), ``reason``, ``isa``,
    ``build_dir``, ``with_cuda``, ``cached`` (a built library is in the cache dir), ``seconds``.
    """
    from fastsr.csrc import build as builder

    if build:
        _build(retry=True)
    if not _state["attempted"]:
        try:
            plan = builder.plan()
        except builder.BuildError as exc:
            return {"built": False, "reason": str(exc), "isa": None, "build_dir": None, "with_cuda": False,
                    "cached": False, "seconds": None}
        return {"built": None, "reason": _state["reason"], "isa": plan.isa, "build_dir": str(plan.build_dir),
                "with_cuda": plan.with_cuda, "cached": plan.library.exists(), "seconds": None}
    return {"built": _state["ok"], "reason": _state["reason"], "isa": _state.get("isa"),
            "build_dir": _state.get("build_dir"), "with_cuda": _state["with_cuda"],
            "cached": _state.get("cached", False), "seconds": _state.get("seconds")}


@contextlib.contextmanager
def unbuilt() -> Iterator[None]:
    """For the block, this process has not loaded the extension yet (the next op builds or loads it,
    or records why it cannot); the real state comes back afterwards. For tests of a first or a
    failed build in a process that already loaded the library."""
    global _loaded
    saved, was_loaded = dict(_state), _loaded
    _state.clear()
    _state.update(attempted=False, ok=False, reason="not built yet (builds on first use)", with_cuda=False)
    _loaded = False
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)
        _loaded = was_loaded


def _ensure() -> None:
    if not _loaded:
        _build()
        if not _state["ok"]:
            from fastsr.errors import BackendUnavailableError

            raise BackendUnavailableError(f"backend 'cpp' is unavailable: {_state['reason']}")


# ----------------------------------------------------------------------------------------------
# The backend contract (fastsr.ops.contract.Backend; positional arguments as in fastsr/ops/reference.py).


def conv2d_prelu(x, weight, bias, slope, residual, shuffle):
    """See :func:`fastsr.ops.functional.conv2d_prelu`. Output (N, C_out/shuffle**2, H*shuffle, W*shuffle), x.dtype."""
    _ensure()
    if slope is not None and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, slope, residual)
    ):
        # Under autograd: conv + bias, then shuffle + PReLU + residual as a second op, so the
        # pre-activation is saved for the PReLU backward instead of recomputed by another
        # convolution (the fused op's backward does that; it made training 7-17% slower than torch).
        pre = torch.ops.fastsr.conv2d_prelu(x, weight, bias, None, None, 1)
        return torch.ops.fastsr.shuffle_prelu(pre, slope, residual, int(shuffle))
    return torch.ops.fastsr.conv2d_prelu(x, weight, bias, slope, residual, int(shuffle))


def conv2d_silu(x, weight, bias, skip):
    """See :func:`fastsr.ops.functional.conv2d_silu`. Output (N, C_out, H, W), x.dtype."""
    _ensure()
    return torch.ops.fastsr.conv2d_silu(x, weight, bias, skip)


def batch_norm_prelu(x, weight, bias, slope, residual, eps):
    """See :func:`fastsr.ops.functional.batch_norm_prelu`: (y, mean, var), y like x, mean and var (C,)."""
    _ensure()
    return torch.ops.fastsr.batch_norm_prelu(x, weight, bias, slope, residual, float(eps))


def pixel_shuffle_prelu(x, slope, upscale_factor):
    """See :func:`fastsr.ops.functional.pixel_shuffle_prelu`. (N, C*r*r, H, W) -> (N, C, H*r, W*r)."""
    _ensure()
    return torch.ops.fastsr.shuffle_prelu(x, slope, None, int(upscale_factor))


def mse(a, b, reduction):
    """Per-image (``"none"``, shape (N,)) or mean squared error, fp32 (fp64 for fp64 inputs)."""
    _ensure()
    per_image = torch.ops.fastsr.mse_per_image(a, b, 1.0, False, 0)
    return per_image if reduction == "none" else per_image.mean()


def psnr(sr, hr, data_range, y_channel, crop_border, reduction):
    """PSNR in dB per image (N,) or their mean; fp32 (fp64 for fp64 inputs)."""
    _ensure()
    per_image = 10.0 * torch.log10(1.0 / torch.ops.fastsr.mse_per_image(sr, hr, 1.0 / data_range, y_channel,
                                                                        crop_border))
    return per_image if reduction == "none" else per_image.mean()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C): clamp, * 255, round half to even; NaN -> 0.

    Computed in fp32 (fp64 for fp64 input), one pass, either memory format in.
    """
    _ensure()
    return torch.ops.fastsr.to_uint8(x)


# The optional training kernels this backend has (contract.OPTIONAL_OPS), with the (device type,
# dtype) pairs each serves: dispatch.optional_kernel and `fastsr selftest` read it.
OPTIONAL = {"adam_step": {("cpu", torch.float32)}}


def adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay):
    """Adam's update of fp32 CPU parameters in one parallel pass (csrc/cpu/adam_cpu.cpp); each
    gradient and moment has its parameter's shape and strides, every parameter is dense."""
    _ensure()
    torch.ops.fastsr.adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay)


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd, registered once the library has defined the ops.


def _empty(x: torch.Tensor, shape, fmt=None, dtype=None) -> torch.Tensor:
    # fastsr.layout's rule, which output_format() in csrc/common.h mirrors: the fakes' strides are the kernels'.
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device,
                       memory_format=memory_format_of(x) if fmt is None else fmt)


def _fake_conv2d_prelu(x, weight, bias, slope, residual, shuffle):
    n, _, h, w = x.shape
    return _empty(x, (n, weight.shape[0] // (shuffle * shuffle), h * shuffle, w * shuffle))


def _fake_conv2d_silu(x, weight, bias, skip):
    n, _, h, w = x.shape
    return _empty(x, (n, weight.shape[0], h, w))


def _fake_sigmoid_gate_backward(grad, y, skip):
    grad_skip = _empty(y, y.shape, dtype=skip.dtype) if skip is not None else torch.empty((0,), dtype=y.dtype,
                                                                                           device=y.device)
    return _empty(y, y.shape), grad_skip


def _fake_shuffle_prelu(x, slope, residual, r):
    n, c, h, w = x.shape
    return _empty(x, (n, c // (r * r), h * r, w * r))


def _fake_shuffle_prelu_backward(grad_out, x, slope, r):
    grad_slope = torch.empty(slope.shape if slope is not None else (0,),
                             dtype=slope.dtype if slope is not None else x.dtype, device=x.device)
    return _empty(x, x.shape), grad_slope


def _fake_batch_norm_prelu(x, weight, bias, slope, residual, eps):
    stats = torch.empty((x.shape[1],), dtype=acc_dtype(x.dtype), device=x.device)
    return _empty(x, x.shape), stats, torch.empty_like(stats)


def _fake_batch_norm_prelu_backward(grad, x, mean, var, weight, bias, slope, eps):
    grad_slope = torch.empty(slope.shape if slope is not None else (0,),
                             dtype=slope.dtype if slope is not None else x.dtype, device=x.device)
    return _empty(x, x.shape), torch.empty_like(weight), torch.empty_like(bias), grad_slope


def _fake_conv2d_weight_grad(grad, x, kernel_size, channels_last):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return _empty(x, (grad.shape[1], x.shape[1], kernel_size, kernel_size), fmt=layout)


def _fake_mse_per_image(a, b, scale, y_channel, crop):
    return torch.empty((a.shape[0],), dtype=acc_dtype(a.dtype), device=a.device)


def _fake_mse_per_image_backward(grad, a, b, scale, y_channel, crop):
    return _empty(a, a.shape)


def _fake_adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay):
    return None


def _fake_to_uint8(x):
    n, c, h, w = x.shape
    return torch.empty((n, h, w, c), dtype=torch.uint8, device=x.device)


_FAKES = {"conv2d_prelu": _fake_conv2d_prelu, "conv2d_silu": _fake_conv2d_silu,
          "sigmoid_gate_backward": _fake_sigmoid_gate_backward, "shuffle_prelu": _fake_shuffle_prelu,
          "shuffle_prelu_backward": _fake_shuffle_prelu_backward, "batch_norm_prelu": _fake_batch_norm_prelu,
          "batch_norm_prelu_backward": _fake_batch_norm_prelu_backward,
          "conv2d_weight_grad": _fake_conv2d_weight_grad, "mse_per_image": _fake_mse_per_image,
          "mse_per_image_backward": _fake_mse_per_image_backward, "to_uint8": _fake_to_uint8,
          "adam_step_": _fake_adam_step_}


def _register_python_side() -> None:
    """Fake (meta) kernels for torch.compile and opcheck (the autograd formulas are C++: csrc/autograd.cpp)."""
    for op, fake in _FAKES.items():
        torch.library.register_fake(f"fastsr::{op}", fake)
