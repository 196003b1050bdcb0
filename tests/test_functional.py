"""The public ops on the reference ("torch") backend: semantics, validation, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within_rule

from fastsr.ops import functional as ops

B = "torch"


@pytest.mark.parametrize("k,shuffle,slope_kind,residual", [
    (3, 1, "scalar", False), (3, 1, "channel", True), (9, 1, None, False), (3, 2, "scalar", False),
    (3, 2, "channel", True),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_prelu_is_conv_shuffle_prelu_add(k, shuffle, slope_kind, residual, channels_last):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, 5, k, k), torch.randn(8)
    c_out = 8 // shuffle**2
    slope = {"scalar": torch.tensor([0.2]), "channel": torch.rand(c_out), None: None}[slope_kind]
    res = torch.randn(3, c_out, 7 * shuffle, 13 * shuffle) if residual else None

    def expected(x, w, b, slope, res):
        y = F.pixel_shuffle(F.conv2d(x, w, b, padding=k // 2), shuffle)
        if slope is not None:
            y = torch.where(y >= 0, y, y * slope.view(1, -1, 1, 1))
        return y if res is None else y + res

    ins = (x, w, b, slope, res)
    out = ops.conv2d_prelu(*ins, shuffle=shuffle, backend=B)
    assert_within_rule("conv2d_prelu", out, expected(*(None if t is None else t.double() for t in ins)),
                       expected(*ins), torch.float32)


def test_pixel_shuffle_prelu():
    x = torch.randn(2, 12, 5, 3)
    slope = torch.rand(3)
    y = ops.pixel_shuffle_prelu(x, slope, 2, backend=B)

    def expected(x, slope):
        s = F.pixel_shuffle(x, 2)
        return torch.where(s >= 0, s, s * slope.view(1, -1, 1, 1))

    assert_within_rule("pixel_shuffle_prelu", y, expected(x.double(), slope.double()), expected(x, slope),
                       torch.float32)


def _per_image_mse(a, b):
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


def _psnr(a, b, data_range=1.0):
    return 10 * torch.log10(data_range**2 / _per_image_mse(a, b))


def test_mse_and_psnr_per_image():
    """Each against the plain expression in float64, by the rule (the expression in fp32 as the
    same-dtype baseline)."""
    a, b = torch.rand(3, 3, 17, 9), torch.rand(3, 3, 17, 9)
    a255, b255 = a * 255, b * 255
    for name, ours, expected, inputs in [
        ("mse none", ops.mse(a, b, "none", backend=B), _per_image_mse, (a, b)),
        ("mse mean", ops.mse(a, b, backend=B), lambda p, q: _per_image_mse(p, q).mean(), (a, b)),
        ("psnr", ops.psnr(a, b, backend=B), _psnr, (a, b)),
        ("psnr 255", ops.psnr(a255, b255, data_range=255, backend=B), lambda p, q: _psnr(p, q, 255.0), (a255, b255)),
        ("psnr mean", ops.psnr(a, b, reduction="mean", backend=B), lambda p, q: _psnr(p, q).mean(), (a, b)),
    ]:
        assert_within_rule(name, ours, expected(*(t.double() for t in inputs)), expected(*inputs), torch.float32)


def test_psnr_y_channel_and_crop_border():
    a, b = torch.rand(2, 3, 20, 21), torch.rand(2, 3, 20, 21)

    def y(t):
        return (16 + 65.481 * t[:, 0] + 128.553 * t[:, 1] + 24.966 * t[:, 2]) / 255

    def expected(a, b):
        ya, yb = y(a)[:, 4:-4, 4:-4], y(b)[:, 4:-4, 4:-4]
        return 10 * torch.log10(1 / ((ya - yb) ** 2).mean(dim=(1, 2)))

    assert_within_rule("psnr y_channel crop_border", ops.psnr(a, b, y_channel=True, crop_border=4, backend=B),
                       expected(a.double(), b.double()), expected(a, b), torch.float32)


def test_reductions_accumulate_in_fp32():
    a = torch.rand(1, 3, 64, 64).half()
    b = (a.float() + 1e-3).half()
    out = ops.mse(a, b, backend=B)
    assert out.dtype == torch.float32
    assert math.isclose(float(out), float(((a.float() - b.float()) ** 2).mean()), rel_tol=1e-6)


def test_gradcheck_conv2d_prelu():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    slope = torch.rand(2, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 2, 10, 8, dtype=torch.float64, requires_grad=True)
    fn = lambda *t: ops.conv2d_prelu(*t, shuffle=2, backend=B)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, slope, res))


def test_gradcheck_pixel_shuffle_prelu_and_mse():
    x = torch.randn(1, 8, 3, 2, dtype=torch.float64, requires_grad=True)
    slope = torch.rand(1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, s: ops.pixel_shuffle_prelu(a, s, 2, backend=B), (x, slope))
    a = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ops.mse(a, b, "none", backend=B), (a,))


@pytest.mark.parametrize("call,message", [
    (lambda: ops.conv2d_prelu(torch.rand(3, 5, 5), torch.rand(4, 3, 3, 3)), "4-D"),
    (lambda: ops.conv2d_prelu(torch.rand(1, 3, 5, 5), torch.rand(4, 3, 2, 2)), "odd K"),
    (lambda: ops.conv2d_prelu(torch.rand(1, 2, 5, 5), torch.rand(4, 3, 3, 3)), "input channels"),
    (lambda: ops.conv2d_prelu(torch.rand(1, 3, 5, 5), torch.rand(4, 3, 3, 3).double()), "dtype"),
    (lambda: ops.conv2d_prelu(torch.rand(1, 3, 5, 5), torch.rand(6, 3, 3, 3), shuffle=2), "divisible"),
    (lambda: ops.conv2d_prelu(torch.rand(1, 3, 5, 5), torch.rand(4, 3, 3, 3), slope=torch.rand(3)), "slope"),
    (lambda: ops.conv2d_prelu(torch.rand(1, 3, 5, 5), torch.rand(4, 3, 3, 3), residual=torch.rand(1, 4, 5, 4)),
     "residual"),
    (lambda: ops.conv2d_prelu(torch.randint(0, 9, (1, 3, 5, 5)), torch.rand(4, 3, 3, 3)), "floating"),
    (lambda: ops.mse(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 5)), "differ in shape"),
    (lambda: ops.psnr(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), y_channel=True), "RGB"),
    (lambda: ops.psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), crop_border=4), "crop_border"),
    (lambda: ops.mse(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4), reduction="sum"), "reduction"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("case, error, words", [
    ("zero-height x", ValueError, "empty"),
    ("C_in=0", ValueError, "empty"),
    ("shuffle=-1", ValueError, "shuffle must be a positive integer"),
    ("shuffle=0", ValueError, "shuffle must be a positive integer"),
    ("fp64 bias, fp32 x", TypeError, "bias dtype torch.float64 differs"),
    ("fp64 slope, fp32 x", TypeError, "slope dtype torch.float64 differs"),
    ("fp16 residual, fp32 x", TypeError, "residual dtype torch.float16 differs"),
])
def test_conv2d_prelu_refuses_bad_arguments_in_one_clear_line(case, error, words):
    x, w = torch.rand(1, 4, 5, 5), torch.rand(8, 4, 3, 3)
    b, slope, residual, shuffle = torch.rand(8), torch.rand(1), None, 1
    if case == "zero-height x":
        x = torch.rand(1, 4, 0, 5)
    elif case == "C_in=0":
        x, w = torch.rand(1, 0, 5, 5), torch.rand(8, 0, 3, 3)
    elif case.startswith("shuffle"):
        shuffle = int(case.split("=")[1])
    elif case.startswith("fp64 bias"):
        b = b.double()
    elif case.startswith("fp64 slope"):
        slope = slope.double()
    else:
        residual = torch.rand(1, 8, 5, 5, dtype=torch.float16)
    with pytest.raises(error, match=words):
        ops.conv2d_prelu(x, w, b, slope, residual, shuffle=shuffle, backend="torch")


def test_pixel_shuffle_prelu_refuses_a_bad_factor():
    with pytest.raises(ValueError, match="upscale_factor must be a positive integer"):
        ops.pixel_shuffle_prelu(torch.rand(1, 4, 3, 3), torch.rand(1), -2, backend="torch")
