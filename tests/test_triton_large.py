"""The Triton kernels at sizes only a GPU holds: launch grids within CUDA's limits and int64
offsets wherever a product can pass 2**31 (docs/gpu-check.md has the audit of every launch).

On the CPU, without launching: every host grid function, with the GPU's block sizes, keeps each
axis within CUDA's limits (2**31 - 1, 65535, 65535) for huge shapes. Through the interpreter: the
kernels on views whose channels lie 2**30 elements apart in a sparse file mapping, so channel
offsets pass 2**31 (int32 arithmetic wraps there, as on a GPU) while only a few pages are touched.
On a GPU (``gpu`` marker): the sizes that failed before, with the farthest offsets checked against
the reference.

Tolerance rule (docs/architecture.md): |ours - ref64| <= 2 * |torch_same_dtype - ref64| + atol.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from cases import GPU_MEMORY_HEAVY
from fastsr.kernels import common
from tolerance import assert_within_rule

from fastsr.constants import Y_WEIGHTS
from fastsr.ops import functional as ops
from fastsr.ops import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# ---------------------------------------------------------------- grids, no launch


def test_checked_grid_refuses_axes_past_cuda_limits():
    assert common.checked_grid(2**31 - 1, 65535, 65535) == (2**31 - 1, 65535, 65535)
    for grid in [(2**31,), (1, 65536), (1, 1, 65536)]:
        with pytest.raises(ValueError, match="CUDA's limit"):
            common.checked_grid(*grid)


# Run without the interpreter (its block sizes differ): the grids a GPU would be given.
_GRIDS = """
import json, sys
from fastsr.kernels import conv as cv, mse_psnr as mp, shuffle_prelu as sp, uint8 as u8
n, c, h, w = map(int, sys.argv[1:])
px = n * h * w
meta = [{"BLOCK_M": bm, "BLOCK_N": bn} for bm, bn, *_ in cv._FWD_SHAPES]
print(json.dumps({
    "mse_forward": [[mp.partial_grid(n, h * w), n * h * w, mp._BLOCK]],
    "mse_backward": [[mp.partial_grid(n, c * h * w), n * c * h * w, mp._BLOCK]],
    "conv": [[cv.pixel_grid(px, 256)(m), px, m["BLOCK_M"], 256, m["BLOCK_N"]] for m in meta],
    "shuffle": [[sp.grid(px, 4 * c), px, sp._BLOCK_P, 4 * c, sp._BLOCK_C]],
    "to_uint8": [[u8.grid(px), px, u8._BLOCK_P]],
}))
"""


@pytest.mark.parametrize("shape", [
    (1, 8, 16400, 16400),   # mse's old grid had 131329 blocks on axis 1 (limit 65535)
    (1, 3, 46341, 46341),   # one image of more than 2**31 pixels
    (100000, 3, 8, 8),      # more images than axis 1 or 2 could hold
])
def test_gpu_grids_stay_within_cuda_limits(shape):
    """Each axis within CUDA's limit, and the grid still covers every pixel or element (a grid
    clamped to the limit would pass the first check and skip work)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _GRIDS, *map(str, shape)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, rows in json.loads(proc.stdout).items():
        for grid, *work in rows:
            assert all(size <= limit for size, limit in zip(grid, common.MAX_GRID, strict=False)), (name, grid)
            # work = (count, block) per axis, flattened; each axis covers its count
            for axis, (count, block) in enumerate(zip(work[::2], work[1::2], strict=True)):
                assert grid[axis] * block >= count, (name, grid, work)


# ---------------------------------------------------------------- offsets past 2**31, interpreter

SPREAD = 2**30  # elements between two channels of a far view: channel 2 starts 2**31 in


@pytest.fixture
def far(tmp_path):
    """far(shape, seed) -> a float32 (N, C, H, W) view with channel stride SPREAD (batch stride
    C * SPREAD), random values, in a sparse file mapping. The view starts 2**31 elements into the
    mapping, so an offset wrapped to a negative int32 still reads mapped (zero) memory: a bug
    shows as a wrong value, not a crash."""
    counter = iter(range(100))

    def make(shape, seed):
        n, c, h, w = shape
        base = 2**31
        numel = base + n * c * SPREAD + 64
        path = tmp_path / f"far{next(counter)}.bin"
        with open(path, "wb") as f:
            f.truncate(numel * 4)  # sparse: no blocks are written
        storage = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=numel * 4)
        path.unlink()  # the mapping stays valid; nothing is left on disk
        view = torch.empty(0, dtype=torch.float32).set_(storage).as_strided(shape, (c * SPREAD, SPREAD, w, 1), base)
        gen = torch.Generator().manual_seed(seed)
        view.copy_(torch.rand(shape, generator=gen, dtype=torch.float64) * 1.2 - 0.1)
        return view

    return make


def _dense64(t):
    return t.contiguous().double()


pytestmark_interp = pytest.mark.skipif(DEVICE == "cuda", reason="interpreter cases; on a GPU the cases below run")


@pytestmark_interp
def test_to_uint8_with_channel_offsets_past_2_31(far):
    from fastsr.kernels.uint8 import to_uint8_forward

    x = far((1, 3, 5, 7), 0)
    assert torch.equal(to_uint8_forward(x), ref.to_uint8(x.contiguous()))


@pytestmark_interp
@pytest.mark.parametrize("y_channel,crop", [(False, 0), (True, 0), (True, 1)])
def test_mse_psnr_with_channel_offsets_past_2_31(far, y_channel, crop):
    from fastsr.kernels import mse_psnr as mp

    a, b = far((2, 3, 6, 5), 1), far((2, 3, 6, 5), 2)
    a64, b64 = _dense64(a), _dense64(b)
    a32, b32 = a.contiguous(), b.contiguous()
    ours = mp.reduce_squared_error(a, b, y_channel=y_channel, crop_border=crop, psnr=True)
    assert_within_rule("psnr", ours, ref.psnr(a64, b64, 1.0, y_channel, crop, "none"),
                       ref.psnr(a32, b32, 1.0, y_channel, crop, "none"), torch.float32)
    if not y_channel and crop == 0:
        assert_within_rule("mse", mp.reduce_squared_error(a, b), ref.mse(a64, b64, "none"), ref.mse(a32, b32, "none"),
                           torch.float32)


@pytestmark_interp
def test_mse_backward_with_channel_offsets_past_2_31(far):
    from fastsr.kernels import mse_psnr as mp

    a, b = far((2, 3, 6, 5), 3), far((2, 3, 6, 5), 4)
    grad = torch.tensor([0.7, -1.3], dtype=torch.float32)
    da, db = mp.mse_backward(grad, a, b, (True, True))

    def ref_grads(dtype):
        leaves = [_dense64(t).to(dtype).requires_grad_() for t in (a, b)]
        ref.mse(*leaves, "none").backward(grad.to(dtype))
        return [t.grad for t in leaves]

    for name, o, r64, same in zip(("da", "db"), (da, db), ref_grads(torch.float64), ref_grads(torch.float32),
                                  strict=True):
        assert_within_rule(name, o, r64, same, torch.float32)


@pytestmark_interp
def test_pixel_shuffle_prelu_with_channel_offsets_past_2_31(far):
    from fastsr.kernels import shuffle_prelu as sp

    x, g = far((1, 12, 4, 5), 5), far((1, 3, 8, 10), 6)  # x's channel 11 and g's channel 2 lie past 2**31
    slope = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float32)
    leaves64 = [_dense64(x).requires_grad_(), slope.double().requires_grad_()]
    leaves32 = [x.contiguous().requires_grad_(), slope.clone().requires_grad_()]
    out64, out32 = (ref.pixel_shuffle_prelu(*leaves, 2) for leaves in (leaves64, leaves32))
    assert_within_rule("pixel_shuffle_prelu", sp.pixel_shuffle_prelu_forward(x, slope, 2), out64, out32, torch.float32)
    out64.backward(_dense64(g))
    out32.backward(g.contiguous())
    dx, ds = sp.pixel_shuffle_prelu_backward(g, x, slope, 2)
    assert_within_rule("dx", dx, leaves64[0].grad, leaves32[0].grad, torch.float32)
    assert_within_rule("dslope", ds, leaves64[1].grad, leaves32[1].grad, torch.float32)


@pytestmark_interp
def test_conv2d_prelu_with_channel_offsets_past_2_31(far):
    """x, the residual and the upstream gradient far apart: the forward's input and residual loads,
    the input gradient's un-shuffled gradient load and the weight gradient's input load."""
    from fastsr.kernels import conv as cv

    gen = torch.Generator().manual_seed(7)
    x, res, g = far((1, 5, 6, 7), 8), far((1, 3, 12, 14), 9), far((1, 3, 12, 14), 10)
    weight = torch.randn(12, 5, 3, 3, generator=gen) / 45**0.5
    bias = torch.randn(12, generator=gen) * 0.1
    slope = torch.tensor([0.2, -0.1, 0.4])
    out, z = cv.conv_forward(x, weight, bias, slope, res, 2, store_preactivation=True)
    dx, dw, db, ds = cv.conv_backward(g, x, weight, slope, z, 2, (True, True, True, True))

    def reference(dtype):
        leaves = [t.contiguous().to(dtype).requires_grad_() for t in (x, weight, bias, slope)]
        y = ref.conv2d_prelu(*leaves, res.contiguous().to(dtype), 2)
        y.backward(g.contiguous().to(dtype))
        return [y] + [t.grad for t in leaves]

    names = ("out", "dx", "dweight", "dbias", "dslope")
    for name, o, r64, same in zip(names, (out, dx, dw, db, ds), reference(torch.float64), reference(torch.float32),
                                  strict=True):
        assert_within_rule(name, o, r64, same, torch.float32)


# ---------------------------------------------------------------- the sizes that failed, on a GPU


def _corner_grads_within_rule(fn, leaves, g, crop, dtype):
    """Gradients of ``fn`` (a triton op) on the full tensors against the reference on the bottom-right
    ``crop`` window, where ``g`` is zero except in that window's last rows and columns (so the
    window's 'same' padding never meets a non-zero gradient); the input gradient is zero outside."""
    full = [t.detach().clone().requires_grad_() for t in leaves]
    fn(*full, "triton").backward(g)

    def window(t):
        return t[..., -crop:, -crop:] if t.dim() == 4 else t

    def ref_grads(dt):
        small = [window(t.detach()).to(dt).requires_grad_() for t in leaves]
        fn(*small, "torch").backward(window(g).to(dt))
        return [t.grad for t in small]

    for i, (ours, r64, same) in enumerate(zip(full, ref_grads(torch.float64), ref_grads(dtype), strict=True)):
        assert_within_rule(f"grad {i}", window(ours.grad), r64, same, dtype)
    assert full[0].grad[..., :-crop, :].abs().max() == 0 and full[0].grad[..., :, :-crop].abs().max() == 0


@pytest.mark.gpu
@GPU_MEMORY_HEAVY
def test_conv2d_prelu_nchw_channel_offsets_past_2_31():
    """(C_in - 1) * H * W >= 2**31 in NCHW: the channel offsets of the input, output, gradient."""
    dtype, c, h, w = torch.float16, 64, 6000, 6000
    assert (c - 1) * h * w >= 2**31
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(1, c, h, w, device=DEVICE, dtype=dtype, generator=gen)
    wt = torch.randn(c, c, 3, 3, device=DEVICE, dtype=dtype, generator=gen) / 24
    bias = torch.randn(c, device=DEVICE, dtype=dtype, generator=gen) * 0.1
    slope = torch.rand(c, device=DEVICE, dtype=dtype, generator=gen) * 0.5
    crop = 40

    def fn(x, wt, bias, slope, backend):
        return ops.conv2d_prelu(x, wt, bias, slope, backend=backend)

    with torch.no_grad():
        out = fn(x, wt, bias, slope, "triton")
        window = [x[..., -crop:, -crop:], wt, bias, slope]
        ref64 = fn(*[t.double() for t in window], "torch")[..., 1:, 1:]
        same = fn(*window, "torch")[..., 1:, 1:]
    assert_within_rule("conv2d_prelu corner", out[..., 1 - crop:, 1 - crop:], ref64, same, dtype)
    del out
    g = torch.zeros(1, c, h, w, device=DEVICE, dtype=dtype)
    g[..., -16:, -16:] = torch.randn(1, c, 16, 16, device=DEVICE, dtype=dtype, generator=gen)
    _corner_grads_within_rule(fn, [x, wt, bias, slope], g, crop, dtype)


@pytest.mark.gpu
@GPU_MEMORY_HEAVY
def test_pixel_shuffle_prelu_nchw_channel_offsets_past_2_31():
    """Input (C - 1) * H * W and output (C/4 - 1) * 4 * H * W both >= 2**31 in NCHW."""
    dtype, c, h, w = torch.float16, 64, 6000, 6000
    assert (c - 1) * h * w >= 2**31 and (c // 4 - 1) * 4 * h * w >= 2**31
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(1, c, h, w, device=DEVICE, dtype=dtype, generator=gen)
    slope = torch.rand(c // 4, device=DEVICE, dtype=dtype, generator=gen)
    crop = 8

    def fn(x, slope, backend):
        return ops.pixel_shuffle_prelu(x, slope, 2, backend=backend)

    with torch.no_grad():
        out = fn(x, slope, "triton")
        window = [x[..., -crop:, -crop:], slope]
        ref64, same = fn(*[t.double() for t in window], "torch"), fn(*window, "torch")
    assert_within_rule("pixel_shuffle_prelu corner", out[..., -2 * crop:, -2 * crop:], ref64, same, dtype)
    del out
    g = torch.zeros(1, c // 4, 2 * h, 2 * w, device=DEVICE, dtype=dtype)
    g[..., -2 * crop:, -2 * crop:] = torch.randn(1, c // 4, 2 * crop, 2 * crop, device=DEVICE, dtype=dtype,
                                                 generator=gen)
    full = [x.clone().requires_grad_(), slope.clone().requires_grad_()]
    fn(*full, "triton").backward(g)
    small = [[t[..., -crop:, -crop:].to(dt).requires_grad_() if t.dim() == 4 else t.to(dt).requires_grad_()
              for t in (x, slope)] for dt in (torch.float64, dtype)]
    for leaves in small:
        fn(*leaves, "torch").backward(g[..., -2 * crop:, -2 * crop:].to(leaves[0].dtype))
    assert_within_rule("dx corner", full[0].grad[..., -crop:, -crop:], small[0][0].grad, small[1][0].grad, dtype)
    assert_within_rule("dslope", full[1].grad, small[0][1].grad, small[1][1].grad, dtype)


@pytest.mark.gpu
@GPU_MEMORY_HEAVY
def test_to_uint8_past_2_31_pixels_and_channel_offsets():
    """One image of more than 2**31 pixels (H * W itself passes int32), 3 channels in NCHW."""
    h = w = 46341
    assert h * w >= 2**31
    x = torch.rand(1, 3, h, w, device=DEVICE, dtype=torch.float16)
    out = ops.to_uint8(x, backend="triton")
    for hs, ws in [(slice(0, 2), slice(0, 2)), (slice(h // 2, h // 2 + 2), slice(7, 9)), (slice(-2, None),) * 2]:
        torch.testing.assert_close(out[:, hs, ws, :], ref.to_uint8(x[:, :, hs, ws]), rtol=0, atol=0)


@pytest.mark.gpu
@GPU_MEMORY_HEAVY
def test_mse_psnr_past_65535_blocks_and_2_31_pixels():
    """3 x 46341 x 46341 bf16: 1.05M blocks per image (grid axis 1 held 65535), H * W and the
    Y-channel offset 2 * H * W past int32; one differing value in the last element of the farthest
    channel, so the expected values are exact. bf16, not fp16: the gradient, 2 d / (3 H W) ~ 1e-10,
    is below fp16's range."""
    h = w = 46341
    a = torch.rand(1, 3, h, w, device=DEVICE, dtype=torch.bfloat16)
    b = a.clone()
    b[0, 2, -1, -1] = a[0, 2, -1, -1] + 0.5
    d = float(b[0, 2, -1, -1]) - float(a[0, 2, -1, -1])
    mse = ops.mse(a, b, "none", backend="triton")
    # Not the rule: the value, ~4e-11, lies far below its fp32 atol (2e-6); this relative check is stronger.
    torch.testing.assert_close(mse.double(), torch.tensor([d * d / (3 * h * w)], device=DEVICE, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    psnr_y = ops.psnr(a, b, y_channel=True, backend="triton")
    expected_y = -10 * torch.log10(torch.tensor([(Y_WEIGHTS[2] * d) ** 2 / (h * w)], dtype=torch.float64))
    # The same-dtype baseline: the reference's fp32 arithmetic without its full-size fp32 copies (~86 GB
    # at peak): every other pixel's luma difference is exactly 0, so the mean is this pixel's over H * W.
    ya, yb = (ref.protocol_view(t[..., -1:, -1:], 1.0, True, 0) for t in (a, b))
    same = 10.0 * torch.log10(1.0 / (ref.mse(ya, yb, "none") / (h * w)))
    assert_within_rule("psnr y_channel", psnr_y.cpu(), expected_y, same.cpu(), torch.float32)
    a.requires_grad_()
    ops.mse(a, b, "none", backend="triton").backward(torch.ones(1, device=DEVICE))
    # Not the rule: the value, ~2e-10, lies far below its bf16 atol (8e-3); this relative check is stronger.
    assert float(a.grad[0, 2, -1, -1]) == pytest.approx(-2 * d / (3 * h * w), rel=1e-2)
    a.grad[0, 2, -1, -1] = 0
    assert a.grad.abs().max() == 0


@pytest.mark.gpu
def test_mse_psnr_over_65535_images():
    """A batch larger than any grid axis but the first holds, against the reference."""
    a, b = (torch.rand(70000, 3, 8, 8, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(s))
            for s in (0, 1))
    a64, b64 = a.double(), b.double()
    for name, ours, ref64, same in [
        ("mse", ops.mse(a, b, "none", backend="triton"), ref.mse(a64, b64, "none"), ref.mse(a, b, "none")),
        ("psnr", ops.psnr(a, b, y_channel=True, backend="triton"), ref.psnr(a64, b64, 1.0, True, 0, "none"),
         ref.psnr(a, b, 1.0, True, 0, "none")),
    ]:
        assert_within_rule(name, ours, ref64, same, torch.float32)
    leaves = [a.clone().requires_grad_(), a64.clone().requires_grad_()]
    ops.mse(leaves[0], b, "mean", backend="triton").backward()
    ref.mse(leaves[1], b64, "mean").backward()
    same = a.clone().requires_grad_()
    ref.mse(same, b, "mean").backward()
    assert_within_rule("mse grad", leaves[0].grad, leaves[1].grad, same.grad, torch.float32)
