"""One conformance suite for every fast backend: each op against the ``torch`` reference.

Parametrised over the backends this machine must serve (``Target``): without CUDA the ``cpp``
extension and ``triton`` through its interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
with CUDA also the extension's CUDA kernels and compiled Triton. A backend that cannot serve its
target FAILS here (it is never a skip). Odd shapes, each target's dtypes, both memory formats,
gradients, ``gradcheck`` in float64.

Tolerance rule (docs/architecture.md): |ours - ref64| <= 2 * |torch_same_dtype - ref64| + atol, elementwise
(tests/tolerance.py). Build, opcheck, ISA and nvcc tests stay in test_cpp.py; the interpreter,
torch.compile and GPU-only tests stay in test_triton.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from backends import require_backend
from cases import conv_inputs, image_pair, small_srresnet
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
from fastsr.ops import contract
from fastsr.ops import functional as ops
from fastsr.ops import reference as ref


@dataclass(frozen=True)
class Target:
    backend: str
    device: str
    dtypes: tuple[torch.dtype, ...]
    light: bool = False  # the Triton interpreter: smaller cases (it runs kernels in numpy)
    psnr_grad: bool = True  # Triton's psnr is a metric without a backward (its mse has one)

    def __str__(self) -> str:
        return f"{self.backend}-{self.device}"


def _targets() -> list[Target]:
    if not torch.cuda.is_available():
        return [Target("cpp", "cpu", (torch.float32, torch.bfloat16)),
                Target("triton", "cpu", (torch.float32, torch.float16), light=True, psnr_grad=False)]  # no bf16 tl.dot
    return [Target("cpp", "cpu", (torch.float32, torch.bfloat16)),
            Target("cpp", "cuda", (torch.float32, torch.bfloat16)),
            Target("triton", "cuda", (torch.float32, torch.float16), psnr_grad=False)]  # bf16: test_triton.py


TARGETS = _targets()
WITH_DTYPE = [pytest.param(t, d, id=f"{t}-{str(d).removeprefix('torch.')}") for t in TARGETS for d in t.dtypes]
FORMATS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])


@pytest.fixture(autouse=True)
def _served(request):
    target = request.node.callspec.params.get("target")
    if target is not None:
        require_backend(target.backend, target.device)


# (n, C_in, C_out, H, W, k, shuffle, bias, slope, residual): every value of each axis of the
# matrix (batch 1/3; C_in 3/5/17/64; C_out 3/12/17/64/68/256; 7x13 and 31x17; k 3/5/9; bias; slope
# none/scalar/per-channel; residual; shuffle 1/2), covering the SRResNet layers. Cases marked
# heavy are too slow for the interpreter.
CONV_CASES = [
    ((1, 3, 64, 7, 13, 9, 1, True, "scalar", False), False),      # head: 9x9, C_in = 3
    ((3, 64, 3, 31, 17, 9, 1, True, None, False), True),          # tail: 9x9 to 3 channels (cpp's own kernel)
    ((3, 64, 3, 7, 13, 9, 1, True, None, False), False),          # the same, small
    ((1, 64, 3, 7, 13, 3, 1, False, "channel", True), True),      # 3 outputs, 3x3, activation + residual
    ((3, 64, 64, 7, 13, 3, 1, False, "channel", True), False),    # body conv + residual
    ((1, 64, 64, 31, 17, 3, 1, True, None, True), True),          # body tail: no activation, residual
    ((1, 64, 256, 7, 13, 3, 2, True, "scalar", False), False),    # upsample: conv + shuffle 2 + PReLU
    ((3, 64, 256, 31, 17, 3, 2, False, "channel", False), True),  # upsample, per-channel slopes
    ((3, 5, 17, 31, 17, 3, 1, True, "channel", True), False),     # odd channels, prime-ish sizes
    ((1, 5, 68, 31, 17, 3, 2, False, "channel", True), False),    # shuffle 2 into 17 channels + residual
    ((3, 3, 17, 7, 13, 9, 1, False, None, False), True),          # 9x9, odd out channels, nothing fused
    ((1, 17, 3, 7, 13, 9, 1, True, "scalar", True), True),        # few-output kernel with C_in 17
    ((3, 64, 12, 7, 13, 3, 2, True, "scalar", True), True),       # shuffle 2 into 3 channels
    ((2, 3, 64, 31, 17, 5, 1, False, "channel", True), True),     # few-input kernel, 5x5, last blocks of 2 / 5
]
GRAD_CASES = [
    ((3, 5, 17, 7, 13, 3, 1, True, "channel", True), False),
    ((1, 3, 8, 7, 13, 9, 1, True, "scalar", False), False),
    ((1, 6, 16, 7, 13, 3, 2, True, "channel", True), False),
    ((2, 64, 3, 5, 7, 9, 1, False, None, False), False),
    ((1, 64, 256, 7, 13, 3, 2, False, "scalar", False), True),
    ((1, 64, 3, 9, 17, 9, 1, True, None, False), True),            # the tail's input gradient (few-input kernel)
]


def _with_cases(cases):
    """(target, dtype, case) parameters; the interpreter gets the cases not marked heavy."""
    return [pytest.param(t, d, c, id=f"{t}-{str(d).removeprefix('torch.')}-{case_id(c)}")
            for t in TARGETS for d in t.dtypes for c, heavy in cases if not (heavy and t.light)]


# ---------------------------------------------------------------------------------------------
# The contract itself


@pytest.mark.parametrize("module", ["fastsr.ops.reference", "fastsr.kernels", "fastsr.csrc.backend"])
def test_every_backend_implements_the_whole_contract(module):
    """Every op of contract.Backend, with the contract's positional parameters (names and order)."""
    import importlib
    import inspect

    backend = importlib.import_module(module)
    assert isinstance(backend, contract.Backend)
    for name in ("availability", *contract.OPS):
        want = list(inspect.signature(getattr(contract.Backend, name)).parameters)[1:]  # without self
        assert list(inspect.signature(getattr(backend, name)).parameters) == want, f"{module}.{name}"


# ---------------------------------------------------------------------------------------------
# conv2d_prelu


@FORMATS
@pytest.mark.parametrize("target,dtype,case", _with_cases(CONV_CASES))
def test_conv2d_prelu_forward(target, dtype, case, channels_last):
    ins = conv_inputs(target.device, *case, channels_last)
    assert_conv_forward_within_rule(target.backend, ins, case[6], dtype, channels_last)


@FORMATS
@pytest.mark.parametrize("target,dtype,case", _with_cases(GRAD_CASES))
def test_conv2d_prelu_gradients(target, dtype, case, channels_last):
    ins = conv_inputs(target.device, *case, channels_last)
    assert_conv_grads_within_rule(target.backend, ins, case[6], dtype, channels_last)


@pytest.mark.parametrize("k,shuffle,slope,residual", [(3, 1, "channel", True), (3, 2, "channel", True),
                                                      (5, 2, "scalar", False), (9, 1, None, False)])
@FORMATS
@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_conv2d_prelu_gradcheck(target, k, shuffle, slope, residual, channels_last):
    ins = conv_inputs(target.device, 2, 3, 4 * shuffle, 4, 5, k, shuffle, True, slope, residual, channels_last)
    leaves = [None if t is None else t.requires_grad_() for t in ins]

    def fn(*a):
        return ops.conv2d_prelu(*a, shuffle=shuffle, backend=target.backend)

    # fast_mode: a random projection of the Jacobian; the full one takes minutes on a busy 2-core box.
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# conv2d_silu (SPAN's SiLU convs and its parameter-free attention)

# (n, C_in, C_out, H, W, k, bias, skip). 48 channels are SPAN's (the CPU Winograd path at 31x17).
SILU_CASES = [
    ((1, 48, 48, 31, 17, 3, True, False), True),   # SPAN's SiLU conv (Winograd on CPU)
    ((1, 48, 48, 31, 17, 3, True, True), True),    # SPAN's attention conv (Winograd on CPU)
    ((3, 48, 48, 7, 13, 3, True, True), False),    # the same, too small for Winograd
    ((3, 5, 17, 7, 13, 3, False, True), False),    # odd channels, no bias
    ((1, 3, 16, 31, 17, 3, True, False), False),   # C_in = 3
    ((2, 17, 3, 7, 13, 9, True, True), False),     # 9x9 to 3 channels (cpp's few-output kernel)
]
SILU_GRAD_CASES = [
    ((3, 5, 17, 7, 13, 3, True, True), False),
    ((1, 16, 16, 17, 16, 3, True, False), False),
    ((1, 48, 48, 17, 16, 3, False, True), True),
]


def _silu_inputs(device, case, channels_last):
    """(x, weight, bias, skip) in float64: conv_inputs without a slope, its residual as the skip."""
    n, c_in, c_out, h, w, k, bias, skip = case
    x, wt, b, _, s = conv_inputs(device, n, c_in, c_out, h, w, k, 1, bias, None, skip, channels_last)
    return [x, wt, b, s]


def _silu_cases(cases):
    return [pytest.param(t, d, c, id=f"{t}-{str(d).removeprefix('torch.')}-" + "n{}_ci{}_co{}_{}x{}_k{}_b{}_skip{}"
                         .format(*c)) for t in TARGETS for d in t.dtypes for c, heavy in cases
            if not (heavy and t.light)]


@FORMATS
@pytest.mark.parametrize("target,dtype,case", _silu_cases(SILU_CASES))
def test_conv2d_silu_forward(target, dtype, case, channels_last):
    ins = _silu_inputs(target.device, case, channels_last)
    ours = ops.conv2d_silu(*cast(ins, dtype), backend=target.backend)
    assert ours.dtype == dtype
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_within_rule("conv2d_silu", ours, ref.conv2d_silu(*ins), ref.conv2d_silu(*cast(ins, dtype)), dtype)


@FORMATS
@pytest.mark.parametrize("target,dtype,case", _silu_cases(SILU_GRAD_CASES))
def test_conv2d_silu_gradients(target, dtype, case, channels_last):
    ins = _silu_inputs(target.device, case, channels_last)
    x, weight = ins[0], ins[1]
    g = torch.randn(x.shape[0], weight.shape[0], *x.shape[2:], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    g = fmt(g.to(x.device), channels_last)
    ref64 = grads(ref.conv2d_silu, ins, g)
    same = grads(ref.conv2d_silu, cast(ins, dtype), g)
    ours = grads(lambda *a: ops.conv2d_silu(*a, backend=target.backend), cast(ins, dtype), g)
    for name, o, r64, s in zip(("x", "weight", "bias", "skip"), ours, ref64, same, strict=True):
        if r64 is None:
            assert o is None
            continue
        assert o.dtype == dtype, f"grad of {name} has dtype {o.dtype}"
        assert_within_rule(f"d{name}", o, r64, s, dtype)


@pytest.mark.parametrize("k,skip", [(3, False), (3, True), (5, True)])
@FORMATS
@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_conv2d_silu_gradcheck(target, k, skip, channels_last):
    ins = _silu_inputs(target.device, (2, 3, 4, 4, 5, k, True, skip), channels_last)
    leaves = [None if t is None else t.requires_grad_() for t in ins]
    assert torch.autograd.gradcheck(lambda *a: ops.conv2d_silu(*a, backend=target.backend), leaves,
                                    eps=1e-6, atol=1e-7, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# pixel_shuffle_prelu


@pytest.mark.parametrize("slope_kind", ["scalar", "channel"])
@pytest.mark.parametrize("r", [1, 2, 3])
@FORMATS
@pytest.mark.parametrize("target,dtype", WITH_DTYPE)
def test_pixel_shuffle_prelu_forward_and_gradients(target, dtype, slope_kind, r, channels_last):
    g = torch.Generator().manual_seed(2)
    c, dev = 5, target.device
    x = fmt(torch.randn(3, c * r * r, 7, 13, generator=g, dtype=torch.float64).to(dev), channels_last)
    slope = (torch.tensor([0.2], dtype=torch.float64) if slope_kind == "scalar"
             else torch.rand(c, generator=g, dtype=torch.float64) - 0.5).to(dev)
    grad = fmt(torch.randn(3, c, 7 * r, 13 * r, generator=g, dtype=torch.float64).to(dev), channels_last)
    ours = ops.pixel_shuffle_prelu(x.to(dtype), slope.to(dtype), r, backend=target.backend)
    assert ours.dtype == dtype
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_within_rule("pixel_shuffle_prelu", ours, ref.pixel_shuffle_prelu(x, slope, r),
                       ref.pixel_shuffle_prelu(x.to(dtype), slope.to(dtype), r), dtype)
    for name, o, r64, s in zip(
        ("x", "slope"),
        grads(lambda a, b: ops.pixel_shuffle_prelu(a, b, r, backend=target.backend), cast([x, slope], dtype), grad),
        grads(lambda a, b: ref.pixel_shuffle_prelu(a, b, r), [x, slope], grad),
        grads(lambda a, b: ref.pixel_shuffle_prelu(a, b, r), cast([x, slope], dtype), grad),
        strict=True,
    ):
        assert o.dtype == dtype
        assert_within_rule(f"d{name}", o, r64, s, dtype)


@FORMATS
@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_pixel_shuffle_prelu_gradcheck(target, channels_last):
    x = fmt(torch.randn(2, 12, 3, 5, dtype=torch.float64).to(target.device), channels_last).requires_grad_()
    slope = torch.tensor([0.1, -0.3, 0.7], dtype=torch.float64, device=target.device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.pixel_shuffle_prelu(a, b, 2, backend=target.backend),
                                    (x, slope), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# mse / psnr (fp32 results, fp64 for fp64 inputs)


def _metric_dtypes():
    return [pytest.param(t, d, id=f"{t}-{str(d).removeprefix('torch.')}")
            for t in TARGETS for d in (*t.dtypes, torch.float64)]


@pytest.mark.parametrize("shape", [(3, 3, 31, 17), (1, 5, 7, 13), (2, 3, 64, 300)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@FORMATS
@pytest.mark.parametrize("target,dtype", _metric_dtypes())
def test_mse_forward_and_gradients(target, dtype, shape, reduction, channels_last):
    a, b = image_pair(target.device, shape, channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ours = ops.mse(a.to(dtype), b.to(dtype), reduction, backend=target.backend)
    same = ref.mse(a.to(dtype), b.to(dtype), reduction)
    assert ours.dtype == acc and ours.shape == same.shape
    assert_within_rule("mse", ours, ref.mse(a, b, reduction), same, acc)
    g = torch.rand(shape[0] if reduction == "none" else (), dtype=torch.float64).to(target.device) + 0.5
    grads64 = grads(lambda p, q: ref.mse(p, q, reduction), [a, b], g)
    grads_same = grads(lambda p, q: ref.mse(p, q, reduction), cast([a, b], dtype), g)
    grads_ours = grads(lambda p, q: ops.mse(p, q, reduction, backend=target.backend), cast([a, b], dtype), g)
    for name, o, r64, s in zip("ab", grads_ours, grads64, grads_same, strict=True):
        assert o.dtype == dtype
        assert_within_rule(f"dmse/d{name}", o, r64, s, dtype)


@pytest.mark.parametrize("y_channel,crop_border,data_range", [(False, 0, 1.0), (True, 0, 1.0), (True, 4, 255.0),
                                                              (False, 3, 255.0)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@FORMATS
@pytest.mark.parametrize("target,dtype", _metric_dtypes())
def test_psnr(target, dtype, y_channel, crop_border, data_range, reduction, channels_last):
    a, b = image_pair(target.device, (3, 3, 31, 37), channels_last)
    a, b = a * data_range, b * data_range
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    args = (data_range, y_channel, crop_border, reduction)
    ours = ops.psnr(a.to(dtype), b.to(dtype), *args, backend=target.backend)
    same = ref.psnr(a.to(dtype), b.to(dtype), *args)
    assert ours.dtype == acc and ours.shape == same.shape
    assert_within_rule("psnr", ours, ref.psnr(a, b, *args), same, acc)


# Under the Triton interpreter each call costs milliseconds and the full numerical Jacobian takes
# ~750 of them per input (a minute a case): there gradcheck's fast mode checks the Jacobian along
# random directions instead, which any wrong element still fails.


@FORMATS
@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_mse_gradcheck(target, channels_last):
    a, b = image_pair(target.device, (2, 3, 7, 9), channels_last)
    assert torch.autograd.gradcheck(lambda p, q: ops.mse(p, q, "none", backend=target.backend),
                                    (a.requires_grad_(), b.requires_grad_()), fast_mode=target.light)


@pytest.mark.parametrize("y_channel,crop_border", [(False, 0), (True, 2)])
@FORMATS
@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_psnr_gradcheck(target, y_channel, crop_border, channels_last):
    if not target.psnr_grad:
        pytest.skip(f"{target.backend}'s psnr is a metric without a backward (docs/architecture.md); "
                    "test_psnr_without_a_backward_builds_no_graph checks it refuses one")
    a, b = image_pair(target.device, (2, 3, 7, 9), channels_last)
    assert torch.autograd.gradcheck(
        lambda p, q: ops.psnr(p, q, 2.0, y_channel, crop_border, "mean", backend=target.backend),
        (a.requires_grad_(), b.requires_grad_()), fast_mode=target.light)


@pytest.mark.parametrize("target", [t for t in TARGETS if not t.psnr_grad], ids=str)
def test_psnr_without_a_backward_builds_no_graph(target):
    """A psnr without a backward must not hand out wrong (zero) gradients: its result carries no
    graph, so a backward through it raises instead of passing silently."""
    a, b = image_pair(target.device, (2, 3, 7, 9), False)
    out = ops.psnr(a.float().requires_grad_(), b.float(), reduction="mean", backend=target.backend)
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.backward()


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_mse_psnr_are_deterministic(target):
    a, b = (t.float() for t in image_pair(target.device, (2, 3, 127, 131), True))
    first = (ops.mse(a, b, "none", backend=target.backend), ops.psnr(a, b, y_channel=True, backend=target.backend))
    second = (ops.mse(a, b, "none", backend=target.backend), ops.psnr(a, b, y_channel=True, backend=target.backend))
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# to_uint8 (equal to the reference, bit for bit)


@FORMATS
@pytest.mark.parametrize("target,dtype", [pytest.param(t, d, id=f"{t}-{str(d).removeprefix('torch.')}")
                                          for t in TARGETS for d in (torch.float32, torch.float16, torch.bfloat16)
                                          if not (t.light and d == torch.bfloat16)])
def test_to_uint8(target, dtype, channels_last):
    g = torch.Generator().manual_seed(4)
    x = fmt((torch.rand(3, 3, 31, 17, generator=g) * 1.4 - 0.2).to(target.device), channels_last).to(dtype)
    ours = ops.to_uint8(x, backend=target.backend)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 31, 17, 3) and ours.is_contiguous()
    assert torch.equal(ours, ref.to_uint8(x))


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_to_uint8_rounds_half_to_even_and_clamps(target):
    # k + 0.5 over 255 is exact in fp32 only approximately; build the ties in the scaled domain.
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, 126.5, 127.5, 253.5, 254.5]) / 255.0
    assert torch.equal((ties * 255.0), torch.tensor([0.5, 1.5, 2.5, 3.5, 126.5, 127.5, 253.5, 254.5])), \
        "test setup: these ties must survive the fp32 round trip"
    extremes = torch.tensor([-1.0, -0.0, 0.0, 1.0, 2.0, float("inf"), float("-inf"), float("nan"), 0.49999997 / 255])
    x = torch.cat([ties, extremes]).view(1, 1, 1, -1).expand(1, 3, 1, 17).contiguous().to(target.device)
    got = ops.to_uint8(x, backend=target.backend)[0, 0, :, 0].tolist()
    assert got == [0, 2, 2, 4, 126, 128, 254, 254] + [0, 0, 0, 255, 255, 255, 0, 0, 0]


# ---------------------------------------------------------------------------------------------
# A whole model


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_srresnet_forward_backward_matches_torch_backend(target, train):
    """Train mode: BN batch statistics (the unfused-BN path); eval: BN folded, every layer one op.
    Output and every parameter gradient within the rule."""
    h, w = (5, 4) if target.light else (11, 13)  # the interpreter spends most of it in the 9x9 tail
    model = small_srresnet().train(train).to(target.device)
    x = fmt(torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(5)), True).to(target.device)
    grad = torch.randn(2, 3, 4 * h, 4 * w, generator=torch.Generator().manual_seed(6)).to(target.device)

    def run(dtype, backend):
        m = copy.deepcopy(model).to(dtype)
        xi = x.to(dtype, copy=True).requires_grad_()  # a leaf of its own per run
        with fastsr.use_backend(backend):
            out = m(xi)
            out.backward(grad.to(dtype))
        return [out, xi.grad] + [p.grad for p in m.parameters()]

    ref64, same, ours = run(torch.float64, "torch"), run(torch.float32, "torch"), run(torch.float32, target.backend)
    names = ["out", "dx"] + [f"d{n}" for n, _ in model.named_parameters()]
    for name, o, r64, s in zip(names, ours, ref64, same, strict=True):
        assert_within_rule(name, o, r64, s, torch.float32)


# ---------------------------------------------------------------------------------------------
# batch_norm_prelu (training-mode BatchNorm -> PReLU -> + residual)

# (n, C, H, W, slope, residual): the SRResNet block's two BatchNorms (64 channels at 12x12, per-channel
# or shared slope; no activation + residual), odd channel counts and sizes, batch 1.
BN_CASES = [(3, 17, 7, 13, "channel", True), (2, 64, 12, 12, "scalar", False), (1, 5, 31, 17, None, True),
            (4, 3, 5, 5, "channel", False)]


def _bn_inputs(case, device, channels_last: bool, kink_free: bool = False):
    """fp64 (x, weight, bias, slope, residual). x has a mean far from zero (the statistics'
    cancellation). ``kink_free``: x centred per channel with no value within 0.5 of its mean and
    bias 0, so no normalised value lies near the PReLU's kink, where rounding decides which side
    a value falls and the gradient jumps (gradients are compared there)."""
    n, c, h, w, slope, residual = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) * 2 + 3
    bias = torch.randn(c, generator=gen, dtype=torch.float64) * 0.3
    if kink_free:
        x = x - 3
        x = torch.where(x < 0, x - 0.5, x + 0.5)
        x = x - x.mean(dim=(0, 2, 3), keepdim=True) + 3
        x = torch.where((x - 3).abs() < 0.5, x + 1.0, x)  # re-centring moved a few values into the gap
        bias = torch.zeros_like(bias)
    weight = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    s = {"scalar": torch.tensor([0.2], dtype=torch.float64), None: None,
         "channel": torch.rand(c, generator=gen, dtype=torch.float64) - 0.5}[slope]
    res = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) if residual else None
    place = lambda t: None if t is None else (fmt(t, channels_last) if t.dim() == 4 else t).to(device)  # noqa: E731
    return [place(t) for t in (x, weight, bias, s, res)]


def _bn_case_params():
    return [pytest.param(t, d, c, id=f"{t}-{str(d).removeprefix('torch.')}-" + "_".join(map(str, c)))
            for t in TARGETS for d in t.dtypes for c in BN_CASES]


@FORMATS
@pytest.mark.parametrize("target,dtype,case", _bn_case_params())
def test_batch_norm_prelu_forward(target, dtype, case, channels_last):
    """y, mean and var within the rule; y keeps x's dtype and memory format."""
    ins = _bn_inputs(case, target.device, channels_last)
    x, weight, bias, slope, residual = ins
    low = [x.to(dtype), weight.float(), bias.float(), None if slope is None else slope.to(dtype),
           None if residual is None else residual.to(dtype)]
    ref64 = ref.batch_norm_prelu(*ins, 1e-5)
    same = ref.batch_norm_prelu(*low, 1e-5)
    ours = fastsr.ops.dispatch.backend_module(target.backend).batch_norm_prelu(*low, 1e-5)
    assert ours[0].dtype == dtype and ours[1].dtype == ours[2].dtype == torch.float32
    assert ours[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for name, o, r64, s in zip(("y", "mean", "var"), ours, ref64, same, strict=True):
        assert_within_rule(f"batch_norm_prelu {name}", o, r64, s, dtype)


@FORMATS
@pytest.mark.parametrize("target,dtype,case", _bn_case_params())
def test_batch_norm_prelu_gradients(target, dtype, case, channels_last):
    """Every gradient (x, weight, bias, slope, residual) within the rule, in the input's dtype."""
    ins = _bn_inputs(case, target.device, channels_last, kink_free=True)
    gen = torch.Generator().manual_seed(1)
    g = fmt(torch.randn(ins[0].shape, generator=gen, dtype=torch.float64), channels_last).to(target.device)
    low = [None if t is None else t.to(dtype) if t.dim() == 4 or t is ins[3] else t.float() for t in ins]
    ref64 = grads(lambda *a: ops.batch_norm_prelu(*a, backend="torch"), ins, g)
    same = grads(lambda *a: ops.batch_norm_prelu(*a, backend="torch"), low, g)
    ours = grads(lambda *a: ops.batch_norm_prelu(*a, backend=target.backend), low, g)
    for name, o, r64, s in zip(("x", "weight", "bias", "slope", "residual"), ours, ref64, same, strict=True):
        if r64 is None:
            assert o is None
            continue
        assert o.dtype == s.dtype, f"grad of {name} has dtype {o.dtype}"
        assert_within_rule(f"d{name}", o, r64, s, dtype)


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("slope,residual", [(None, True), ("scalar", False), ("channel", True)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_batch_norm_prelu_gradcheck(target, slope, residual, channels_last):
    if target.light and slope != "channel":
        pytest.skip("the interpreter takes 15-50 s per gradcheck: it checks the case with every input")
    ins = _bn_inputs((2, 5, 4, 3, slope, residual), target.device, channels_last)
    ins = [None if t is None else t.detach().requires_grad_() for t in ins]
    assert torch.autograd.gradcheck(lambda *a: ops.batch_norm_prelu(*a, backend=target.backend), ins)


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_residual_block_matches_batchnorm2d(target, momentum):
    """An SRResNet block in training mode on the fused path (conv, then batch_norm_prelu) against the
    same block written with nn.BatchNorm2d and F.prelu, two steps in float64: outputs, every
    parameter's gradient, running statistics and the step count (momentum None: cumulative average)."""
    torch.manual_seed(0)
    block = fastsr.nn.ResidualBlock(16).double().train().to(target.device)
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    plain = copy.deepcopy(block)

    def plain_forward(x):
        c1, c2 = plain.conv1, plain.conv2
        h = torch.nn.functional.prelu(c1.bn(torch.nn.functional.conv2d(x, c1.conv.weight, padding=1)), c1.slope)
        return c2.bn(torch.nn.functional.conv2d(h, c2.conv.weight, padding=1)) + x

    for step in range(2):
        x = torch.randn(3, 16, 7, 9, dtype=torch.float64, device=target.device) + step
        with fastsr.use_backend(target.backend):
            y = block(x)
        want = plain_forward(x)
        g = torch.randn_like(want)
        y.backward(g)
        want.backward(g)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    for (name, ours), (_, theirs) in zip(block.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-11, msg=name)
    for (name, ours), (_, theirs) in zip(block.named_buffers(), plain.named_buffers(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12, msg=name)
