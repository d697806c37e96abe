"""SPyNet optical flow and backward warping, as used by DLoRAL's Cross-Frame Retrieval.

Parameter names follow the mmagic/BasicVSR layout (`basic_module.{level}.basic_module.{i}.conv`)
so that the official DLoRAL checkpoint's `spynet.*` tensors load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def flow_coords(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each pixel p samples from: (x, y) = p + flow[p], each (N, H, W), in pixels."""
    h, w = flow.shape[-2:]
    gy, gx = torch.meshgrid(
        torch.arange(h, device=flow.device, dtype=flow.dtype),
        torch.arange(w, device=flow.device, dtype=flow.dtype),
        indexing="ij",
    )
    return gx + flow[:, 0], gy + flow[:, 1]


def flow_warp(x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Backward-warp x (N, C, H, W) by flow (N, 2, H, W) in pixels (x, y); align_corners=True.

    out[p] = x[p + flow[p]]: with the flow from frame t to frame t-1, this brings t-1 onto t.
    """
    n, _, h, w = x.shape
    if flow.shape[-2:] != (h, w):
        raise ValueError(f"flow size {tuple(flow.shape[-2:])} differs from input size {(h, w)}")
    px, py = flow_coords(flow)
    grid = torch.stack((2.0 * px / max(w - 1, 1) - 1.0, 2.0 * py / max(h - 1, 1) - 1.0), dim=-1)
    return F.grid_sample(
        x, grid.to(x.dtype), mode="bilinear", padding_mode=padding_mode, align_corners=True
    )


class _ConvAct(nn.Module):
    def __init__(self, cin: int, cout: int, act: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 7, 1, 3)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class SPyNetBasicModule(nn.Module):
    """One pyramid level: [ref (3), warped supp (3), flow (2)] -> flow residual (2)."""

    def __init__(self):
        super().__init__()
        widths = [8, 32, 64, 32, 16, 2]
        self.basic_module = nn.Sequential(
            *[_ConvAct(widths[i], widths[i + 1], act=i < 4) for i in range(5)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.basic_module(x)


class SPyNet(nn.Module):
    """Spatial-pyramid flow (Ranjan & Black 2017), six levels, no batch norm."""

    levels = 6

    def __init__(self):
        super().__init__()
        self.basic_module = nn.ModuleList(SPyNetBasicModule() for _ in range(self.levels))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def _pyramid_flow(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        n, _, h, w = ref.shape
        refs = [(ref - self.mean) / self.std]
        supps = [(supp - self.mean) / self.std]
        for _ in range(self.levels - 1):
            refs.append(F.avg_pool2d(refs[-1], 2, 2, count_include_pad=False))
            supps.append(F.avg_pool2d(supps[-1], 2, 2, count_include_pad=False))
        refs, supps = refs[::-1], supps[::-1]
        flow = ref.new_zeros(n, 2, h // 32, w // 32)
        for level in range(self.levels):
            if level > 0:
                flow = (
                    F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=True) * 2.0
                )
            warped = flow_warp(supps[level], flow, padding_mode="border")
            flow = flow + self.basic_module[level](torch.cat([refs[level], warped, flow], 1))
        return flow

    def forward(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        """Flow (N, 2, H, W) from ref to supp: warping supp by it aligns supp onto ref."""
        h, w = ref.shape[-2:]
        h_up, w_up = -(-h // 32) * 32, -(-w // 32) * 32
        size = (h_up, w_up)
        ref_up = F.interpolate(ref, size=size, mode="bilinear", align_corners=False)
        supp_up = F.interpolate(supp, size=size, mode="bilinear", align_corners=False)
        flow = F.interpolate(
            self._pyramid_flow(ref_up, supp_up), size=(h, w), mode="bilinear", align_corners=False
        )
        scale = torch.tensor([w / w_up, h / h_up], device=flow.device, dtype=flow.dtype)
        return flow * scale.view(1, 2, 1, 1)
