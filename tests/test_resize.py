import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dloral.resize import (
    _gaussian_taps,
    bd_downsample,
    bi_downsample,
    pil_weights,
    resize_bicubic,
    resize_frames,
)


def _basicsr_duf_downsample(x, kernel_size=13, scale=4):
    """BasicSR's duf_downsample procedure (pad k//2 + 2*scale, stride-scale conv, crop 2)."""
    t, c, h, w = x.shape
    x = x.reshape(t * c, 1, h, w)
    pad = kernel_size // 2 + scale * 2
    x = F.pad(x, (pad,) * 4, mode="reflect")
    taps = _gaussian_taps(kernel_size, 0.4 * scale).float()
    x = F.conv2d(x, torch.outer(taps, taps)[None, None], stride=scale)[:, :, 2:-2, 2:-2]
    return x.reshape(t, c, x.shape[-2], x.shape[-1])


@pytest.mark.parametrize("size", [(32, 48), (36, 44)])
def test_bd_matches_basicsr_procedure(size, bikes_lq):
    frames = bikes_lq[:2, :, : size[0], : size[1]]
    assert torch.allclose(bd_downsample(frames), _basicsr_duf_downsample(frames), atol=1e-6)


def test_bd_kernel_is_scipy_gaussian_of_a_delta():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    import numpy as np

    delta = np.zeros((13, 13))
    delta[6, 6] = 1
    ref = scipy_ndimage.gaussian_filter(delta, 1.6)
    taps = _gaussian_taps(13, 1.6)
    assert np.allclose(torch.outer(taps, taps).numpy(), ref, atol=1e-12)


def test_bi_downsample_shape_and_constant_preservation():
    flat = torch.full((2, 3, 16, 24), 0.25)
    out = bi_downsample(flat, 4)
    assert out.shape == (2, 3, 4, 6) and torch.allclose(out, torch.full_like(out, 0.25), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the scale"):
        bi_downsample(torch.zeros(1, 3, 10, 12), 4)


def test_resize_bicubic_upsampling_interpolates_linear_ramps_exactly():
    ramp = torch.linspace(0, 1, 16).view(1, 1, 16).expand(3, 16, 16).contiguous()
    up = resize_bicubic(ramp, (64, 64))
    # away from the borders a cubic kernel reproduces a linear function
    d = up[0, 20, 8:56].diff()
    assert torch.allclose(d, d.mean().expand_as(d), atol=1e-4)


@pytest.mark.parametrize(
    ("size", "kernel"),
    [
        ((192, 256), "bicubic"),  # x4 up: the pipeline's LQ upsampling
        ((100, 131), "bicubic"),  # an odd factor
        ((12, 16), "bicubic"),  # x4 down: the antialiased BI shrink
        ((48, 56), "lanczos"),  # the reference's resize to a multiple of 8
        ((30, 90), "lanczos"),  # down one axis, up the other
    ],
)
def test_device_resize_gives_pils_frames(size, kernel, bikes_lq):
    """The matrix-product resampling CUDA frames use gives what PIL gives, on real frames."""
    frames = bikes_lq[:3]
    pil = resize_frames(frames, size, kernel, backend="pil")
    assert torch.allclose(resize_frames(frames, size, kernel, backend="torch"), pil, atol=1e-6)
    # in float64 the taps are PIL's to rounding: nearer still
    exact = resize_frames(frames.double(), size, kernel, backend="torch")
    assert (exact.float() - pil).abs().max() <= 2e-7
    # PIL renormalises the taps cut at a border: a constant frame stays constant
    flat = torch.full((1, 3, 48, 64), 0.7, dtype=torch.float64)
    out = resize_frames(flat, size, kernel, backend="torch")
    assert torch.allclose(out, flat.mean(), atol=1e-12)


def test_device_resize_taps_sum_to_one_and_widen_when_shrinking():
    up, down = pil_weights(48, 192), pil_weights(192, 48)
    assert np.allclose(up.sum(1), 1) and np.allclose(down.sum(1), 1)
    assert (up[96] != 0).sum() == 4  # bicubic's 4 taps
    assert (down[24] != 0).sum() == 16  # support 2 x factor 4 on each side
    with pytest.raises(ValueError, match="kernel must be one of"):
        pil_weights(4, 8, "nearest")
    with pytest.raises(ValueError, match="backend must be"):
        resize_frames(torch.zeros(1, 3, 4, 4), (8, 8), backend="cv2")
