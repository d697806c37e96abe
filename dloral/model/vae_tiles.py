"""The reference's tiled VAE: tiles that run the VAE in step and share its GroupNorm statistics.

DLoRAL's code (yjsunnn/DLoRAL, `src/my_utils/vaehook.py`, from multidiffusion-upscaler's
"Tiled VAE") replaces the forward of the VAE's encoder and decoder. A frame whose larger side
exceeds `tile + 2 * pad` (input units: pixels for the encoder, latent positions for the decoder)
is cut into a grid of non-overlapping core regions, each widened by `pad` on every side within
the frame, and every tile runs the network layer by layer in step with the others:

- at each GroupNorm, each tile's mean and (biased) variance per frame and group are computed,
  averaged over the tiles weighted by the tile's area at that layer (padding included), and
  every tile is normalised with those averages. Like the reference, the average of the
  variances leaves out the spread of the tiles' means, so this is close to, not equal to, the
  whole frame's norm. The statistics and the normalisation are computed in fp32 (the reference
  computes them in the activations' dtype): equal to the reference in fp32, within bf16/fp16
  rounding of it otherwise;
- convolutions, up- and downsampling, SiLU and residual additions run on each tile;
- the mid block's self-attention attends within each tile;
- each tile's output is cropped to its core region (no blending) and pasted in place.

A frame within `tile + 2 * pad` runs the plain, whole-frame forward. The reference's test script
sets encoder tiles of 1024 pixels (`--vae_encoder_tiled_size`, padding 32) and decoder tiles of
224 latent positions (`--vae_decoder_tiled_size`, padding 11), without its "fast" estimation;
these are the defaults here (`VAETiles`). The reference keeps the tiles waiting at a GroupNorm
in host memory; here they stay on the model's device (the same numbers, and the VAE's working
memory is then about the whole frame's: see dloral.model.memory).

Inference only (no gradients). With input sides and an encoder tile that are multiples of 8 (the
pipeline's model input is; UpscaleOptions checks the tile) every tile edge falls on the latent
grid; other sides give what the reference's hook gives, a latent of (H // 8, W // 8). Tested
against a transcription of the reference's hook in tests/reference_vaehook.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dloral.model.config import VAE_DECODER_TILE, VAE_ENCODER_TILE

ENCODER_PAD = 32  # pixels around an encoder tile (the reference's VAEHook)
DECODER_PAD = 11  # latent positions around a decoder tile

# A tile's forward, suspended at each GroupNorm: yields (norm layer, input), receives the output
Steps = Generator[tuple[nn.GroupNorm, torch.Tensor], torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class VAETiles:
    """Tile sizes of the reference's tiled VAE: the encoder's in pixels, the decoder's in latent
    positions (the reference test script's --vae_encoder_tiled_size / --vae_decoder_tiled_size)."""

    encoder: int = VAE_ENCODER_TILE
    decoder: int = VAE_DECODER_TILE

    def __post_init__(self):
        for name, value in (("encoder", self.encoder), ("decoder", self.decoder)):
            if value < 8:
                raise ValueError(f"VAE {name} tile must be >= 8; got {value}")

    def encoder_tiled(self, size: tuple[int, int]) -> bool:
        """Whether a model input of `size` (H, W) pixels is encoded in tiles."""
        return max(size) > self.encoder + 2 * ENCODER_PAD

    def decoder_tiled(self, size: tuple[int, int]) -> bool:
        """Whether a latent of `size` (h, w) positions is decoded in tiles."""
        return max(size) > self.decoder + 2 * DECODER_PAD

    def describe(self) -> str:
        return (
            f"the reference's tiled VAE (shared GroupNorm): encoder tiles of {self.encoder} px "
            f"above {self.encoder + 2 * ENCODER_PAD}, decoder tiles of {self.decoder} latent "
            f"above {self.decoder + 2 * DECODER_PAD}"
        )


@dataclass(frozen=True)
class Tile:
    """One tile, in input units, as (top, bottom, left, right): `box` is what the tile reads
    (its core widened by the padding, within the frame), `core` the region its output fills."""

    box: tuple[int, int, int, int]
    core: tuple[int, int, int, int]


def _fitted(size: int, most: int) -> int:
    """`size` rounded up to a multiple of 32 (else 16, 8, 4, 2) that does not exceed `most`."""
    step = 32
    while step >= 2:
        if size % step == 0:
            return size
        up = size - size % step + step
        if up <= most:
            return up
        step //= 2
    return size


def split(height: int, width: int, tile: int, pad: int) -> list[Tile]:
    """The reference's grid: as few cores of at most `tile` as cover the frame less `pad` on
    each side, shrunk to an even share (rounded up to a multiple of 32 where that fits); a core
    within `pad` of the frame's edge reaches the edge. Row-major order."""
    rows = max(math.ceil((height - 2 * pad) / tile), 1)
    cols = max(math.ceil((width - 2 * pad) / tile), 1)
    th = _fitted(math.ceil((height - 2 * pad) / rows), tile)
    tw = _fitted(math.ceil((width - 2 * pad) / cols), tile)
    tiles = []
    for i in range(rows):
        for j in range(cols):
            top, bottom = pad + i * th, min(pad + (i + 1) * th, height)
            left, right = pad + j * tw, min(pad + (j + 1) * tw, width)
            core = (
                top if top > pad else 0,
                bottom if bottom < height - pad else height,
                left if left > pad else 0,
                right if right < width - pad else width,
            )
            box = (
                max(0, top - pad),
                min(height, bottom + pad),
                max(0, left - pad),
                min(width, right + pad),
            )
            tiles.append(Tile(box, core))
    return tiles


def _resnet(block: nn.Module, x: torch.Tensor) -> Steps:
    """diffusers' ResnetBlock2D as the VAE uses it (no time embedding, no resampling)."""
    h = yield block.norm1, x
    h = block.conv1(block.nonlinearity(h))
    h = yield block.norm2, h
    h = block.conv2(block.dropout(block.nonlinearity(h)))
    shortcut = block.conv_shortcut(x) if block.conv_shortcut is not None else x
    return (shortcut + h) / block.output_scale_factor


def _attention(attn: nn.Module, x: torch.Tensor) -> Steps:
    """diffusers' VAE self-attention on one tile (the tile's positions attend to each other)."""
    h = yield attn.group_norm, x
    b, c, height, width = h.shape
    seq = h.reshape(b, c, height * width).transpose(1, 2)
    q, k, v = attn.to_q(seq), attn.to_k(seq), attn.to_v(seq)
    heads = attn.heads
    q, k, v = (t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, height * width, -1).to(h.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    out = out.transpose(1, 2).reshape(b, c, height, width)
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor


def _mid(block: nn.Module, x: torch.Tensor) -> Steps:
    x = yield from _resnet(block.resnets[0], x)
    for attn, resnet in zip(block.attentions, block.resnets[1:], strict=True):
        if attn is not None:
            x = yield from _attention(attn, x)
        x = yield from _resnet(resnet, x)
    return x


def _encoder(net: nn.Module, x: torch.Tensor) -> Steps:
    """diffusers' Encoder.forward, suspended at each GroupNorm."""
    x = net.conv_in(x)
    for block in net.down_blocks:
        for resnet in block.resnets:
            x = yield from _resnet(resnet, x)
        for down in block.downsamplers or ():
            x = down(x)
    x = yield from _mid(net.mid_block, x)
    x = yield net.conv_norm_out, x
    return net.conv_out(net.conv_act(x))


def _decoder(net: nn.Module, z: torch.Tensor) -> Steps:
    """diffusers' Decoder.forward (no latent embeddings), suspended at each GroupNorm."""
    x = net.conv_in(z)
    up_dtype = next(iter(net.up_blocks.parameters())).dtype
    x = yield from _mid(net.mid_block, x)
    x = x.to(up_dtype)
    for block in net.up_blocks:
        for resnet in block.resnets:
            x = yield from _resnet(resnet, x)
        for up in block.upsamplers or ():
            x = up(x)
    x = yield net.conv_norm_out, x
    return net.conv_out(net.conv_act(x))


def _group_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per frame and group, (B, groups), in fp32."""
    var, mean = torch.var_mean(x.float().reshape(x.shape[0], groups, -1), dim=-1, correction=0)
    return mean, var


def _normalise(x, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[:2]
    y = x.float().reshape(b, norm.num_groups, -1)
    y = (y - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)
    y = y.reshape(x.shape)
    if norm.affine:
        y = y * norm.weight.float().view(1, c, 1, 1) + norm.bias.float().view(1, c, 1, 1)
    return y.to(x.dtype)


def run_in_step(
    steps: Callable[[nn.Module, torch.Tensor], Steps],
    net: nn.Module,
    x: torch.Tensor,
    tiles: list[Tile],
    factor: float,
) -> torch.Tensor:
    """Run `steps` on each tile of `x`, all tiles in step, sharing GroupNorm statistics; paste
    each tile's output core into the result. `factor`: output size / input size (8, or 1/8)."""
    boxes = [tile.box for tile in tiles]
    runs = [steps(net, x[..., top:bottom, left:right]) for top, bottom, left, right in boxes]
    waiting = [next(run) for run in runs]
    outputs: list[torch.Tensor | None] = [None] * len(tiles)
    while True:
        norm = waiting[0][0]
        if any(n is not norm for n, _ in waiting):
            raise RuntimeError("tiles out of step: the VAE's forward differs between tiles")
        if not isinstance(norm, nn.GroupNorm):
            raise TypeError(f"tiled VAE: expected a GroupNorm, found {type(norm).__name__}")
        stats = [_group_stats(h, norm.num_groups) for _, h in waiting]
        # each tile weighs its area at this layer (as the reference counts it, layer by layer)
        areas = torch.tensor([h.shape[-2] * h.shape[-1] for _, h in waiting], device=x.device)
        weights = (areas / areas.sum()).float()[:, None, None]
        mean = (torch.stack([m for m, _ in stats]) * weights).sum(0)
        var = (torch.stack([v for _, v in stats]) * weights).sum(0)
        finished = 0
        for i, run in enumerate(runs):
            h = waiting[i][1]
            waiting[i] = None  # type: ignore[call-overload]
            try:
                waiting[i] = run.send(_normalise(h, norm, mean, var))
            except StopIteration as end:
                outputs[i] = end.value
                finished += 1
            del h
        if finished == len(runs):
            break
        if finished:
            raise RuntimeError("tiles out of step: some finished before the others")
    height, width = int(x.shape[-2] * factor), int(x.shape[-1] * factor)  # H // 8 for encoding
    result = None
    for tile, out in zip(tiles, outputs, strict=True):
        if result is None:
            result = out.new_zeros((out.shape[0], out.shape[1], height, width))
        bt, bb, bl, br = (int(v * factor) for v in tile.box)
        ct, cb, cl, cr = (int(v * factor) for v in tile.core)
        # offsets from the tile output's own edges (an encoder tile not a multiple of 8 wide
        # comes out a fraction shorter than box * factor: crop from its end, as the reference)
        rows = slice(ct - bt, out.shape[-2] + (cb - bb))
        cols = slice(cl - bl, out.shape[-1] + (cr - br))
        result[..., ct:cb, cl:cr] = out[..., rows, cols]
    return result


@torch.no_grad()
def encode(vae: nn.Module, x: torch.Tensor, tiles: VAETiles):
    """vae.encode(x).latent_dist (x in [-1, 1]), through the reference's tiled encoder when
    `x` exceeds its tile."""
    if not tiles.encoder_tiled(tuple(x.shape[-2:])):
        return vae.encode(x).latent_dist
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    grid = split(x.shape[-2], x.shape[-1], tiles.encoder, ENCODER_PAD)
    moments = run_in_step(_encoder, vae.encoder, x, grid, 1 / 8)
    if getattr(vae, "quant_conv", None) is not None:
        moments = vae.quant_conv(moments)
    return DiagonalGaussianDistribution(moments)


@torch.no_grad()
def decode(vae: nn.Module, z: torch.Tensor, tiles: VAETiles) -> torch.Tensor:
    """vae.decode(z).sample (z unscaled), through the reference's tiled decoder when `z`
    exceeds its tile."""
    if not tiles.decoder_tiled(tuple(z.shape[-2:])):
        return vae.decode(z).sample
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    grid = split(z.shape[-2], z.shape[-1], tiles.decoder, DECODER_PAD)
    return run_in_step(_decoder, vae.decoder, z, grid, 8)
