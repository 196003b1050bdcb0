"""The key GPU benchmarks, the ones `make gpu-check` (benchmarks/gpu_check.py) has time for.

* conv2d_prelu 64->64 3x3 + PReLU, bf16, batch 16 x 96x96: triton and cpp vs eager and torch.compile;
* SRResNet x4 on 512x512, bf16: triton vs eager and torch.compile(mode="max-autotune");
* mse and psnr (Y, crop 4) on 16 x 3 x 2048x2048 against the device's copy bandwidth;
* the tiled file pipeline (2048x2048 .npy -> .zarr, the default model) vs the model alone on its tiles.

With FASTSR_GPU_CHECK_DRY=1 (the CI dry run on a CPU) the same cases run at toy sizes, one round,
without the torch.compile variants. Extra info: TFLOP/s, GB/s, output Mpixel/s.
"""

from __future__ import annotations

import copy
import os
import time

import numpy as np
import pytest
import torch
from timing import mean_seconds

import fastsr
from fastsr.ops import functional as ops
from fastsr.ops import reference as ref

DRY = os.environ.get("FASTSR_GPU_CHECK_DRY") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not DRY else "cpu"
DTYPE = torch.float32 if DRY else torch.bfloat16
ROUNDS = 1 if DRY else 10
CL = torch.channels_last
SIZES = {"conv": (2, 24) if DRY else (16, 96), "model": 32 if DRY else 512, "metric": (2, 256) if DRY else (16, 2048),
         "pipeline": (96, 48) if DRY else (2048, 512)}

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not DRY, reason="GPU benchmarks: no CUDA GPU here "
                                "(FASTSR_GPU_CHECK_DRY=1 runs them on the CPU at toy sizes)")


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time(benchmark, fn, *args, **info):
    def step():
        with torch.inference_mode():
            out = fn(*args)
        _sync()
        return out

    step()  # warm-up and compilation outside the timed rounds
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=0 if DRY or ROUNDS == 1 else 2)
    benchmark.extra_info.update({"device": DEVICE, "dtype": str(DTYPE), **info})
    return mean_seconds(benchmark)


def _impl(impl: str, fast, eager):
    if impl == "triton" and DRY:
        pytest.skip("dry run on a CPU: the Triton interpreter is a correctness tool (fastsr selftest runs it)")
    if impl in ("triton", "cpp"):
        ok, why = fastsr.backend.availability(impl, DEVICE)
        if not ok:
            pytest.skip(f"{impl} unavailable on {DEVICE}: {why}")
        return fast(impl)
    if impl.startswith("compile"):
        if DRY:
            pytest.skip("dry run: torch.compile is exercised by benchmarks/test_cpp_ops.py")
        torch._dynamo.reset()
        return torch.compile(eager, mode="max-autotune" if impl == "compile-max-autotune" else None)
    return eager


@pytest.mark.parametrize("impl", ["triton", "cpp", "eager", "compile"])
def test_conv_64_3x3_bf16(benchmark, impl):
    n, hw = SIZES["conv"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, hw, hw, generator=g).to(DEVICE, DTYPE).contiguous(memory_format=CL)
    w = (torch.randn(64, 64, 3, 3, generator=g) / 24).to(DEVICE, DTYPE)
    b, s = torch.zeros(64, device=DEVICE, dtype=DTYPE), torch.full((1,), 0.25, device=DEVICE, dtype=DTYPE)
    fn = _impl(impl, lambda name: lambda *a: ops.conv2d_prelu(*a, backend=name),
               lambda *a: ref.conv2d_prelu(*a, None, 1))
    benchmark.group = "conv64-3x3"
    mean = _time(benchmark, fn, x, w, b, s, impl=impl)
    benchmark.extra_info["tflop_per_s"] = 2 * 64 * 64 * 9 * n * hw * hw / mean / 1e12


@pytest.fixture(scope="module")
def srresnet():
    torch.manual_seed(0)
    return fastsr.SRResNet(scale=4).eval().to(DEVICE, DTYPE).to(memory_format=CL)


@pytest.mark.parametrize("impl", ["triton", "cpp", "eager", "compile-max-autotune"])
def test_srresnet_x4(benchmark, srresnet, impl):
    size = SIZES["model"]
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    fast = fastsr.optimize(copy.deepcopy(srresnet))

    def on(name):
        def run(t):
            with fastsr.use_backend(name):
                return fast(t)
        return run

    with fastsr.backend.global_backend("torch"):  # what eager and the compiled graph run; restored after the case
        fn = _impl(impl, on, srresnet)
        benchmark.group = f"srresnet-x4-{size}"
        mean = _time(benchmark, fn, x.contiguous(memory_format=CL), impl=impl)
    benchmark.extra_info["output_mpix_per_s"] = (4 * size) ** 2 / mean / 1e6


@pytest.mark.parametrize("impl", ["triton", "cpp", "eager"])
@pytest.mark.parametrize("metric", ["mse", "psnr_y_crop4", "copy"])
def test_metrics_vs_bandwidth(benchmark, metric, impl):
    n, hw = SIZES["metric"]
    if metric == "copy" and impl != "eager":
        pytest.skip("the copy is the bandwidth reference")
    a = torch.rand(n, 3, hw, hw, device=DEVICE, dtype=DTYPE)
    b = torch.rand(n, 3, hw, hw, device=DEVICE, dtype=DTYPE)
    if metric == "copy":
        out = torch.empty_like(a)
        fn = lambda p, q: out.copy_(p)  # reads one tensor, writes one: the same bytes as a metric
    else:
        kw = {"y_channel": True, "crop_border": 4} if metric == "psnr_y_crop4" else {}
        call = ops.psnr if metric.startswith("psnr") else ops.mse
        fn = _impl(impl, lambda name: lambda p, q: call(p, q, **kw, reduction="none", backend=name),
                   lambda p, q: call(p, q, **kw, reduction="none", backend="torch"))
    benchmark.group = f"metrics-{n}x3x{hw}x{hw}"
    mean = _time(benchmark, fn, a, b, impl=impl, metric=metric)
    benchmark.extra_info["gb_per_s"] = 2 * a.numel() * a.element_size() / mean / 1e9


@pytest.mark.parametrize("what", ["pipeline", "model-only"])
def test_tiled_pipeline_vs_model(benchmark, tmp_path_factory, what):
    size, tile = SIZES["pipeline"]
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    src = tmp_path_factory.mktemp("pipe") / "in.npy"
    np.save(src, image)
    model = fastsr.SRResNet(scale=4, num_blocks=2 if DRY else 16).eval()
    dtype = "fp32" if DRY else "bf16"
    if what == "pipeline":
        def fn():
            dst = src.with_name(f"out-{time.perf_counter_ns()}.zarr")
            fastsr.upscale_file(src, dst, model, tile=tile, device=DEVICE, dtype=dtype, progress=False)
    else:
        from fastsr.pipeline import Upscaler
        from fastsr.tiling import plan_tiles

        up = Upscaler(model, device=DEVICE, dtype=dtype)
        plan = plan_tiles(size, size, tile=tile, halo=up.radius, scale=up.scale)
        batch = 4 if DEVICE == "cuda" else 1
        groups = [np.stack([image[slice(*plan.tile_at(i).window[:2]), slice(*plan.tile_at(i).window[2:])]
                            for i in g]) for g in plan.batches(batch)]

        def fn():
            for windows in groups:
                up.run_uint(windows)
    benchmark.group = f"pipeline-{size}"
    benchmark.pedantic(fn, rounds=min(ROUNDS, 3), warmup_rounds=0 if DRY or ROUNDS == 1 else 1)
    benchmark.extra_info.update({"device": DEVICE, "what": what,
                                 "output_mpix_per_s": (4 * size) ** 2 / mean_seconds(benchmark) / 1e6})
