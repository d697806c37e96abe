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
these are the defaults here (`VAETiles`). The reference runs one tile at a time and keeps the
others, waiting at a GroupNorm, in host memory: its VAE holds one tile on the GPU whatever the
frame's size, at the cost of copying every tile out and back at each GroupNorm. Here the tiles
wait on the device by default (no copies; the VAE's working memory is then about the whole
frame's: see dloral.model.memory), or in host memory as the reference (`VAETiles.wait_on`
"host"; the upscaler chooses it when the frame would not fit otherwise). The numbers are the same.

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
WAIT_ON = ("device", "host")  # where tiles wait between steps (VAETiles.wait_on)


@dataclass(frozen=True)
class VAETiles:
    """Tile sizes of the reference's tiled VAE: the encoder's in pixels, the decoder's in latent
    positions (the reference test script's --vae_encoder_tiled_size / --vae_decoder_tiled_size)."""

    encoder: int = VAE_ENCODER_TILE
    decoder: int = VAE_DECODER_TILE
    # where the tiles wait between GroupNorm steps: "device" (the VAE's device: no copies, and
    # the VAE's working memory is about the whole frame's) or "host" (the reference's: host
    # memory, so the device holds one tile's tensors at a time, at the cost of copies). Same
    # numbers either way; on a CPU both are the same memory
    wait_on: str = "device"

    def __post_init__(self):
        for name, value in (("encoder", self.encoder), ("decoder", self.decoder)):
            if value < 8:
                raise ValueError(f"VAE {name} tile must be >= 8; got {value}")
        if self.wait_on not in WAIT_ON:
            raise ValueError(f"VAE tiles wait on one of {WAIT_ON}; got {self.wait_on!r}")

    def parking(self, device: torch.device) -> Parking | None:
        """How tiles on `device` wait: None where they stay (on the device, or on a CPU)."""
        if self.wait_on == "host" and device.type != "cpu":
            return Parking.host(device)
        return None

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


def grid(height: int, width: int, tile: int, pad: int) -> tuple[int, int, int, int]:
    """(rows, cols, core height, core width) of `split`'s grid, which they decide."""
    rows = max(math.ceil((height - 2 * pad) / tile), 1)
    cols = max(math.ceil((width - 2 * pad) / tile), 1)
    th = _fitted(math.ceil((height - 2 * pad) / rows), tile)
    tw = _fitted(math.ceil((width - 2 * pad) / cols), tile)
    return rows, cols, th, tw


def split(height: int, width: int, tile: int, pad: int) -> list[Tile]:
    """The reference's grid: as few cores of at most `tile` as cover the frame less `pad` on
    each side, shrunk to an even share (rounded up to a multiple of 32 where that fits); a core
    within `pad` of the frame's edge reaches the edge. Row-major order."""
    rows, cols, th, tw = grid(height, width, tile, pad)
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


class _Live:
    """A tile's tensors that outlive a GroupNorm step: `x`, the activation (the input of the
    GroupNorm the tile waits at), and the input of the residual block it is in, kept with
    `keep` and taken back with `kept`: with `parking` it waits parked from the moment it is
    kept to the moment it is added, as the reference's residuals do. The steps below keep no
    other tensor across a step, so parking `x` moves the rest of the tile."""

    __slots__ = ("x", "res", "parking")

    def __init__(self, x: torch.Tensor, parking: Parking | None = None):
        self.x: torch.Tensor = x
        self.res: torch.Tensor | None = None
        self.parking = parking

    def keep(self, res: torch.Tensor) -> None:
        self.res = self.parking.park(res) if self.parking is not None else res

    def kept(self) -> torch.Tensor:
        res, self.res = self.res, None
        return self.parking.unpark(res) if self.parking is not None else res


# A tile's forward, suspended at each GroupNorm: yields the norm, whose input is `live.x` and
# whose output the driver puts back in `live.x`; at its end `live.x` is the tile's output
Steps = Generator[nn.GroupNorm, None, None]


def _resnet(block: nn.Module, live: _Live) -> Steps:
    """diffusers' ResnetBlock2D as the VAE uses it (no time embedding, no resampling)."""
    live.keep(live.x)
    yield block.norm1
    live.x = block.conv1(block.nonlinearity(live.x))
    yield block.norm2
    h = block.conv2(block.dropout(block.nonlinearity(live.x)))
    res = live.kept()
    shortcut = block.conv_shortcut(res) if block.conv_shortcut is not None else res
    live.x = (shortcut + h) / block.output_scale_factor


def _attention(attn: nn.Module, live: _Live) -> Steps:
    """diffusers' VAE self-attention on one tile (the tile's positions attend to each other)."""
    live.keep(live.x)
    yield attn.group_norm
    h = live.x
    b, c, height, width = h.shape
    seq = h.reshape(b, c, height * width).transpose(1, 2)
    q, k, v = attn.to_q(seq), attn.to_k(seq), attn.to_v(seq)
    heads = attn.heads
    q, k, v = (t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, height * width, -1).to(h.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    out = out.transpose(1, 2).reshape(b, c, height, width)
    res = live.kept()
    if attn.residual_connection:
        out = out + res
    live.x = out / attn.rescale_output_factor


def _mid(block: nn.Module, live: _Live) -> Steps:
    yield from _resnet(block.resnets[0], live)
    for attn, resnet in zip(block.attentions, block.resnets[1:], strict=True):
        if attn is not None:
            yield from _attention(attn, live)
        yield from _resnet(resnet, live)


def _encoder(net: nn.Module, live: _Live) -> Steps:
    """diffusers' Encoder.forward, suspended at each GroupNorm."""
    live.x = net.conv_in(live.x)
    for block in net.down_blocks:
        for resnet in block.resnets:
            yield from _resnet(resnet, live)
        for down in block.downsamplers or ():
            live.x = down(live.x)
    yield from _mid(net.mid_block, live)
    yield net.conv_norm_out
    live.x = net.conv_out(net.conv_act(live.x))


def _decoder(net: nn.Module, live: _Live) -> Steps:
    """diffusers' Decoder.forward (no latent embeddings), suspended at each GroupNorm."""
    live.x = net.conv_in(live.x)
    up_dtype = next(iter(net.up_blocks.parameters())).dtype
    yield from _mid(net.mid_block, live)
    live.x = live.x.to(up_dtype)
    for block in net.up_blocks:
        for resnet in block.resnets:
            yield from _resnet(resnet, live)
        for up in block.upsamplers or ():
            live.x = up(live.x)
    yield net.conv_norm_out
    live.x = net.conv_out(net.conv_act(live.x))


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


@dataclass(frozen=True)
class Parking:
    """Where tiles wait between steps: `park` moves a tensor there, `unpark` brings it back to
    the device the VAE runs on (host memory: `Parking.host(device)`)."""

    park: Callable[[torch.Tensor], torch.Tensor]
    unpark: Callable[[torch.Tensor], torch.Tensor]

    @staticmethod
    def host(device: torch.device) -> Parking:
        """Host memory; from a CUDA device pinned and copied without waiting: both copies are
        queued on the device's current stream, so a copy back follows its copy out, PyTorch
        keeps a pinned block until the copies queued on it are done, and the host never
        reads the parked tensors itself."""
        pin = device.type == "cuda"

        def park(t: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(t, device="cpu", pin_memory=pin).copy_(t, non_blocking=pin)

        return Parking(park, lambda t: t.to(device, non_blocking=pin))


def run_in_step(
    steps: Callable[[nn.Module, _Live], Steps],
    net: nn.Module,
    x: torch.Tensor,
    tiles: list[Tile],
    factor: float,
    parking: Parking | None = None,
) -> torch.Tensor:
    """Run `steps` on each tile of `x`, all tiles in step, sharing GroupNorm statistics; paste
    each tile's output core into the result. `factor`: output size / input size (8, or 1/8).

    One tile at a time runs to its next GroupNorm, and its statistics are taken there. With
    `parking`, every other tile waits parked (the reference's order: back and forth over the
    tiles, so the tile at each turn stays on the device for the next step), and every
    residual from when it is kept to when it is added: the device then holds the input, the
    result and one tile's activations. The numbers do not depend on parking:
    each tile's statistics are combined in the tiles' order."""
    n = len(tiles)
    lives = [
        _Live(x[..., top:bottom, left:right], parking)
        for top, bottom, left, right in (t.box for t in tiles)
    ]
    runs = [steps(net, live) for live in lives]
    parked = [False] * n
    norms: list[nn.GroupNorm | None] = [None] * n
    stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
    areas = [0] * n
    shared: tuple[nn.GroupNorm, torch.Tensor, torch.Tensor] | None = None
    height, width = int(x.shape[-2] * factor), int(x.shape[-1] * factor)  # H // 8 for encoding
    result = None
    order = list(range(n))
    while True:
        finished = 0
        for position, i in enumerate(order):
            live = lives[i]
            if parked[i]:  # (its residual stays parked until it is added)
                live.x = parking.unpark(live.x)
                parked[i] = False
            if shared is not None:
                norm, mean, var = shared
                live.x = _normalise(live.x, norm, mean, var)
            try:
                norms[i] = next(runs[i])
            except StopIteration:
                out = live.x
                lives[i] = None  # type: ignore[call-overload]
                if result is None:
                    result = out.new_zeros((out.shape[0], out.shape[1], height, width))
                _paste(result, out, tiles[i], factor)
                del out, live
                finished += 1
                continue
            if not isinstance(norms[i], nn.GroupNorm):
                raise TypeError(f"tiled VAE: expected a GroupNorm, found {type(norms[i]).__name__}")
            stats[i] = _group_stats(live.x, norms[i].num_groups)
            areas[i] = live.x.shape[-2] * live.x.shape[-1]
            if parking is not None and position < n - 1:
                live.x = parking.park(live.x)
                parked[i] = True
            del live
        if finished == n:
            return result
        if finished:
            raise RuntimeError("tiles out of step: some finished before the others")
        norm = norms[0]
        if any(other is not norm for other in norms):
            raise RuntimeError("tiles out of step: the VAE's forward differs between tiles")
        # each tile weighs its area at this layer (as the reference counts it, layer by layer)
        weights = (torch.tensor(areas, device=x.device) / sum(areas)).float()[:, None, None]
        mean = (torch.stack([m for m, _ in stats]) * weights).sum(0)
        var = (torch.stack([v for _, v in stats]) * weights).sum(0)
        shared = (norm, mean, var)
        order.reverse()


def _paste(result: torch.Tensor, out: torch.Tensor, tile: Tile, factor: float) -> None:
    """Put a tile's output core in its place in `result`."""
    bt, bb, bl, br = (int(v * factor) for v in tile.box)
    ct, cb, cl, cr = (int(v * factor) for v in tile.core)
    # offsets from the tile output's own edges (an encoder tile not a multiple of 8 wide comes
    # out a fraction shorter than box * factor: crop from its end, as the reference)
    rows = slice(ct - bt, out.shape[-2] + (cb - bb))
    cols = slice(cl - bl, out.shape[-1] + (cr - br))
    result[..., ct:cb, cl:cr] = out[..., rows, cols]


@torch.no_grad()
def encode(vae: nn.Module, x: torch.Tensor, tiles: VAETiles):
    """vae.encode(x).latent_dist (x in [-1, 1]), through the reference's tiled encoder when
    `x` exceeds its tile."""
    if not tiles.encoder_tiled(tuple(x.shape[-2:])):
        return vae.encode(x).latent_dist
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    grid = split(x.shape[-2], x.shape[-1], tiles.encoder, ENCODER_PAD)
    moments = run_in_step(_encoder, vae.encoder, x, grid, 1 / 8, tiles.parking(x.device))
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
    return run_in_step(_decoder, vae.decoder, z, grid, 8, tiles.parking(z.device))
