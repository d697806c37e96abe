"""dloral.quality: the one PSNR/SSIM under training validation (and dloral.bench.fullref, whose
BasicSR checks are in test_bench_fullref.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dloral import quality
from dloral.train import validation


def reference_ssim(pred, gt):
    """Wang et al. 2004 as a plain 2-D convolution, averaged over every channel's map."""
    x, y = (
        pred.double().reshape(-1, 1, *pred.shape[-2:]),
        gt.double().reshape(-1, 1, *gt.shape[-2:]),
    )
    taps = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2)).double()
    win = torch.outer(taps / taps.sum(), taps / taps.sum())[None, None]
    mx, my = F.conv2d(x, win), F.conv2d(y, win)
    vx, vy = F.conv2d(x * x, win) - mx**2, F.conv2d(y * y, win) - my**2
    cxy = F.conv2d(x * y, win) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean().item()


@pytest.mark.parametrize("shape", [(2, 3, 3, 40, 52), (3, 3, 64, 64), (1, 3, 16, 11)])
def test_validation_psnr_and_ssim_match_the_plain_formulas(shape):
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(shape, generator=g)
    pred = (gt + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    mse = ((pred.double() - gt.double()) ** 2).mean().item()
    assert validation.psnr(pred, gt) == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)
    assert validation.ssim(pred, gt) == pytest.approx(reference_ssim(pred, gt), abs=1e-6)
    assert validation.psnr(gt, gt) == math.inf and validation.ssim(gt, gt) == pytest.approx(1.0)


def test_ssim_is_per_image_and_in_the_inputs_dtype():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 2, 20, 24, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.rand(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    whole = quality.ssim(a, b, data_range=1.0)
    assert whole.shape == (3,) and whole.dtype == torch.float64
    assert torch.equal(whole[1:2], quality.ssim(a[1:2], b[1:2], data_range=1.0))
    scaled = quality.ssim(a * 255, b * 255, data_range=255.0)
    assert torch.allclose(whole, scaled, atol=1e-12)
    psnr = quality.psnr(a, b, data_range=1.0, dim=(1, 2, 3))
    assert psnr.shape == (3,) and torch.isinf(quality.psnr(a, a, 1.0, dim=(1, 2, 3))).all()
