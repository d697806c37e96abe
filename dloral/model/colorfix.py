"""Colour correction of the restored frame towards the (upsampled) LQ input, as the reference.

`adain`: per-channel mean/std of the output matched to the input's (unbiased variance, eps 1e-5).
`wavelet`: keep the output's high frequencies (5-level dilated 3x3 blur pyramid) and take the
low frequencies from the input. Inputs/outputs: (N, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dloral.model.config import COLOR_FIXES


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]


def adain_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    t_mean, t_std = _mean_std(target)
    s_mean, s_std = _mean_std(source)
    return ((target - t_mean) / t_std * s_std + s_mean).clamp(0, 1)


@functools.lru_cache(maxsize=16)
def _blur_kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 3x3 binomial kernel, made once per dtype and device (building it from a Python list
    for every call copies it to the device each time: on CUDA a sync)."""
    return torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=dtype, device=device) / 16


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    k = _blur_kernel(x.dtype, x.device).expand(x.shape[1], 1, 3, 3)
    x = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(x, k, groups=x.shape[1], dilation=radius)


def _wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (high frequencies, low frequencies); high + low == x."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2**i)
        high += x - low
        x = low
    return high, x


def wavelet_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    high, _ = _wavelet_split(target)
    _, low = _wavelet_split(source)
    return (high + low).clamp(0, 1)


def color_fix(target: torch.Tensor, source: torch.Tensor, method: str) -> torch.Tensor:
    if method == "adain":
        return adain_color_fix(target, source)
    if method == "wavelet":
        return wavelet_color_fix(target, source)
    if method == "none":
        return target
    raise ValueError(f"color fix must be one of {COLOR_FIXES}; got {method!r}")
