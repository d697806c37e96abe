import pytest
import torch
from conftest import read_clip
from torch import Tensor
from torch.nn import functional as F

from dloral.model.colorfix import _wavelet_split, adain_color_fix, color_fix, wavelet_color_fix


def test_adain_takes_source_statistics():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 32, 32, generator=g) * 0.3 + 0.1
    source = torch.rand(1, 3, 32, 32, generator=g) * 0.5 + 0.3
    out = adain_color_fix(target, source)
    assert torch.allclose(out.flatten(2).mean(-1), source.flatten(2).mean(-1), atol=1e-5)
    assert torch.allclose(out.flatten(2).std(-1), source.flatten(2).std(-1), atol=1e-3)
    # structure is the target's: correlation with target stays 1 per channel
    a = (out - out.mean()).flatten()
    b = (target - target.mean()).flatten()
    assert torch.corrcoef(torch.stack([a[:1024], b[:1024]]))[0, 1] > 0.999


def test_wavelet_split_is_exact_and_fix_moves_low_frequencies():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 48, 48, generator=g)
    high, low = _wavelet_split(x)
    assert torch.allclose(high + low, x, atol=1e-6)
    # a colour cast is a low-frequency change: the fix removes it
    cast = (x * 0.8 + torch.tensor([0.15, 0.0, -0.05]).view(1, 3, 1, 1)).clamp(0, 1)
    fixed = wavelet_color_fix(cast, x)
    assert (fixed - x).abs().mean() < 0.5 * (cast - x).abs().mean()


# ----- a literal transcription of the reference's colour fixes: src/my_utils/wavelet_color_fix.py
# (yjsunnn/DLoRAL 40c1308; itself from pkuliyi2015/sd-webui-stablesr). Its PIL wrappers
# adain_color_fix / wavelet_color_fix (ToTensor, the function below, .clamp_(0.0, 1.0), ToPILImage)
# are not transcribed: the tests compare at the tensor level, with the wrappers' clamp.
def calc_mean_std(feat: Tensor, eps=1e-5):
    size = feat.size()
    assert len(size) == 4, "The input feature should be 4D tensor."
    b, c = size[:2]
    feat_var = feat.reshape(b, c, -1).var(dim=2) + eps
    feat_std = feat_var.sqrt().reshape(b, c, 1, 1)
    feat_mean = feat.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1)
    return feat_mean, feat_std


def adaptive_instance_normalization(content_feat: Tensor, style_feat: Tensor):
    size = content_feat.size()
    style_mean, style_std = calc_mean_std(style_feat)
    content_mean, content_std = calc_mean_std(content_feat)
    normalized_feat = (content_feat - content_mean.expand(size)) / content_std.expand(size)
    return normalized_feat * style_std.expand(size) + style_mean.expand(size)


def wavelet_blur(image: Tensor, radius: int):
    # input shape: (1, 3, H, W)
    # convolution kernel
    kernel_vals = [
        [0.0625, 0.125, 0.0625],
        [0.125, 0.25, 0.125],
        [0.0625, 0.125, 0.0625],
    ]
    kernel = torch.tensor(kernel_vals, dtype=image.dtype, device=image.device)
    # add channel dimensions to the kernel to make it a 4D tensor
    kernel = kernel[None, None]
    # repeat the kernel across all input channels
    kernel = kernel.repeat(3, 1, 1, 1)
    image = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    # apply convolution
    output = F.conv2d(image, kernel, groups=3, dilation=radius)
    return output


def wavelet_decomposition(image: Tensor, levels=5):
    high_freq = torch.zeros_like(image)
    for i in range(levels):
        radius = 2**i
        low_freq = wavelet_blur(image, radius)
        high_freq += image - low_freq
        image = low_freq

    return high_freq, low_freq


def wavelet_reconstruction(content_feat: Tensor, style_feat: Tensor):
    # calculate the wavelet decomposition of the content feature
    content_high_freq, content_low_freq = wavelet_decomposition(content_feat)
    del content_low_freq
    # calculate the wavelet decomposition of the style feature
    style_high_freq, style_low_freq = wavelet_decomposition(style_feat)
    del style_high_freq
    # reconstruct the content feature with the style's high frequency
    return content_high_freq + style_low_freq


REFERENCE_FIX = {"adain": adaptive_instance_normalization, "wavelet": wavelet_reconstruction}


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_color_fix_is_the_reference_function_on_real_frames(method, bikes_path):
    """color_fix(target, source, method) == the reference's tensor function, clamped to [0, 1]
    as its PIL wrapper does (the wrapper's uint8 round trip is not compared), within 1e-6
    (measured: 0.0 for both). Real frames: the target is a real 192x256 bikes crop off in tone
    and colour (gamma 2 and a colour cast, as a restored frame can be), the source its LQ
    (x4 area-downscaled) bicubically upsampled back; one image per call, as the wrapper passes
    it. The fix moves the frame, and some of the reference's values leave [0, 1] (the clamp is
    compared too)."""
    hr = read_clip(bikes_path, 2, (40, 200, 192, 256), (192, 256))
    lq = F.interpolate(hr, scale_factor=0.25, mode="area")
    source = F.interpolate(lq, size=(192, 256), mode="bicubic", align_corners=False).clamp(0, 1)
    cast = torch.tensor([0.08, -0.03, 0.05]).view(1, 3, 1, 1)
    target = (hr**2 + cast).clamp(0, 1)
    for t, s in zip(target, source, strict=True):
        t, s = t[None], s[None]
        raw = REFERENCE_FIX[method](t, s)
        assert ((raw < 0) | (raw > 1)).float().mean() > 0.01
        want = raw.clamp_(0.0, 1.0)
        assert (want - t).abs().mean() > 0.05
        torch.testing.assert_close(color_fix(t, s, method), want, atol=1e-6, rtol=0)
