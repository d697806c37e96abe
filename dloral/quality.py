"""PSNR and SSIM, the one implementation behind training validation and the benchmark.

Each caller keeps its own convention around this core: training validation scores float frames
in [0, 1] as they are (`data_range=1`); the benchmark (dloral.bench.fullref) first quantises to
uint8 as BasicSR does, crops borders, maybe takes BT.601 Y, and scores in float64 on the
[0, 255] scale (`data_range=255`). SSIM is Wang et al. 2004: an 11x11 Gaussian window (sigma
1.5, the taps of OpenCV's `getGaussianKernel`), K1 = 0.01, K2 = 0.03, the map kept on its
'valid' region (no padding), as BasicSR's `cv2.filter2D(...)[5:-5, 5:-5]`.
"""

from __future__ import annotations

import torch

__all__ = ["SSIM_WINDOW", "gaussian_taps", "psnr", "ssim"]

SSIM_WINDOW = 11  # the 'valid' map drops SSIM_WINDOW // 2 pixels on each side
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(
    a: torch.Tensor, b: torch.Tensor, data_range: float, dim: tuple[int, ...] | None = None
) -> torch.Tensor:
    """10 log10(data_range^2 / MSE) in dB, float64; the MSE is taken in the inputs' dtype over
    `dim` (every element when None); inf where the inputs are equal."""
    sq = (a - b).square()
    mse = (sq.mean() if dim is None else sq.mean(dim=dim)).double()
    value = 10.0 * torch.log10(data_range**2 / mse)
    return torch.where(mse == 0, torch.full_like(mse, float("inf")), value)


def gaussian_taps(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """(size,) float64 Gaussian taps summing to 1 (OpenCV's getGaussianKernel for sigma > 0)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(x**2) / (2 * sigma**2))
    return taps / taps.sum()


def _blur(x: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """x (..., H, W) filtered by the separable window outer(taps, taps), 'valid' region only.
    Shifted multiply-adds: about as fast as cv2.filter2D in float64, on any device and dtype."""
    n = len(taps)
    h, w = x.shape[-2] - n + 1, x.shape[-1] - n + 1
    rows = x[..., 0:h, :] * taps[0]
    for i in range(1, n):
        rows.add_(x[..., i : i + h, :], alpha=taps[i])
    out = rows[..., 0:w] * taps[0]
    for i in range(1, n):
        out.add_(rows[..., i : i + w], alpha=taps[i])
    return out


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Per-image SSIM of (N, C, H, W) a and b (H, W >= 11), (N,) in their dtype: the map's mean
    over its valid region, then over channels. Images are scored one at a time (memory, cache)."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim expects two (N, C, H, W) tensors, got {a.shape} and {b.shape}")
    taps = gaussian_taps().tolist()
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2

    def one(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu_x, mu_y = _blur(x, taps), _blur(y, taps)
        mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
        var_x = _blur(x * x, taps).sub_(mu_xx)
        var_y = _blur(y * y, taps).sub_(mu_yy)
        cov = _blur(x * y, taps).sub_(mu_xy)
        num = (2 * mu_xy + c1).mul_(2 * cov + c2)
        den = (mu_xx + mu_yy + c1).mul_(var_x.add_(var_y).add_(c2))
        return num.div_(den).mean(dim=(1, 2)).mean()

    return torch.stack([one(x, y) for x, y in zip(a, b, strict=True)])
