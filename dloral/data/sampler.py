"""Training samples: N GT frames of one clip (every `frame_stride`-th), one crop and one flip /
rotation for all of them, LQ made on the fly by the video-consistent degradation (reference: 3
frames, 512 crop, x4) or read from disk (clips with pre-degraded LQ frames, `disk_lq`).

Per sample, in order: pick a clip and a start frame; read the frames (and their LQ); optionally
resize their short side (PIL BOX, as the reference's `resize_and_crop`); crop (random, or centred);
augment (a flip/transpose, or one of the 8 dihedral transforms); degrade unless LQ came from disk.

Every sample is a pure function of (seed, index): the same seed gives the same sample in any
process, so it works with any number of DataLoader workers and resumes exactly. Data-parallel
runs split each step's indices between their processes (`worker_indices`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dloral.data.config import SamplerConfig
from dloral.data.frames import to_tensor, to_uint8


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(T, 3, H, W) frames of 8-bit images -> short side `size`, long side int(long * size /
    short), PIL BOX on the uint8 image (the reference's `resize_and_crop` before its crop)."""
    h, w = frames.shape[-2:]
    if w < h:
        new_w, new_h = size, int(h * (size / w))
    else:
        new_h, new_w = size, int(w * (size / h))
    if (new_h, new_w) == (h, w):
        return frames
    return torch.stack(
        [
            to_tensor(np.asarray(Image.fromarray(to_uint8(f)).resize((new_w, new_h), Image.BOX)))
            for f in frames
        ]
    )


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Dihedral transform k of (..., H, W): k % 4 quarter turns (torch.rot90 over dims (-1, -2)),
    then a vertical flip for k >= 4; numbered as the reference's transform0..transform7."""
    x = torch.rot90(x, k % 4, dims=(-1, -2))
    return x.flip(-2) if k >= 4 else x


def _crop_corner(size: int, crop: int, mode: str, g: torch.Generator) -> int:
    if mode == "random":
        return int(torch.randint(size - crop + 1, (1,), generator=g))
    if mode == "center":
        return (size - crop) // 2
    return int(round((size - crop) / 2.0))


def worker_indices(start: int, stop: int, share: int, rank: int, workers: int) -> list[int]:
    """The sample indices process `rank` of `workers` trains on in steps start..stop-1, in order.

    Step s uses samples s*P .. s*P + P - 1 (P = workers * share) and rank r takes the r-th run of
    `share` (batch x accumulation) of them: the ranks' shares are disjoint, together they are
    exactly what one process with accumulation `workers` times longer draws, and one worker
    draws every index in order."""
    per_step = workers * share
    first = rank * share
    return [s * per_step + first + k for s in range(start, stop) for k in range(share)]


class TrainingClips(Dataset):
    """Dataset over GT clips -> {"gt": (N,3,c,c), "lq": (N,3,c/s,c/s), "clip", "start", "seed",
    "augment" (the dihedral index)}; s is the config's scale, or with `disk_lq` (the clips' own
    LQ frames, nothing degraded) each clip's GT/LQ scale: 1 for LQ stored at GT size, as the
    reference's LR frames."""

    def __init__(
        self,
        clips: Sequence,
        config: SamplerConfig | None = None,
        degradation=None,
        *,
        disk_lq: bool = False,
    ):
        from dloral.data.degradation import VideoDegradation

        self.cfg = cfg = config or SamplerConfig()
        self.disk_lq = disk_lq
        self.clips = [c for c in clips if c.gt is not None]
        if not self.clips:
            raise ValueError("no clip with GT frames to sample from")
        if disk_lq:
            no_lq = [c.name for c in self.clips if c.lq is None]
            if no_lq:
                raise ValueError(f"clips without LQ frames on disk: {', '.join(no_lq)}")
            sizes = (cfg.crop, cfg.resize_short_side)
            bad = [f"{c.name} (x{c.scale})" for c in self.clips if any(n % c.scale for n in sizes)]
            if bad:
                raise ValueError(
                    f"the {cfg.crop}px crop (and resize_short_side {cfg.resize_short_side}) must "
                    f"be multiples of the GT/LQ scale of: {', '.join(bad)}"
                )
        if not cfg.resize_short_side:
            small = [
                f"{c.name} ({c.gt.size[1]}x{c.gt.size[0]})"
                for c in self.clips
                if min(c.gt.size) < cfg.crop
            ]
            if small:
                raise ValueError(
                    f"clips smaller than the {cfg.crop}px crop: {', '.join(small)}. Train on "
                    f"frames at least {cfg.crop} px: set data.train_root to a folder of larger "
                    "clips (`python benchmarks/bench_gpu.py prepare DIR` writes bigbuckbunny's "
                    "1280x720 frames as one), or a smaller data.sampler.crop"
                )
        self.degradation = degradation or VideoDegradation(scale=cfg.scale)

    def __len__(self) -> int:
        return self.cfg.samples

    def __getitem__(self, index: int) -> dict:
        cfg = self.cfg
        if not 0 <= index < len(self):
            raise IndexError(index)
        seed = cfg.seed * 1_000_003 + index
        g = torch.Generator().manual_seed(seed)
        clip = self.clips[int(torch.randint(len(self.clips), (1,), generator=g))]
        n, stride = len(clip.gt), cfg.frame_stride
        count = min(cfg.frames, (n - 1) // stride + 1)
        start = int(torch.randint(n - (count - 1) * stride, (1,), generator=g))
        indices = [start + k * stride for k in range(count)]
        gt = clip.gt.read(indices)
        lq = clip.lq.read(indices) if self.disk_lq else None
        s = clip.scale if self.disk_lq else 1
        if cfg.resize_short_side:
            gt = resize_short_side(gt, cfg.resize_short_side)
            if lq is not None:
                lq = resize_short_side(lq, cfg.resize_short_side // s)
        # crop corners on the LQ grid when LQ comes from disk, so both sides stay aligned
        base = lq if lq is not None else gt
        c = cfg.crop // s
        top = _crop_corner(base.shape[-2], c, cfg.crop_mode, g)
        left = _crop_corner(base.shape[-1], c, cfg.crop_mode, g)
        gt = gt[..., s * top : s * top + cfg.crop, s * left : s * left + cfg.crop]
        if lq is not None:
            lq = lq[..., top : top + c, left : left + c]
        if count < cfg.frames:  # a still or very short clip: repeat its last frame (no motion)
            gt = torch.cat([gt, gt[-1:].expand(cfg.frames - count, -1, -1, -1)])
            if lq is not None:
                lq = torch.cat([lq, lq[-1:].expand(cfg.frames - count, -1, -1, -1)])
        k = self._augmentation(g)
        gt = dihedral(gt, k).contiguous()
        if lq is None:
            lq, _ = self.degradation(gt, seed=seed, per_frame_noise=cfg.per_frame_noise)
        else:
            lq = dihedral(lq, k).contiguous()
        return {"gt": gt, "lq": lq, "clip": clip.name, "start": start, "seed": seed, "augment": k}

    def _augmentation(self, g: torch.Generator) -> int:
        """The dihedral index (see `dihedral`) of this sample's flip / rotation."""
        if self.cfg.augment == "dihedral":
            return int(torch.randint(8, (1,), generator=g))
        if self.cfg.augment == "none":
            return 0
        flip = bool(torch.randint(2, (1,), generator=g))
        transpose = bool(torch.randint(2, (1,), generator=g))
        # x.flip(-1) is dihedral 6, x.transpose(-1, -2) is 7, x.flip(-1).transpose(-1, -2) is 3
        return {(False, False): 0, (True, False): 6, (False, True): 7, (True, True): 3}[
            (flip, transpose)
        ]


class StagedClips(Dataset):
    """One index space over a training set per stage: sample `index` comes from the set of
    `stage_of(index)` (a pure function, so workers and resumed runs see the same samples)."""

    def __init__(self, by_stage: Mapping[str, Dataset], stage_of: Callable[[int], str]):
        lengths = {len(d) for d in by_stage.values()}
        if len(lengths) != 1:
            raise ValueError(f"stage sets differ in length: {sorted(lengths)}")
        self.by_stage = dict(by_stage)
        self.stage_of = stage_of

    def __len__(self) -> int:
        return len(next(iter(self.by_stage.values())))

    def __getitem__(self, index: int) -> dict:
        return self.by_stage[self.stage_of(index)][index]
