"""Resizing: PIL's bicubic kernel, and the two classic VSR downsamplings (BI and BD).

- `resize_bicubic`: PIL bicubic (a = -0.5, antialiased when shrinking), run on float32 channels
  (PIL mode "F") so nothing is quantised on the way. The reference upsamples LQ frames with it,
  and shrinking with it is the usual stand-in for MATLAB's `imresize` (BI degradation).
  `kernel="lanczos"` is PIL's LANCZOS instead (the reference's resize to a multiple of 8).
- `bd_downsample`: the BD degradation of VSR benchmarks (DUF / BasicSR `duf_downsample`): a 13x13
  Gaussian with sigma = 0.4 * scale, reflect padding, then every scale-th pixel from (0, 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESAMPLING = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def resize_bicubic(
    frame: torch.Tensor, size: tuple[int, int], kernel: str = "bicubic"
) -> torch.Tensor:
    """frame (C, H, W) float -> (C, size[0], size[1]) float, PIL bicubic (or `kernel`, a key
    of RESAMPLING) per channel."""
    h, w = size
    if tuple(frame.shape[-2:]) == (h, w):
        return frame
    src = frame.detach().float().cpu().numpy()
    out = np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(ch, dtype=np.float32)).resize(
                    (w, h), RESAMPLING[kernel]
                )
            )
            for ch in src
        ]
    )
    return torch.from_numpy(out).to(frame.device)


def resize_frames(
    frames: torch.Tensor, size: tuple[int, int], kernel: str = "bicubic"
) -> torch.Tensor:
    """(..., C, H, W) -> (..., C, size[0], size[1]) by PIL bicubic (or `kernel`) per frame,
    clipped to [0, 1] (what a uint8 image would hold: bicubic and lanczos overshoot)."""
    flat = frames.reshape(-1, *frames.shape[-3:])
    out = torch.stack([resize_bicubic(f, size, kernel) for f in flat]).clamp_(0, 1)
    return out.reshape(*frames.shape[:-2], *size)


def bi_downsample(frames: torch.Tensor, scale: int) -> torch.Tensor:
    """BI: (T, C, H, W) -> (T, C, H/scale, W/scale), antialiased PIL bicubic, clipped to [0, 1]."""
    h, w = frames.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"frame size {w}x{h} is not a multiple of the scale {scale}")
    return resize_frames(frames, (h // scale, w // scale))


def _gaussian_taps(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def bd_downsample(frames: torch.Tensor, scale: int = 4, kernel_size: int = 13) -> torch.Tensor:
    """BD: (T, C, H, W) -> (T, C, ceil(H/scale), ceil(W/scale)), Gaussian blur then decimation."""
    t, c, h, w = frames.shape
    taps = _gaussian_taps(kernel_size, 0.4 * scale).to(frames.dtype)
    kernel = torch.outer(taps, taps).to(frames.device)[None, None]
    pad = kernel_size // 2
    x = F.pad(frames.reshape(t * c, 1, h, w), (pad,) * 4, mode="reflect")
    x = F.conv2d(x, kernel)[..., ::scale, ::scale]
    return x.reshape(t, c, math.ceil(h / scale), math.ceil(w / scale))
