"""The tiny profile's VAE: trained as an autoencoder, so `tiny` starts where SD 2.1 starts.

SD 2.1's VAE reconstructs images; a random-init VAE decodes colour noise, and a model built on
one is untrained whatever its LoRAs learn. `train_tiny_vae` trains the tiny, SD-2.1-shaped VAE
(factor 8, 4 latent channels, `TINY_VAE_TRAINED`) on crops of real frames: the embedded training
clips (`dloral-exp data prepare` passes them; never the test clips). A third of each batch is
the crop itself, a third its bicubic x4 down-and-up version and a third its x8 one: what the
restorer encodes is an upsampled LQ frame (x4 in training, about x8 where the pipeline first
enlarges small frames to `process_size`), and what it must decode after training is detail.

Minutes of CPU do not train a VAE from random weights (after 1500 steps one still decodes ~21 dB on
embedded-udm10, bicubic 28 dB). So training starts from an autoencoder built by hand
(`start_as_pooling`): the encoder averages 8x8 blocks into the latent's first three channels (RGB),
the decoder sharpens them (a 3x3 unsharp kernel, `SHARPEN`) and upsamples them again (nearest x2 and
a [1, 2, 1]/4 smoothing per level), and every residual branch and attention output starts at zero,
as the UNet's conv_out does. Group norms would normalise each image's brightness away; every block
of 4 channels therefore carries (+e x, -e x, +K, -K) (x = 0 in blocks without a signal), whose mean
is 0 and variance (e^2 E[x^2] + K^2) / 2 ~ K^2 / 2 whatever the image, so the norms (groups of 4 or
8 channels: `norm_num_groups` 4 where SD's tiny copy has 8) only rescale it. The SiLU after the last
norms runs near z = 4, almost linear there, and the +- pair cancels its curvature. This start is
already within 1 dB of bicubic on embedded-udm10 (0.5 dB below); training, at a learning rate that
keeps it, then learns what averaging loses.

It is an autoencoder, not a KL-regularised VAE: the posterior's log-variance starts at -12
(std 0.0025) and only the reconstruction trains it, so sampling the posterior (as the reference
does at inference) changes the latents by well under one percent of their spread. After
training, `scaling_factor` is set so the scaled latents of the training crops have unit standard
deviation, as SD's 0.18215 was chosen.

Seeded: the same recipe on the same frames gives the same weights on the same torch build
(training runs on one thread, so the machine's core count does not change them). The file is
safetensors; its metadata holds the VAE's config, the recipe and the scaling factor
(dloral.model.backbone.load_tiny_vae reads it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dloral.atomic import atomic_write
from dloral.model.backbone import TINY_VAE, TINY_VAE_FORMAT, TINY_VAE_META, new_tiny_vae
from dloral.model.config import DLoRALConfig
from dloral.provenance import cpu_capability
from dloral.resize import bi_downsample, resize_frames
from dloral.weights import TINY_VAE_ENV

log = logging.getLogger(__name__)

LOGVAR_INIT = -12.0  # the posterior's log-variance at the start: std exp(-6) = 0.0025
TINY_VAE_TRAINED = {**TINY_VAE, "norm_num_groups": 4}  # 4 channels per group (see above)
# the hand-built start: signal scale e, constant K, the SiLU's operating point
SIGNAL, CONSTANT, SILU_AT = 0.1, 1.0, 4.0
# the decoder's latent sharpening: centre 1 + 4s, each of the 4 neighbours -s. Pooling and the
# smoothed upsampling blur twice; s = 0.3 takes embedded-udm10 at step 0 from 1.7 dB below its
# bicubic upsampling to 0.5 dB below (0.15: 0.9 dB, 0.5: 0.6 dB)
SHARPEN = 0.3


@dataclass(frozen=True)
class TinyVAERecipe:
    """How the tiny VAE is trained. A different recipe is a different file: the embedded data's
    manifest records it, and `prepare_embedded` rebuilds the VAE when it changes."""

    seed: int = 0
    steps: int = 400  # 0: the hand-built start as it is (only the scaling factor is measured)
    batch_size: int = 6  # crops per step: 2 as they are, 2 bicubic x4 down-up, 2 x8 down-up
    crop: int = 32  # pixels
    # peak of a one-cycle schedule (Adam). 1e-3 wrecks the hand-built start (1200 steps ended
    # 3 dB below it on embedded-udm10); 3e-4 improves on it
    lr: float = 3e-4

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 3 or self.crop < 16 or self.crop % 8:
            raise ValueError(
                "tiny VAE recipe: steps >= 0, batch_size >= 3 and crop a multiple of 8 >= 16; "
                f"got {self}"
            )

    def describe(self) -> dict:
        return {"format": TINY_VAE_FORMAT, **asdict(self)}

    def build(self, frames: Sequence[torch.Tensor], file: Path) -> dict:
        """Train on `frames` and write the weights to `file`; returns what `describe` and the
        training measured (seconds, final reconstruction PSNR, scaling factor)."""
        vae, info = train_tiny_vae(frames, self)
        save_tiny_vae(vae, file, info)
        return info


def uses_embedded_vae(cfg: DLoRALConfig) -> bool:
    """Whether this model loads the tiny VAE from the embedded data folder, where it is built
    on first use: tiny, pretrained, no `tiny_vae_path` and no $DLORAL_TINY_VAE given."""
    return (
        cfg.profile == "tiny"
        and cfg.tiny_init == "pretrained"
        and not cfg.tiny_vae_path
        and not os.environ.get(TINY_VAE_ENV)
    )


def _crops(frames: Sequence[torch.Tensor], recipe: TinyVAERecipe, gen: torch.Generator):
    """(batch, 3, crop, crop) in [0, 1]: random crops of random frames, the second and third
    thirds replaced by their bicubic x4 and x8 down-and-up versions."""
    c = recipe.crop
    out = []
    for _ in range(recipe.batch_size):
        frame = frames[int(torch.randint(len(frames), (1,), generator=gen))]
        h, w = frame.shape[-2:]
        top = int(torch.randint(h - c + 1, (1,), generator=gen))
        left = int(torch.randint(w - c + 1, (1,), generator=gen))
        out.append(frame[:, top : top + c, left : left + c])
    batch = torch.stack(out)
    third = recipe.batch_size // 3
    for i, factor in ((1, 4), (2, 8)):
        part = batch[i * third : (i + 1) * third]
        batch[i * third : (i + 1) * third] = resize_frames(bi_downsample(part, factor), (c, c))
    return batch.clamp(0, 1)


# ----- the hand-built start -------------------------------------------------------------
def _zero(conv: nn.Module) -> None:
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _diagonal(conv: nn.Module, kernel: torch.Tensor) -> None:
    """Channel i -> channel i with `kernel` (kh, kw); nothing crosses channels."""
    _zero(conv)
    n = min(conv.weight.shape[:2])
    conv.weight[torch.arange(n), torch.arange(n)] = kernel


def _constants(bias: torch.Tensor, first: int = 0) -> None:
    """+K, -K in the last two channels of every block of 4 from channel `first` on: each norm
    group (4 or 8 channels) then has mean 0 and std ~K/sqrt(2), whatever it carries."""
    for block in range(first // 4, bias.shape[0] // 4):
        bias[4 * block + 2], bias[4 * block + 3] = CONSTANT, -CONSTANT


def _quiet(resnet: nn.Module) -> None:
    """A ResnetBlock2D that passes its input (a widening shortcut keeps the channels it has
    and gives the new blocks their constants)."""
    _zero(resnet.conv2)
    if resnet.conv_shortcut is not None:
        _diagonal(resnet.conv_shortcut, torch.ones(1, 1))
        _constants(resnet.conv_shortcut.bias, resnet.conv_shortcut.in_channels)


def _signal_in(conv: nn.Module, channels: int, sharpen: float = 0.0) -> None:
    """Input channel c -> block c as (+e x, -e x, +K, -K), at the kernel's centre (with
    `sharpen` s: centre 1 + 4s, its 4 neighbours -s); the blocks after them hold the constants
    alone."""
    _zero(conv)
    mid = conv.weight.shape[-1] // 2
    kernel = torch.zeros(conv.weight.shape[-2:])
    kernel[mid, mid] = 1 + 4 * sharpen
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        kernel[mid + dy, mid + dx] = -sharpen
    for c in range(channels):
        conv.weight[4 * c, c] = SIGNAL * kernel
        conv.weight[4 * c + 1, c] = -SIGNAL * kernel
    _constants(conv.bias)


def _signal_out(norm: nn.Module, conv: nn.Module, channels: int) -> None:
    """After GroupNorm (std ~K/sqrt(2)) and SiLU at SILU_AT: group c -> output channel c."""
    nn.init.ones_(norm.weight)
    nn.init.constant_(norm.bias, SILU_AT)
    z = torch.tensor(SILU_AT)
    slope = float(torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z))))  # SiLU'(z)
    gain = CONSTANT / math.sqrt(2) / (2 * slope * SIGNAL)
    _zero(conv)
    mid = conv.weight.shape[-1] // 2
    for c in range(channels):
        conv.weight[c, 4 * c, mid, mid] = gain
        conv.weight[c, 4 * c + 1, mid, mid] = -gain


@torch.no_grad()
def start_as_pooling(vae: nn.Module) -> None:
    """Set an AutoencoderKL with 4-channel norm groups to 8x8 average pooling into latent
    channels 0-2 and smoothed upsampling back (module docstring); other weights stay."""
    enc, dec, rgb = vae.encoder, vae.decoder, 3
    latent = vae.config.latent_channels
    _signal_in(enc.conv_in, rgb)
    for block in enc.down_blocks:
        for resnet in block.resnets:
            _quiet(resnet)
        for down in block.downsamplers or []:  # pad right/bottom, 3x3 stride 2: 2x2 mean
            _diagonal(down.conv, F.pad(torch.full((2, 2), 0.25), (0, 1, 0, 1)))
    for mid in (enc.mid_block, dec.mid_block):
        for resnet in mid.resnets:
            _quiet(resnet)
        for attention in mid.attentions:
            _zero(attention.to_out[0])
    _signal_out(enc.conv_norm_out, enc.conv_out, rgb)
    _diagonal(vae.quant_conv, torch.ones(1, 1))  # mean = encoder output; log-variance:
    vae.quant_conv.bias[latent:] = LOGVAR_INIT
    _diagonal(vae.post_quant_conv, torch.ones(1, 1))
    _signal_in(dec.conv_in, rgb, SHARPEN)
    smooth = torch.tensor([1.0, 2.0, 1.0]) / 4
    for block in dec.up_blocks:
        for resnet in block.resnets:
            _quiet(resnet)
        for up in block.upsamplers or []:  # nearest x2, then this
            _diagonal(up.conv, smooth[:, None] * smooth[None, :])
    _signal_out(dec.conv_norm_out, dec.conv_out, rgb)


def train_tiny_vae(
    frames: Sequence[torch.Tensor],
    recipe: TinyVAERecipe | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Train the tiny VAE on frames (each (3, H, W) in [0, 1], at least `crop` pixels each
    side) -> (the VAE in eval mode, a record of the recipe and what training measured).
    `progress(step, reconstruction_psnr_db)` is called after every step."""
    recipe = recipe or TinyVAERecipe()
    small = [tuple(f.shape) for f in frames if min(f.shape[-2:]) < recipe.crop]
    if not frames or small:
        raise ValueError(
            f"the tiny VAE trains on {recipe.crop}px crops: need frames at least that large; "
            f"got {len(frames)} frames"
            + (f", {len(small)} too small (e.g. {small[0]})" if small else "")
        )
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU kernels sum in a thread-dependent order: one thread, so the
    try:  # weights do not depend on the machine's core count
        vae, info = _train(frames, recipe, progress, start)
    finally:
        torch.set_num_threads(threads)
    return vae, info


def _train(frames, recipe: TinyVAERecipe, progress, start: float) -> tuple[nn.Module, dict]:
    gen = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        vae = new_tiny_vae(TINY_VAE_TRAINED)
    start_as_pooling(vae)
    vae.train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=max(recipe.steps, 1), pct_start=0.05
    )
    psnr = 0.0
    for step in range(recipe.steps):
        x = _crops(frames, recipe, gen) * 2 - 1
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=gen)
        y = vae.decode(posterior.mean + posterior.std * noise).sample
        loss = F.mse_loss(y, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        psnr = 10 * math.log10(4 / max(loss.item(), 1e-12))  # images span 2 ([-1, 1])
        if progress:
            progress(step + 1, psnr)
        if (step + 1) % 200 == 0:
            log.info(
                "tiny VAE: step %d/%d, %.1f dB on its batch, %.0f s",
                step + 1,
                recipe.steps,
                psnr,
                time.perf_counter() - start,
            )
    vae.eval()
    with torch.no_grad():  # unit-variance scaled latents, measured on fresh training crops
        probe = torch.cat([_crops(frames, recipe, gen) for _ in range(8)]) * 2 - 1
        scaling = 1.0 / float(vae.encode(probe).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=scaling)
    info = {
        **recipe.describe(),
        "frames": len(frames),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "torch_threads": 1,
        # the same bits on every run of one machine; another kernel instruction set sums in
        # another order, and its weights differ in the last bits (sha256 differs)
        "cpu_capability": cpu_capability(),
        "final_train_psnr_db": round(psnr, 2) if recipe.steps else None,
        "scaling_factor": scaling,
    }
    log.info(
        "tiny VAE: %d steps in %.0f s, reconstruction %.1f dB on its last batch",
        recipe.steps,
        info["seconds"],
        psnr,
    )
    return vae, info


def save_tiny_vae(vae: nn.Module, file: str | os.PathLike, info: dict) -> Path:
    """Write the VAE's weights to `file` (safetensors, atomically); `info` (the recipe and the
    scaling factor) goes into the file's metadata."""
    from safetensors.torch import save_file

    file = Path(file)
    state = {k: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()}
    config = {k: vae.config[k] for k in TINY_VAE}
    fields = {
        "format": TINY_VAE_FORMAT,
        "config": config,
        # not the training time: the same recipe on the same frames writes the same bytes
        "info": {k: v for k, v in info.items() if k != "seconds"},
    }
    meta = {TINY_VAE_META: json.dumps(fields, sort_keys=True)}
    atomic_write(file, lambda tmp: save_file(state, tmp, meta))
    return file
