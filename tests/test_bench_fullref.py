import math

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from dloral.bench.fullref import psnr, rgb_to_y, ssim
from dloral.bench.registry import FULLREF_METRICS, fullref_metric

# ---------------------------------------------------------------------------------------------
# Test oracle: BasicSR's reference formulas transcribed per image (basicsr/metrics/psnr_ssim.py
# calculate_psnr / calculate_ssim / _ssim, metric_util.to_y_channel, color_util.bgr2ycbcr,
# img_util.tensor2img). Images are HWC, BGR, uint8 as BasicSR's validation hands them over.
# ---------------------------------------------------------------------------------------------


def oracle_tensor2img(frame: torch.Tensor) -> np.ndarray:
    """(3, H, W) RGB float -> HWC BGR uint8: clamp, x * 255 in float32, round half to even."""
    hwc = frame.float().clamp(0, 1).numpy().transpose(1, 2, 0)
    bgr = np.ascontiguousarray(hwc[..., ::-1])
    return (bgr * 255.0).round().astype(np.uint8)


def oracle_y(bgr_u8: np.ndarray) -> np.ndarray:
    """to_y_channel: /255 in float32, bgr2ycbcr(y_only) via float64 dot, float32 Y/255, * 255."""
    unit = bgr_u8.astype(np.float32) / 255.0
    y = np.dot(unit, [24.966, 128.553, 65.481]) + 16.0  # float64
    y = (y / 255.0).astype(np.float32)
    return y[..., None] * 255.0


def oracle_prepare(img, img2, crop, y):
    if crop:
        img, img2 = img[crop:-crop, crop:-crop], img2[crop:-crop, crop:-crop]
    if y:
        img, img2 = oracle_y(img), oracle_y(img2)
    return img.astype(np.float64), img2.astype(np.float64)


def oracle_psnr(img, img2, crop, y):
    a, b = oracle_prepare(img, img2, crop, y)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 * 255.0 / mse)


def oracle_ssim_channel(a, b):
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = cv2.getGaussianKernel(11, 1.5)
    w = np.outer(g, g.transpose())

    def f(x):
        return cv2.filter2D(x, -1, w)[5:-5, 5:-5]

    mu1, mu2 = f(a), f(b)
    s1 = f(a**2) - mu1**2
    s2 = f(b**2) - mu2**2
    s12 = f(a * b) - mu1 * mu2
    num = (2 * mu1 * mu2 + c1) * (2 * s12 + c2)
    return (num / ((mu1**2 + mu2**2 + c1) * (s1 + s2 + c2))).mean()


def oracle_ssim(img, img2, crop, y):
    a, b = oracle_prepare(img, img2, crop, y)
    return np.mean([oracle_ssim_channel(a[..., i], b[..., i]) for i in range(a.shape[2])])


# ---------------------------------------------------------------------------------------------
# Fixtures: real photos shipped with scikit-image, degraded three ways.
# ---------------------------------------------------------------------------------------------


def to_frame(rgb_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb_u8)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def photo_clip():
    """gt: three 120x160 crops of real photos; out: noisy, blurred (both off the uint8 grid),
    JPEG q=20 (on the grid). Both (3, 3, 120, 160) float32 in [0, 1]."""
    crops = [
        data.astronaut()[60:180, 140:300],
        data.chelsea()[50:170, 120:280],
        data.coffee()[100:220, 220:380],
    ]
    rng = np.random.default_rng(0)
    noisy = np.clip(crops[0] / 255.0 + rng.normal(0, 0.04, crops[0].shape), 0, 1)
    blurred = cv2.GaussianBlur(crops[1].astype(np.float32) / 255, (7, 7), 1.6)
    ok, jpg = cv2.imencode(
        ".jpg", cv2.cvtColor(crops[2], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 20]
    )
    assert ok
    jpeg = cv2.cvtColor(cv2.imdecode(jpg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    out = torch.stack(
        [
            torch.from_numpy(noisy).permute(2, 0, 1).float(),
            torch.from_numpy(blurred).permute(2, 0, 1),
            to_frame(jpeg),
        ]
    )
    gt = torch.stack([to_frame(c) for c in crops])
    return out, gt


@pytest.mark.parametrize("crop", [0, 4])
@pytest.mark.parametrize("y_channel", [False, True])
def test_psnr_and_ssim_equal_basicsr_reference_on_degraded_photos(photo_clip, crop, y_channel):
    out, gt = photo_clip
    got_psnr = psnr(out, gt, crop_border=crop, y_channel=y_channel)
    got_ssim = ssim(out, gt, crop_border=crop, y_channel=y_channel)
    for t in range(out.shape[0]):
        img, img2 = oracle_tensor2img(out[t]), oracle_tensor2img(gt[t])
        assert got_psnr[t].item() == pytest.approx(
            oracle_psnr(img, img2, crop, y_channel), abs=1e-6
        )
        assert got_ssim[t].item() == pytest.approx(
            oracle_ssim(img, img2, crop, y_channel), abs=1e-6
        )
    # the three degradations really differ in quality, so the comparison is not degenerate
    assert got_psnr.max() - got_psnr.min() > 0.5
    assert (got_ssim < 0.99).all()


def test_identical_frames_give_infinite_psnr_and_unit_ssim(photo_clip):
    _, gt = photo_clip
    for y_channel in (False, True):
        assert torch.isinf(psnr(gt, gt, y_channel=y_channel)).all()
        assert (ssim(gt, gt, crop_border=4, y_channel=y_channel) == 1.0).all()


def test_offset_of_five_levels_gives_closed_form_psnr(photo_clip):
    _, gt = photo_clip
    base = (gt * 255).round().clamp(0, 250)
    off = (base + 5) / 255
    base = base / 255
    expected = 10 * math.log10(255**2 / 25)
    assert torch.allclose(
        psnr(off, base), torch.full((3,), expected, dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert torch.allclose(
        psnr(off, base, crop_border=4), torch.full((3,), expected, dtype=torch.float64), atol=1e-12
    )
    # on Y the 5 levels shrink to 5 * 219 / 255 (BT.601 studio range); float32 Y costs ~1e-5 dB
    expected_y = 20 * math.log10(255 / (5 * 219 / 255))
    assert torch.allclose(
        psnr(off, base, y_channel=True),
        torch.full((3,), expected_y, dtype=torch.float64),
        atol=1e-4,
    )


def test_rgb_to_y_maps_black_and_white_to_studio_range():
    frames = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2), torch.full((3, 2, 2), 0.5)])
    y = rgb_to_y(frames)
    assert y.shape == (3, 1, 2, 2) and y.dtype == torch.float32
    assert torch.allclose(y[0] * 255, torch.tensor(16.0), atol=1e-5)
    assert torch.allclose(y[1] * 255, torch.tensor(235.0), atol=1e-4)
    assert torch.allclose(y[2] * 255, torch.tensor(16 + 219 * 0.5), atol=1e-4)
    # green weighs most, blue least (BT.601)
    r, g, b = (rgb_to_y(torch.eye(3)[i].view(3, 1, 1)).item() for i in range(3))
    assert g > r > b


def test_values_are_float64_one_per_frame(photo_clip):
    out, gt = photo_clip
    for fn in (psnr, ssim):
        clip_values = fn(out, gt)
        assert clip_values.shape == (3,) and clip_values.dtype == torch.float64
        single = fn(out[1], gt[1])
        assert single.shape == (1,)
        assert single.item() == clip_values[1].item()


def test_mismatched_sizes_raise_naming_both_shapes(photo_clip):
    out, gt = photo_clip
    for fn in (psnr, ssim):
        with pytest.raises(ValueError, match=r"\(3, 3, 120, 160\).*\(3, 3, 112, 160\)"):
            fn(out, gt[..., :112, :])


def test_crop_that_leaves_no_ssim_window_is_rejected(photo_clip):
    out, gt = photo_clip
    with pytest.raises(ValueError, match="11x11"):
        ssim(out[..., :20, :20], gt[..., :20, :20], crop_border=5)
    with pytest.raises(ValueError, match="crop_border"):
        psnr(out, gt, crop_border=60)


def test_metric_infos_state_direction_channel_and_crop(photo_clip):
    out, gt = photo_clip
    for name in FULLREF_METRICS:
        metric = fullref_metric(name, crop_border=4)
        info = metric.info
        assert info.name == name and info.higher_is_better
        assert (info.kind, info.level, info.needs_gt) == ("full_reference", "frame", True)
        assert "crop 4" in info.implementation and "uint8" in info.implementation
        assert ("Y (BT.601" in info.implementation) == name.endswith("_y")
        assert ("RGB" in info.implementation) != name.endswith("_y")
        fn = psnr if name.startswith("psnr") else ssim
        assert torch.equal(
            metric(out, gt), fn(out, gt, crop_border=4, y_channel=name.endswith("_y"))
        )
    # higher really is better: a milder degradation scores higher on every metric
    mild = (gt + 0.01 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(1))).clamp(
        0, 1
    )
    strong = (gt + 0.08 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(2))).clamp(
        0, 1
    )
    for name in FULLREF_METRICS:
        metric = fullref_metric(name)
        assert (metric(mild, gt) > metric(strong, gt)).all()
    with pytest.raises(KeyError, match="psnr_y"):
        fullref_metric("psnr_cb")


# ---------------------------------------------------------------------------------------------
# Cross-checks against pyiqa (no weights needed for these metrics). Values are quantised first so
# that both see the same uint8 images.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantised_clip(photo_clip):
    out, gt = photo_clip
    return (out * 255).round() / 255, (gt * 255).round() / 255


def pyiqa_scores(name, out, gt, **kwargs):
    pyiqa = pytest.importorskip("pyiqa")
    metric = pyiqa.create_metric(name, device="cpu", **kwargs)
    return metric(out, gt).reshape(-1).double()


def test_rgb_psnr_matches_pyiqa_psnr_up_to_its_eps(quantised_clip):
    out, gt = quantised_clip
    ours = psnr(out, gt)
    theirs = pyiqa_scores("psnr", out, gt, test_y_channel=False, crop_border=0)
    # pyiqa: 10 log10(1 / (mse_[0,1] + 1e-8)) in float32; the eps alone explains the gap
    mse_unit = 255.0**2 / 10 ** (ours / 10) / 255.0**2
    assert torch.allclose(theirs, 10 * torch.log10(1 / (mse_unit + 1e-8)), atol=1e-4)
    assert ((ours - theirs).abs() < 1e-3).all()


def test_y_psnr_differs_from_pyiqa_psnry_by_the_studio_range(quantised_clip):
    out, gt = quantised_clip
    ours = psnr(out, gt, y_channel=True)
    # pyiqa's default luma is YIQ Y in [0, 1]; BT.601 Y spans 219/255 of it, so PSNR is higher here
    yiq = pyiqa_scores("psnry", out, gt)
    assert torch.allclose(ours - yiq, torch.full_like(ours, 20 * math.log10(255 / 219)), atol=2e-3)
    ycbcr = pyiqa_scores("psnry", out, gt, color_space="ycbcr")
    assert torch.allclose(ours, ycbcr, atol=1e-3)


def test_rgb_ssim_matches_pyiqa_ssimc(quantised_clip):
    out, gt = quantised_clip
    # same window and constants on RGB; pyiqa's float32 window and ReLU on cs cost < 1e-5
    assert torch.allclose(ssim(out, gt), pyiqa_scores("ssimc", out, gt), atol=1e-5)


def test_shared_preparation_quantises_a_clip_once_for_all_metrics_with_equal_values(
    photo_clip, monkeypatch
):
    from dloral.bench import fullref

    out, gt = photo_clip
    alone = {n: fullref_metric(n, crop_border=4)(out, gt) for n in FULLREF_METRICS}
    calls = []
    real = fullref.to_uint8
    monkeypatch.setattr(fullref, "to_uint8", lambda f: calls.append(1) or real(f))
    with fullref.shared_preparation():
        shared = {n: fullref_metric(n, crop_border=4)(out, gt) for n in FULLREF_METRICS}
        assert len(calls) == 2 * 2 * len(out)  # out and gt, RGB and Y: 4 metrics, 2 preparations
        out.add_(0.0)  # changed in place (its version moves): prepared again, not reused stale
        fullref.psnr(out, gt, crop_border=4)
        assert len(calls) == 2 * 2 * len(out) + len(out)
    for n in FULLREF_METRICS:
        assert torch.equal(alone[n], shared[n]), n
    calls.clear()
    fullref.psnr(out, gt, crop_border=4)  # outside the block nothing is kept
    fullref.psnr(out, gt, crop_border=4)
    assert len(calls) == 4 * len(out)
