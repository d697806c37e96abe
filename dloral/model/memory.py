"""Memory one batch of upscaling needs, estimated from the frame size before any frame is
processed, and the guard that refuses a run the machine cannot hold (with the flags that make it
fit) instead of letting it grow until the OS kills it.

The estimate is what a batch adds on the device the model runs on (process RAM on CPU, GPU
memory on CUDA) once the model is built and on the device, for B frames whose model input is
H x W pixels (latent h x w = H/8 x W/8):

    need = SLACK + (1 + batch_share * (B - 1)) * (FRAME * H*W + vae * Hv*Wv + unet * hl*wl) * s

- FRAME: buffers at the whole frame size, never tiled: the upsampled LQ (fp32 and model dtype),
  the padded model input, the decoded and colour-fixed output.
- Hv x Wv: the VAE's working area: one VAE tile (min(tile, H) x min(tile, W)) with diffusers'
  tiling (`tile` N), the frame untiled (`tile` 0), and with the reference's tiled VAE (the
  default) the frame plus its tiles' padding, since those tiles run in step, all on the device
  (the sum of the decoder's or, if larger, the encoder's padded tiles: dloral.model.vae_tiles),
  or, with its tiles waiting on the host (`vae_tiles_wait` host, the reference's way), its
  largest padded tile (the decoder's or the encoder's; a network that does not tile works on
  the whole frame).
  hl x wl: one latent tile (min(latent_tile, h, w) squared) when the latent is tiled, else the
  latent. CFR and the UNet work on latent tiles.
- s: the model dtype's element size / 4 for the vae and unet terms (they were measured in fp32).
- batch_share: what each frame past the first adds; less than 1 on CPU, where buffers of the
  batch's stages are reused by the allocator.

Constants (bytes per pixel, per latent position), and how they were measured:
- tiny: on a 2-core CPU (fp32, torch 2.15, glibc malloc), peak RSS (ru_maxrss) minus the RSS once
  the model was built, one process per point, `VideoUpscaler.upscale` of B random frames with
  `process_size` 0 (model input = output size). Measured growth in GiB:
      256x384   B=2 untiled 0.20       1024x1024 B=1 tiled (latent 96, VAE 768) 0.23
      512x512   B=1 untiled 0.19       1024x1024 B=1 latent tiles only          0.51
      512x512   B=2 untiled 0.26       1024x1024 B=1 VAE tiles (768) only       0.29
      1024x1024 B=1 untiled 0.58       1536x1536 B=1 tiled (latent 96, VAE 768) 0.51
      1024x1024 B=2 untiled 0.80
  The constants are the grid-searched set whose estimate is never below a measured point and
  at most 1.8x above (the largest: the tiled 1024x1024 point; a symmetric fit is within 1.35x
  both ways but underestimates). The reference's tiled VAE (the default since fd01322), checked
  with `/usr/bin/time -v dloral-exp upscale` of 2 bigbuckbunny frames, 640x360 -> 2560x1440
  (tiles: encoder 6, decoder 2): 3.2 GiB peak RSS, 1.1 GiB for two 64x36 frames
  (`--process-size 0`), so about 2.1 GiB of growth; the estimate is 2.1 GiB. batch_share 0.5:
  the second frame added
  0.07 GiB at 512x512 and 0.22 GiB at 1024x1024, 38-45% of the first frame's growth.
- sd21: the full-size architecture in bf16 with SDPA on one H200, untiled, from the design
  notes (720x1280 batch 4 9.6 GiB, 2048x2048 batch 1 12.0 GiB, max_memory_allocated), less the
  2.4 GiB of bf16 weights: 2100-2460 bytes per output pixel and frame. The larger is split
  between the VAE (85%) and the UNet (15%, per latent position x64) by their activation widths
  (VAE 128-256 channels at full resolution; UNet 320-1280 channels with skips at 1/8);
  batch_share 1 on CUDA (GPU memory grew linearly with the batch). Both design-note points are
  within 1.25x of the estimate; no tiled sd21 run has been measured yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dloral.model.config import VAE_DECODER_TILE, VAE_ENCODER_TILE
from dloral.model.tiling import needs_tiling, tile_grid
from dloral.model.vae_tiles import DECODER_PAD, ENCODER_PAD, split

GIB = 2**30
SKIP_ENV = "DLORAL_MEMORY_CHECK"  # "off": no guard (the estimate is a model, not a promise)


@dataclass(frozen=True)
class Profile:
    frame: float  # bytes per model-input pixel per frame, whole frame (never tiled)
    vae: float  # bytes per pixel of the VAE's working area, fp32
    unet: float  # bytes per latent position of one latent tile (CFR + UNet), fp32
    slack: float  # bytes, whatever the size (allocator, thread scratch)
    batch_share: dict[str, float]  # device type -> what each frame past the first adds


PROFILES = {
    "tiny": Profile(
        frame=80, vae=260, unet=7_000, slack=0.14 * GIB, batch_share={"cpu": 0.5, "cuda": 1.0}
    ),
    "sd21": Profile(
        frame=80, vae=4_000, unet=46_000, slack=0.5 * GIB, batch_share={"cpu": 0.5, "cuda": 1.0}
    ),
}


class InsufficientMemory(ValueError):
    """The estimate for one batch exceeds the memory available; the message gives both numbers
    and the settings that fit."""


@dataclass(frozen=True)
class Settings:
    """What sets the memory of one batch (the UpscaleOptions fields of the same names)."""

    batch_size: int
    latent_tile: int  # 0: never tiled
    tile: int | None  # diffusers' VAE tile, pixels; None: the reference's tiled VAE; 0: never
    latent_overlap: int = 32
    tile_batch: int = 1  # latent tiles per CFR + UNet call: that many tiles' activations at once
    vae_encoder_tile: int = VAE_ENCODER_TILE  # the reference's tiled VAE (tile None)
    vae_decoder_tile: int = VAE_DECODER_TILE
    # where its tiles wait between GroupNorm steps: device (all on the device), host (one tile
    # on the device at a time, the reference's way); the same memory on a CPU
    vae_tiles_wait: str = "device"


@dataclass(frozen=True)
class Estimate:
    bytes: float
    parts: dict[str, float]  # frames, vae, unet+cfr, slack (bytes)
    vae_area: tuple[int, int]  # (h, w) pixels the VAE works on at once
    latent_area: tuple[int, int]  # (h, w) latent positions CFR + UNet work on at once

    def describe(self) -> str:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in self.parts.items())
        return f"{gib(self.bytes)} ({parts})"


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def working_areas(
    size: tuple[int, int], settings: Settings
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(VAE area in pixels, latent area in positions) worked on at once for model input `size`,
    as VideoUpscaler tiles them."""
    height, width = size
    h, w = height // 8, width // 8
    latent_tiled = needs_tiling(h, w, settings.latent_tile)
    if settings.tile is None:
        tiles = _largest if settings.vae_tiles_wait == "host" else _padded
        vae = max(
            tiles(height, width, settings.vae_encoder_tile, ENCODER_PAD, 1),
            tiles(h, w, settings.vae_decoder_tile, DECODER_PAD, 8),
            key=lambda a: a[0] * a[1],
        )
    elif settings.tile:
        vae = (min(settings.tile, height), min(settings.tile, width))
    else:
        vae = (height, width)
    if latent_tiled:
        t = min(settings.latent_tile, h, w)
        return vae, (t, t)
    return vae, (h, w)


def _padded(height: int, width: int, tile: int, pad: int, factor: int) -> tuple[int, int]:
    """The reference's VAE tiles of a (height, width) input, side by side: (sum of the rows'
    padded heights, sum of the columns' padded widths) x `factor` (output pixels per input unit).
    A frame within one tile is (height, width) x factor."""
    if max(height, width) <= tile + 2 * pad:
        return height * factor, width * factor
    grid = split(height, width, tile, pad)
    rows = {t.box[0]: t.box[1] - t.box[0] for t in grid}
    cols = {t.box[2]: t.box[3] - t.box[2] for t in grid}
    return sum(rows.values()) * factor, sum(cols.values()) * factor


def _largest(height: int, width: int, tile: int, pad: int, factor: int) -> tuple[int, int]:
    """The largest of the reference's padded VAE tiles of a (height, width) input (the one on
    the device while the others wait on the host) x `factor`; a frame within one tile, whole."""
    if max(height, width) <= tile + 2 * pad:
        return height * factor, width * factor
    box = max(
        ((t.box[1] - t.box[0], t.box[3] - t.box[2]) for t in split(height, width, tile, pad)),
        key=lambda a: a[0] * a[1],
    )
    return box[0] * factor, box[1] * factor


def _tiles_at_once(size: tuple[int, int], settings: Settings) -> int:
    """Latent tiles restored together: tile_batch, at most the frame's tiles; 1 untiled."""
    h, w = size[0] // 8, size[1] // 8
    if settings.tile_batch == 1 or not needs_tiling(h, w, settings.latent_tile):
        return 1
    _, origins = tile_grid(h, w, settings.latent_tile, settings.latent_overlap)
    return min(settings.tile_batch, len(origins))


def estimate(
    size: tuple[int, int],
    settings: Settings,
    profile: str = "tiny",
    dtype: torch.dtype = torch.float32,
    device_type: str = "cpu",
) -> Estimate:
    """Bytes one batch of frames with model input `size` (H, W) adds on the device."""
    p = PROFILES[profile]
    (vh, vw), (lh, lw) = working_areas(size, settings)
    scale = torch.empty((), dtype=dtype).element_size() / 4
    frames = 1 + p.batch_share.get(device_type, 1.0) * (settings.batch_size - 1)
    parts = {
        "frames": frames * p.frame * size[0] * size[1],
        "vae": frames * p.vae * vh * vw * scale,
        "unet+cfr": frames * _tiles_at_once(size, settings) * p.unet * lh * lw * scale,
        "slack": p.slack,
    }
    return Estimate(sum(parts.values()), parts, (vh, vw), (lh, lw))


def available(device: torch.device) -> tuple[float, str] | None:
    """(bytes free for this process, where that number comes from); None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free memory of {device} (torch.cuda.mem_get_info + cached)"
    found = []
    meminfo = _read_meminfo()
    if meminfo is not None:
        found.append((meminfo, "MemAvailable in /proc/meminfo"))
    limit = _cgroup_room()
    if limit is not None:
        found.append(limit)
    return min(found) if found else None


def _read_meminfo() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> tuple[float, str] | None:
    """Room left under this process's cgroup memory limit (v2, then v1); None without one."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            top = Path(limit).read_text().strip()
            used = int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
        if top == "max" or int(top) >= 2**60:  # no limit
            return None
        return int(top) - used, f"room under the cgroup limit ({limit})"
    return None


def check_fits(
    size: tuple[int, int],
    settings: Settings,
    *,
    profile: str,
    dtype: torch.dtype,
    device: torch.device,
    frame_size: tuple[int, int],
    flags: dict[str, str],
) -> Estimate:
    """Refuse (InsufficientMemory) when one batch at model input `size` is estimated to need more
    than the device has available now. `frame_size` (H, W) is the input frame, for the message;
    `flags` maps the Settings fields the caller can change to how they are set there, a format
    string for the value (e.g. {"latent_tile": "--latent-tile {}"}): the message proposes the
    first change that fits."""
    need = estimate(size, settings, profile, dtype, device.type)
    if os.environ.get(SKIP_ENV, "").lower() == "off":
        return need
    room = available(device)
    if room is None or need.bytes <= room[0]:
        return need
    free, source = room
    fix = _fitting(size, settings, profile, dtype, device.type, free, flags)
    (vh, vw), (lh, lw) = need.vae_area, need.latent_area
    message = (
        f"not enough memory: frames {frame_size[1]}x{frame_size[0]} (model input "
        f"{size[1]}x{size[0]}, batch {settings.batch_size}, {profile}, "
        f"{str(dtype).removeprefix('torch.')} on {device}; VAE on {vw}x{vh} pixels, CFR and "
        f"UNet on {lw}x{lh} latent positions at once) need about {need.describe()} per batch, "
        f"and {gib(free)} is available ({source}). "
    )
    if fix is not None:
        change, fitted = fix
        message += f"Use {change} (about {gib(fitted.bytes)})"
    else:
        message += "No tile or batch setting fits: use a smaller frame or a larger machine"
    message += f"; {SKIP_ENV}=off skips this check."
    raise InsufficientMemory(message)


def _fitting(size, settings, profile, dtype, device_type, free, flags):
    """The first change of the caller's settings (as its flags) whose estimate fits in `free`:
    the reference's VAE tiles waiting on the host, one latent tile per call, then smaller
    batches (none of these changes the frames, and a resumed upscale may change them), then VAE
    tiles of 8 latent tiles, smaller latent tiles (with VAE
    tiles of their size), then both."""
    tilings: list[tuple[dict, int, int | None]] = []
    vae = settings.tile or 0
    small_vae = 32 * max(2, 8 * (settings.latent_tile or 96) // 32)  # a valid VAE tile
    if "tile" in flags and (vae == 0 or vae > small_vae):
        tilings.append(({"tile": small_vae}, settings.latent_tile, small_vae))
    if "latent_tile" in flags:
        for t in (96, 64, 48):
            if (settings.latent_tile and t >= settings.latent_tile) or t <= settings.latent_overlap:
                continue
            if "tile" in flags and settings.tile != 8 * t:  # 8 * t: a multiple of 32
                tilings.append(({"latent_tile": t, "tile": 8 * t}, t, 8 * t))
            else:  # the VAE tile stays as it is (the caller cannot set it, or it is 8 * t)
                tilings.append(({"latent_tile": t}, t, settings.tile))
    batches = []
    if "batch_size" in flags:
        batches = sorted({max(1, settings.batch_size // 2**i) for i in range(1, 8)}, reverse=True)
        batches = [b for b in batches if b < settings.batch_size]
    candidates = []
    if (  # first: the reference's VAE tiles wait on the host (the same frames)
        "vae_tiles_wait" in flags
        and settings.tile is None
        and settings.vae_tiles_wait == "device"
        and device_type != "cpu"
        and not host_lacks_room(size, settings, profile, dtype, device_type)
    ):
        candidates.append(({"vae_tiles_wait": "host"}, replace(settings, vae_tiles_wait="host")))
    if "tile_batch" in flags and settings.tile_batch > 1:  # one tile per call
        candidates.append(({"tile_batch": 1}, replace(settings, tile_batch=1)))
    candidates += [({"batch_size": b}, replace(settings, batch_size=b)) for b in batches]
    candidates += [(c, replace(settings, latent_tile=t, tile=v)) for c, t, v in tilings]
    candidates += [
        ({**change, "batch_size": b}, replace(settings, batch_size=b, latent_tile=t, tile=v))
        for b in batches
        for change, t, v in tilings
    ]
    for change, candidate in candidates:
        fitted = estimate(size, candidate, profile, dtype, device_type)
        if fitted.bytes <= free:
            return " ".join(flags[k].format(v) for k, v in change.items()), fitted
    return None


def check_upscaler(
    upscaler, lq_size: tuple[int, int], frames: int, flags: dict[str, str]
) -> Estimate:
    """check_fits for a VideoUpscaler about to upscale `frames` LQ frames of `lq_size` (H, W):
    its geometry, options, model profile, dtype and device. First, where the reference's VAE
    tiles wait (`vae_tiles_wait`, see where_vae_tiles_wait); the upscaler is set so
    (`upscaler.vae_tiles.wait_on`)."""
    proc, _ = upscaler.geometry(lq_size)
    opt = upscaler.opt
    size = upscaler.model_size(proc)
    profile, dtype, device = upscaler.model.profile, upscaler.dtype, upscaler.device
    settings = Settings(
        max(1, min(opt.batch_size, frames)),
        opt.latent_tile,
        opt.tile,
        opt.latent_overlap,
        opt.tile_batch,
        opt.vae_encoder_tile,
        opt.vae_decoder_tile,
    )
    wait = where_vae_tiles_wait(opt.vae_tiles_wait, size, settings, profile, dtype, device)
    settings = replace(settings, vae_tiles_wait=wait)
    if upscaler.vae_tiles is not None:
        upscaler.vae_tiles = replace(upscaler.vae_tiles, wait_on=wait)
    if wait == "host":
        check_host_room(size, settings, profile, dtype, device.type)
    return check_fits(
        size,
        settings,
        profile=profile,
        dtype=dtype,
        device=device,
        frame_size=lq_size,
        flags=flags,
    )


def where_vae_tiles_wait(
    option: str,
    size: tuple[int, int],
    settings: Settings,
    profile: str,
    dtype: torch.dtype,
    device: torch.device,
) -> str:
    """Where the reference's VAE tiles wait between GroupNorm steps, "device" or "host", for the
    `vae_tiles_wait` option at model input `size`. On a CPU (the host is the device) and with
    diffusers' tiling or none (`tile` not None: nothing waits) always "device". Otherwise as
    asked; "auto" is the device, unless one batch with the tiles there is estimated not to fit
    in the device's memory available now while with them on the host it needs less, and the
    host has room for them (then the host). With the memory check off (DLORAL_MEMORY_CHECK=off)
    "auto" is the device: no estimate decides anything."""
    if device.type == "cpu" or settings.tile is not None:
        return "device"
    if option != "auto":
        return option
    if os.environ.get(SKIP_ENV, "").lower() == "off":
        return "device"
    on_device = estimate(
        size, replace(settings, vae_tiles_wait="device"), profile, dtype, device.type
    )
    room = available(device)
    if room is None or on_device.bytes <= room[0]:
        return "device"
    parked = estimate(size, replace(settings, vae_tiles_wait="host"), profile, dtype, device.type)
    if parked.bytes >= on_device.bytes or host_lacks_room(
        size, settings, profile, dtype, device.type
    ):
        return "device"
    return "host"


def host_lacks_room(
    size: tuple[int, int], settings: Settings, profile: str, dtype: torch.dtype, device_type: str
) -> tuple[float, float, str] | None:
    """(bytes the waiting tiles may take on the host, bytes available there, where that number
    comes from) when the host has no room for the reference's VAE tiles, else None: at most what
    they would take on the device (the estimate's VAE part with them there; a waiting tile holds
    its activation and a residual)."""
    on_device = estimate(
        size, replace(settings, vae_tiles_wait="device"), profile, dtype, device_type
    )
    room = available(torch.device("cpu"))
    if room is not None and on_device.parts["vae"] > room[0]:
        return on_device.parts["vae"], room[0], room[1]
    return None


def check_host_room(
    size: tuple[int, int], settings: Settings, profile: str, dtype: torch.dtype, device_type: str
) -> None:
    """Refuse (InsufficientMemory) when the reference's VAE tiles are to wait on the host and
    the host has no room for them (host_lacks_room)."""
    if os.environ.get(SKIP_ENV, "").lower() == "off":
        return
    lacking = host_lacks_room(size, settings, profile, dtype, device_type)
    if lacking is not None:
        need, room, source = lacking
        raise InsufficientMemory(
            f"not enough host memory for the VAE's tiles waiting there (--vae-tiles-wait host): "
            f"up to {gib(need)} per batch, and {gib(room)} is available ({source}). Use a "
            f"smaller --batch-size, --vae-tiles-wait device on a larger GPU, or smaller frames; "
            f"{SKIP_ENV}=off skips this check."
        )
