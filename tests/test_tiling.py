"""fastsr.tiling: receptive field (derived vs measured), tile plans, and tiled == whole-image output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerance import assert_within_rule, whole_image_reference
from torch import nn

import fastsr
from fastsr.models.checkpoint import embedded_path
from fastsr.tiling import TilePlan, model_scale, plan_tiles, receptive_field

BACKEND = "torch"  # tiling is backend-independent; the reference backend keeps these tests deterministic


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random-init model in eval mode with every BN active (SRResNet zero-inits the last BN of
    each block, which would make the blocks identities and hide part of the receptive field)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def measured_radius(model: nn.Module, size: int, scale: int) -> int:
    """Receptive-field radius measured by an impulse: perturb one input pixel in the middle of a
    random image and find the farthest output pixel that changes, in LR pixels (float64, so any
    dependence shows up as a non-zero difference)."""
    model = model.double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, size, size, generator=g, dtype=torch.float64)
    c = size // 2
    x2 = x.clone()
    x2[0, :, c, c] += 1.0
    with torch.no_grad(), fastsr.use_backend(BACKEND):
        diff = (model(x2) - model(x)).abs().amax(dim=(0, 1))
    ys, xs = torch.nonzero(diff > 0, as_tuple=True)
    assert len(ys), "the impulse changed nothing"
    # Output pixel p lies in LR pixel p // scale; distance in LR pixels from the impulse.
    dist = torch.maximum((ys // scale - c).abs(), (xs // scale - c).abs())
    assert (ys // scale).min() > 0 and (ys // scale).max() < size - 1, "impulse response reached the border"
    return int(dist.max())


@pytest.mark.parametrize("scale,num_blocks", [(4, 16), (4, 2), (2, 3), (8, 1)])
def test_receptive_field_matches_impulse_response(scale, num_blocks):
    model = randomize(fastsr.SRResNet(scale=scale, num_blocks=num_blocks, channels=8))
    radius = receptive_field(model)
    assert model_scale(model) == scale
    assert measured_radius(model, 2 * radius + 9, scale) == radius


def test_srresnet_x4_radius_is_40():
    # head 9x9 (4) + 16 blocks x 2 convs (32) + body tail (1) + upsampling / tail at finer scales.
    assert receptive_field(fastsr.SRResNet()) == 40


def test_receptive_field_of_plain_torch_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.Conv2d(8, 12, 3, padding=1), nn.PixelShuffle(2),
                          nn.Conv2d(3, 3, 3, padding=1)).eval()
    assert model_scale(model) == 2
    assert receptive_field(model) == measured_radius(model, 21, 2) == 4
    with pytest.raises(ValueError, match="strided"):
        receptive_field(nn.Sequential(nn.Conv2d(3, 3, 3, stride=2)))


@pytest.mark.parametrize("height,width,tile,halo", [(100, 70, 32, 40), (37, 200, 16, 5), (64, 64, 64, 0),
                                                    (5, 9, 2, 3), (130, 131, 7, 12)])
def test_plan_covers_image_and_windows_contain_halo(height, width, tile, halo):
    plan = plan_tiles(height, width, tile=tile, halo=halo, scale=4)
    covered = np.zeros((height, width), dtype=int)
    for t in plan:
        y0, y1, x0, x1 = t.core
        wy0, wy1, wx0, wx1 = t.window
        covered[y0:y1, x0:x1] += 1
        assert (wy1 - wy0, wx1 - wx0) == plan.window_shape  # batchable: one shape for all
        assert 0 <= wy0 and wy1 <= height and 0 <= wx0 and wx1 <= width
        # Each side has the halo, or reaches the image border (same zero padding as whole-image).
        assert wy0 <= max(y0 - halo, 0) and wy1 >= min(y1 + halo, height)
        assert wx0 <= max(x0 - halo, 0) and wx1 >= min(x1 + halo, width)
        rows, cols = t.output_crop(4)
        oy0, oy1, ox0, ox1 = t.output_box(4)
        assert (rows.stop - rows.start, cols.stop - cols.start) == (oy1 - oy0, ox1 - ox0)
    assert (covered == 1).all()  # cores partition the image
    assert sum(len(b) for b in plan.batches(3)) == len(plan) == plan.rows * plan.cols


def test_plan_rejects_empty_image():
    with pytest.raises(ValueError, match="empty"):
        TilePlan(0, 5, 4, 1, 4)


def _photo(h: int, w: int) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[100:100 + h, 150:150 + w])


def _check_tiled_equals_whole(model, image: np.ndarray, tiles: list[int]) -> None:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    whole = fastsr.upscale(x, model, tile=max(image.shape), backend=BACKEND)
    exact = whole.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255
    whole_u8 = np.round(exact).astype(np.uint8)  # what the uint8 path computes for the whole image
    ref64 = whole_image_reference(model, x)
    for tile in tiles:
        # Batches of 8 windows: batching must not change the result either.
        tiled = fastsr.upscale(x, model, tile=tile, backend=BACKEND, batch_size=8)
        assert tiled.shape == whole.shape
        assert_within_rule(f"tile {tile}", tiled, ref64, whole, torch.float32)
        tiled_u8 = fastsr.upscale(image, model, tile=tile, backend=BACKEND, batch_size=8)
        diff = np.abs(tiled_u8.astype(int) - whole_u8)
        assert diff.max() <= 1, f"tile {tile}"
        # Where they differ, the exact value sits on a rounding boundary (x.5) within float noise.
        frac = np.abs(exact[diff > 0] % 1 - 0.5)
        assert (frac < 1e-3).all(), f"tile {tile}: uint8 differences away from a rounding boundary"
        assert (diff > 0).mean() <= 1e-3, f"tile {tile}: {(diff > 0).mean():.2%} of the values differ"


def test_tiled_equals_whole_image_small_model():
    model = randomize(fastsr.SRResNet(scale=4, num_blocks=2, channels=8))
    halo = receptive_field(model)
    assert halo == 12
    image = _photo(47, 59)  # not divisible by any of the tile sizes
    whole_u8 = fastsr.upscale(image, model, backend=BACKEND)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    whole = fastsr.upscale(x, model, backend=BACKEND)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    assert np.array_equal(whole_u8, np.round(whole * 255).astype(np.uint8))  # the uint8 path is round(float)
    _check_tiled_equals_whole(model, image, [5, 16, 27])  # 5: tiles smaller than the halo


def _default_model():
    path = embedded_path("default")
    if not path.is_file():
        pytest.skip(f"the embedded default model {path.name} is not there yet")
    return fastsr.load_model("default")


def test_tiled_equals_whole_image_default_model():
    model = _default_model()
    # 128 > 44 + 2 * 40: interior column tiles have real 40-pixel halos (rows span the image).
    _check_tiled_equals_whole(model, _photo(96, 128), [44])


@pytest.mark.slow
def test_tiled_equals_whole_image_default_model_many_tiles():
    model = _default_model()
    # Larger than tile + 2 * 40 in both directions; 20 is smaller than the halo.
    _check_tiled_equals_whole(model, _photo(150, 173), [20, 32, 64])


def test_upscale_tiles_automatically_when_large():
    model = randomize(fastsr.SRResNet(scale=2, num_blocks=1, channels=8))
    from skimage import data

    image = np.ascontiguousarray(data.hubble_deep_field()[:520, :530])  # > 512 x 512: tiles of 512
    auto = fastsr.upscale(image, model, backend=BACKEND)
    whole = fastsr.upscale(image, model, tile=530, backend=BACKEND)
    assert auto.shape == (1040, 1060, 3)
    assert np.abs(auto.astype(int) - whole).max() <= 1


@pytest.mark.parametrize("mode,numpy_mode", [("mirror", "symmetric"), ("reflect", "reflect")])
def test_border_index_matches_numpy_pad(mode, numpy_mode):
    from fastsr.tiling import border_index

    for length in (1, 2, 3, 7):
        for pad in (0, 1, 5, 20):
            expected = np.pad(np.arange(length), pad, mode=numpy_mode)
            assert (border_index(np.arange(-pad, length + pad), length, mode) == expected).all(), (length, pad)


@pytest.mark.parametrize("mode,numpy_mode", [("mirror", "symmetric"), ("reflect", "reflect")])
def test_padded_plan_reads_padded_windows(mode, numpy_mode):
    image = np.arange(9 * 7 * 1).reshape(9, 7, 1)
    plan = plan_tiles(9, 7, tile=4, halo=3, scale=1, pad=2, pad_mode=mode)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode=numpy_mode)
    for t in plan:
        y0, y1, x0, x1 = t.window
        assert -2 <= y0 and y1 <= 11 and -2 <= x0 and x1 <= 9 and (y1 - y0, x1 - x0) == plan.window_shape
        window = plan.read(lambda a, b, c, d: image[a:b, c:d], t)
        assert (window == padded[y0 + 2:y1 + 2, x0 + 2:x1 + 2]).all()


def test_pad_must_fit_the_halo():
    with pytest.raises(ValueError, match="pad"):
        TilePlan(10, 10, 4, 2, 1, 1, 3)


@pytest.mark.parametrize("border", ["mirror", "reflect", "zero"])
def test_flat_image_stays_flat_with_a_mirrored_border(border):
    flat = np.empty((1, 1, 3), np.uint8)
    flat[...] = (200, 100, 50)
    out = fastsr.upscale(flat, "default", border=border).reshape(-1, 3).astype(int)
    error = np.abs(out - (200, 100, 50)).max()
    if border != "zero":
        assert error <= 3
    else:  # the plain model's zero padding darkens everything: why a mirrored border is the default
        assert error > 100


def test_tiled_equals_whole_with_a_mirrored_border():
    image = _photo(37, 41)
    whole = fastsr.upscale(image, "default", tile=64).astype(int)
    for tile in (8, 13):
        assert np.abs(fastsr.upscale(image, "default", tile=tile, batch_size=4).astype(int) - whole).max() <= 1
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    whole_t = fastsr.upscale(x, "default", tile=64)
    assert_within_rule("tile 9", fastsr.upscale(x, "default", tile=9), whole_image_reference("default", x), whole_t,
                       torch.float32)
