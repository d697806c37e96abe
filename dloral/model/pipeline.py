"""One-step video super-resolution with DLoRAL, streamed frame by frame.

For each frame: upsample the LQ frame by `scale` (PIL bicubic, as the reference), bring it to a
multiple of 8 (`size_to_8`: replicate-pad, or the reference's LANCZOS resize), VAE-encode,
retrieve from the previous frame (CFR), one UNet step, decode, colour-fix towards the upsampled
input. CFR and the UNet run on latent tiles above `latent_tile` x `latent_tile`
(dloral.model.tiling, as the reference); by default the VAE is the reference's tiled VAE
(dloral.model.vae_tiles: tiles in step sharing the GroupNorm statistics, for model inputs above
1088 pixels and outputs above 1968), `tile` N is diffusers' tiling instead and 0 the whole
frame (see dloral.model.config). `first_frame`: `self`
pairs the first frame with itself (zero motion), so every input frame has an output; `skip` is
the reference's test script, which pairs (t-1, t) and writes no output for frame 0.

Memory is bounded by `batch_size` frames whatever the video's length: only the previous frame's
LQ and latent are carried between batches; with latent tiling and diffusers' VAE tiling
(`tile` N) the model's working memory stops growing with the frame size at the tiles' size
(buffers of whole frames, such as the upsampled input and the output, still grow); the
reference's VAE tiles run in step: waiting on the device (`vae_tiles_wait` device) its working
memory is about the whole frame's, waiting in host memory (host, as the reference) about one
tile's. Each frame is VAE-encoded once
(`previous` carry); `previous="reencode"` encodes the previous frame again for every pair, as
the reference does.
Each frame's posterior noise comes from its own generator, seeded by (seed, frame index), so a
frame's output does not depend on its batch, and a run resumed at frame t (`resume_at`) gives
the frames of an uninterrupted one.

`stage_times` (a StageTimes, None by default) profiles the stages: the device is synchronised
around each one, so they are timed apart (and the run is slower); when None nothing is added.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from dloral.devices import synchronize, to_device
from dloral.model.colorfix import color_fix
from dloral.model.config import UpscaleOptions
from dloral.model.dloral import DLoRAL
from dloral.model.prompts import PromptSource
from dloral.model.tiling import needs_tiling, restore_tiled, tile_grid
from dloral.model.vae_tiles import DECODER_PAD, ENCODER_PAD, VAETiles
from dloral.model.vae_tiles import grid as vae_grid
from dloral.resize import resize_frames

log = logging.getLogger(__name__)


class StageTimes:
    """Seconds spent in each stage of VideoUpscaler, summed over the frames it ran, the device
    synchronised before and after every stage (so GPU work is charged to its own stage)."""

    STAGES = (
        "lq_upsample",  # bicubic x scale, pad/resize to a multiple of 8, host -> device
        "prompt",  # text encoder, once per clip
        "vae_encode",
        "spynet_cfr",  # flow, warp and cross-frame retrieval
        "unet",
        "vae_decode",
        "color_fix",  # crop, colour fix, resize to the output size
        "host_copy",  # device -> host
    )

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.frames = 0

    @contextmanager
    def __call__(self, stage: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[stage] += time.perf_counter() - start

    @contextmanager
    def around_forward(self, module: torch.nn.Module, stage: str):
        """Time every forward call of `module` as `stage` while inside."""
        starts = []

        def before(*_):
            synchronize(self.device)
            starts.append(time.perf_counter())

        def after(*_):
            synchronize(self.device)
            self.seconds[stage] += time.perf_counter() - starts.pop()

        handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def per_frame(self) -> dict[str, float]:
        return {k: v / max(self.frames, 1) for k, v in self.seconds.items()}


def frame_generator(seed: int, index: int, role: int = 0) -> torch.Generator:
    """The generator of the posterior noise of a clip's frame `index` (role 0: the frame
    encoded as the current frame; 1: encoded again as the previous frame of the next pair, with
    `previous="reencode"`): a function of (seed, index, role) only, so a frame gets the same
    noise whatever batch it comes in, and a resumed run the noise of an uninterrupted one."""
    words = np.random.SeedSequence([seed % 2**64, index, role]).generate_state(2, np.uint32)
    return torch.Generator(device="cpu").manual_seed(int(words[0]) << 32 | int(words[1]))


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
        if self.opt.channels_last:
            self.model.unet.to(memory_format=torch.channels_last)
            self.model.vae.to(memory_format=torch.channels_last)
        self.prompt = prompt or PromptSource()
        self.stage_times: StageTimes | None = None
        self.prompt_text: str | None = None  # the text condition of the clip being upscaled
        self._vae_tiling(self.opt.tile or 0)
        # the reference's tiled VAE (the default), passed to encode and decode; None: diffusers'.
        # Its tiles wait on the host only if asked: "auto" is resolved by the memory check
        # (dloral.model.memory.check_upscaler), which knows the frame size; the device otherwise
        self.vae_tiles: VAETiles | None = None
        if self.opt.tile is None:
            wait = "host" if self.opt.vae_tiles_wait == "host" else "device"
            self.vae_tiles = VAETiles(self.opt.vae_encoder_tile, self.opt.vae_decoder_tile, wait)

    def _stage(self, name: str):
        return self.stage_times(name) if self.stage_times is not None else nullcontext()

    def _vae_tiling(self, tile: int) -> None:
        """diffusers' VAE tiling with tiles of `tile` output pixels (0: off); it tiles only a
        frame with a side above the tile."""
        vae = self.model.vae
        if tile:
            vae.enable_tiling()
            vae.tile_sample_min_size = tile
            vae.tile_latent_min_size = tile // 8
        else:
            vae.disable_tiling()

    def geometry(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """LQ (h, w) -> (processing size, output size). Processing size is the upsampled size;
        an LQ frame whose short side is below process_size // scale is first enlarged to that
        short side (`enlarged`), as the reference's test script. It is then padded to a multiple
        of 8 (`pad`) or resized down to one (`lanczos`, see `model_size`)."""
        h, w = size
        r = self.opt.scale
        enlarged = self.enlarged(size)
        return (enlarged[0] * r, enlarged[1] * r), (h * r, w * r)

    def enlarged(self, size: tuple[int, int]) -> tuple[int, int]:
        """The LQ size before the x scale upsampling: `size`, or for a small frame test_DLoRAL.py's
        `int(scale * side)` with scale = (process_size // upscale) / short side."""
        h, w = size
        small = self.opt.process_size // self.opt.scale
        if min(h, w) >= small:
            return size
        f = small / min(h, w)
        return int(f * h), int(f * w)

    def model_size(self, proc: tuple[int, int]) -> tuple[int, int]:
        """The size the model sees: proc rounded up (pad) or down (lanczos, as the reference's
        `width - width % 8`) to a multiple of 8."""
        if self.opt.size_to_8 == "lanczos":
            return tuple(max(8, s - s % 8) for s in proc)
        return tuple(s + -s % 8 for s in proc)

    def tiling(self, size: tuple[int, int]) -> dict[str, str]:
        """How frames of LQ `size` (h, w) are cut into tiles: per part (the VAE's encoder and
        decoder, CFR + UNet on the latent) the grid that cuts it, or "whole" where that part
        sees the whole frame. Tile options that leave this unchanged give the same frames."""
        h, w = self.model_size(self.geometry(size)[0])
        latent = (h // 8, w // 8)
        encoder = decoder = "whole"
        tiles = self.vae_tiles
        if tiles is not None:
            if tiles.encoder_tiled((h, w)):
                rows, cols, th, tw = vae_grid(h, w, tiles.encoder, ENCODER_PAD)
                encoder = f"reference tiles: {rows}x{cols} of {th}x{tw} px"
            if tiles.decoder_tiled(latent):
                rows, cols, th, tw = vae_grid(*latent, tiles.decoder, DECODER_PAD)
                decoder = f"reference tiles: {rows}x{cols} of {th}x{tw} latent"
        elif self.opt.tile:  # diffusers' tiling: a side above its tile, which sets its grid
            if max(h, w) > self.opt.tile:
                encoder = f"diffusers tiles of {self.opt.tile} px"
            if max(latent) > self.opt.tile // 8:
                decoder = f"diffusers tiles of {self.opt.tile // 8} latent"
        unet = "whole"
        if needs_tiling(*latent, self.opt.latent_tile):
            tile, origins = tile_grid(*latent, self.opt.latent_tile, self.opt.latent_overlap)
            tops = sorted({y for y, _ in origins})
            lefts = sorted({x for _, x in origins})
            unet = f"tiles of {tile} latent at rows {tops}, columns {lefts}"
        return {"vae_encoder": encoder, "vae_decoder": decoder, "latent": unet}

    @torch.no_grad()
    def upscale(
        self,
        frames: Iterable[tuple[str, torch.Tensor]],
        resume_at: int = 0,
        prompt: str | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, LQ frame (3, h, w) in [0, 1]) -> (name, SR frame (3, H, W) in [0, 1]) in order.
        With first_frame `skip` the first frame has no output (it is only frame 1's previous).

        `resume_at` > 0 (a resumed run): outputs start at the clip's frame `resume_at`, and
        `frames` start at frame resume_at - 1, its previous frame only (as frame 0 with `skip`).
        They equal those of a run from frame 0: the posterior noise of a frame depends only on
        the seed and its index (`frame_generator`). `prompt`: the text condition, instead of
        asking the prompt source (a resumed run passes the one it recorded); the one used is
        kept in `self.prompt_text`."""
        state = None  # (prompt_embeds, previous latent, previous LQ, geometry)
        self.prompt_text = prompt
        pending = None  # with overlap_copy: the last batch's output, on its way to the host
        for batch in self._batches(frames, max(resume_at - 1, 0)):
            state, names, sr = self._run_batch(batch, state, previous_only=resume_at > 0)
            if pending is not None:  # delivered once the next batch is queued
                yield from self._delivered(pending)
            pending = self._to_host(names, sr)
            if not self.opt.overlap_copy:
                yield from self._delivered(pending)
                pending = None
        if pending is not None:
            yield from self._delivered(pending)

    def _batches(self, frames: Iterable[tuple[str, torch.Tensor]], first: int):
        """Batches of (clip index, name, frame)."""
        batch = []
        for index, (name, frame) in enumerate(frames, start=first):
            batch.append((index, name, frame))
            if len(batch) == self.opt.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _to_host(self, names: list[str], sr: torch.Tensor):
        """Start the copy of a batch's output to the host: with overlap_copy on CUDA into pinned
        memory without waiting (an event marks its end), else a plain synchronous copy."""
        if self.stage_times is not None:
            self.stage_times.frames += len(names)
        with self._stage("host_copy"):
            if not (self.opt.overlap_copy and sr.device.type == "cuda"):
                return names, sr.cpu(), None
            host = torch.empty(sr.shape, dtype=sr.dtype, pin_memory=True)
            host.copy_(sr, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return names, host, done

    @staticmethod
    def _delivered(pending) -> Iterator[tuple[str, torch.Tensor]]:
        names, host, done = pending
        if done is not None:
            done.synchronize()
        return iter(zip(names, host, strict=True))

    def _prepare(self, frames: torch.Tensor, proc: tuple[int, int]):
        """Upsampled LQ at proc size (the colour-fix target) and the model's input (a multiple
        of 8), both on the device."""
        # The small LQ goes to the device first and is upsampled there (PIL's kernel: on CPU by
        # PIL, on CUDA as matrix products, see resize_frames), so no 4x frame crosses the bus.
        # Bicubic overshoots; the reference's LQ is a uint8 image, i.e. clipped to [0, 1].
        if self.opt.upsample_on == "device":
            frames = to_device(frames, self.device)
        enlarged = self.enlarged(tuple(frames.shape[-2:]))
        if enlarged != tuple(frames.shape[-2:]):  # a small frame: two bicubic resizes, as there
            frames = resize_frames(frames, enlarged)
        lq = resize_frames(frames, proc)
        size = self.model_size(proc)
        if self.opt.size_to_8 == "lanczos":
            lq = resize_frames(lq, size, "lanczos")
            return (lq.to(self.device, self.dtype),) * 2
        lq = lq.to(self.device, self.dtype)
        ph, pw = size[0] - proc[0], size[1] - proc[1]
        return lq, (F.pad(lq, (0, pw, 0, ph), mode="replicate") if ph or pw else lq)

    def _noise(self, indices: list[int], role: int = 0) -> list[torch.Generator]:
        return [frame_generator(self.opt.seed, i, role) for i in indices]

    def _run_batch(self, batch, state, previous_only: bool = False):
        indices, names = [i for i, _, _ in batch], [n for _, n, _ in batch]
        size = tuple(batch[0][2].shape[-2:])
        for _, n, f in batch:
            if tuple(f.shape[-2:]) != size:
                raise ValueError(f"frame {n}: size {tuple(f.shape[-2:])} differs from {size}")
        proc, out_size = self.geometry(size)
        if state is not None and state[3] != (proc, out_size):
            raise ValueError(f"frame {names[0]}: size changed inside the clip")
        with self._stage("lq_upsample"):
            lq, lq_model = self._prepare(torch.stack([f for _, _, f in batch]), proc)
        model = self.model
        if state is None:
            with self._stage("prompt"):
                if self.prompt_text is None:
                    self.prompt_text = self.prompt.prompt_for(lq[0].float())
                log.info("prompt: %r", self.prompt_text)
                embeds = model.encode_prompt([self.prompt_text])
        else:
            embeds = state[0]
        with self._stage("vae_encode"):
            latents = model.encode(
                lq_model, self._noise(indices), self.opt.sample_latent, tiles=self.vae_tiles
            )
        new_state = (embeds, latents[-1:], lq_model[-1:], (proc, out_size))
        if state is None and (self.opt.first_frame == "skip" or previous_only):
            # the first frame is only the previous frame of the next: no output of its own
            names, lq = names[1:], lq[1:]
            prev_lat, prev_lq = latents[:-1], lq_model[:-1]
            latents, lq_model = latents[1:], lq_model[1:]
            if not names:
                return new_state, [], lq[:0]
        else:
            # the first frame of a clip (state None) is its own previous frame
            prev_lat, prev_lq = (latents[:1], lq_model[:1]) if state is None else state[1:3]
            prev_lat = torch.cat([prev_lat, latents[:-1]])
            prev_lq = torch.cat([prev_lq, lq_model[:-1]])
        if self.opt.previous == "reencode":
            with self._stage("vae_encode"):
                # a new draw for the previous frame, as the reference's re-encoding
                prev = [max(i - 1, 0) for i in indices[len(indices) - len(prev_lq) :]]
                prev_lat = model.encode(
                    prev_lq, self._noise(prev, 1), self.opt.sample_latent, tiles=self.vae_tiles
                )
        with self._restore_timed():
            restored = restore_tiled(
                model.restore_latent,
                latents,
                prev_lat,
                lq_model,
                prev_lq,
                embeds,
                self.opt.latent_tile,
                self.opt.latent_overlap,
                self.opt.tile_batch,
            )
        with self._stage("vae_decode"):
            sr = model.decode(restored, tiles=self.vae_tiles)
        with self._stage("color_fix"):
            sr = sr[..., : lq.shape[-2], : lq.shape[-1]].float()
            sr = color_fix(sr, lq.float(), self.opt.color_fix)
            if tuple(sr.shape[-2:]) != out_size:
                sr = resize_frames(sr, out_size)
        return new_state, names, sr

    @contextmanager
    def _restore_timed(self):
        """With stage_times: CFR (SPyNet inside) and the UNet timed on their forward calls."""
        if self.stage_times is None:
            yield
            return
        with (
            self.stage_times.around_forward(self.model.cfr, "spynet_cfr"),
            self.stage_times.around_forward(self.model.unet, "unet"),
        ):
            yield
