"""What is specific to the ``cpp`` backend (the C++/CUDA extension in csrc/); the op-by-op matrix
against the reference is tests/test_conformance.py, shared by every backend.

``torch.library.opcheck`` for every op, SRResNet under ``torch.compile(fullgraph=True)``,
BatchNorm folding (fastsr.optimize), the build state and ISA, and every ``csrc/cuda/*.cu`` compiled
with ``nvcc -c`` for sm_80 and sm_90 where nvcc exists.

The extension builds on first use (about a minute, cached afterwards) for the ISA variant in
effect (``FASTSR_CPU_CAPABILITY``; ``make test`` runs the cpp tests once per variant the CPU runs).
A build failure FAILS every test here: the fast path is what this file tests, so it is never a skip.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cases import conv_inputs, image_pair, small_srresnet
from fastsr.csrc import backend as ext
from tolerance import (
    assert_weight_grad_within_rule,
    assert_within_rule,
    fmt,
    grads,
)

import fastsr
from fastsr.fusion import optimize as fuse_for_inference

CSRC = Path(ext.__file__).resolve().parent.parent / "csrc"


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, why = ext.availability("cpu")
    if not ok:
        pytest.fail(f"the C++ extension did not build: {why}")


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck for every op (schema, fake kernels, autograd registration, AOT dispatch).


def _opcheck(op, args):
    torch.library.opcheck(op, args)


def test_opcheck_conv2d_prelu():
    for channels_last in (False, True):
        for case in [(2, 5, 12, 5, 7, 3, 2, True, "channel", True), (1, 16, 3, 6, 5, 9, 1, False, None, False)]:
            x, w, b, s, r = conv_inputs("cpu", *case, channels_last)
            args = [t if t is None else t.float().requires_grad_() for t in (x, w, b, s, r)]
            _opcheck(torch.ops.fastsr.conv2d_prelu.default, (*args, case[6]))


def test_opcheck_conv2d_silu():
    for channels_last in (False, True):
        for case in [(2, 5, 12, 5, 7, 3, 1, True, None, True), (1, 16, 16, 17, 16, 3, 1, False, None, False)]:
            x, w, b, _, s = conv_inputs("cpu", *case, channels_last)
            _opcheck(torch.ops.fastsr.conv2d_silu.default,
                     [t if t is None else t.float().requires_grad_() for t in (x, w, b, s)])
            _opcheck(torch.ops.fastsr.sigmoid_gate_backward.default,
                     (fmt(torch.randn(case[0], case[2], case[3], case[4]), channels_last),
                      fmt(torch.randn(case[0], case[2], case[3], case[4]), channels_last),
                      None if s is None else s.float()))


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


def test_opcheck_batch_norm_prelu_and_backward():
    for channels_last in (False, True):
        x, res, grad = (fmt(torch.randn(2, 5, 4, 7) + 1, channels_last) for _ in range(3))
        weight, bias, slope = torch.rand(5) + 0.5, torch.randn(5), torch.rand(5) - 0.5
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, slope, res)]
        _opcheck(torch.ops.fastsr.batch_norm_prelu.default, (*leaves, 1e-5))
        _opcheck(torch.ops.fastsr.batch_norm_prelu.default, (x, weight, bias, slope[:1], None, 1e-3))
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), correction=0)
        _opcheck(torch.ops.fastsr.batch_norm_prelu_backward.default, (grad, x, mean, var, weight, bias, slope, 1e-5))
        _opcheck(torch.ops.fastsr.batch_norm_prelu_backward.default, (grad, x, mean, var, weight, bias, None, 1e-5))



def test_opcheck_adam_step():
    for channels_last in (False, True):
        params = [fmt(torch.randn(8, 5, 3, 3), channels_last), torch.randn(19)]
        state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        _opcheck(torch.ops.fastsr.adam_step_.default,
                 (params, [torch.randn_like(p) for p in params], *state, [torch.tensor(0.0), torch.tensor(2.0)],
                  1e-3, 0.9, 0.99, 1e-8, 0.01))


def test_adam_step_bumps_the_versions_of_what_it_changes():
    """Like an ATen in-place op: the parameters, moments and step counts, not the gradients."""
    params = [torch.randn(8, 5, 3, 3), torch.randn(19)]
    grads = [torch.randn_like(p) for p in params]
    moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.tensor(0.0), torch.tensor(2.0)]
    changed, kept = params + moments[0] + moments[1] + steps, grads
    before = [t._version for t in changed + kept]
    with torch.no_grad():
        torch.ops.fastsr.adam_step_(params, grads, *moments, steps, 1e-3, 0.9, 0.99, 1e-8, 0.01)
    assert [t._version for t in changed + kept] == [v + 1 for v in before[:len(changed)]] + before[len(changed):]


# The autograd formulas are C++ (csrc/autograd.cpp). Their context numbers only the tensor inputs
# that were given, so each case leaves an optional tensor out and differentiates a subset of the
# inputs: a gradient that landed on the wrong input fails gradcheck (float64, the direct ops).
def _double(*shape, channels_last=False, offset=0.0):
    gen = torch.Generator().manual_seed(sum(shape))
    t = torch.randn(*shape, generator=gen, dtype=torch.float64) + offset
    return fmt(t, channels_last) if t.dim() == 4 else t


# ---------------------------------------------------------------------------------------------
# Bitwise reproducibility: exact resume needs a kernel's result to depend on its inputs only.


def _bn_prelu_both_ways(x, res, grad, weight, bias, slope):
    y, mean, var = torch.ops.fastsr.batch_norm_prelu(x, weight, bias, slope, res, 1e-5)
    back = torch.ops.fastsr.batch_norm_prelu_backward(grad, x, mean, var, weight, bias, slope, 1e-5)
    return (y, mean, var, *back)


@pytest.mark.parametrize("channels", [5, 8, 21])
def test_batch_norm_prelu_channels_come_out_the_same_beside_others(channels):
    """Each channel of an fp32 channels_last batch_norm_prelu, forward and backward, is bit for bit
    the same alone as in front of 32 more: every channel runs through the same vector arithmetic,
    the last partial vector masked. A scalar loop served the channels past the last full vector; GCC
    vectorised it behind a run-time alias check, so which of two roundings a channel got depended on
    heap addresses, and an 8-channel model did not resume training bit-identically on AVX-512."""
    gen = torch.Generator().manual_seed(channels)
    # 512 pixels: below every channel count's parallel grain, so both runs sum in one thread.
    wide = [torch.randn(2, channels + 32, 16, 16, generator=gen).contiguous(memory_format=torch.channels_last)
            for _ in range(3)]
    per_channel = [torch.rand(channels + 32, generator=gen) + 0.5, torch.randn(channels + 32, generator=gen),
                   torch.rand(channels + 32, generator=gen) - 0.5]
    both = _bn_prelu_both_ways(*wide, *per_channel)
    alone = _bn_prelu_both_ways(*(t[:, :channels].contiguous(memory_format=torch.channels_last) for t in wide),
                                *(t[:channels] for t in per_channel))
    for name, a, b in zip(("y", "mean", "var", "grad_x", "grad_weight", "grad_bias", "grad_slope"), alone, both,
                          strict=True):
        assert torch.equal(a, b[:, :channels] if a.dim() == 4 else b[:channels]), name


def test_adam_step_updates_a_value_the_same_wherever_it_sits():
    """adam_step_ is elementwise: each value's update is bit for bit the same in a short tensor (its
    last, masked vector) as inside a long one. A scalar loop served the values past the last full
    vector and rounded them differently (FMA contraction)."""
    gen = torch.Generator().manual_seed(0)
    n = 100
    state = [torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.randn(n, generator=gen) / 10,
             torch.rand(n, generator=gen) / 100]  # param, grad, exp_avg, exp_avg_sq

    def step(part: slice) -> list[torch.Tensor]:
        p, g, m, v = (t[part].clone() for t in state)
        torch.ops.fastsr.adam_step_([p], [g], [m], [v], [torch.tensor(3.0)], 1e-3, 0.9, 0.99, 1e-8, 0.01)
        return [p, m, v]

    whole = step(slice(0, n))
    for start, length in [(0, 1), (3, 7), (5, 9), (16, 17), (40, 23)]:
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), step(slice(start, start + length)), whole,
                              strict=True):
            assert torch.equal(a, b[start:start + length]), (name, start, length)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("op,inputs,differentiate", [
    ("conv2d_prelu", lambda cl: (_double(2, 3, 5, 6, channels_last=cl), _double(4, 3, 3, 3), None,
                                 _double(4).abs() * 0.3, _double(2, 4, 5, 6, channels_last=cl), 1), (0, 1, 3, 4)),
    ("conv2d_prelu", lambda cl: (_double(2, 3, 5, 6, channels_last=cl), _double(8, 3, 3, 3), None, None,
                                 _double(2, 2, 10, 12, channels_last=cl), 2), (1, 4)),
    ("conv2d_silu", lambda cl: (_double(2, 3, 5, 6, channels_last=cl), _double(4, 3, 3, 3), None,
                                _double(2, 4, 5, 6, channels_last=cl)), (1, 3)),
    ("shuffle_prelu", lambda cl: (_double(2, 8, 3, 4, channels_last=cl), None,
                                  _double(2, 2, 6, 8, channels_last=cl), 2), (0, 2)),
    ("batch_norm_prelu", lambda cl: (_double(2, 5, 4, 7, channels_last=cl, offset=1.0), _double(5).abs() + 0.5,
                                     _double(5), None, _double(2, 5, 4, 7, channels_last=cl), 1e-5), (1, 4)),
    ("mse_per_image", lambda cl: (_double(2, 3, 9, 11, channels_last=cl), _double(2, 3, 9, 11, channels_last=cl),
                                  0.5, True, 1), (1,)),
], ids=["conv-no-bias", "conv-shuffle-no-slope", "silu-no-bias", "shuffle-no-slope", "bn-no-slope", "mse-b-only"])
def test_autograd_with_absent_inputs_and_partial_gradients(op, inputs, differentiate, channels_last):
    args = list(inputs(channels_last))
    for i in differentiate:
        args[i].requires_grad_()

    def fn(*a):
        out = getattr(torch.ops.fastsr, op)(*a)
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("shape",
                         [(4, 64, 31, 17, 3, 9), (3, 32, 7, 13, 1, 3), (1, 16, 5, 6, 4, 5), (2, 48, 9, 8, 2, 9),
                          (3, 16, 7, 13, 32, 3), (1, 16, 5, 6, 16, 3)],
                         ids=lambda s: "n{}_ci{}_{}x{}_co{}_k{}".format(*s))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("weight_channels_last", [False, True], ids=["w_oihw", "w_ohwi"])
def test_conv2d_weight_grad_within_rule(shape, channels_last, weight_channels_last):
    """The weight gradients training computes with this op instead of oneDNN's: few outputs (the tail
    conv's) and 3x3 with channels in multiples of 16 (Winograd; the last case, 30 pixels, is below
    its size threshold and goes to oneDNN), against the float64 convolution_backward, by the rule,
    in the layout asked for (the weight's), whatever the input's."""
    n, c_in, h, w, c_out, k = shape
    gen = torch.Generator().manual_seed(0)
    x = fmt(torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64), channels_last)
    g = fmt(torch.randn(n, c_out, h, w, generator=gen, dtype=torch.float64), channels_last)
    ours = assert_weight_grad_within_rule(g, x, k, weight_channels_last)
    assert ours.shape == (c_out, c_in, k, k)
    _opcheck(torch.ops.fastsr.conv2d_weight_grad.default, (g.float(), x.float(), k, weight_channels_last))


def test_conv2d_weight_grad_refuses_what_it_does_not_serve():
    x, g = torch.randn(1, 16, 5, 5), torch.randn(1, 8, 5, 5)
    with pytest.raises(RuntimeError, match="1 to 4 output channels"):
        torch.ops.fastsr.conv2d_weight_grad(g, x, 3, True)  # 8 outputs: neither few nor a multiple of 16
    with pytest.raises(RuntimeError, match="1 to 4 output channels"):
        torch.ops.fastsr.conv2d_weight_grad(torch.randn(1, 16, 5, 5), x, 5, True)  # many outputs, 5x5
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.fastsr.conv2d_weight_grad(g[:, :3].double(), x.double(), 3, True)


@pytest.mark.parametrize("shape", [(64, 64, 3), (3, 64, 9)], ids=["3x3_winograd", "9x9_few_outputs"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("weight_channels_last", [False, True], ids=["w_oihw", "w_ohwi"])
def test_weight_gradient_comes_in_the_weights_layout(shape, channels_last, weight_channels_last):
    """Under autograd the weight gradient is computed in the weight's own layout, whatever the
    input's, so gradient accumulation stores it as it is: no copy of a weight-shaped tensor in the
    backward (a 64x64x3x3 copy cost ~20 us per conv and step)."""
    c_out, c_in, k = shape
    gen = torch.Generator().manual_seed(3)
    x = fmt(torch.randn(2, c_in, 12, 12, generator=gen), channels_last)
    weight = fmt(torch.randn(c_out, c_in, k, k, generator=gen), weight_channels_last).requires_grad_()
    out = fastsr.functional.conv2d_prelu(x, weight, backend="cpp")
    with torch.profiler.profile(record_shapes=True) as prof:
        out.backward(torch.ones_like(out))
    copies = [e for e in prof.events() if e.name == "aten::copy_" and list(weight.shape) in e.input_shapes]
    assert not copies, f"the weight gradient was copied: {[e.input_shapes for e in copies]}"
    layout = torch.channels_last if weight_channels_last else torch.contiguous_format
    assert weight.grad.is_contiguous(memory_format=layout)


def test_opcheck_mse_and_to_uint8():
    for channels_last in (False, True):
        a, b = (t.float() for t in image_pair("cpu", (2, 3, 9, 11), channels_last))
        _opcheck(torch.ops.fastsr.mse_per_image.default, (a.requires_grad_(), b.requires_grad_(), 0.5, True, 1))
        _opcheck(torch.ops.fastsr.mse_per_image.default, (a.detach(), b.detach(), 1.0, False, 0))
        _opcheck(torch.ops.fastsr.mse_per_image_backward.default, (torch.rand(2), a.detach(), b.detach(), 1.0, True, 2))
        _opcheck(torch.ops.fastsr.to_uint8.default, (a.detach(),))


# ---------------------------------------------------------------------------------------------
# Whole models.


def _small_span():
    from fastsr.models.span import SPAN

    torch.manual_seed(0)
    return SPAN(scale=2, channels=16)


@pytest.mark.parametrize("make", [small_srresnet, _small_span], ids=["srresnet", "span"])
def test_torch_compile_fullgraph_on_cpp(make):
    """conv2d_prelu (SRResNet) and conv2d_silu (SPAN) trace as single ops, forward and backward.
    Compiled and eager outputs and input gradients by the rule: the model in float64 on the torch
    backend the reference, in fp32 there the same-dtype baseline."""
    model = make().eval()
    model64 = copy.deepcopy(model).double()
    x = fmt(torch.rand(1, 3, 9, 10, generator=torch.Generator().manual_seed(7)), True)
    try:
        with fastsr.backend.global_backend("cpp"):  # the default before the test is back after it
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True)
            with torch.no_grad():
                eager = model(x)
                out = compiled(x)
                with fastsr.use_backend("torch"):
                    ref64, same = model64(x.double()), model(x)
            assert_within_rule("compiled", out, ref64, same, torch.float32)
            assert_within_rule("eager", eager, ref64, same, torch.float32)
            # Training graph: forward + backward through the registered autograd formulas.
            model.train()
            model64.train()
            g = torch.randn(ref64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
            with fastsr.use_backend("torch"):
                (dx64,), (dx_same,) = grads(model64, [x.double()], g), grads(model, [x], g)
            for name, fn in (("compiled", compiled), ("eager", model)):
                (dx,) = grads(fn, [x], g)
                assert_within_rule(f"{name} dx", dx, dx64, dx_same, torch.float32)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("channels_last_input", [False, True])
def test_fuse_for_inference_matches_unfused(channels_last_input):
    model = small_srresnet().eval()
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
    monkeypatch.setenv("CXX", "no-such-compiler-fastsr")
    with ext.unbuilt():
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


def _cuda_include_dirs(nvcc: str) -> list[str]:
    """The toolkit's include folders, as nvcc itself reports them (``--dryrun``)."""
    probe = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null"], capture_output=True, text=True,
                           timeout=60)
    return re.findall(r'-I"?([^"\s]+)', "".join(line for line in probe.stderr.splitlines()
                                                  if "INCLUDES=" in line))


def test_cuda_glue_compiles_against_the_torch_headers(tmp_path):
    """csrc/cuda/ops_cuda.cpp (the torch side of the CUDA ops) cannot be built without a CUDA build
    of torch, but its code can be checked: a syntax-only compile against this torch's headers and
    the CUDA toolkit's, with the one header a CPU wheel lacks (c10's generated CUDA macros) empty."""
    from torch.utils.cpp_extension import include_paths

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: no CUDA toolkit headers to check the CUDA glue against")
    cuda = _cuda_include_dirs(nvcc)
    assert cuda, "nvcc --dryrun named no include folder"
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    flags = [f"-I{p}" for p in (str(tmp_path), *include_paths(), *cuda, str(CSRC))]
    proc = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", *flags, str(CSRC / "cuda" / "ops_cuda.cpp")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/cuda/*.cu is missing"
