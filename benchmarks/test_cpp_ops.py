"""The ``cpp`` backend (C++ extension) vs PyTorch eager vs ``torch.compile``, in one run.

Each op on SRResNet-sized CPU inputs (fp32, channels_last; conv2d_silu on SPAN's), and the whole SRResNet x4 forward
(fp32, channels_last weights, eval, ``inference_mode``) on 128x128 and 256x256 inputs given as
NCHW (what users pass) and as channels_last:

* ``cpp``: ``fastsr.optimize(model)`` (BatchNorm folded, channels_last) on the ``cpp`` backend;
* ``eager``: the same model on the ``torch`` backend (plain PyTorch ops; eval BatchNorm is
  folded into the conv weights on the fly, so the convolutions match);
* ``compile``: ``torch.compile`` of the eager model.

``extra_info`` has output Mpixel/s (and GB/s for the memory-bound ops). On CUDA machines the
same cases run on the GPU. Compare timings only within one run on one machine.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fastsr.csrc import backend as ext

import fastsr
from fastsr.fusion import optimize as fuse_for_inference
from fastsr.ops import functional as ops
from fastsr.ops import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last
IMPLS = ["cpp", "eager", "compile"]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", autouse=True)
def cpp_built():
    ok, why = ext.availability(DEVICE)
    if not ok:
        pytest.skip(f"the cpp backend is unavailable on {DEVICE}: {why}")


def _time(benchmark, fn, args, *, rounds, info):
    def step():
        with torch.inference_mode():
            out = fn(*args)
        _sync()
        return out

    with torch.inference_mode():
        out = fn(*args)  # warm-up (and compilation) outside the timed rounds
    _sync()
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    pixels = info.pop("pixels") if "pixels" in info else out.shape[0] * out.shape[-1] * out.shape[-2]
    benchmark.extra_info.update({"device": DEVICE, "mpix_per_s": pixels / 1e6 / mean, **info})
    if "bytes" in benchmark.extra_info:
        benchmark.extra_info["gb_per_s"] = benchmark.extra_info.pop("bytes") / 1e9 / mean


def _impl(impl, cpp_fn, torch_fn):
    if impl == "cpp":
        return cpp_fn
    if impl == "eager":
        return torch_fn
    torch._dynamo.reset()  # every case compiles afresh (no recompilation limit across cases)
    return torch.compile(torch_fn, dynamic=False)


# ---------------------------------------------------------------------------------------------
# Single ops. (name, C_in, C_out, k, H, W, shuffle, slope, residual): the SRResNet layers at a
# 128x128 input (the tail runs at the x4 output resolution, 512x512).
CONV_CASES = {
    "head_9x9_3to64": (3, 64, 9, 128, 128, 1, True, False),
    "body_3x3_64_prelu": (64, 64, 3, 128, 128, 1, True, False),
    "body_3x3_64_residual": (64, 64, 3, 128, 128, 1, False, True),
    "upsample_3x3_64to256_shuffle2": (64, 256, 3, 128, 128, 2, True, False),
    "tail_9x9_64to3": (64, 3, 9, 512, 512, 1, False, False),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_prelu(benchmark, case, impl):
    c_in, c_out, k, h, w, r, act, res = CONV_CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, c_in, h, w, generator=g).to(DEVICE).contiguous(memory_format=CL)
    weight = (torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5).to(DEVICE)
    weight = weight.contiguous(memory_format=CL)
    bias = torch.randn(c_out, generator=g).to(DEVICE) * 0.1
    slope = torch.full((1,), 0.25, device=DEVICE) if act else None
    oc = c_out // (r * r)
    residual = torch.rand(1, oc, h * r, w * r, generator=g).to(DEVICE).contiguous(memory_format=CL) if res else None
    fn = _impl(impl, lambda *a: ops.conv2d_prelu(*a, shuffle=r, backend="cpp"), lambda *a: ref.conv2d_prelu(*a, r))
    benchmark.group = f"conv2d_prelu-{case}"
    flops = 2 * c_out * c_in * k * k * h * w
    _time(benchmark, fn, (x, weight, bias, slope, residual), rounds=5 if h * w <= 128 * 128 else 3,
          info={"impl": impl, "case": case, "gflop": flops / 1e9})
    benchmark.extra_info["tflop_per_s"] = flops / 1e12 / benchmark.stats.stats.mean


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("attention", [False, True], ids=["silu", "attention"])
def test_conv2d_silu(benchmark, attention, impl):
    """SPAN's block convs: 3x3, 48 -> 48 channels at 128x128, + SiLU or + the parameter-free attention."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 48, 128, 128, generator=g).to(DEVICE).contiguous(memory_format=CL)
    weight = (torch.randn(48, 48, 3, 3, generator=g) / (48 * 9) ** 0.5).to(DEVICE).contiguous(memory_format=CL)
    bias = torch.randn(48, generator=g).to(DEVICE) * 0.1
    skip = x if attention else None
    fn = _impl(impl, lambda *a: ops.conv2d_silu(*a, backend="cpp"), ref.conv2d_silu)
    benchmark.group = f"conv2d_silu-3x3_48-{'attention' if attention else 'silu'}-128x128"
    flops = 2 * 48 * 48 * 9 * 128 * 128
    _time(benchmark, fn, (x, weight, bias, skip), rounds=10, info={"impl": impl, "gflop": flops / 1e9})
    benchmark.extra_info["tflop_per_s"] = flops / 1e12 / benchmark.stats.stats.mean


@pytest.mark.parametrize("impl", IMPLS)
def test_pixel_shuffle_prelu(benchmark, impl):
    x = torch.randn(1, 256, 256, 256, device=DEVICE).contiguous(memory_format=CL)
    slope = torch.full((64,), 0.25, device=DEVICE)
    fn = _impl(impl, lambda a, s: ops.pixel_shuffle_prelu(a, s, 2, backend="cpp"),
               lambda a, s: ref.pixel_shuffle_prelu(a, s, 2))
    benchmark.group = "pixel_shuffle_prelu-256ch-256x256"
    _time(benchmark, fn, (x, slope), rounds=10, info={"impl": impl, "bytes": 2 * x.numel() * 4})


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", ["mse", "psnr_y_crop4"])
def test_metrics_4x2048x2048(benchmark, metric, impl):
    """The issue's target: 4 RGB images of 2048x2048, >= 2x the composed PyTorch expression."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 2048, 2048, generator=g).to(DEVICE)
    b = (a + 0.05 * torch.randn(a.shape, generator=g).to(DEVICE)).clamp(0, 1)
    if metric == "mse":
        cpp_fn, torch_fn = (lambda p, q: ops.mse(p, q, "none", backend="cpp")), (lambda p, q: ref.mse(p, q, "none"))
    else:
        cpp_fn = lambda p, q: ops.psnr(p, q, 1.0, True, 4, "none", backend="cpp")
        torch_fn = lambda p, q: ref.psnr(p, q, 1.0, True, 4, "none")
    benchmark.group = f"{metric}-4x3x2048x2048"
    _time(benchmark, _impl(impl, cpp_fn, torch_fn), (a, b), rounds=5,
          info={"impl": impl, "pixels": 4 * 2048 * 2048, "bytes": 2 * a.numel() * 4})


@pytest.mark.parametrize("impl", IMPLS)
def test_to_uint8(benchmark, impl):
    x = torch.rand(1, 3, 2048, 2048, device=DEVICE)
    torch_fn = lambda t: (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    benchmark.group = "to_uint8-3x2048x2048"
    _time(benchmark, _impl(impl, ext.to_uint8, torch_fn), (x,), rounds=10,
          info={"impl": impl, "pixels": 2048 * 2048, "bytes": x.numel() * 5})


# ---------------------------------------------------------------------------------------------
# The whole model.


@pytest.fixture(scope="module")
def srresnet():
    torch.manual_seed(0)
    return fastsr.SRResNet(scale=4).eval().to(DEVICE).to(memory_format=CL)


@pytest.mark.parametrize("input_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [128, 256])
def test_srresnet_x4_inference(benchmark, srresnet, size, impl, input_format):
    """The model (channels_last weights) fed what users pass (NCHW) and channels_last."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x = x.contiguous(memory_format=CL if input_format == "channels_last" else torch.contiguous_format)
    if impl == "cpp":
        model = fuse_for_inference(copy.deepcopy(srresnet))

        def fn(t):
            with fastsr.use_backend("cpp"):
                return model(t)
    else:
        def eager(t):
            with fastsr.use_backend("torch"):
                return srresnet(t)

        if impl == "compile":
            torch._dynamo.reset()
        fn = eager if impl == "eager" else torch.compile(srresnet)
    benchmark.group = f"srresnet-x4-{size}x{size}-fp32"
    # compile: the default is what the compiled graph traces (use_backend is not traced); restored after the case
    with fastsr.backend.global_backend("torch" if impl == "compile" else None):
        _time(benchmark, fn, (x,), rounds=3,
              info={"impl": impl, "input": f"{size}x{size}", "input_format": input_format})


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_part", ["bn_prelu", "bn_residual"])
def test_batch_norm_prelu_train(benchmark, block_part, impl):
    """Training BatchNorm -> PReLU (a residual block's first half) or -> + residual (its second),
    forward and backward, on the paper's training size: 16 crops of 24x24 LR, 64 channels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, 24, 24, generator=g).to(DEVICE).contiguous(memory_format=CL).requires_grad_()
    weight, bias = (torch.rand(64, generator=g) + 0.5).to(DEVICE), torch.randn(64, generator=g).to(DEVICE)
    slope = torch.full((1,), 0.25, device=DEVICE) if block_part == "bn_prelu" else None
    residual = torch.randn(x.shape, generator=g).to(DEVICE).contiguous(memory_format=CL) if slope is None else None
    grad = torch.randn(x.shape, generator=g).to(DEVICE).contiguous(memory_format=CL)
    fn = _impl(impl, lambda *a: ops.batch_norm_prelu(*a, backend="cpp"),
               lambda *a: ops.batch_norm_prelu(*a, backend="torch"))

    def step():
        fn(x, weight, bias, slope, residual).backward(grad)
        _sync()

    step()  # warm-up (and compilation) outside the timed rounds
    benchmark.group = f"batch_norm_prelu-train-{block_part}-16x64x24x24"
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    benchmark.extra_info.update({"device": DEVICE, "impl": impl,
                                 "gb_per_s": 6 * x.numel() * 4 / 1e9 / benchmark.stats.stats.mean})


@pytest.mark.parametrize("impl", IMPLS)
def test_adam_step_srresnet(benchmark, impl):
    """One Adam update of SRResNet x4's 126 channels_last parameters (1.55 M values), as the trainer
    makes it: ``cpp`` is fastsr.training.optim.Adam on the cpp backend (its one-pass kernel on CPU;
    on CUDA it is PyTorch's fused step), ``eager`` torch.optim.Adam(fused=True), ``compile``
    torch.compile of torch.optim.Adam's step (Inductor fuses the foreach update)."""
    from fastsr.training.optim import Adam

    model = fastsr.SRResNet(4).to(DEVICE).to(memory_format=CL)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))
    kwargs = {"lr": 1e-4, "betas": (0.9, 0.99)}
    if impl == "cpp":
        opt = Adam(model.parameters(), fused=True, **kwargs)
        step = opt.step
    elif impl == "eager":
        step = torch.optim.Adam(model.parameters(), fused=True, **kwargs).step
    else:
        torch._dynamo.reset()
        step = torch.compile(torch.optim.Adam(model.parameters(), **kwargs).step)

    def run():
        with fastsr.use_backend("cpp" if impl == "cpp" else "torch"):
            step()
        _sync()

    run()  # warm-up, state creation and compilation outside the timed rounds
    benchmark.group = "adam-step-srresnet-x4"
    benchmark.pedantic(run, rounds=50, warmup_rounds=3)
    values = sum(p.numel() for p in model.parameters())
    benchmark.extra_info.update({"device": DEVICE, "impl": impl, "values": values,
                                 "gb_per_s": 7 * 4 * values / 1e9 / benchmark.stats.stats.mean})
