"""Whole-model forward throughput: SRResNet x4 on each available backend vs torch.compile.

Sized for a 2-core CPU (a 64x64 input -> 256x256 output); on a GPU the input is 512x512.
Output Mpixel/s is in extra_info. Compare timings only within one run.
"""

import pytest
import torch

import fastsr

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZE = 512 if DEVICE == "cuda" else 64
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    model = fastsr.SRResNet(scale=4).eval().to(DEVICE, DTYPE).to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, SIZE, SIZE, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    return model, x


def _run(benchmark, fn, x, label):
    def step():
        with torch.inference_mode():
            out = fn(x)
        _sync()
        return out

    out = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({
        "what": label, "device": DEVICE, "dtype": str(DTYPE), "input": f"{SIZE}x{SIZE}",
        "output_mpix_per_s": out.shape[-1] * out.shape[-2] / 1e6 / benchmark.stats.stats.mean,
    })


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
def test_srresnet_forward_backend(benchmark, model_and_input, backend):
    model, x = model_and_input
    ok, why = fastsr.ops.dispatch.availability(backend, DEVICE)
    if not ok:
        pytest.skip(f"backend {backend} unavailable on {DEVICE}: {why}")
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("the Triton interpreter is a correctness tool, far too slow to benchmark")
    benchmark.group = "srresnet-x4-forward"

    def fn(t):
        with fastsr.use_backend(backend):
            return model(t)

    _run(benchmark, fn, x, f"fastsr[{backend}]")


def test_srresnet_forward_torch_compile(benchmark, model_and_input):
    model, x = model_and_input
    benchmark.group = "srresnet-x4-forward"
    with fastsr.use_backend("torch"):
        compiled = torch.compile(model)
        with torch.inference_mode():
            compiled(x)  # compile outside the timed region
        _run(benchmark, compiled, x, "torch.compile(fastsr[torch])")
