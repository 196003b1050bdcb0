"""The ``cpp`` backend (the C++/CUDA extension in csrc/) against the ``torch`` reference.

On CPU: fp32 and bf16 forward/backward on odd shapes in both memory formats, gradcheck in fp64,
``torch.library.opcheck`` for every op, a whole SRResNet forward/backward and under
``torch.compile(fullgraph=True)``, BatchNorm folding (fastsr.optimize), ``to_uint8``. Every
``csrc/cuda/*.cu`` is compiled with ``nvcc -c`` for sm_80 and sm_90 where nvcc exists.

Tolerance rule (DESIGN.md): |ours - ref64| <= 2 * |torch_same_dtype - ref64| + atol, elementwise.
The extension builds on first use (about a minute, cached afterwards) for the ISA variant in
effect (``FASTSR_CPU_CAPABILITY``; ``make test`` runs this file once per variant the CPU runs). A
build failure FAILS every test here: the fast path is what this file tests, so it is never a skip.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tolerance import (
    assert_conv_forward_within_rule,
    assert_conv_grads_within_rule,
    assert_within_rule,
    case_id,
    cast,
    fmt,
    grads,
)

import fastsr
from fastsr import ext
from fastsr import functional as ops
from fastsr import reference as ref
from fastsr.fusion import optimize as fuse_for_inference

DTYPES = [torch.float32, torch.bfloat16]
# atol relative to the largest reference magnitude (see DESIGN.md): a margin for reduction-order
# differences in fp32 (K up to 5184 products), about one ulp at that magnitude in bf16.
CSRC = Path(ext.__file__).resolve().parent.parent / "csrc"


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, why = ext.availability("cpu")
    if not ok:
        pytest.fail(f"the C++ extension did not build: {why}")


def _conv_inputs(n, c_in, c_out, h, w, k, shuffle, bias, slope, residual, channels_last, seed=0):
    """Random conv2d_prelu inputs in float64 (cast per test); weights scaled ~1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    oc = c_out // (shuffle * shuffle)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64) / (c_in * k * k) ** 0.5
    b = torch.randn(c_out, generator=g, dtype=torch.float64) * 0.1 if bias else None
    s = {"scalar": torch.tensor([0.2], dtype=torch.float64),
         "channel": torch.rand(oc, generator=g, dtype=torch.float64) - 0.5, None: None}[slope]
    r = torch.randn(n, oc, h * shuffle, w * shuffle, generator=g, dtype=torch.float64) if residual else None
    return [fmt(t, channels_last) if t is not None and t.dim() == 4 else t for t in (x, wt, b, s, r)]


# (n, C_in, C_out, H, W, k, shuffle, bias, slope, residual): every value of each axis of the
# matrix (batch 1/3; C_in 3/5/64; C_out 3/17/64/256; 7x13 and 31x17; k 3/9; bias; slope
# none/scalar/per-channel; residual; shuffle 1/2), covering the SRResNet layers.
CONV_CASES = [
    (1, 3, 64, 7, 13, 9, 1, True, "scalar", False),      # head: 9x9, C_in = 3
    (3, 64, 3, 31, 17, 9, 1, True, None, False),         # tail: 9x9 to 3 channels (own kernel)
    (1, 64, 3, 7, 13, 3, 1, False, "channel", True),     # 3 outputs, 3x3, activation + residual
    (3, 64, 64, 7, 13, 3, 1, False, "channel", True),    # body conv + residual
    (1, 64, 64, 31, 17, 3, 1, True, None, True),         # body tail: no activation, residual
    (1, 64, 256, 7, 13, 3, 2, True, "scalar", False),    # upsample: conv + shuffle 2 + PReLU
    (3, 64, 256, 31, 17, 3, 2, False, "channel", False),  # upsample, per-channel slopes
    (3, 5, 17, 31, 17, 3, 1, True, "channel", True),     # odd channels, prime-ish sizes
    (1, 5, 68, 31, 17, 3, 2, False, "channel", True),    # shuffle 2 into 17 channels + residual
    (3, 3, 17, 7, 13, 9, 1, False, None, False),         # 9x9, odd out channels, nothing fused
    (1, 17, 3, 7, 13, 9, 1, True, "scalar", True),       # few-output kernel with C_in 17 (scalar tail)
    (3, 64, 12, 7, 13, 3, 2, True, "scalar", True),      # shuffle 2 into 3 channels
]


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv2d_prelu_forward(case, channels_last, dtype):
    assert_conv_forward_within_rule("cpp", _conv_inputs(*case, channels_last), case[6], dtype, channels_last)


GRAD_CASES = [
    (3, 5, 17, 7, 13, 3, 1, True, "channel", True),
    (1, 3, 8, 7, 13, 9, 1, True, "scalar", False),
    (1, 6, 16, 7, 13, 3, 2, True, "channel", True),
    (2, 64, 3, 5, 7, 9, 1, False, None, False),
    (1, 64, 256, 7, 13, 3, 2, False, "scalar", False),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv2d_prelu_gradients(case, channels_last, dtype):
    assert_conv_grads_within_rule("cpp", _conv_inputs(*case, channels_last), case[6], dtype, channels_last)


@pytest.mark.parametrize("k,shuffle,slope,residual", [(3, 1, "channel", True), (3, 2, "channel", True),
                                                      (5, 2, "scalar", False), (9, 1, None, False)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv2d_prelu_gradcheck(k, shuffle, slope, residual, channels_last):
    ins = _conv_inputs(2, 3, 4 * shuffle, 4, 5, k, shuffle, True, slope, residual, channels_last)
    leaves = [None if t is None else t.requires_grad_() for t in ins]
    # fast_mode: a random projection of the Jacobian; the full one takes minutes on a busy 2-core box.
    assert torch.autograd.gradcheck(lambda *a: ops.conv2d_prelu(*a, shuffle=shuffle, backend="cpp"), leaves,
                                    fast_mode=True)


@pytest.mark.parametrize("slope_kind", ["scalar", "channel"])
@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pixel_shuffle_prelu_forward_and_gradients(slope_kind, r, channels_last, dtype):
    g = torch.Generator().manual_seed(2)
    c = 5
    x = fmt(torch.randn(3, c * r * r, 7, 13, generator=g, dtype=torch.float64), channels_last)
    slope = torch.tensor([0.2], dtype=torch.float64) if slope_kind == "scalar" else torch.rand(c, generator=g).double()
    grad = fmt(torch.randn(3, c, 7 * r, 13 * r, generator=g, dtype=torch.float64), channels_last)
    ref64 = ref.pixel_shuffle_prelu(x, slope, r)
    same = ref.pixel_shuffle_prelu(x.to(dtype), slope.to(dtype), r)
    ours = ops.pixel_shuffle_prelu(x.to(dtype), slope.to(dtype), r, backend="cpp")
    assert ours.dtype == dtype
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_within_rule("pixel_shuffle_prelu", ours, ref64, same, dtype)
    for name, o, r64, s in zip(
        ("x", "slope"),
        grads(lambda a, b: ops.pixel_shuffle_prelu(a, b, r, backend="cpp"), cast([x, slope], dtype), grad),
        grads(lambda a, b: ref.pixel_shuffle_prelu(a, b, r), [x, slope], grad),
        grads(lambda a, b: ref.pixel_shuffle_prelu(a, b, r), cast([x, slope], dtype), grad),
        strict=True,
    ):
        assert o.dtype == dtype
        assert_within_rule(f"d{name}", o, r64, s, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_pixel_shuffle_prelu_gradcheck(channels_last):
    x = fmt(torch.randn(2, 12, 3, 5, dtype=torch.float64), channels_last).requires_grad_()
    slope = torch.tensor([0.1, -0.3, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.pixel_shuffle_prelu(a, b, 2, backend="cpp"), (x, slope))


def _image_pair(shape, channels_last, seed=3):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(*shape, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return fmt(a, channels_last), fmt(b, channels_last)


@pytest.mark.parametrize("shape", [(3, 3, 31, 17), (1, 5, 7, 13), (2, 3, 64, 300)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mse_forward_and_gradients(shape, reduction, channels_last, dtype):
    a, b = _image_pair(shape, channels_last)
    ours = ops.mse(a.to(dtype), b.to(dtype), reduction, backend="cpp")
    assert ours.dtype == torch.float32
    assert_within_rule("mse", ours, ref.mse(a, b, reduction), ref.mse(a.to(dtype), b.to(dtype), reduction),
                       torch.float32)
    g = torch.rand(shape[0] if reduction == "none" else (), dtype=torch.float64)
    grads64 = grads(lambda p, q: ref.mse(p, q, reduction), [a, b], g)
    grads_same = grads(lambda p, q: ref.mse(p, q, reduction), cast([a, b], dtype), g)
    grads_ours = grads(lambda p, q: ops.mse(p, q, reduction, backend="cpp"), cast([a, b], dtype), g)
    for name, o, r64, s in zip("ab", grads_ours, grads64, grads_same, strict=True):
        assert o.dtype == dtype
        assert_within_rule(f"dmse/d{name}", o, r64, s, dtype)


@pytest.mark.parametrize("y_channel", [False, True])
@pytest.mark.parametrize("crop_border", [0, 4])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_psnr(y_channel, crop_border, channels_last, dtype):
    a, b = _image_pair((3, 3, 31, 37), channels_last)
    for data_range, reduction in ((1.0, "none"), (255.0, "mean")):
        args = (data_range, y_channel, crop_border, reduction)
        a2, b2 = a * data_range, b * data_range
        ours = ops.psnr(a2.to(dtype), b2.to(dtype), *args, backend="cpp")
        assert ours.dtype == torch.float32
        assert_within_rule("psnr", ours, ref.psnr(a2, b2, *args), ref.psnr(a2.to(dtype), b2.to(dtype), *args),
                           torch.float32)


@pytest.mark.parametrize("y_channel,crop_border", [(False, 0), (True, 2)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_psnr_mse_gradcheck(y_channel, crop_border, channels_last):
    a, b = _image_pair((2, 3, 7, 9), channels_last)
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q: ops.mse(p, q, "none", backend="cpp"), (a, b))
    assert torch.autograd.gradcheck(
        lambda p, q: ops.psnr(p, q, 2.0, y_channel, crop_border, "mean", backend="cpp"), (a, b))


def _uint8_reference(x):
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_to_uint8(channels_last, dtype):
    g = torch.Generator().manual_seed(4)
    x = fmt(torch.rand(3, 3, 31, 17, generator=g) * 1.4 - 0.2, channels_last).to(dtype)
    ours = ext.to_uint8(x)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 31, 17, 3) and ours.is_contiguous()
    assert torch.equal(ours, _uint8_reference(x))


def test_to_uint8_rounds_half_to_even_and_clamps():
    # k + 0.5 over 255 is exact in fp32 only approximately; build the ties in the scaled domain.
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, 126.5, 127.5, 253.5, 254.5]) / 255.0
    assert torch.equal((ties * 255.0), torch.tensor([0.5, 1.5, 2.5, 3.5, 126.5, 127.5, 253.5, 254.5])), \
        "test setup: these ties must survive the fp32 round trip"
    extremes = torch.tensor([-1.0, -0.0, 0.0, 1.0, 2.0, float("inf"), float("-inf"), float("nan")])
    x = torch.cat([ties, extremes]).view(1, 1, 1, -1).expand(1, 3, 1, 16).contiguous()
    got = ext.to_uint8(x)[0, 0, :, 0].tolist()
    assert got == [0, 2, 2, 4, 126, 128, 254, 254] + [0, 0, 0, 255, 255, 255, 0, 0]


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck for every op (schema, fake kernels, autograd registration, AOT dispatch).


def _opcheck(op, args):
    torch.library.opcheck(op, args)


def test_opcheck_conv2d_prelu():
    for channels_last in (False, True):
        for case in [(2, 5, 12, 5, 7, 3, 2, True, "channel", True), (1, 16, 3, 6, 5, 9, 1, False, None, False)]:
            x, w, b, s, r = _conv_inputs(*case, channels_last)
            args = [t if t is None else t.float().requires_grad_() for t in (x, w, b, s, r)]
            _opcheck(torch.ops.fastsr.conv2d_prelu.default, (*args, case[6]))


def test_opcheck_shuffle_prelu_and_backward():
    for channels_last in (False, True):
        x = fmt(torch.randn(2, 12, 5, 7), channels_last)
        slope = torch.rand(3)
        res = fmt(torch.randn(2, 3, 10, 14), channels_last)
        _opcheck(torch.ops.fastsr.shuffle_prelu.default, (x.requires_grad_(), slope.requires_grad_(), None, 2))
        _opcheck(torch.ops.fastsr.shuffle_prelu.default, (x.detach(), None, res, 2))
        _opcheck(torch.ops.fastsr.shuffle_prelu_backward.default, (torch.randn(2, 3, 10, 14), x.detach(),
                                                                    slope.detach(), 2))
        _opcheck(torch.ops.fastsr.shuffle_prelu_backward.default, (torch.randn(2, 3, 10, 14), x.detach(), None, 2))


def test_opcheck_mse_and_to_uint8():
    for channels_last in (False, True):
        a, b = (t.float() for t in _image_pair((2, 3, 9, 11), channels_last))
        _opcheck(torch.ops.fastsr.mse_per_image.default, (a.requires_grad_(), b.requires_grad_(), 0.5, True, 1))
        _opcheck(torch.ops.fastsr.mse_per_image.default, (a.detach(), b.detach(), 1.0, False, 0))
        _opcheck(torch.ops.fastsr.mse_per_image_backward.default, (torch.rand(2), a.detach(), b.detach(), 1.0, True, 2))
        _opcheck(torch.ops.fastsr.to_uint8.default, (a.detach(),))


# ---------------------------------------------------------------------------------------------
# Whole models.


def _small_srresnet(seed=0):
    torch.manual_seed(seed)
    model = fastsr.SRResNet(scale=4, num_blocks=2, channels=16)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is really exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, fastsr.nn.ConvPReLU) and isinstance(m.slope, torch.nn.Parameter):
                m.slope.uniform_(0.0, 0.5)
    return model


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_srresnet_forward_backward_matches_torch_backend(train):
    model = _small_srresnet().train(train)
    x = fmt(torch.rand(2, 3, 11, 13, generator=torch.Generator().manual_seed(5)), True)
    grad = torch.randn(2, 3, 44, 52, generator=torch.Generator().manual_seed(6))

    def run(m, dtype, backend):
        m = copy.deepcopy(m).to(dtype)
        xi = x.to(dtype).requires_grad_()
        with fastsr.use_backend(backend):
            out = m(xi)
            out.backward(grad.to(dtype))
        return [out, xi.grad] + [p.grad for p in m.parameters()]

    ref64, same, ours = run(model, torch.float64, "torch"), run(model, torch.float32, "torch"), run(
        model, torch.float32, "cpp")
    names = ["out", "dx"] + [f"d{n}" for n, _ in model.named_parameters()]
    for name, o, r64, s in zip(names, ours, ref64, same, strict=True):
        assert_within_rule(name, o, r64, s, torch.float32)


def test_torch_compile_fullgraph_srresnet_on_cpp(monkeypatch):
    model = _small_srresnet().eval()
    x = fmt(torch.rand(1, 3, 9, 10, generator=torch.Generator().manual_seed(7)), True)
    monkeypatch.setattr(fastsr.backend, "_global_choice", None)  # restored after the test
    fastsr.set_backend("cpp")
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            eager = model(x)
            out = compiled(x)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        # Training graph: forward + backward through the registered autograd formulas.
        model.train()
        xg = x.clone().requires_grad_()
        compiled(xg).square().mean().backward()
        xe = x.clone().requires_grad_()
        model(xe).square().mean().backward()
        torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-4, atol=1e-6)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("channels_last_input", [False, True])
def test_fuse_for_inference_matches_unfused(channels_last_input):
    model = _small_srresnet().eval()
    x = fmt(torch.rand(2, 3, 12, 9, generator=torch.Generator().manual_seed(8)), channels_last_input)
    with torch.no_grad(), fastsr.use_backend("torch"):
        expected64 = copy.deepcopy(model).double()(x.double())
        expected = model(x)
    fused = fastsr.optimize(copy.deepcopy(model))  # fastsr.optimize is fuse_for_inference
    assert fastsr.optimize is fuse_for_inference and not fused.training
    convs = [m for m in fused.modules() if isinstance(m, fastsr.nn.ConvPReLU)]
    assert all(m.bn is None for m in convs) and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert all(m.conv.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    for backend in ("torch", "cpp"):
        with torch.no_grad(), fastsr.use_backend(backend):
            got = fused(x)
        assert_within_rule(f"fused model ({backend})", got, expected64, expected, torch.float32)


# ---------------------------------------------------------------------------------------------
# Build plumbing and CUDA sources.


def test_build_info_and_availability():
    info = ext.build_info()
    assert info["built"] is True and Path(info["build_dir"]).is_dir()
    assert ext.availability("cpu")[0]
    ok, why = ext.availability("cuda")
    if not torch.cuda.is_available():
        assert not ok and why


def test_failed_build_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(ext, "_state", {"attempted": False, "ok": False, "reason": "", "with_cuda": False})
    monkeypatch.setenv("CXX", "no-such-compiler-fastsr")
    ok, why = ext.availability("cpu")
    assert not ok and "no C++ compiler" in why and "no-such-compiler-fastsr" in why


def test_the_built_isa_is_the_one_asked_for():
    """What this run tests is the variant it claims (the ISA matrix relies on it)."""
    from fastsr.csrc import build

    info = ext.build_info()
    assert info["isa"] == build.cpu_isa()
    forced = os.environ.get("FASTSR_CPU_CAPABILITY")
    if forced:
        assert info["isa"] == forced.upper()
    assert f"_{info['isa'].lower()}_" in Path(info["build_dir"]).name


CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cuda_sources_compile_with_nvcc(cu, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compiled here")
    cmd = [nvcc, "-c", str(cu), "-o", str(tmp_path / "k.o"), f"-arch={arch}", "-O2", "-std=c++17",
           "--expt-relaxed-constexpr"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed for {cu.name} ({arch}):\n{proc.stderr[-3000:]}"


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/cuda/*.cu is missing"
