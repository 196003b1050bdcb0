"""First-use validation: a fast backend is checked against the torch reference before it serves.

The first time a backend serves an (op, device, dtype, memory format) in a process, :func:`check`
runs it on small probes through the same entry point real calls use (for the cpp backend: the
registered ops, so a kernel that is wrong at run time is caught) and compares with the float64
reference by the tolerance rule (:mod:`.tolerance`). The verdict is cached for the process. The
probes cover the code paths real models take: a 3x3 conv large enough for the CPU Winograd path,
with and without a pixel shuffle, the 9x9 head and few-output tail, SPAN's SiLU and attention
convs, the pixel shuffle, the reductions and ``to_uint8``. ``FASTSR_VALIDATE=0`` turns it off (for benchmarking).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

from . import reference
from .tolerance import Verdict, judge

# (n, C_in, C_out, H, W, k, shuffle, bias, slope, residual)
CONV_PROBES = [
    (1, 16, 16, 17, 16, 3, 1, True, "scalar", True),   # body conv + residual (Winograd on CPU)
    (1, 16, 64, 17, 16, 3, 2, True, "channel", False),  # upsample: conv + shuffle 2 + PReLU
    (1, 3, 16, 9, 8, 9, 1, True, "scalar", False),      # 9x9 head
    (1, 16, 3, 9, 8, 9, 1, True, None, False),          # 9x9 tail, few outputs
]

# (n, C_in, C_out, H, W, k, skip): SPAN's convs, SiLU and attention (Winograd on CPU), and a
# conv too small for Winograd.
SILU_PROBES = [
    (1, 16, 16, 17, 16, 3, False),
    (1, 16, 16, 17, 16, 3, True),
    (1, 3, 16, 9, 8, 3, True),
]

# (n, C, H, W, slope, residual): an SRResNet block's two BatchNorms (PReLU; residual, no activation)
# on an image whose mean is far from zero (the statistics' cancellation), odd sizes.
BATCH_NORM_PROBES = [(2, 16, 9, 7, "channel", False), (1, 16, 5, 11, None, True)]

_lock = threading.Lock()


class KernelError(RuntimeError):
    """The backend's kernel raised on a probe (the original exception is the cause)."""


_verdicts: dict[tuple, str | None] = {}


def enabled() -> bool:
    return os.environ.get("FASTSR_VALIDATE", "1") != "0"


def _conv_args(case, device, channels_last: bool, gen: torch.Generator) -> list:
    n, c_in, c_out, h, w, k, r, bias, slope, residual = case
    oc = c_out // (r * r)
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64)
    wt = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64) / (c_in * k * k) ** 0.5
    b = torch.randn(c_out, generator=gen, dtype=torch.float64) * 0.1 if bias else None
    s = {"scalar": torch.tensor([0.2], dtype=torch.float64), None: None,
         "channel": torch.rand(oc, generator=gen, dtype=torch.float64) - 0.5}[slope]
    res = torch.randn(n, oc, h * r, w * r, generator=gen, dtype=torch.float64) if residual else None
    return [_place(t, device, channels_last) for t in (x, wt, b, s, res)] + [r]


def _silu_args(case, device, channels_last: bool, gen: torch.Generator) -> list:
    """A conv probe without slope or shuffle, its residual taken as the skip."""
    n, c_in, c_out, h, w, k, skip = case
    x, wt, b, _, s, _ = _conv_args((n, c_in, c_out, h, w, k, 1, True, None, skip), device, channels_last, gen)
    return [x, wt, b, s]


def _batch_norm_args(case, device, channels_last: bool, gen: torch.Generator) -> list:
    n, c, h, w, slope, residual = case
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) * 2 + 3
    weight = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(c, generator=gen, dtype=torch.float64) * 0.1
    s = torch.rand(c, generator=gen, dtype=torch.float64) - 0.5 if slope else None
    res = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) if residual else None
    return [_place(t, device, channels_last) for t in (x, weight, bias, s, res)] + [1e-5]


def _place(t, device, channels_last: bool):
    if not isinstance(t, torch.Tensor):
        return t
    t = t.to(device)
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def _image_pair(shape, device, channels_last: bool, gen: torch.Generator) -> list:
    a = torch.rand(*shape, generator=gen, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(*shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return [_place(a, device, channels_last), _place(b, device, channels_last)]


def _adam_args(device, gen: torch.Generator) -> list:
    """Both memory formats at once: a channels_last and a contiguous conv weight, a vector (odd sizes,
    longer than a vector register and not a multiple of one) and a 1-element slope; moments from an
    earlier step (step count 4), weight decay on."""
    params = [_place(torch.randn(*shape, generator=gen, dtype=torch.float64), device, cl)
              for shape, cl in (((16, 5, 3, 3), True), ((3, 16, 9, 9), False), ((37,), False), ((1,), False))]

    def like_params(scale: float, positive: bool = False) -> list[torch.Tensor]:
        # Each in its parameter's layout, as the optimizer's state is.
        draw = torch.rand if positive else torch.randn
        return [torch.empty_like(p).copy_(draw(p.shape, generator=gen, dtype=torch.float64) * scale) for p in params]

    grads, exp_avgs, exp_avg_sqs = like_params(1.0), like_params(0.1), like_params(0.01, positive=True)
    steps = [torch.tensor(4.0, dtype=torch.float64, device=device) for _ in params]
    return [params, grads, exp_avgs, exp_avg_sqs, steps, 1e-2, 0.9, 0.99, 1e-8, 1e-2]


def probes(op: str, device, channels_last: bool) -> list[list]:
    """The probe inputs (float64, on ``device``, in the memory format) for ``op``: argument lists
    in the contract's positional order."""
    gen = torch.Generator().manual_seed(0)
    if op == "conv2d_prelu":
        return [_conv_args(c, device, channels_last, gen) for c in CONV_PROBES]
    if op == "conv2d_silu":
        return [_silu_args(c, device, channels_last, gen) for c in SILU_PROBES]
    if op == "batch_norm_prelu":
        return [_batch_norm_args(case, device, channels_last, gen) for case in BATCH_NORM_PROBES]
    if op == "pixel_shuffle_prelu":
        x = torch.randn(2, 16, 5, 7, generator=gen, dtype=torch.float64)
        return [[_place(x, device, channels_last), (torch.rand(4, generator=gen, dtype=torch.float64) - 0.5).to(device),
                 2]]
    if op == "mse":
        return [[*_image_pair((2, 3, 9, 8), device, channels_last, gen), "none"]]
    if op == "psnr":
        return [[*_image_pair((2, 3, 12, 11), device, channels_last, gen), 1.0, True, 2, "none"]]
    if op == "to_uint8":
        return [[_place(torch.rand(1, 3, 9, 8, generator=gen, dtype=torch.float64) * 1.4 - 0.2, device,
                        channels_last)]]
    if op == "adam_step":
        return [_adam_args(device, gen)]
    raise ValueError(f"no probe for op {op!r}")


def _cast(args: list, dtype: torch.dtype) -> list:
    """Copies of the float tensors (also in lists) in ``dtype``; step counts (0-dim) stay fp32 or wider."""
    def one(a):
        if isinstance(a, list):
            return [one(t) for t in a]
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            return a
        return a.to(torch.float32 if a.dim() == 0 and dtype != torch.float64 else dtype, copy=True)
    return [one(a) for a in args]


def _in_place_verdicts(fn: Callable, want: Callable, args: list, dtype: torch.dtype) -> list[Verdict]:
    """An op that updates lists of tensors in place (adam_step): every tensor it updates, against the
    reference's update of float64 copies, the same-dtype reference's as the baseline."""
    ours, ref64, same = _cast(args, dtype), _cast(args, torch.float64), _cast(args, dtype)
    try:
        fn(*ours)
    except Exception as exc:
        raise KernelError(exc) from exc
    want(*ref64)
    want(*same)
    return [judge(o, r, s, dtype) for i in (0, 2, 3, 4) for o, r, s in zip(ours[i], ref64[i], same[i], strict=True)]


@contextlib.contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """TF32 off while a CUDA probe runs: the rule's baseline is torch's IEEE fp32 error, and cuDNN's
    convolutions (the reference's and the cpp backend's) round fp32 inputs to TF32 by default, each
    algorithm differently. The flags are process-wide; they are restored when the probe ends. The
    tests hold every CUDA case to the rule under it too (tests/conftest.py)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_probe(op: str, backend: ModuleType, device, dtype: torch.dtype, channels_last: bool) -> Verdict:
    """``backend``'s ``op`` on every probe in ``dtype`` against the float64 reference; the worst verdict.
    A kernel that raises raises :class:`KernelError`. ``to_uint8`` must equal the reference exactly."""
    fn: Callable = getattr(backend, op)
    want: Callable = getattr(reference, op)
    verdicts = []
    with torch.no_grad(), ieee_fp32(torch.device(device)):
        for args in probes(op, device, channels_last):
            if op == "adam_step":
                verdicts.extend(_in_place_verdicts(fn, want, args, dtype))
                continue
            try:
                ours = fn(*_cast(args, dtype))
            except Exception as exc:  # a kernel that raises is as unusable as one that is wrong
                raise KernelError(exc) from exc
            if op == "to_uint8":
                bad = int((ours.int() - want(*_cast(args, dtype)).int()).abs().gt(0).sum())
                verdicts.append(Verdict(bad, ours.numel(), float(bad > 0), 0.0, float(bad)))
            elif isinstance(ours, tuple):  # batch_norm_prelu: (y, mean, var), each within the rule
                verdicts.extend(map(judge, ours, want(*args), want(*_cast(args, dtype)), [dtype] * len(ours)))
            else:
                verdicts.append(judge(ours, want(*args), want(*_cast(args, dtype)), dtype))
    failing = [v for v in verdicts if not v.ok]
    return failing[0] if failing else max(verdicts, key=lambda v: v.ratio)


def check(op: str, name: str, backend: ModuleType, device_type: str, dtype: torch.dtype,
          channels_last: bool) -> str | None:
    """None when ``backend`` serves ``op`` correctly on this device, dtype and memory format (or
    validation is off), else the reason; probed once per process."""
    if not enabled() or name == "torch" or not dtype.is_floating_point:
        return None
    key = (op, name, device_type, dtype, channels_last)
    if key in _verdicts:  # every op call asks: a verdict once written is read without the lock
        return _verdicts[key]
    with _lock:
        if key not in _verdicts:
            _verdicts[key] = _probe_reason(op, backend, device_type, dtype, channels_last)
        return _verdicts[key]


def _probe_reason(op, backend, device_type, dtype, channels_last) -> str | None:
    try:
        verdict = run_probe(op, backend, torch.device(device_type), dtype, channels_last)
    except KernelError as failure:
        exc = failure.__cause__
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return None if verdict.ok else str(verdict)


def forget() -> None:
    """Drop every cached verdict (tests; after replacing a kernel)."""
    with _lock:
        _verdicts.clear()
