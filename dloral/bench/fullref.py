"""PSNR and SSIM as VSR papers report them: BasicSR's `calculate_psnr` / `calculate_ssim`.

Convention (BasicSR `basicsr/metrics/psnr_ssim.py`, `basicsr/utils/color_util.py`): frames are
quantised to uint8 as `tensor2img` does (clamp to [0, 1], x*255 in float32, round half to even),
`crop_border` pixels are dropped on each side, Y is ITU-R BT.601 luma in [16, 235] computed in
BasicSR's order of float32/float64 steps (not rounded), and everything else runs in float64.
SSIM is Wang et al.'s with an 11x11 Gaussian window (sigma 1.5) filtered by `cv2.filter2D`, kept
on its 'valid' region, averaged over the map and then over channels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from dloral.bench.registry import MetricInfo
from dloral.data.frames import to_uint8

__all__ = ["FULLREF_METRICS", "FullRefMetric", "fullref_metric", "psnr", "rgb_to_y", "ssim"]

FULLREF_METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")

# BT.601 luma of [0, 255] RGB into [16, 235] (BasicSR's rgb2ycbcr, y_only=True).
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2
_SSIM_WINDOW = 11  # 'valid' region drops 5 pixels on each side
_SSIM_SIGMA = 1.5


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

    return one(out), one(gt)


def psnr(
    out: torch.Tensor, gt: torch.Tensor, crop_border: int = 0, y_channel: bool = False
) -> torch.Tensor:
    """Per-frame PSNR in dB, (T,) float64 ((1,) for one (3, H, W) frame); inf for equal frames."""
    a, b = _prepare(out, gt, crop_border, y_channel)
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    value = 10.0 * torch.log10(255.0**2 / mse)
    return torch.where(mse == 0, torch.full_like(mse, float("inf")), value)


def _ssim_frame(a: np.ndarray, b: np.ndarray, window: np.ndarray) -> float:
    """SSIM of one (H, W, C) float64 frame pair on the [0, 255] scale, averaged over channels."""
    m = _SSIM_WINDOW // 2

    def blur(x: np.ndarray) -> np.ndarray:
        y = cv2.filter2D(x, -1, window)[m:-m, m:-m]
        return y if y.ndim == 3 else y[..., None]

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + _SSIM_C1) * (2 * cov + _SSIM_C2)) / (
        (mu_a**2 + mu_b**2 + _SSIM_C1) * (var_a + var_b + _SSIM_C2)
    )
    return float(ssim_map.mean(axis=(0, 1)).mean())


def ssim(
    out: torch.Tensor, gt: torch.Tensor, crop_border: int = 0, y_channel: bool = False
) -> torch.Tensor:
    """Per-frame SSIM, (T,) float64 ((1,) for one (3, H, W) frame); needs 11x11 after the crop."""
    a, b = _prepare(out, gt, crop_border, y_channel)
    if min(a.shape[-2:]) < _SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least 11x11 after cropping, got {a.shape[-2:]}")
    kernel = cv2.getGaussianKernel(_SSIM_WINDOW, _SSIM_SIGMA)
    window = np.outer(kernel, kernel.T)
    a_np = a.permute(0, 2, 3, 1).contiguous().numpy()
    b_np = b.permute(0, 2, 3, 1).contiguous().numpy()
    values = [_ssim_frame(x, y, window) for x, y in zip(a_np, b_np, strict=True)]
    return torch.tensor(values, dtype=torch.float64)


@dataclass(frozen=True)
class FullRefMetric:
    """A full-reference metric with its MetricInfo; call as metric(out, gt) -> (T,) float64."""

    info: MetricInfo
    crop_border: int
    y_channel: bool
    fn: Callable[..., torch.Tensor]

    def __call__(self, out: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        return self.fn(out, gt, crop_border=self.crop_border, y_channel=self.y_channel)


def fullref_metric(name: str, crop_border: int = 0) -> FullRefMetric:
    """`psnr`, `ssim` (RGB) or `psnr_y`, `ssim_y` (BT.601 Y), BasicSR convention, given crop."""
    if name not in FULLREF_METRICS:
        raise KeyError(
            f"unknown full-reference metric {name!r}; known: {', '.join(FULLREF_METRICS)}"
        )
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    y_channel = name.endswith("_y")
    channel = "Y (BT.601, 16-235)" if y_channel else "RGB"
    info = MetricInfo(
        name=name,
        higher_is_better=True,
        kind="full_reference",
        level="frame",
        implementation=(
            f"dloral.bench.fullref (BasicSR): {channel}, uint8, crop {crop_border}, float64"
        ),
    )
    fn = psnr if name.startswith("psnr") else ssim
    return FullRefMetric(info=info, crop_border=crop_border, y_channel=y_channel, fn=fn)
