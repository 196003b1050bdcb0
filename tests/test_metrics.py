"""fastsr.metrics agrees with scikit-image under the SR protocol (Y of rgb2ycbcr, crop border)."""

import numpy as np
import pytest
import torch
from skimage import data
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fastsr import metrics
from fastsr.data import bicubic_downscale, bicubic_upscale, quantize, to_float


@pytest.fixture(scope="module")
def pair():
    hr = to_float(data.astronaut()[100:300, 150:330])
    sr = quantize(bicubic_upscale(bicubic_downscale(hr, 4), 4))
    return sr, hr


def _skimage_y(t: torch.Tensor, border: int) -> np.ndarray:
    y = rgb2ycbcr(t[0].permute(1, 2, 0).double().numpy())[..., 0]
    return y[border:-border, border:-border] if border else y


@pytest.mark.parametrize("border", [0, 4])
def test_psnr_matches_skimage(pair, border):
    sr, hr = pair
    expected = peak_signal_noise_ratio(_skimage_y(hr, border), _skimage_y(sr, border), data_range=255)
    assert float(metrics.psnr(sr, hr, crop_border=border)) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("border", [0, 4])
def test_ssim_matches_skimage(pair, border):
    sr, hr = pair
    expected = structural_similarity(_skimage_y(hr, border), _skimage_y(sr, border), data_range=255,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert float(metrics.ssim(sr, hr, crop_border=border)) == pytest.approx(expected, abs=1e-5)


def test_rgb_psnr_and_ssim_per_image(pair):
    sr, hr = (t.double() for t in pair)
    batch_sr, batch_hr = torch.cat([sr, hr]), torch.cat([hr, hr])
    p = metrics.psnr(batch_sr, batch_hr, y_channel=False)
    expected = peak_signal_noise_ratio(hr[0].numpy(), sr[0].numpy(), data_range=1.0)
    assert p.shape == (2,) and float(p[0]) == pytest.approx(expected, abs=1e-4) and torch.isinf(p[1])
    s = metrics.ssim(batch_sr, batch_hr, y_channel=False)
    expected = structural_similarity(hr[0].numpy(), sr[0].numpy(), channel_axis=0, data_range=1.0,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert float(s[0]) == pytest.approx(expected, abs=1e-5) and float(s[1]) == pytest.approx(1.0)
