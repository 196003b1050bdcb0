"""Triton backend vs PyTorch eager vs ``torch.compile(mode="max-autotune")`` on a GPU.

Cases (bf16, channels_last, as in the issue's performance goals):
* conv2d_prelu 64->64 3x3 + PReLU + residual on 16 x 96x96;
* the upsample conv 64->256 3x3 + pixel shuffle 2 + PReLU on 16 x 96x96;
* pixel_shuffle_prelu on 16 x 256 x 96x96;
* mse / psnr on 16 x 3 x 2048x2048 (psnr: forward only, it is a metric);
* the whole SRResNet x4 on a 512x512 input.
Each in forward and forward+backward. ``extra_info`` holds output Mpixel/s, GB/s of the minimal
logical traffic (each input read once, each output written once) and TFLOP/s (conv FLOPs, 2 per
multiply-add; backward counted as 2x forward). CUDA is synchronised inside the timed function.
Run with ``pytest benchmarks/test_triton_ops.py --benchmark-only``.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastsr
from fastsr.ops import functional as ops
from fastsr.ops import reference as ref

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="Triton benchmarks need a CUDA GPU (the CPU interpreter is a correctness tool, not a benchmark)",
)

DEVICE = "cuda"
DTYPE = torch.bfloat16
IMPLS = ["triton", "eager", "compile"]
MODES = ["forward", "forward_backward"]
CL = torch.channels_last


def _timed(benchmark, step, *, group, impl, mode, pixels, bytes_moved, flops, rounds=20):
    """Time ``step`` (which synchronises) and record throughput in extra_info."""
    benchmark.group = group
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=3)  # warm-up covers autotune and compilation
    t = benchmark.stats.stats.mean
    benchmark.extra_info.update({
        "impl": impl, "mode": mode, "device": torch.cuda.get_device_name(), "dtype": str(DTYPE),
        "torch": torch.__version__, "triton": __import__("triton").__version__,
        "output_mpix_per_s": pixels / t / 1e6, "gb_per_s": bytes_moved / t / 1e9, "tflop_per_s": flops / t / 1e12,
    })


def _op(impl: str, fn_triton, fn_torch):
    if impl == "triton":
        return fn_triton
    if impl == "eager":
        return fn_torch
    return torch.compile(fn_torch, mode="max-autotune")


def _step(fn, inputs, mode):
    """A timed step: forward (no grad) or forward + backward w.r.t. every float input."""
    if mode == "forward":
        def step():
            with torch.no_grad():
                out = fn(*inputs)
            torch.cuda.synchronize()
            return out
        return step
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    wrt = [t for t in leaves if t is not None]

    def step():
        out = fn(*leaves)
        grads = torch.autograd.grad(out, wrt, torch.ones_like(out))
        torch.cuda.synchronize()
        return grads
    return step


# ---------------------------------------------------------------- conv2d_prelu

CONV_CASES = {
    # name: (N, C_in, C_out, H, W, k, shuffle, bias, residual)
    "conv64x64_3x3_res": (16, 64, 64, 96, 96, 3, 1, False, True),
    "upsample64x256_shuffle2": (16, 64, 256, 96, 96, 3, 2, True, False),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_prelu(benchmark, case, impl, mode):
    n, c_in, c_out, h, w, k, r, has_bias, has_res = CONV_CASES[case]
    torch.manual_seed(0)
    oc = c_out // (r * r)
    x = torch.randn(n, c_in, h, w, device=DEVICE, dtype=DTYPE).contiguous(memory_format=CL)
    # channels_last weights too, as model.to(memory_format=torch.channels_last) gives
    wt = (torch.randn(c_out, c_in, k, k, device=DEVICE, dtype=DTYPE) / math.sqrt(c_in * k * k)).contiguous(
        memory_format=CL
    )
    b = torch.randn(c_out, device=DEVICE, dtype=DTYPE) if has_bias else None
    s = torch.tensor([0.25], device=DEVICE, dtype=DTYPE)
    res = torch.randn(n, oc, h * r, w * r, device=DEVICE, dtype=DTYPE).contiguous(memory_format=CL) if has_res else None

    def fn_triton(x, wt, b, s, res):
        return ops.conv2d_prelu(x, wt, b, s, res, shuffle=r, backend="triton")

    def fn_torch(x, wt, b, s, res):
        return ref.conv2d_prelu(x, wt, b, s, res, r)

    fn = _op(impl, fn_triton, fn_torch)
    out_elems = n * c_out * h * w
    elem = x.element_size()
    fwd_bytes = (x.numel() + wt.numel() + out_elems + (out_elems if has_res else 0)) * elem
    fwd_flops = 2 * n * h * w * c_out * c_in * k * k
    if mode == "forward":
        bytes_moved, flops = fwd_bytes, fwd_flops
    else:  # backward reads g, x, w (and z) and writes dx, dw (and the residual grad)
        bytes_moved, flops = fwd_bytes + (2 * out_elems + 2 * x.numel() + wt.numel()) * elem, 3 * fwd_flops
    _timed(benchmark, _step(fn, [x, wt, b, s, res], mode), group=f"{case}-{mode}", impl=impl, mode=mode,
           pixels=n * h * r * w * r, bytes_moved=bytes_moved, flops=flops)


# ---------------------------------------------------------------- pixel_shuffle_prelu


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_pixel_shuffle_prelu(benchmark, impl, mode):
    torch.manual_seed(0)
    x = torch.randn(16, 256, 96, 96, device=DEVICE, dtype=DTYPE).contiguous(memory_format=CL)
    s = torch.rand(64, device=DEVICE, dtype=DTYPE)
    fn = _op(impl, lambda t, a: ops.pixel_shuffle_prelu(t, a, 2, backend="triton"),
             lambda t, a: ref.pixel_shuffle_prelu(t, a, 2))
    elem_bytes = x.numel() * x.element_size()
    bytes_moved = 2 * elem_bytes if mode == "forward" else 5 * elem_bytes  # bwd: read g, x; write dx
    _timed(benchmark, _step(fn, [x, s], mode), group=f"pixel_shuffle_prelu-{mode}", impl=impl, mode=mode,
           pixels=16 * 192 * 192, bytes_moved=bytes_moved, flops=0)


# ---------------------------------------------------------------- mse / psnr

IMG_SHAPE = (16, 3, 2048, 2048)


@pytest.fixture(scope="module")
def image_pair():
    torch.manual_seed(0)
    a = torch.rand(IMG_SHAPE, device=DEVICE, dtype=DTYPE).contiguous(memory_format=CL)
    b = (a + 0.05 * torch.randn_like(a)).clamp(0, 1)
    return a, b


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_mse(benchmark, image_pair, impl, mode):
    a, b = image_pair
    fn = _op(impl, lambda p, q: ops.mse(p, q, "mean", backend="triton"), lambda p, q: ref.mse(p, q, "mean"))
    reads = 2 * a.numel() * a.element_size()
    bytes_moved = reads if mode == "forward" else 2 * reads + reads  # fwd + bwd re-read + write da, db
    _timed(benchmark, _step(fn, [a, b], mode), group=f"mse-{mode}", impl=impl, mode=mode,
           pixels=a.shape[0] * a.shape[2] * a.shape[3], bytes_moved=bytes_moved, flops=0)


@pytest.mark.parametrize("y_channel", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_psnr(benchmark, image_pair, impl, y_channel):
    a, b = image_pair

    def fn_triton(p, q):
        return ops.psnr(p, q, 1.0, y_channel, 4, "none", backend="triton")

    def fn_torch(p, q):
        return ref.psnr(p, q, 1.0, y_channel, 4, "none")

    fn = _op(impl, fn_triton, fn_torch)
    _timed(benchmark, _step(fn, [a, b], "forward"), group=f"psnr-y{int(y_channel)}-forward", impl=impl,
           mode="forward", pixels=a.shape[0] * a.shape[2] * a.shape[3],
           bytes_moved=2 * a.numel() * a.element_size(), flops=0)


# ---------------------------------------------------------------- whole model

MODEL_SIZE = 512


def _srresnet_flops(model: fastsr.SRResNet, h: int, w: int) -> int:
    """Conv FLOPs of one forward pass: each conv at the resolution it runs at."""
    def conv(layer, scale):
        c_out, c_in, k, _ = layer.conv.weight.shape
        return 2 * (h * scale) * (w * scale) * c_out * c_in * k * k

    total = conv(model.head, 1) + conv(model.body_tail, 1)
    total += sum(conv(block.conv1, 1) + conv(block.conv2, 1) for block in model.body)
    total += sum(conv(block.conv, 2**i) for i, block in enumerate(model.upsample))
    return total + conv(model.tail, model.scale)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_srresnet_x4(benchmark, impl, mode):
    torch.manual_seed(0)
    model = fastsr.SRResNet(scale=4).to(DEVICE, DTYPE).to(memory_format=CL)
    # forward: inference (BatchNorm folded, every layer one fused op); forward+backward: training mode
    model.train(mode == "forward_backward")
    x = torch.rand(1, 3, MODEL_SIZE, MODEL_SIZE, device=DEVICE, dtype=DTYPE).contiguous(memory_format=CL)
    backend = "triton" if impl == "triton" else "torch"

    # The backend is chosen outside the compiled region (a context variable), as users would.
    fn = torch.compile(model, mode="max-autotune") if impl == "compile" else model
    params = list(model.parameters())
    if mode == "forward":
        def step():
            with fastsr.use_backend(backend), torch.inference_mode():
                out = fn(x)
            torch.cuda.synchronize()
            return out
        flops = _srresnet_flops(model, MODEL_SIZE, MODEL_SIZE)
    else:
        def step():
            with fastsr.use_backend(backend):
                out = fn(x)
            grads = torch.autograd.grad(out, params, torch.ones_like(out))
            torch.cuda.synchronize()
            return grads
        flops = 3 * _srresnet_flops(model, MODEL_SIZE, MODEL_SIZE)
    out_pixels = (MODEL_SIZE * model.scale) ** 2
    bytes_moved = (x.numel() + 3 * out_pixels) * x.element_size()  # image in, image out (activations excluded)
    _timed(benchmark, step, group=f"srresnet-x4-512-{mode}", impl=impl, mode=mode, pixels=out_pixels,
           bytes_moved=bytes_moved, flops=flops, rounds=10)
