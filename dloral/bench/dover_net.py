"""DOVER's network (Wu et al., ICCV 2023; VQAssessment/DOVER), on plain torch modules.

Two branches, each a backbone and a VQA head, with the official module names, so that the
official `DOVER.pth` loads with no missing or unexpected key (dloral.bench.dover loads it):
- technical: Swin3D-tiny with gated relative position biases ("swin_tiny_grpb" in dover.yml;
  `SwinTransformer3D()` with its defaults, dover/models/swin_backbone.py) on the fragments view;
- aesthetic: ConvNeXt-tiny inflated to 3D ("conv_tiny": `convnext_3d_tiny`,
  dover/models/conv_backbone.py) on the 224x224 resized view;
- heads: `VQAHead(in_channels=768, hidden_channels=64, pre_pool=False)` (dover/models/head.py,
  divide_head in dover.yml): a per-position score map, which the caller averages.
Inference only: dropout, stochastic depth and activation checkpointing (training-time parts of
the official modules, identity at inference) are left out; they hold no weights.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvNeXt3D",
    "DoverNet",
    "SwinTransformer3D",
    "VQAHead",
    "WindowAttention3D",
    "relative_position_index",
]


# ---- technical branch: Swin3D-T with gated relative position bias (swin_backbone.py) -------


def window_partition(x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """(B, D, H, W, C) -> (B * windows, Wd * Wh * Ww, C), windows in (d, h, w) order."""
    b, d, h, w, c = x.shape
    x = x.view(
        b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c
    )
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, math.prod(window), c)


def window_reverse(
    windows: torch.Tensor, window: tuple[int, int, int], b: int, d: int, h: int, w: int
):
    """Inverse of window_partition: (B * windows, Wd, Wh, Ww, C) -> (B, D, H, W, C)."""
    x = windows.view(b, d // window[0], h // window[1], w // window[2], *window, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


def window_and_shift(size, window, shift) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`get_window_size`: a dimension no longer than its window is one window, unshifted."""
    window, shift = list(window), list(shift)
    for i, n in enumerate(size):
        if n <= window[i]:
            window[i], shift[i] = n, 0
    return tuple(window), tuple(shift)


def relative_position_index(window: tuple[int, int, int]) -> torch.Tensor:
    """(N, N) index into the (2Wd-1)(2Wh-1)(2Ww-1) bias table for token pairs of a window."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in window), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    for i, n in enumerate(window):
        rel[:, :, i] += n - 1
    rel[:, :, 0] *= (2 * window[1] - 1) * (2 * window[2] - 1)
    rel[:, :, 1] *= 2 * window[2] - 1
    return rel.sum(-1)


@functools.lru_cache(maxsize=32)
def shift_mask(dp: int, hp: int, wp: int, window, shift, device) -> torch.Tensor:
    """`compute_mask`: (windows, N, N) with -100 between tokens from different regions of a
    cyclically shifted window, 0 within one."""
    regions = torch.zeros((1, dp, hp, wp, 1), device=device)
    count = 0
    for d in (slice(-window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for h in (slice(-window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            for w in (slice(-window[2]), slice(-window[2], -shift[2]), slice(-shift[2], None)):
                regions[:, d, h, w, :] = count
                count += 1
    ids = window_partition(regions, window).squeeze(-1)
    mask = ids.unsqueeze(1) - ids.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


@functools.lru_cache(maxsize=32)
def fragment_distance(dp: int, hp: int, wp: int, window, shift, device) -> torch.Tensor:
    """`global_position_index(...).abs().sum(-1)`: (windows, N, N) float, the L1 distance
    between the fragments of two tokens of a window, fragments being a 1 x Wh x Ww grid laid
    over the (padded, shifted) feature map by nearest interpolation: 0 for tokens of one
    fragment (32x32 pixels at every stage, as the 7x7 fragments of the view)."""
    grid = torch.stack(
        torch.meshgrid(
            torch.arange(1), torch.arange(window[1]), torch.arange(window[2]), indexing="ij"
        )
    ).float()
    coords = F.interpolate(grid[None].to(device), size=(dp, hp, wp)).long().permute(0, 2, 3, 4, 1)
    coords = torch.roll(coords, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    coords = window_partition(coords, window)
    return (coords[:, None, :] - coords[:, :, None]).abs().sum(-1).float()


class WindowAttention3D(nn.Module):
    """Window self-attention with a relative position bias table and, with `frag_bias`, a second
    table for token pairs of the same fragment (DOVER/FAST-VQA's gated relative position bias)."""

    def __init__(self, dim: int, window: tuple[int, int, int], heads: int, frag_bias: bool):
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        table = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table, heads))
        if frag_bias:
            self.fragment_position_bias_table = nn.Parameter(torch.zeros(table, heads))
        else:
            self.fragment_position_bias_table = None
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def _bias(self, table: torch.Tensor, n: int) -> torch.Tensor:
        index = self.relative_position_index[:n, :n]  # as the official code, even for a
        return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)  # shrunk window

    def forward(self, x: torch.Tensor, distance: torch.Tensor, mask: torch.Tensor | None):
        """x (B * windows, N, C); distance (windows, N, N) fragment distances; mask: shift mask."""
        b_, n, c = x.shape
        windows = distance.shape[0]
        qkv = self.qkv(x).reshape(b_, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self._bias(self.relative_position_bias_table, n).unsqueeze(0)  # (1, heads, N, N)
        if self.fragment_position_bias_table is not None:
            # the official gate is the fragment distance itself, not 0/1: the fragment table
            # alone within a fragment, rel * g + frag * (1 - g) across fragments g apart
            gate = distance.unsqueeze(1)
            bias = bias * gate + self._bias(self.fragment_position_bias_table, n) * (1 - gate)
        attn = attn.view(b_ // windows, windows, self.heads, n, n) + bias.unsqueeze(0)
        if mask is not None:
            attn = attn + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.heads, n, n).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock3D(nn.Module):
    """`SwinTransformerBlock3D`: (shifted) window attention and an MLP, pre-norm, residual."""

    def __init__(self, dim: int, heads: int, window, shift, frag_bias: bool):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, window, heads, frag_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def _attention(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        window, shift = window_and_shift((d, h, w), self.window, self.shift)
        x = self.norm1(x)
        pads = [(window[i] - n % window[i]) % window[i] for i, n in enumerate((d, h, w))]
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        _, dp, hp, wp, _ = x.shape
        shifted = any(s > 0 for s in shift)
        if shifted:
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        distance = fragment_distance(dp, hp, wp, window, shift, x.device)
        out = self.attn(window_partition(x, window), distance, mask if shifted else None)
        x = window_reverse(out.view(-1, *window, c), window, b, dp, hp, wp)
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, :d, :h, :w, :]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(x, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 spatial neighbours concatenated (4C), normalised and projected to 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:4]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat(
            [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]],
            -1,
        )
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`BasicLayer`: blocks alternating unshifted and half-window-shifted windows."""

    def __init__(self, dim: int, depth: int, heads: int, window, frag_bias: bool, merge: bool):
        super().__init__()
        self.window = window
        self.shift = tuple(n // 2 for n in window)
        self.blocks = nn.ModuleList(
            SwinBlock3D(dim, heads, window, (0, 0, 0) if i % 2 == 0 else self.shift, frag_bias)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if merge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, C', D, H', W')."""
        d, h, w = x.shape[2:]
        window, shift = window_and_shift((d, h, w), self.window, self.shift)
        padded = [math.ceil(n / window[i]) * window[i] for i, n in enumerate((d, h, w))]
        mask = shift_mask(*padded, window, shift, x.device)
        x = x.permute(0, 2, 3, 4, 1)
        for block in self.blocks:
            x = block(x, mask)
        if self.downsample is not None:
            x = self.downsample(x)
        return x.permute(0, 4, 1, 2, 3)


class PatchEmbed3D(nn.Module):
    """Non-overlapping (2, 4, 4) tubelets -> 96 channels, LayerNorm (input zero-padded up)."""

    def __init__(self, patch=(2, 4, 4), dim: int = 96):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, h, w = x.shape[2:]
        pd, ph, pw = ((-n) % p for n, p in zip((d, h, w), self.patch, strict=True))
        x = F.pad(x, (0, pw, 0, ph, 0, pd))
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class SwinTransformer3D(nn.Module):
    """`SwinTransformer3D()` as DOVER builds it: embed 96, depths 2-2-6-2, heads 3-6-12-24,
    window (8, 7, 7), fragment biases in the first three stages. (B, 3, T, H, W) ->
    (B, 768, T/2, H/32, W/32), LayerNorm'd."""

    def __init__(
        self,
        depths=(2, 2, 6, 2),
        heads=(3, 6, 12, 24),
        window=(8, 7, 7),
        frag_biases=(True, True, True, False),
        dim: int = 96,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed3D(dim=dim)
        self.layers = nn.ModuleList(
            SwinStage(dim * 2**i, depths[i], heads[i], window, frag_biases[i], i < len(depths) - 1)
            for i in range(len(depths))
        )
        self.norm = nn.LayerNorm(dim * 2 ** (len(depths) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


# ---- aesthetic branch: ConvNeXt-T inflated to 3D (conv_backbone.py) ------------------------


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of (B, C, T, H, W) (conv_backbone.LayerNorm, "channels_first")."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps).movedim(-1, 1)


class ConvNeXtBlock3D(nn.Module):
    """`Block3D`: depthwise (t, 7, 7) conv, LayerNorm, 4x MLP, layer scale `gamma`, residual."""

    def __init__(self, dim: int, t: int):
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, (t, 7, 7), padding=(t // 2, 3, 3), groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 4, 1)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 4, 1, 2, 3)


class ConvNeXt3D(nn.Module):
    """`convnext_3d_tiny`: dims 96-192-384-768, depths 3-3-9-3, a (2, 4, 4) stem, (1, 2, 2)
    downsampling, depthwise kernels 1, 3, 1, 1, 3, 1, ... deep ("131" inflation) in each stage.
    (B, 3, T, H, W) -> (B, 768, T/2, H/32, W/32), LayerNorm'd (`forward_features(x, True)`)."""

    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), inflate: str = "131"):
        super().__init__()
        stem = nn.Sequential(
            nn.Conv3d(3, dims[0], kernel_size=(2, 4, 4), stride=(2, 4, 4)),
            ChannelsFirstLayerNorm(dims[0]),
        )
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    ChannelsFirstLayerNorm(dims[i]),
                    nn.Conv3d(dims[i], dims[i + 1], kernel_size=(1, 2, 2), stride=(1, 2, 2)),
                )
            )
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(ConvNeXtBlock3D(dims[i], int(inflate[j % len(inflate)])) for j in range(depth))
            )
            for i, depth in enumerate(depths)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


# ---- heads and the two-branch model (head.py, evaluator.py) --------------------------------


class VQAHead(nn.Module):
    """1x1x1 conv MLP 768 -> 64 -> 1 with GELU: a quality score per feature position."""

    def __init__(self, in_channels: int = 768, hidden: int = 64):
        super().__init__()
        self.fc_hid = nn.Conv3d(in_channels, hidden, 1)
        self.fc_last = nn.Conv3d(hidden, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_last(F.gelu(self.fc_hid(x)))


class DoverNet(nn.Module):
    """`DOVER(**dover.yml["model"]["args"])`: raw scores of the two views (evaluator.py)."""

    def __init__(self):
        super().__init__()
        self.technical_backbone = SwinTransformer3D()
        self.aesthetic_backbone = ConvNeXt3D()
        self.technical_head = VQAHead()
        self.aesthetic_head = VQAHead()

    def head_output(self, branch: str, view: torch.Tensor) -> torch.Tensor:
        """(clips, 3, T, H, W) normalised view -> (clips, 1, T/2, H/32, W/32) score map."""
        backbone = getattr(self, f"{branch}_backbone")
        return getattr(self, f"{branch}_head")(backbone(view))

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"technical": view, "aesthetic": view} -> raw score of each (0-d): the mean of its
        score map over clips and positions, as evaluate_one_video.py's `r.mean()`. Clips run
        one at a time (equal maps, so the mean of means is the mean)."""
        return {
            branch: torch.stack(
                [self.head_output(branch, clip[None]).mean() for clip in view]
            ).mean()
            for branch, view in views.items()
        }
