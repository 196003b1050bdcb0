"""Inference forms of the ESRGAN family (fastsr.optimize) and the measured halo of deep models.

* :func:`fastsr.nn.fold_nearest_upsampling`: nearest x2 + 3x3 conv == LR conv + pixel shuffle,
  exactly in float64, borders included;
* RRDBNet's inference form (residual scales in the weights, upsampling folded) equals the plain
  form on odd shapes, scales 1/2/4, both memory formats, on the torch and cpp backends, within
  the 2x-of-PyTorch rule against the float64 plain model;
* SPAN's blocks as conv2d_silu ops equal the published form, on every backend;
* ``halo="auto"``: exact for models with small receptive fields whatever the tile; measured for
  a deep RRDBNet, and the tiled output with the measured halo stays within a level of the whole.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from backends import require_backend
from tolerance import assert_within_rule, fmt, whole_image_reference
from zoo_oracles import span_oracle

import fastsr
from fastsr.models.compact import SRVGGNetCompact
from fastsr.models.peers import convert_checkpoint
from fastsr.models.rrdbnet import RRDBNet
from fastsr.nn import fold_nearest_upsampling
from fastsr.pipeline import halo as halo_mod
from fastsr.pipeline.engine import Upscaler


@pytest.mark.parametrize("bias", [True, False])
def test_fold_nearest_upsampling_is_exact(bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    x = torch.randn(2, 4, 7, 9, generator=g, dtype=torch.float64)
    expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)
    w2, b2 = fold_nearest_upsampling(w, b)
    assert w2.shape == (20, 4, 3, 3)
    # Exact in float64 (up to 1e-12): stronger than the rule, whose atol is 1e-12 x the largest |value| (~20).
    torch.testing.assert_close(F.pixel_shuffle(F.conv2d(x, w2, b2, padding=1), 2), expected, rtol=0, atol=1e-12)


def test_fold_nearest_upsampling_needs_3x3():
    with pytest.raises(ValueError, match="3x3"):
        fold_nearest_upsampling(torch.zeros(2, 2, 5, 5), None)


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that every layer matters (default init leaves the body near identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5))
    return model.eval()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_rrdbnet_inference_form_equals_plain(scale, channels_last, backend):
    require_backend(backend)
    plain = _randomised(RRDBNet(scale=scale, num_blocks=2, channels=32, growth=16), seed=scale)
    optimized = fastsr.optimize(copy.deepcopy(plain))
    assert optimized.upsampling_folded and all(block.scale_folded for block in optimized.body)
    size = (13, 11) if scale == 4 else (16, 12)  # x1/x2 pixel-unshuffle the input by 4 / 2
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(x.double())
        same = plain(x)
        with fastsr.use_backend(backend):
            ours = optimized(fmt(x, channels_last))
    assert ours.shape == (2, 3, size[0] * scale, size[1] * scale)
    assert_within_rule(f"RRDBNet x{scale} inference form", ours, ref64, same, torch.float32)


def test_rrdbnet_inference_form_is_idempotent():
    model = fastsr.optimize(_randomised(RRDBNet(num_blocks=1, channels=16, growth=16), seed=3))
    x = torch.rand(1, 3, 9, 10)
    with torch.no_grad():
        before = model(x)
        fastsr.optimize(model)
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compact_optimized_equals_plain(backend):
    require_backend(backend)
    plain = _randomised(SRVGGNetCompact(num_convs=4, channels=32), seed=5)
    x = torch.rand(1, 3, 11, 13, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(x.double())
        with fastsr.use_backend(backend):
            ours = fastsr.optimize(copy.deepcopy(plain))(x)
        same = plain(x)
    assert_within_rule("SRVGGNetCompact", ours, ref64, same, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_span_fused_blocks_equal_the_published_form(backend):
    """SPAN's blocks run as conv2d_silu ops (conv + SiLU, conv + attention) on every backend; the
    result stays within the rule of the published training-form network in float64. On a CPU the
    Triton case goes through the interpreter (a small image); cpp's 48-channel convs take Winograd."""
    require_backend(backend)
    oracle = span_oracle(4, seed=46)
    model = convert_checkpoint(oracle.state_dict(), "span.pth")
    size = (7, 6) if backend == "triton" else (23, 19)
    x = fmt(torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(4)), backend == "cpp")
    with torch.no_grad():
        ref64 = copy.deepcopy(oracle).double()(x.double())
        same = oracle(x.clone())
        with fastsr.use_backend(backend):
            ours = fastsr.optimize(model)(x)
    assert_within_rule(f"SPAN ({backend})", ours, ref64, same, torch.float32)


def _photo(h: int, w: int) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[120:120 + h, 140:140 + w])


def _choice(model, image: np.ndarray, tile: int) -> halo_mod.HaloChoice:
    source = fastsr.imageio.array_source(image, "<photo>", "array")
    return halo_mod.choose_halo(Upscaler(model), "auto", height=image.shape[0], width=image.shape[1], channels=3,
                                tile=tile, read=halo_mod.source_reader(source))


def test_auto_halo_is_exact_for_small_receptive_fields_whatever_the_tile():
    choice = _choice(fastsr.load_model("default"), _photo(48, 40), tile=16)
    assert (choice.halo, choice.how) == (40, "exact")
    assert _choice(fastsr.load_model("default"), _photo(48, 40), tile=48).how == "whole image"


def test_given_halo_is_kept():
    up = Upscaler(fastsr.load_model("default"))
    choice = halo_mod.choose_halo(up, 7, height=50, width=50, channels=3, tile=16, read=None)
    assert (choice.halo, choice.how) == (7, "given")


def test_probe_cores_stay_inside_the_image():
    for h, w in [(8, 8), (9, 300), (500, 400), (40, 2000)]:
        for y, x in halo_mod.probe_cores(h, w, 128):
            assert 0 <= y <= h - halo_mod.PROBE_CORE and 0 <= x <= w - halo_mod.PROBE_CORE
    assert all(128 <= y <= 500 - 128 - 8 for y, _ in halo_mod.probe_cores(500, 400, 128))


def test_deep_model_gets_a_measured_halo_that_keeps_tiles_within_a_level():
    # 9 RRDBs: a receptive field of ~140 LR pixels, beyond the exact-halo limit.
    model = _randomised(RRDBNet(num_blocks=9, channels=16, growth=8), seed=11)
    assert Upscaler(model).radius > 128
    image = _photo(72, 64)
    choice = _choice(model, image, tile=24)
    assert choice.how == "measured" and choice.halo in halo_mod.CANDIDATES + (128,)
    whole = fastsr.upscale(image, model, tile=72).astype(int)
    tiled = fastsr.upscale(image, model, tile=24, halo="auto").astype(int)
    assert np.abs(tiled - whole).max() <= 1


def test_measured_halo_is_logged(caplog):
    model = _randomised(RRDBNet(num_blocks=9, channels=16, growth=8), seed=11)
    with caplog.at_level("WARNING", logger="fastsr.pipeline.halo"):
        fastsr.upscale(_photo(40, 40), model, tile=16)
    assert any("measured on the image" in r.message for r in caplog.records)


class _PlainUpsampler(torch.nn.Module):
    """ESRGAN's upsampling tail written plainly: [nearest x2, 3x3 conv, LeakyReLU] x 2, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.up1, self.up2 = torch.nn.Conv2d(16, 16, 3, 1, 1), torch.nn.Conv2d(16, 16, 3, 1, 1)
        self.last = torch.nn.Conv2d(16, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.up1(F.interpolate(x, scale_factor=2, mode="nearest")), 0.2)
        x = F.leaky_relu(self.up2(F.interpolate(x, scale_factor=2, mode="nearest")), 0.2)
        return self.last(x)


def _sequential_upsampler() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="nearest"), torch.nn.Conv2d(16, 16, 3, 1, 1),
                               torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(16, 3, 3, 1, 1))


@pytest.mark.parametrize("make", [_PlainUpsampler, _sequential_upsampler], ids=["fx", "sequential"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_fuse_folds_nearest_upsampling_into_the_conv(make, backend):
    require_backend(backend)
    plain = _randomised(make(), seed=9)
    fused = fastsr.fuse(plain)
    upsamplings = [m for m in fused.modules() if isinstance(m, torch.nn.Upsample)]
    calls = [n for n in getattr(fused, "graph", torch.fx.Graph()).nodes if n.target is F.interpolate]
    assert not upsamplings and not calls, "an upsampling was left unfused"
    assert sum(getattr(m, "shuffle", 1) == 2 for m in fused.modules()) == (2 if make is _PlainUpsampler else 1)
    x = torch.rand(1, 16, 7, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(x.double())
        with fastsr.use_backend(backend):
            ours = fused(x)
        same = plain(x)
    assert_within_rule("fused upsampler", ours, ref64, same, torch.float32)


def test_fuse_keeps_an_upsampling_whose_output_is_also_read_elsewhere():
    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, 1, 1)

        def forward(self, x):
            up = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(up) + up

    plain = _randomised(Branchy(), seed=2)
    fused = fastsr.fuse(plain)
    x = torch.rand(1, 4, 5, 6)
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(x.double())
        assert_within_rule("Branchy fused", fused(x), ref64, plain(x), torch.float32)


@pytest.mark.parametrize("scale", [1, 2])
def test_unshuffling_rrdbnet_runs_any_size_and_tiles_like_the_whole_image(scale):
    """x1/x2 RRDBNets pixel-unshuffle their input: odd sizes are padded like Real-ESRGAN does, and
    tile windows stay on the unshuffle grid, so tiled output equals the whole image's."""
    model = _randomised(RRDBNet(scale=scale, num_blocks=1, channels=16, growth=8), seed=scale)
    image = _photo(37, 29)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    whole = fastsr.upscale(x, model, tile=40)
    assert whole.shape == (1, 3, 37 * scale, 29 * scale)
    ref64 = whole_image_reference(model, x)
    for tile in (7, 12):
        tiled = fastsr.upscale(x, model, tile=tile, batch_size=3)
        assert_within_rule(f"tile {tile}", tiled, ref64, whole, torch.float32)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 1, 3)).shape == (1, 3, scale, 3 * scale)  # too small to reflect


def test_aligned_plan_keeps_windows_on_the_grid():
    from fastsr.tiling import plan_tiles

    for h, w in [(37, 29), (64, 64), (9, 101)]:
        plan = plan_tiles(h, w, tile=7, halo=5, scale=1, align=4)
        assert plan.tile == 8 and plan.halo == 8
        covered = np.zeros((h, w), bool)
        for t in plan:
            y0, y1, x0, x1 = t.window
            assert y0 % 4 == 0 and x0 % 4 == 0 and (y1 - y0, x1 - x0) == plan.window_shape
            assert y1 <= h and x1 <= w
            cy0, cy1, cx0, cx1 = t.core
            assert y0 <= max(cy0 - plan.halo, 0) and y1 >= min(cy1 + plan.halo, h)
            assert x0 <= max(cx0 - plan.halo, 0) and x1 >= min(cx1 + plan.halo, w)
            covered[cy0:cy1, cx0:cx1] = True
        assert covered.all()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_concat_free_dense_block_equals_concatenation(backend):
    """Inference writes the dense features into one buffer; autograd concatenates: same features."""
    require_backend(backend)
    block = _randomised(RRDBNet(num_blocks=1, channels=32, growth=16), seed=4).body[0].rdb1
    x = fmt(torch.rand(2, 32, 9, 11, generator=torch.Generator().manual_seed(3)), True)
    with fastsr.use_backend(backend):
        with torch.no_grad():
            buffered = block.dense_features(x)
        concatenated = block.dense_features(x.clone().requires_grad_()).detach()
    assert buffered.is_contiguous(memory_format=torch.channels_last)
    with fastsr.use_backend("torch"):  # the reference: concatenation (autograd on) in float64, and in fp32
        ref64 = copy.deepcopy(block).double().dense_features(x.double().requires_grad_()).detach()
        same = block.dense_features(x.clone().requires_grad_()).detach()
    assert_within_rule("buffered", buffered, ref64, same, torch.float32)
    assert_within_rule("concatenated", concatenated, ref64, same, torch.float32)


def test_rrdbnet_inference_form_on_triton():
    """The inference form uses only conv2d_prelu, so the Triton backend serves it too (on a CPU
    through the interpreter: one small case), channel-slice inputs of the dense blocks included."""
    require_backend("triton")
    plain = _randomised(RRDBNet(scale=4, num_blocks=1, channels=16, growth=16), seed=8)
    optimized = fastsr.optimize(copy.deepcopy(plain))
    x = torch.rand(1, 3, 6, 5, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(x.double())
        same = plain(x)
        with fastsr.use_backend("triton"):
            ours = optimized(x)
    assert_within_rule("RRDBNet inference form (triton)", ours, ref64, same, torch.float32)


def test_an_image_too_thin_to_probe_gets_the_reference_context():
    model = _randomised(RRDBNet(num_blocks=9, channels=16, growth=8), seed=11)
    strip = _photo(5, 70)
    choice = _choice(model, strip, tile=16)
    assert (choice.how, choice.halo) == ("measured", halo_mod.REFERENCE_HALO)
    assert fastsr.upscale(strip, model, tile=16).shape == (20, 280, 3)
