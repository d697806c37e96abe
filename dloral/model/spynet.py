"""SPyNet optical flow and backward warping, as used by DLoRAL's Cross-Frame Retrieval.

Parameter names follow the mmagic/BasicVSR layout (`basic_module.{level}.basic_module.{i}.conv`)
so that the official DLoRAL checkpoint's `spynet.*` tensors load without renaming.

Pretrained weights: BasicVSR's `spynet_20210409-c6c1bd09.pth` (found by
`dloral.weights.locate_spynet`), loaded by `load_spynet_file`. `spynet_state` maps a SPyNet state
dict onto this module for that file and for the official checkpoint's `spynet.` keys alike.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

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
        # per channel by Python floats: no small tensor copied to the device (a sync on CUDA)
        return torch.cat((flow[:, :1] * (w / w_up), flow[:, 1:] * (h / h_up)), dim=1)


# ----- pretrained weights --------------------------------------------------------------------
# mmedit/BasicVSR (the file the reference loads, and the official checkpoint's `spynet.` keys):
ZERO_FLOW = "zero-flow"  # provenance of a SPyNet set by `zero_flow`
SPYNET_UNUSED = "unused (cfr off)"  # SPyNet of an inference model whose CFR is off


def zero_flow(spynet: SPyNet) -> None:
    """Zero the last conv of every level: each level adds no flow, so SPyNet returns zero
    motion for any pair (the tiny profile's SPyNet without BasicVSR weights)."""
    with torch.no_grad():
        for level in spynet.basic_module:
            last = level.basic_module[-1].conv
            last.weight.zero_()
            last.bias.zero_()


# ConvModule(conv + activate) per layer: basic_module.L.basic_module.I.conv.{weight,bias}.
_MMEDIT_KEY = re.compile(r"basic_module\.([0-5])\.basic_module\.([0-4])\.conv\.(weight|bias)")
# BasicSR (basicsr/archs/spynet_arch.py): Conv2d and ReLU alternate in one Sequential, so conv I
# is entry 2I: basic_module.L.basic_module.{0,2,4,6,8}.{weight,bias}.
_BASICSR_KEY = re.compile(r"basic_module\.([0-5])\.basic_module\.([02468])\.(weight|bias)")
SPYNET_LAYOUT = "basic_module.L.basic_module.I.conv.{weight,bias} (BasicVSR/mmedit, L 0-5, I 0-4)"


class SpynetWeightsError(ValueError):
    """A SPyNet weight file that does not fit this module; the message names the file and keys."""


def spynet_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A SPyNet state dict (BasicVSR/mmedit layout, or BasicSR's) in this module's names.

    `module.` prefixes (DataParallel) are dropped, `mean`/`std` pass through. Returns (the mapped
    tensors, the keys that have no place here)."""
    mapped: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        name = key.removeprefix("module.")
        if m := _MMEDIT_KEY.fullmatch(name):
            level, layer, kind = m.groups()
        elif m := _BASICSR_KEY.fullmatch(name):
            level, kind = m.group(1), m.group(3)
            layer = str(int(m.group(2)) // 2)
        elif name in ("mean", "std"):
            mapped[name] = tensor
            continue
        else:
            unmapped.append(key)
            continue
        mapped[f"basic_module.{level}.basic_module.{layer}.conv.{kind}"] = tensor
    return mapped, unmapped


def _keys_list(keys: list[str], limit: int = 6) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_spynet_file(spynet: SPyNet, path: str | os.PathLike) -> None:
    """Load a SPyNet weight file into `spynet`: a state dict, or one under `state_dict`
    (mmengine, BasicVSR's file) or `params`/`params_ema` (BasicSR). Every parameter must be
    provided and every key must map, else SpynetWeightsError names the keys. `mean`/`std` are
    ImageNet constants, kept when the file does not hold them (BasicVSR's file does not)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-weights objects
        raise SpynetWeightsError(f"{path}: not loadable with weights_only=True ({err})") from err
    if not isinstance(obj, Mapping):
        raise SpynetWeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for wrapper in ("state_dict", "params_ema", "params"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    mapped, unexpected = spynet_state(tensors)
    unexpected += [k for k in obj if k not in tensors]
    own = spynet.state_dict()
    missing = [k for k in own if k not in mapped and k not in ("mean", "std")]
    if missing or unexpected:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_keys_list(unexpected)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_keys_list(missing)}")
        raise SpynetWeightsError(
            f"{path}: not a SPyNet state dict in a known layout; {'; '.join(parts)}. "
            f"Expected {SPYNET_LAYOUT}, optionally under 'state_dict' (or BasicSR's "
            "basic_module.L.basic_module.{0,2,4,6,8}.{weight,bias} under 'params')"
        )
    bad = [
        f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
        for k, v in mapped.items()
        if v.shape != own[k].shape
    ]
    if bad:
        raise SpynetWeightsError(f"{path}: shape mismatch for {_keys_list(bad, 3)}")
    spynet.load_state_dict(mapped, strict=False)
