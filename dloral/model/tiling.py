"""Latent tiling as the reference's inference (src/DLoRAL_model.py, `Generator_eval.forward`).

When a latent's area exceeds tile x tile, CFR and the UNet run on square tiles of
`min(tile, h, w)` latent pixels that overlap by `overlap`, and the tiles' restored latents are
averaged with a Gaussian weight per tile. Memory then depends on the tile, not on the frame:
the UNet's self-attention and CFR's retrieval are quadratic in the number of latent positions.

Grid, as the reference: along an axis of length L, tiles start every `tile - overlap` until one
reaches L; the last tile is moved back to end exactly at L. The reference blends the noise
prediction and the fused latent separately and subtracts after; blending `fused - eps` once is
the same linear average.
"""

from __future__ import annotations

import functools
import math

import torch


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis of `length` latent pixels (tile <= length)."""
    stride = tile - overlap
    count = 1 if length <= tile else 1 + math.ceil((length - tile) / stride)
    return [i * stride for i in range(count - 1)] + [length - tile]


def tile_grid(h: int, w: int, tile: int, overlap: int) -> tuple[int, list[tuple[int, int]]]:
    """(tile size, [(top, left), ...]) for an (h, w) latent; tile size is min(tile, h, w).

    Where the reference's loop would not end (tile size <= overlap: a latent narrower than the
    overlap), the overlap is halved to the tile size's half instead."""
    size = min(tile, h, w)
    if overlap >= size:
        overlap = size // 2
    rows, cols = axis_starts(h, size, overlap), axis_starts(w, size, overlap)
    return size, [(y, x) for y in rows for x in cols]


def gaussian_weights(size: int) -> torch.Tensor:
    """(size, size) float64 blending weights: the reference's `_gaussian_weights` (variance
    0.01 of the tile's width; its x midpoint is (size - 1) / 2, its y midpoint size / 2)."""
    var = 0.01
    x = torch.arange(size, dtype=torch.float64)
    norm = math.sqrt(2 * math.pi * var)
    gx = torch.exp(-((x - (size - 1) / 2) ** 2) / (size * size) / (2 * var)) / norm
    gy = torch.exp(-((x - size / 2) ** 2) / (size * size) / (2 * var)) / norm
    return torch.outer(gy, gx)


@functools.lru_cache(maxsize=8)
def _device_weights(size: int, device: torch.device) -> torch.Tensor:
    """gaussian_weights in float32 on `device`, copied there once, not for every batch."""
    return gaussian_weights(size).to(device, torch.float32)


def needs_tiling(h: int, w: int, tile: int) -> bool:
    """The reference tiles when the latent's area exceeds tile x tile; tile 0 never tiles."""
    return tile > 0 and h * w > tile * tile


def blend(tiles: list[torch.Tensor], origins: list[tuple[int, int]], h: int, w: int):
    """Gaussian-weighted average of (B, C, s, s) tiles placed at `origins` -> (B, C, h, w)."""
    size = tiles[0].shape[-1]
    weight = _device_weights(size, tiles[0].device)
    b, c = tiles[0].shape[:2]
    out = torch.zeros(b, c, h, w, device=tiles[0].device, dtype=torch.float32)
    total = torch.zeros(h, w, device=tiles[0].device, dtype=torch.float32)
    for t, (y, x) in zip(tiles, origins, strict=True):
        out[..., y : y + size, x : x + size] += t.float() * weight
        total[y : y + size, x : x + size] += weight
    return (out / total).to(tiles[0].dtype)


def restore_tiled(
    restore,
    current,
    previous,
    current_lq,
    previous_lq,
    prompt_embeds,
    tile: int,
    overlap: int,
    tile_batch: int = 1,
) -> torch.Tensor:
    """`restore(current, previous, current_lq, previous_lq, embeds)` (DLoRAL.restore_latent) on
    latent tiles, blended; the whole latent at once when its area fits one tile.

    current/previous: (B, 4, h, w) latents; *_lq: (B, 3, 8h, 8w) frames, cut with the tiles.
    tile_batch: tiles restored in one call, stacked along the batch (B x tile_batch samples):
    fewer, larger UNet calls, each sample computed as alone (CFR and the UNet are per sample)."""
    h, w = current.shape[-2:]
    if not needs_tiling(h, w, tile):
        return restore(current, previous, current_lq, previous_lq, prompt_embeds)
    size, origins = tile_grid(h, w, tile, overlap)
    b = current.shape[0]

    def cut(y: int, x: int) -> tuple[torch.Tensor, ...]:
        lat = (..., slice(y, y + size), slice(x, x + size))
        pix = (..., slice(8 * y, 8 * (y + size)), slice(8 * x, 8 * (x + size)))
        return current[lat], previous[lat], current_lq[pix], previous_lq[pix]

    tiles = []
    for start in range(0, len(origins), tile_batch):
        pieces = [cut(y, x) for y, x in origins[start : start + tile_batch]]
        inputs = (torch.cat(p) if len(p) > 1 else p[0] for p in zip(*pieces, strict=True))
        tiles.extend(restore(*inputs, prompt_embeds).split(b))
    return blend(tiles, origins, h, w)
