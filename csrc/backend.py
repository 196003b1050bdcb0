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


def _fake_conv2d_weight_grad(grad, x, kernel_size):
    return torch.empty((grad.shape[1], x.shape[1], kernel_size, kernel_size), dtype=x.dtype, device=x.device)


def _fake_mse_per_image(a, b, scale, y_channel, crop):
    return torch.empty((a.shape[0],), dtype=acc_dtype(a.dtype), device=a.device)


def _fake_mse_per_image_backward(grad, a, b, scale, y_channel, crop):
    return _empty(a, a.shape)


def _fake_to_uint8(x):
    n, c, h, w = x.shape
    return torch.empty((n, h, w, c), dtype=torch.uint8, device=x.device)


# conv2d_prelu's autograd formula. With a slope it serves only direct torch.ops.fastsr.conv2d_prelu
# calls (torch.library.opcheck in tests/test_cpp.py, users calling the op themselves): under autograd
# the backend's conv2d_prelu above never runs the fused op with a slope but conv + bias, then
# shuffle_prelu, which keeps the pre-activation. Here the backward recomputes the convolution instead
# (its pre-activation values decide the PReLU gradient), like activation checkpointing: the op stays
# a single output and saves nothing but its inputs. Without a slope (the path the backend takes) it
# needs no recompute: the gradient is only un-shuffled.
def _conv_setup(ctx, inputs, output):
    x, weight, bias, slope, residual, shuffle = inputs
    ctx.shuffle = shuffle
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, weight, bias, slope)


def _conv_backward(ctx, grad):
    x, weight, bias, slope = ctx.saved_tensors
    r = ctx.shuffle
    need_x, need_w, need_b, need_slope, _, _ = ctx.needs_input_grad
    grad_slope = None
    if slope is not None:
        pre = torch.ops.fastsr.conv2d_prelu(x, weight, bias, None, None, 1)
        grad_pre, grad_slope = torch.ops.fastsr.shuffle_prelu_backward(grad, pre, slope, r)
    else:
        grad_pre = torch.nn.functional.pixel_unshuffle(grad, r) if r > 1 else grad
    grad_x, grad_w, grad_b = _conv_input_weight_grads(grad_pre, x, weight, bias, (need_x, need_w, need_b))
    return grad_x, grad_w, grad_b, grad_slope if need_slope else None, grad if ctx.has_residual else None, None


def _conv_input_weight_grads(grad_pre, x, weight, bias, needs):
    """(grad_x, grad_weight, grad_bias) of the 'same' convolution for the upstream gradient of its
    output ``grad_pre``; None where ``needs`` (same order) is False. The parts this extension's CPU
    kernels do faster than oneDNN are computed here; oneDNN does the rest in one call."""
    need_x, need_w, need_b = needs
    # The input gradient stays on oneDNN: through the Winograd kernel (a conv with the flipped weight) it
    # was 1.3x faster at 24x24 but a whole SRResNet's slope gradient broke the tolerance rule (1.4x the bound).
    own_w = need_w and _few_output_weight_grad(x, weight)
    grad_x = None
    grad_w = torch.ops.fastsr.conv2d_weight_grad(grad_pre, x, weight.shape[-1]) if own_w else None
    # Asked for the bias gradient, oneDNN computes the weight gradient too (15 ms of a tail's 17).
    grad_b = grad_pre.sum(dim=(0, 2, 3)) if own_w and need_b and bias is not None else None
    mask = [need_x, need_w and not own_w, need_b and bias is not None and grad_b is None]
    if any(mask):
        pad = weight.shape[-1] // 2
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_pre, x, weight, None if bias is None else [bias.shape[0]], [1, 1], [pad, pad], [1, 1], False,
            [0, 0], 1, mask)
        grad_x, grad_w, grad_b = gx if mask[0] else grad_x, gw if mask[1] else grad_w, gb if mask[2] else grad_b
    return grad_x if need_x else None, grad_w if need_w else None, grad_b if need_b else None


def _fp32_cpu(*tensors) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _few_output_weight_grad(x, weight) -> bool:
    """conv2d_weight_grad's shapes (1-4 output channels, input channels in multiples of 16): a
    tail conv's weight gradient, 5-10x faster there than oneDNN's (benchmarks/test_train_step.py)."""
    return _fp32_cpu(x, weight) and weight.shape[0] <= 4 and x.shape[1] % 16 == 0


# conv2d_silu's autograd formula, the one the backend's conv2d_silu takes: like conv2d_prelu's with a
# slope, the backward recomputes the convolution for the activation's derivative (the
# sigmoid_gate_backward op).
def _silu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_backward(ctx, grad):
    x, weight, bias, skip = ctx.saved_tensors
    pre = torch.ops.fastsr.conv2d_prelu(x, weight, bias, None, None, 1)
    grad_pre, grad_skip = torch.ops.fastsr.sigmoid_gate_backward(grad, pre, skip)
    grads = _conv_input_weight_grads(grad_pre, x, weight, bias, ctx.needs_input_grad[:3])
    return *grads, grad_skip if ctx.needs_input_grad[3] else None


def _shuffle_setup(ctx, inputs, output):
    x, slope, residual, r = inputs
    ctx.r = r
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, slope)


def _shuffle_backward(ctx, grad):
    x, slope = ctx.saved_tensors
    grad_x, grad_slope = torch.ops.fastsr.shuffle_prelu_backward(grad, x, slope, ctx.r)
    return grad_x, grad_slope if slope is not None else None, grad if ctx.has_residual else None, None


# batch_norm_prelu's autograd: one fused backward op (two passes: the per-channel sums, then grad_x).
# mean and var are statistics for the running averages, not differentiable outputs.
def _bn_setup(ctx, inputs, output):
    x, weight, bias, slope, residual, eps = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.eps = eps
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, mean, var, weight, bias, slope)


def _bn_backward(ctx, grad, _grad_mean, _grad_var):
    x, mean, var, weight, bias, slope = ctx.saved_tensors
    grad_x, grad_w, grad_b, grad_slope = torch.ops.fastsr.batch_norm_prelu_backward(grad, x, mean, var, weight,
                                                                                   bias, slope, ctx.eps)
    need = ctx.needs_input_grad
    return (grad_x if need[0] else None, grad_w if need[1] else None, grad_b if need[2] else None,
            grad_slope if slope is not None and need[3] else None, grad if ctx.has_residual else None, None)


def _mse_setup(ctx, inputs, output):
    a, b, scale, y_channel, crop = inputs
    ctx.args = (scale, y_channel, crop)
    ctx.save_for_backward(a, b)


def _mse_backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = torch.ops.fastsr.mse_per_image_backward(grad, a, b, *ctx.args)
    need_a, need_b = ctx.needs_input_grad[:2]
    return (grad_a if need_a else None, (-grad_a).to(b.dtype) if need_b else None, None, None, None)


_FAKES = {"conv2d_prelu": _fake_conv2d_prelu, "conv2d_silu": _fake_conv2d_silu,
          "sigmoid_gate_backward": _fake_sigmoid_gate_backward, "shuffle_prelu": _fake_shuffle_prelu,
          "shuffle_prelu_backward": _fake_shuffle_prelu_backward, "batch_norm_prelu": _fake_batch_norm_prelu,
          "batch_norm_prelu_backward": _fake_batch_norm_prelu_backward,
          "conv2d_weight_grad": _fake_conv2d_weight_grad, "mse_per_image": _fake_mse_per_image,
          "mse_per_image_backward": _fake_mse_per_image_backward, "to_uint8": _fake_to_uint8}
_AUTOGRAD = {"conv2d_prelu": (_conv_backward, _conv_setup), "conv2d_silu": (_silu_backward, _silu_setup),
             "shuffle_prelu": (_shuffle_backward, _shuffle_setup),
             "batch_norm_prelu": (_bn_backward, _bn_setup),
             "mse_per_image": (_mse_backward, _mse_setup)}


def _register_python_side() -> None:
    """Fake (meta) kernels for torch.compile and opcheck, and the autograd formulas."""
    for op, fake in _FAKES.items():
        torch.library.register_fake(f"fastsr::{op}", fake)
    for op, (backward, setup) in _AUTOGRAD.items():
        torch.library.register_autograd(f"fastsr::{op}", backward, setup_context=setup)
