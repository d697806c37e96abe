"""One-step video super-resolution with DLoRAL, streamed frame by frame.

For each frame: upsample the LQ frame by `scale` (PIL bicubic, as the reference), VAE-encode,
retrieve from the previous frame (CFR), one UNet step, decode, colour-fix towards the upsampled
input. The first frame is paired with itself (zero motion), so every input frame has an output;
the reference's test script pairs (t-1, t) and writes no output for frame 0.

Memory is bounded by `batch_size` frames whatever the video's length: only the previous
frame's LQ and latent are carried between batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dloral.model.colorfix import COLOR_FIXES, color_fix
from dloral.model.dloral import DLoRAL
from dloral.model.prompts import PromptSource
from dloral.resize import resize_frames

log = logging.getLogger(__name__)


@dataclass
class UpscaleOptions:
    scale: int = 4
    color_fix: str = "adain"  # the reference's default
    batch_size: int = 4  # frames encoded/restored/decoded together
    tile: int | None = None  # VAE tile size in output pixels; None: no tiling
    process_size: int = 512  # LQ whose short side * scale is below this is enlarged first
    sample_latent: bool = True  # draw from the VAE posterior as the reference does
    seed: int = 0

    def __post_init__(self):
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1; got {self.scale}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {COLOR_FIXES}; got {self.color_fix!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.tile is not None and (self.tile < 64 or self.tile % 8):
            raise ValueError(f"tile must be a multiple of 8 and >= 64; got {self.tile}")


class VideoUpscaler:
    def __init__(
        self,
        model: DLoRAL,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        options: UpscaleOptions | None = None,
        prompt: PromptSource | None = None,
    ):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.model.cfr.spynet.float()  # flow estimation stays fp32 (see CrossFrameRetrieval.flow)
        self.device, self.dtype = device, dtype
        self.opt = options or UpscaleOptions()
        self.prompt = prompt or PromptSource()
        vae = self.model.vae
        if self.opt.tile:
            vae.enable_tiling()
            vae.tile_sample_min_size = self.opt.tile
            vae.tile_latent_min_size = self.opt.tile // 8
        else:
            vae.disable_tiling()

    def geometry(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """LQ (h, w) -> (processing size, output size). Processing size is the upsampled size,
        enlarged so its short side reaches process_size; the model pads it to a multiple of 8."""
        h, w = size
        out = (h * self.opt.scale, w * self.opt.scale)
        short = min(out)
        if short < self.opt.process_size:
            f = self.opt.process_size / short
            return (round(out[0] * f), round(out[1] * f)), out
        return out, out

    @torch.no_grad()
    def upscale(
        self, frames: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, LQ frame (3, h, w) in [0, 1]) -> (name, SR frame (3, H, W) in [0, 1]) in order."""
        gen = torch.Generator(device="cpu").manual_seed(self.opt.seed)
        state = None  # (prompt_embeds, previous latent, previous LQ, geometry)
        batch: list[tuple[str, torch.Tensor]] = []
        for name, frame in frames:
            batch.append((name, frame))
            if len(batch) == self.opt.batch_size:
                state, out = self._run_batch(batch, state, gen)
                yield from out
                batch = []
        if batch:
            _, out = self._run_batch(batch, state, gen)
            yield from out

    def _run_batch(self, batch, state, gen):
        names = [n for n, _ in batch]
        size = tuple(batch[0][1].shape[-2:])
        for n, f in batch:
            if tuple(f.shape[-2:]) != size:
                raise ValueError(f"frame {n}: size {tuple(f.shape[-2:])} differs from {size}")
        proc, out_size = self.geometry(size)
        if state is not None and state[3] != (proc, out_size):
            raise ValueError(f"frame {names[0]}: size changed inside the clip")
        # Bicubic overshoots; the reference's LQ is a uint8 image, i.e. clipped to [0, 1].
        lq = resize_frames(torch.stack([f for _, f in batch]), proc)
        lq = lq.to(self.device, self.dtype)
        ph, pw = -proc[0] % 8, -proc[1] % 8
        lq_pad = F.pad(lq, (0, pw, 0, ph), mode="replicate") if ph or pw else lq
        model = self.model
        if state is None:
            text = self.prompt.prompt_for(lq[0].float())
            log.info("prompt: %r", text)
            embeds = model.encode_prompt([text])
        else:
            embeds = state[0]
        latents = model.encode(lq_pad, gen, sample=self.opt.sample_latent)
        if state is None:  # first frame: its own previous frame
            prev_lat, prev_lq = latents[:1], lq_pad[:1]
        else:
            prev_lat, prev_lq = state[1], state[2]
        prev_lat = torch.cat([prev_lat, latents[:-1]])
        prev_lq = torch.cat([prev_lq, lq_pad[:-1]])
        restored = model.restore_latent(latents, prev_lat, lq_pad, prev_lq, embeds)
        sr = model.decode(restored)[..., : proc[0], : proc[1]].float()
        sr = color_fix(sr, lq.float(), self.opt.color_fix)
        if proc != out_size:
            sr = resize_frames(sr, out_size)
        new_state = (embeds, latents[-1:], lq_pad[-1:], (proc, out_size))
        return new_state, list(zip(names, sr.cpu(), strict=True))
