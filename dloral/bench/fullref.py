"""PSNR and SSIM as VSR papers report them: BasicSR's `calculate_psnr` / `calculate_ssim`.

Convention (BasicSR `basicsr/metrics/psnr_ssim.py`, `basicsr/utils/color_util.py`): frames are
quantised to uint8 as `tensor2img` does (clamp to [0, 1], x*255 in float32, round half to even),
`crop_border` pixels are dropped on each side, Y is ITU-R BT.601 luma in [16, 235] computed in
BasicSR's order of float32/float64 steps (not rounded), and everything else runs in float64.
PSNR and SSIM themselves are dloral.quality's (SSIM: Wang et al.'s 11x11 Gaussian window, sigma
1.5, on the 'valid' region as BasicSR's `cv2.filter2D(...)[5:-5, 5:-5]`, averaged over the map
and then over channels), here with data range 255.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from dloral import quality
from dloral.data.frames import to_uint8

__all__ = ["psnr", "rgb_to_y", "shared_preparation", "ssim"]

# BT.601 luma of [0, 255] RGB into [16, 235] (BasicSR's rgb2ycbcr, y_only=True).
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def rgb_to_y(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> (..., 1, H, W) BT.601 Y in [16/255, 235/255], same dtype.

    As BasicSR's `rgb2ycbcr(img, y_only=True)` on float32 input: the weighted sum of the [0, 1]
    values plus 16 and the division by 255 in float64, then back to the input dtype.
    """
    if rgb.ndim < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb_to_y expects (..., 3, H, W) RGB frames, got {tuple(rgb.shape)}")
    r, g, b = rgb.double().unbind(dim=-3)
    y = r * _Y_WEIGHTS[0] + g * _Y_WEIGHTS[1] + b * _Y_WEIGHTS[2] + 16.0
    return (y / 255.0).to(rgb.dtype).unsqueeze(-3)


def _prepare(
    out: torch.Tensor, gt: torch.Tensor, crop_border: int, y_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both clips as float64 (T, C, H', W') on the [0, 255] scale, quantised, cropped, maybe Y."""
    if out.shape != gt.shape:
        raise ValueError(
            f"out and gt differ in shape: out {tuple(out.shape)}, gt {tuple(gt.shape)}"
        )
    if out.ndim not in (3, 4) or out.shape[-3] != 3:
        raise ValueError(f"expected (T, 3, H, W) or (3, H, W) RGB frames, got {tuple(out.shape)}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    h, w = out.shape[-2:]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"crop_border {crop_border} leaves nothing of {h}x{w} frames")

    def one(clip: torch.Tensor) -> torch.Tensor:
        clip = clip.reshape(-1, *clip.shape[-3:]).detach().float().cpu()
        u8 = torch.from_numpy(np.stack([to_uint8(f) for f in clip])).permute(0, 3, 1, 2)
        if crop_border:
            u8 = u8[..., crop_border:-crop_border, crop_border:-crop_border]
        if not y_channel:
            return u8.double()
        # BasicSR's to_y_channel: uint8 -> float32 / 255 -> Y/255 (float32) -> * 255 (float32).
        return (rgb_to_y(u8.float() / 255.0) * 255.0).double()

    return _reused(out, crop_border, y_channel, one), _reused(gt, crop_border, y_channel, one)


# Within `shared_preparation()`: (id, version, crop, y) of a clip -> (the clip, its prepared form).
_SHARED: dict[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None


@contextmanager
def shared_preparation() -> Iterator[None]:
    """Inside this block a clip is quantised (and cropped, maybe turned into Y) once, however
    many of psnr/ssim/psnr_y/ssim_y score it: the benchmark scores one clip's output with all of
    them. The values are the same as without it (the same function of the same tensor); a clip
    changed in place in between is prepared again (its version counter differs)."""
    global _SHARED
    outer = _SHARED
    _SHARED = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED = outer


def _reused(clip: torch.Tensor, crop_border: int, y_channel: bool, prepare) -> torch.Tensor:
    if _SHARED is None:
        return prepare(clip)
    key = (id(clip), clip._version, crop_border, y_channel)
    if key not in _SHARED:  # the entry keeps the clip alive, so its id is not reused meanwhile
        _SHARED[key] = (clip, prepare(clip))
    return _SHARED[key][1]


def psnr(
    out: torch.Tensor, gt: torch.Tensor, crop_border: int = 0, y_channel: bool = False
) -> torch.Tensor:
    """Per-frame PSNR in dB, (T,) float64 ((1,) for one (3, H, W) frame); inf for equal frames."""
    a, b = _prepare(out, gt, crop_border, y_channel)
    return quality.psnr(a, b, data_range=255.0, dim=(1, 2, 3))


def ssim(
    out: torch.Tensor, gt: torch.Tensor, crop_border: int = 0, y_channel: bool = False
) -> torch.Tensor:
    """Per-frame SSIM, (T,) float64 ((1,) for one (3, H, W) frame); needs 11x11 after the crop."""
    a, b = _prepare(out, gt, crop_border, y_channel)
    if min(a.shape[-2:]) < quality.SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least 11x11 after cropping, got {a.shape[-2:]}")
    return quality.ssim(a, b, data_range=255.0)
