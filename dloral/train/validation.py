"""Quick validation metrics for training runs: PSNR, SSIM and a warping-free temporal score.

These are for watching a run, not for papers: the benchmark harness (dloral.bench) carries the
reference-checked metric set. Conventions here: RGB in [0, 1], no border crop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """PSNR in dB over (..., 3, H, W) in [0, 1]; inf for identical inputs."""
    mse = F.mse_loss(pred.float(), gt.float()).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """SSIM (Wang et al. 2004: 11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03), mean over channels."""
    x, y = pred.float().reshape(-1, 1, *pred.shape[-2:]), gt.float().reshape(-1, 1, *gt.shape[-2:])
    taps = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    taps = taps / taps.sum()
    win = torch.outer(taps, taps)[None, None].to(x)

    def blur(t):
        return F.conv2d(t, win)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean().item()


def temporal_change_error(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean |(pred_t - pred_t-1) - (gt_t - gt_t-1)| over a clip (T, 3, H, W): flicker that the
    ground truth does not have. No motion compensation (the benchmark's E*warp has it)."""
    if pred.shape[0] < 2:
        return 0.0
    return (pred.diff(dim=0) - gt.diff(dim=0)).abs().mean().item()
