import dataclasses
import json
import math
import tomllib

import av
import numpy as np
import pytest
import torch

from dloral.data.degradation import (
    DEFAULT_TOML,
    KERNEL_TYPES,
    DegradationConfig,
    VideoDegradation,
    add_gaussian_noise,
    add_poisson_noise,
    crop_to_multiple,
    filter2d,
    gaussian_kernel,
    generalized_gaussian_kernel,
    jpeg,
    pad_kernel,
    plateau_kernel,
    pulse_kernel,
    resize,
    sinc_kernel,
)

REFERENCE = {  # yjsunnn/DLoRAL src/datasets/params.yml
    "scale": 4,
    "resize_prob": (0.2, 0.7, 0.1),
    "resize_range": (0.3, 1.5),
    "gaussian_noise_prob": 0.5,
    "noise_range": (1, 15),
    "poisson_scale_range": (0.05, 2.0),
    "gray_noise_prob": 0.4,
    "jpeg_range": (60, 95),
    "second_blur_prob": 0.5,
    "resize_prob2": (0.3, 0.4, 0.3),
    "resize_range2": (0.6, 1.2),
    "gaussian_noise_prob2": 0.5,
    "noise_range2": (1, 12),
    "poisson_scale_range2": (0.05, 1.0),
    "gray_noise_prob2": 0.4,
    "jpeg_range2": (60, 100),
    "blur_kernel_size": 21,
    "kernel_list": KERNEL_TYPES,
    "kernel_prob": (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
    "sinc_prob": 0.1,
    "blur_sigma": (0.2, 3),
    "betag_range": (0.5, 4),
    "betap_range": (1, 2),
    "blur_kernel_size2": 21,
    "kernel_list2": KERNEL_TYPES,
    "kernel_prob2": (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
    "sinc_prob2": 0.1,
    "blur_sigma2": (0.2, 1.5),
    "betag_range2": (0.5, 4),
    "betap_range2": (1, 2),
    "final_sinc_prob": 0.8,
}


@pytest.fixture(scope="module")
def bikes_hr(bikes_path) -> torch.Tensor:
    """3 real frames of bikes.mp4 at native resolution, a 128x128 crop off the codec's grid."""
    with av.open(str(bikes_path)) as container:
        decoded = container.decode(video=0)
        frames = [next(decoded).to_ndarray(format="rgb24") for _ in range(3)]
    clip = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    return clip[:, :, 83:211, 245:373].contiguous()


def _still(frame: torch.Tensor, t: int = 3) -> torch.Tensor:
    return frame[None].repeat(t, 1, 1, 1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ config


def test_packaged_toml_holds_the_reference_values_and_round_trips(tmp_path):
    config = DegradationConfig.from_toml()
    assert DegradationConfig.from_toml(DEFAULT_TOML) == config
    for key, value in REFERENCE.items():
        assert getattr(config, key) == value, key
    assert DegradationConfig.from_dict(config.to_dict()) == config
    json.dumps(config.to_dict())

    text = DEFAULT_TOML.read_text().replace("jpeg_range2 = [60, 100]", "jpeg_range2 = [30, 40]")
    (tmp_path / "custom.toml").write_text(text)
    custom = DegradationConfig.from_toml(tmp_path / "custom.toml")
    assert custom.jpeg_range2 == (30.0, 40.0) and custom.noise_range == (1.0, 15.0)


def test_config_rejects_unknown_missing_and_bad_values():
    grouped = tomllib.loads(DEFAULT_TOML.read_text())
    grouped["kernel_info"]["blur_sgima"] = [0.2, 3]
    with pytest.raises(KeyError, match="blur_sgima"):
        DegradationConfig.from_dict(grouped)
    flat = DegradationConfig.from_toml().to_dict()
    with pytest.raises(KeyError, match="color_jitter_prob"):
        DegradationConfig.from_dict({**flat, "color_jitter_prob": 0.0})
    del flat["final_sinc_prob"]
    with pytest.raises(KeyError, match="final_sinc_prob"):
        DegradationConfig.from_dict(flat)
    flat = DegradationConfig.from_toml().to_dict()
    with pytest.raises(ValueError, match="kernel_prob2"):
        DegradationConfig.from_dict({**flat, "kernel_prob2": [0.5, 0.5]})
    with pytest.raises(ValueError, match="noise_range"):
        DegradationConfig.from_dict({**flat, "noise_range": [15, 1]})


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("size", [7, 13, 21])
def test_every_kernel_sums_to_one_with_the_requested_size(size):
    kernels = [
        gaussian_kernel(size, 1.5),
        gaussian_kernel(size, 2.5, 0.7, 0.6),
        generalized_gaussian_kernel(size, 1.2, 2.0, -1.0, beta=0.6),
        generalized_gaussian_kernel(size, 2.0, beta=3.5),
        plateau_kernel(size, 1.0, beta=1.7),
        plateau_kernel(size, 2.0, 0.5, 2.2, beta=1.2),
        sinc_kernel(size, math.pi / 4),
        pulse_kernel(size),
    ]
    for kernel in kernels:
        assert kernel.shape == (size, size) and kernel.dtype == torch.float32
        assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-5)
        padded = pad_kernel(kernel, 21)
        assert padded.shape == (21, 21) and float(padded.sum()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel(8, 1.0)


def _moments(kernel: torch.Tensor) -> tuple[float, float, float]:
    """Var(x), Var(y), Cov(x, y) of a kernel read as a distribution; x = column, y = row."""
    k = kernel.double()
    ax = torch.arange(k.shape[0], dtype=torch.float64) - k.shape[0] // 2
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    mx, my = float((k * x).sum()), float((k * y).sum())
    assert abs(mx) < 1e-6 and abs(my) < 1e-6
    return float((k * x * x).sum()), float((k * y * y).sum()), float((k * x * y).sum())


def test_isotropic_gaussian_is_symmetric_with_variance_sigma_squared():
    for sigma in (0.8, 1.5, 3.0):
        k = gaussian_kernel(21, sigma)
        assert torch.allclose(k, k.T) and torch.allclose(k, k.flip(0))
        assert torch.allclose(k, k.flip(1))
        var_x, var_y, cov = _moments(k)
        # a sampled Gaussian's variance is sigma^2 to well within 2% for sigma >= 0.8
        assert var_x == pytest.approx(sigma**2, rel=0.02)
        assert var_y == pytest.approx(sigma**2, rel=0.02) and abs(cov) < 1e-6
    assert int(gaussian_kernel(21, 1.0).argmax()) == 21 * 10 + 10


def test_anisotropic_gaussian_covariance_follows_sigma_and_rotation():
    sx, sy = 3.0, 1.0
    var_x, var_y, cov = _moments(gaussian_kernel(21, sx, sy, 0.0))
    assert var_x == pytest.approx(9.0, rel=0.03) and var_y == pytest.approx(1.0, rel=0.03)
    var_x, var_y, _ = _moments(gaussian_kernel(21, sx, sy, math.pi / 2))
    assert var_x == pytest.approx(1.0, rel=0.03) and var_y == pytest.approx(9.0, rel=0.03)
    theta = 0.5
    var_x, var_y, cov = _moments(gaussian_kernel(21, sx, sy, theta))
    c, s = math.cos(theta), math.sin(theta)
    assert var_x == pytest.approx(c * c * 9 + s * s * 1, rel=0.03)
    assert var_y == pytest.approx(s * s * 9 + c * c * 1, rel=0.03)
    assert cov == pytest.approx(c * s * (9 - 1), rel=0.03)


def test_generalized_and_plateau_kernels_have_their_shapes():
    assert torch.allclose(generalized_gaussian_kernel(21, 2.0, beta=1.0), gaussian_kernel(21, 2.0))
    # beta > 1 flattens the top and cuts the tails, beta < 1 sharpens the peak, fattens tails
    gauss = gaussian_kernel(21, 2.0)
    flat = generalized_gaussian_kernel(21, 2.0, beta=4.0)
    peaky = generalized_gaussian_kernel(21, 2.0, beta=0.5)
    assert flat[10, 11] / flat[10, 10] > 0.99 > gauss[10, 11] / gauss[10, 10]
    assert flat[10, 18] / flat[10, 10] < 1e-6 < gauss[10, 18] / gauss[10, 10]
    assert peaky[10, 18] / peaky[10, 10] > 10 * gauss[10, 18] / gauss[10, 10]
    plateau = plateau_kernel(21, 3.0, beta=2.0)
    row = plateau[10, 10:]
    assert bool((row[:-1] >= row[1:]).all())  # decreasing away from the centre
    assert row[1] / row[0] > 0.95  # the plateau
    assert row[-1] / row[0] < 0.01


def test_sinc_kernel_is_the_circular_low_pass():
    for cutoff in (math.pi / 2, math.pi / 3):
        k = sinc_kernel(21, cutoff)
        assert float(k.sum()) == pytest.approx(1.0, abs=1e-5)
        assert torch.allclose(k, k.T) and torch.allclose(k, k.flip(0))
        assert torch.allclose(k, k.flip(1))
        assert float(k[10, 13]) == pytest.approx(float(k[13, 10]))
        assert float(k.min()) < 0  # sinc side lobes
        response = torch.fft.fft2(k.double(), s=(128, 128)).abs()
        w = torch.fft.fftfreq(128, dtype=torch.float64) * 2 * math.pi
        radius = torch.sqrt(w[None, :] ** 2 + w[:, None] ** 2)
        # passes below the cutoff (ripple of the 21-tap truncation), stops well above it
        assert float(response[radius < 0.6 * cutoff].min()) > 0.8
        assert float(response[radius < 0.6 * cutoff].max()) < 1.1
        assert float(response[radius > 1.4 * cutoff].max()) < 0.1
    padded = sinc_kernel(9, math.pi / 2, pad_to=21)
    assert padded.shape == (21, 21) and float(padded[:6].abs().sum()) == 0.0
    assert torch.equal(padded[6:15, 6:15], sinc_kernel(9, math.pi / 2))


# --------------------------------------------------------------------------- operators


def test_filter2d_correlates_with_reflect_padding(bikes_hr):
    x = bikes_hr[:, :, :40, :50]
    assert torch.equal(filter2d(x, pulse_kernel(21)), x)
    shift = torch.zeros(5, 5)
    shift[2, 3] = 1.0  # correlation, as cv2.filter2D: out[x] = in[x + 1]
    out = filter2d(x, shift)
    assert torch.equal(out[..., :-1], x[..., 1:])
    assert torch.equal(out[..., -1], x[..., -2])  # reflect padding, edge not repeated
    flat = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(filter2d(flat, gaussian_kernel(21, 3.0)), flat, atol=1e-6)
    stack = torch.stack(
        [
            pad_kernel(gaussian_kernel(7, 1.0), 21),
            pulse_kernel(21),
            shift.new_zeros(21, 21) + 1 / 441,
        ]
    )
    out = filter2d(x, stack)
    assert torch.allclose(out[0], filter2d(x[:1], gaussian_kernel(7, 1.0))[0], atol=1e-6)
    assert torch.equal(out[1], x[1])
    # tiny frames (smaller than the kernel radius) fall back to edge padding
    assert filter2d(x[:, :, :6, :6], gaussian_kernel(21, 2.0)).shape == (3, 3, 6, 6)


def test_resize_sizes_and_crop_to_multiple():
    x = torch.rand(2, 3, 30, 41)
    assert resize(x, scale_factor=0.5, mode="area").shape == (2, 3, 15, 20)
    assert resize(x, scale_factor=1.3, mode="bicubic").shape == (2, 3, 39, 53)
    assert resize(x, size=(7, 9), mode="bilinear").shape == (2, 3, 7, 9)
    assert torch.allclose(resize(x, scale_factor=1.0, mode="bilinear"), x, atol=1e-6)
    with pytest.raises(ValueError, match="nearest"):
        resize(x, size=(7, 9), mode="nearest")
    assert crop_to_multiple(x, 4).shape == (2, 3, 28, 40)


def test_gaussian_noise_has_sigma_over_255_and_gray_noise_is_shared_by_channels():
    grey = torch.full((4, 3, 64, 64), 0.5)
    for sigma in (3.0, 15.0):
        noise = add_gaussian_noise(grey, sigma, _gen(), clip=False) - grey
        assert float(noise.std()) == pytest.approx(sigma / 255, rel=0.03)
        assert abs(float(noise.mean())) < 0.1 * sigma / 255
        assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[:, 0], noise[:, 1])
    gray = add_gaussian_noise(grey, 10.0, _gen(), gray=True, clip=False) - grey
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert float(gray.std()) == pytest.approx(10 / 255, rel=0.03)
    shared = add_gaussian_noise(grey, 10.0, _gen(), per_frame=False)
    assert all(torch.equal(shared[0], f) for f in shared)
    clipped = add_gaussian_noise(torch.full((1, 3, 32, 32), 0.99), 30.0, _gen())
    assert float(clipped.max()) == 1.0 and float(clipped.min()) >= 0.0


def test_poisson_noise_variance_is_level_over_vals_times_scale_squared():
    # 256 distinct 8-bit levels -> vals = 256, so Var(noise) = x / 256 * scale^2
    ramp = torch.arange(256).float().div(255).view(1, 1, 1, 256).expand(2, 3, 128, 256)
    stds = []
    for scale in (0.25, 1.0, 2.0):
        noise = add_poisson_noise(ramp, scale, _gen(1), clip=False) - ramp
        column = noise[..., 128]  # pixels at 128/255
        assert float(column.std()) == pytest.approx(math.sqrt(128 / 255 / 256) * scale, rel=0.05)
        assert abs(float(noise.mean())) < 2e-4 * scale
        stds.append(float(noise.std()))
    assert stds[1] / stds[0] == pytest.approx(4.0, rel=0.05)
    assert stds[2] / stds[1] == pytest.approx(2.0, rel=0.05)
    dark = add_poisson_noise(ramp, 1.0, _gen(1), clip=False) - ramp
    assert float(dark[..., 10].std()) < float(dark[..., 240].std())  # shot noise grows with x
    gray = add_poisson_noise(ramp, 1.0, _gen(2), gray=True, clip=False) - ramp
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    shared = add_poisson_noise(ramp, 1.0, _gen(3), per_frame=False)
    assert torch.equal(shared[0], shared[1])


def _blockiness(frames: torch.Tensor) -> float:
    """Mean luma step across 8x8 block boundaries over the mean step inside blocks."""
    y = frames.mean(dim=1)
    dh, dv = (y[..., 1:] - y[..., :-1]).abs(), (y[..., 1:, :] - y[..., :-1, :]).abs()
    on_h = (torch.arange(dh.shape[-1]) + 1) % 8 == 0
    on_v = (torch.arange(dv.shape[-2]) + 1) % 8 == 0
    edge = dh[..., on_h].mean() + dv[..., on_v, :].mean()
    inner = dh[..., ~on_h].mean() + dv[..., ~on_v, :].mean()
    return float(edge / inner)


def test_jpeg_is_real_and_low_quality_is_blocky(bikes_hr):
    low, mid, high = (jpeg(bikes_hr, q) for q in (10, 50, 95))
    assert low.shape == bikes_hr.shape
    assert torch.equal(low, (low * 255).round() / 255)  # decoded 8-bit frames
    assert _blockiness(bikes_hr) < 1.2
    assert _blockiness(low) > 2.0 and _blockiness(low) > _blockiness(high) + 1.0
    errors = [float((y - bikes_hr).pow(2).mean()) for y in (low, mid, high)]
    assert errors[0] > errors[1] > errors[2] > 0


@pytest.mark.parametrize("quality", [10, 50, 95])
def test_pils_jpeg_round_trip_is_torchvisions(bikes_hr, quality):
    """Where torchvision is absent (a GPU node with torch alone) PIL encodes: the same libjpeg
    settings, the same decoded frames."""
    assert torch.equal(jpeg(bikes_hr, quality, "pil"), jpeg(bikes_hr, quality, "torchvision"))
    with pytest.raises(ValueError, match="codec must be"):
        jpeg(bikes_hr, quality, "cv2")


# ---------------------------------------------------------------------------- pipeline


def test_output_is_the_scaled_size_on_the_8bit_grid(bikes_hr):
    deg = VideoDegradation()
    lq, _ = deg(bikes_hr, seed=3)
    assert lq.shape == (3, 3, 32, 32)
    assert torch.equal(lq, (lq * 255).round() / 255)
    assert 0.0 <= float(lq.min()) and float(lq.max()) <= 1.0
    odd, _ = deg(bikes_hr[:, :, :70, :90], seed=3)
    assert odd.shape == (3, 3, 17, 22)  # H // scale, W // scale
    assert VideoDegradation(scale=2)(bikes_hr, seed=3)[0].shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match="T, 3, H, W"):
        deg(bikes_hr[0], seed=0)


def test_same_seed_same_output_and_different_seed_differs(bikes_hr):
    deg = VideoDegradation()
    a, draw_a = deg(bikes_hr, seed=11, per_frame_noise=True)
    b, draw_b = deg(bikes_hr, seed=11, per_frame_noise=True)
    c, draw_c = deg(bikes_hr, seed=12, per_frame_noise=True)
    assert torch.equal(a, b) and draw_a.describe() == draw_b.describe()
    assert torch.equal(draw_a.kernel1, draw_b.kernel1)
    assert not torch.equal(a, c) and draw_a.describe() != draw_c.describe()
    # the draw alone is deterministic too, and apply with a fresh generator repeats the noise
    assert VideoDegradation().sample(_gen(5)).describe() == deg.sample(_gen(5)).describe()
    assert torch.equal(deg.apply(bikes_hr, draw_a, _gen(1)), deg.apply(bikes_hr, draw_a, _gen(1)))


def test_identical_frames_give_identical_lq_frames(bikes_hr):
    deg = VideoDegradation()
    still = _still(bikes_hr[0])
    kinds = set()
    for seed in range(6):
        lq, draw = deg(still, seed=seed)
        kinds |= {draw.noise1.kind, draw.noise2.kind}
        assert all(torch.equal(lq[0], frame) for frame in lq), seed
    assert kinds == {"gaussian", "poisson"}


def test_per_frame_noise_changes_only_the_noise(bikes_hr):
    deg = VideoDegradation()
    still = _still(bikes_hr[0], t=4)
    draw = deg.sample(_gen(7))
    noisy = deg.apply(still, draw, _gen(8), per_frame_noise=True)
    assert not torch.equal(noisy[0], noisy[1])
    silent = dataclasses.replace(
        draw,
        noise1=dataclasses.replace(draw.noise1, level=0.0),
        noise2=dataclasses.replace(draw.noise2, level=0.0),
    )
    # with the noise switched off, per-frame sampling changes nothing: all else is shared
    clean = deg.apply(still, silent, _gen(8), per_frame_noise=True)
    assert all(torch.equal(clean[0], frame) for frame in clean)
    assert torch.equal(clean, deg.apply(still, silent, _gen(9), per_frame_noise=False))
    # and the noisy frames scatter around the clean one (zero-mean noise, same blur/resize)
    assert float((noisy - clean).mean(dim=(1, 2, 3)).abs().max()) < 3 / 255
    assert float((noisy - clean).abs().mean()) < 0.1


def test_clip_draws_follow_the_configured_probabilities():
    deg = VideoDegradation()
    c = deg.config
    draws = [deg.sample(_gen(seed)) for seed in range(1500)]
    json.dumps([d.describe() for d in draws[:50]])
    for d in draws:
        assert d.kernel1.shape == d.kernel2.shape == d.sinc_kernel.shape == (21, 21)
        for blur in (d.blur1, d.blur2):
            assert blur.size % 2 == 1 and 7 <= blur.size <= 21
        assert c.jpeg_range[0] <= d.jpeg1 <= c.jpeg_range[1]
        assert c.jpeg_range2[0] <= d.jpeg2 <= c.jpeg_range2[1]
        if d.blur1.kind not in ("sinc",):
            assert c.blur_sigma[0] <= d.blur1.sigma_x <= c.blur_sigma[1]
        if d.blur1.kind == "sinc":
            low = math.pi / 3 if d.blur1.size < 13 else math.pi / 5
            assert low <= d.blur1.omega_c <= math.pi
        if d.blur1.kind.startswith("plateau"):
            assert c.betap_range[0] <= d.blur1.beta <= c.betap_range[1]
        if d.resize1.direction == "down":
            assert c.resize_range[0] <= d.resize1.factor <= 1
        if d.noise1.kind == "gaussian":
            assert c.noise_range[0] <= d.noise1.level <= c.noise_range[1]
        else:
            assert c.poisson_scale_range[0] <= d.noise1.level <= c.poisson_scale_range[1]

    def share(pred) -> float:
        return sum(map(pred, draws)) / len(draws)

    assert share(lambda d: d.blur1.kind == "sinc") == pytest.approx(c.sinc_prob, abs=0.025)
    assert share(lambda d: d.blur1.kind == "iso") == pytest.approx(0.9 * 0.45, abs=0.04)
    assert share(lambda d: d.final_sinc.kind == "sinc") == pytest.approx(0.8, abs=0.03)
    assert share(lambda d: d.resize1.direction == "down") == pytest.approx(0.7, abs=0.04)
    assert share(lambda d: d.resize2.direction == "keep") == pytest.approx(0.3, abs=0.04)
    assert share(lambda d: d.noise1.kind == "gaussian") == pytest.approx(0.5, abs=0.04)
    assert share(lambda d: d.noise2.gray) == pytest.approx(0.4, abs=0.04)
    assert share(lambda d: d.second_blur) == pytest.approx(0.5, abs=0.04)
    assert share(lambda d: d.sinc_then_jpeg) == pytest.approx(0.5, abs=0.04)
    assert {d.blur1.kind for d in draws} == set(KERNEL_TYPES) | {"sinc"}
    assert {d.final_mode for d in draws} == {"area", "bilinear", "bicubic"}


def test_every_branch_runs_on_a_small_real_clip(bikes_lq):
    deg = VideoDegradation()
    for seed in range(40):
        lq, draw = deg(bikes_lq[:2], seed=seed, per_frame_noise=seed % 2 == 1)
        assert lq.shape == (2, 3, 12, 16), draw.describe()
        assert torch.isfinite(lq).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_deterministically(bikes_hr):
    deg = VideoDegradation()
    still = _still(bikes_hr[0]).cuda()
    for seed in range(6):
        a, draw = deg(still, seed=seed)
        b, _ = deg(still, seed=seed)
        assert a.is_cuda and a.shape == (3, 3, 32, 32) and torch.equal(a, b)
        assert all(torch.equal(a[0], frame) for frame in a)
        cpu = deg.apply(still.cpu(), draw, _gen(seed))
        # same draw, other device: only the noise sample (and float rounding) differ
        assert float((a.cpu() - cpu).mean(dim=(1, 2, 3)).abs().max()) < 3 / 255
