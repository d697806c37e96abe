import torch

from dloral.model.colorfix import _wavelet_split, adain_color_fix, wavelet_color_fix


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
