"""Quick validation metrics for training runs: PSNR, SSIM and a warping-free temporal score.

These are for watching a run, not for papers: the benchmark harness (dloral.bench) carries the
reference-checked metric set. Conventions here: RGB in [0, 1], no border crop.
"""

from __future__ import annotations

import torch

from dloral import quality


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """PSNR in dB over (..., 3, H, W) in [0, 1] (float32); inf for identical inputs."""
    return float(quality.psnr(pred.float(), gt.float(), data_range=1.0))


def ssim(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """SSIM (dloral.quality: Wang et al. 2004, 11x11 Gaussian, sigma 1.5) of (..., 3, H, W) in
    [0, 1] in float32, each channel of each frame scored alone, then averaged."""
    h, w = pred.shape[-2:]
    x, y = pred.float().reshape(-1, 1, h, w), gt.float().reshape(-1, 1, h, w)
    return float(quality.ssim(x, y, data_range=1.0).mean())


def temporal_change_error(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean |(pred_t - pred_t-1) - (gt_t - gt_t-1)| over a clip (T, 3, H, W): flicker that the
    ground truth does not have. No motion compensation (the benchmark's E*warp has it)."""
    if pred.shape[0] < 2:
        return 0.0
    return (pred.diff(dim=0) - gt.diff(dim=0)).abs().mean().item()
