"""Resizing: PIL's bicubic kernel, and the two classic VSR downsamplings (BI and BD).

- `resize_bicubic`: PIL bicubic (a = -0.5, antialiased when shrinking), run on float32 channels
  (PIL mode "F") so nothing is quantised on the way. The reference upsamples LQ frames with it,
  and shrinking with it is the usual stand-in for MATLAB's `imresize` (BI degradation).
  `kernel="lanczos"` is PIL's LANCZOS instead (the reference's resize to a multiple of 8).
- `resize_frames` runs PIL itself on CPU tensors; on other devices (CUDA) it runs the same
  resampling as two matrix products on the device (`pil_weights`: PIL's `precompute_coeffs`, the
  separable, border-renormalised taps), so frames do not travel to the host and back.
- `bd_downsample`: the BD degradation of VSR benchmarks (DUF / BasicSR `duf_downsample`): a 13x13
  Gaussian with sigma = 0.4 * scale, reflect padding, then every scale-th pixel from (0, 0).
"""

from __future__ import annotations

import functools
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


def _bicubic_filter(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic_filter (a = -0.5, support 2)."""
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _lanczos_filter(x: np.ndarray) -> np.ndarray:
    """PIL's lanczos_filter: sinc(x) sinc(x / 3) on [-3, 3)."""
    return np.where((x >= -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3), 0.0)


FILTERS = {"bicubic": (2.0, _bicubic_filter), "lanczos": (3.0, _lanczos_filter)}


@functools.lru_cache(maxsize=64)
def pil_weights(in_size: int, out_size: int, kernel: str = "bicubic") -> np.ndarray:
    """(out_size, in_size) float64: row i holds the taps PIL's precompute_coeffs gives output
    pixel i (support widened by the factor when shrinking: antialiasing; taps cut at the borders
    and renormalised to sum 1)."""
    if kernel not in FILTERS:
        raise ValueError(f"kernel must be one of {', '.join(FILTERS)}; got {kernel!r}")
    base, filt = FILTERS[kernel]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base * filterscale
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # C's (int) truncates, as Python's int()
        hi = min(int(center + support + 0.5), in_size)
        taps = filt((np.arange(lo, hi) - center + 0.5) / filterscale)
        total = taps.sum()
        weights[i, lo:hi] = taps / total if total != 0.0 else taps
    return weights


def _resize_matmul(frames: torch.Tensor, size: tuple[int, int], kernel: str) -> torch.Tensor:
    """PIL's two passes (horizontal, then vertical, float32 in between) as matrix products on
    the frames' device."""
    dtype = torch.float64 if frames.dtype == torch.float64 else torch.float32
    x = frames.to(dtype, copy=True)  # clamped in place by the caller
    h, w = size
    if x.shape[-1] != w:
        x = x @ _device_weights(x.shape[-1], w, kernel, dtype, x.device).T
    if x.shape[-2] != h:
        x = _device_weights(x.shape[-2], h, kernel, dtype, x.device) @ x
    return x


@functools.lru_cache(maxsize=64)
def _device_weights(
    in_size: int, out_size: int, kernel: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """pil_weights on `device`, copied there once, not for every batch (on CUDA a copy from
    host memory is a sync)."""
    return torch.from_numpy(pil_weights(in_size, out_size, kernel)).to(device, dtype)


def resize_frames(
    frames: torch.Tensor, size: tuple[int, int], kernel: str = "bicubic", backend: str = "auto"
) -> torch.Tensor:
    """(..., C, H, W) -> (..., C, size[0], size[1]) by PIL bicubic (or `kernel`) per frame,
    clipped to [0, 1] (what a uint8 image would hold: bicubic and lanczos overshoot).

    backend `pil`: PIL on the host (the reference's own resize); `torch`: the same taps as
    matrix products on the frames' device; `auto`: PIL for CPU tensors, torch elsewhere."""
    if backend == "auto":
        backend = "pil" if frames.device.type == "cpu" else "torch"
    if backend == "torch":
        return _resize_matmul(frames, size, kernel).clamp_(0, 1)
    if backend != "pil":
        raise ValueError(f"backend must be auto, pil or torch; got {backend!r}")
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
