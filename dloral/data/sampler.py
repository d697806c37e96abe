"""Training samples: N consecutive GT frames, one random crop and flip/transpose for all of them,
LQ made on the fly by the video-consistent degradation (reference: 3 frames, 512 crop, x4).

Every sample is a pure function of (seed, index): the same seed gives the same sample in any
process, so it works with any number of DataLoader workers and resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from dloral.data.frames import FrameSource, read_image


@dataclass
class SamplerConfig:
    frames: int = 3  # consecutive frames per sample
    crop: int = 512  # GT crop size (LQ is crop / scale)
    scale: int = 4
    samples: int = 1000  # length of one epoch
    seed: int = 0
    flip: bool = True  # horizontal flip, as BasicSR's augment
    transpose: bool = True  # swap H and W (with flip, covers the 90-degree rotations)
    per_frame_noise: bool = False

    def __post_init__(self):
        if self.crop % self.scale:
            raise ValueError(f"crop {self.crop} must be a multiple of scale {self.scale}")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1; got {self.frames}")


def _read_frames(source: FrameSource, start: int, count: int) -> torch.Tensor:
    """Frames start..start+count of a clip; folders read only those files."""
    if not source.is_video:
        return torch.stack(
            [read_image(source.path / n) for n in source.names[start : start + count]]
        )
    frames = []
    for i, (_, frame) in enumerate(source.frames()):
        if i >= start:
            frames.append(frame)
        if len(frames) == count:
            break
    return torch.stack(frames)


class TrainingClips(Dataset):
    """Dataset over GT clips -> {"gt": (N,3,c,c), "lq": (N,3,c/s,c/s), "clip", "start", "seed"}."""

    def __init__(self, clips: Sequence, config: SamplerConfig | None = None, degradation=None):
        from dloral.data.degradation import VideoDegradation

        self.cfg = cfg = config or SamplerConfig()
        self.clips = [c for c in clips if c.gt is not None]
        if not self.clips:
            raise ValueError("no clip with GT frames to sample from")
        small = [c.name for c in self.clips if min(c.gt.size) < cfg.crop]
        if small:
            raise ValueError(f"clips smaller than the {cfg.crop}px crop: {', '.join(small)}")
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
        n = len(clip.gt)
        count = min(cfg.frames, n)
        start = int(torch.randint(n - count + 1, (1,), generator=g))
        h, w = clip.gt.size
        top = int(torch.randint(h - cfg.crop + 1, (1,), generator=g))
        left = int(torch.randint(w - cfg.crop + 1, (1,), generator=g))
        flip = cfg.flip and bool(torch.randint(2, (1,), generator=g))
        transpose = cfg.transpose and bool(torch.randint(2, (1,), generator=g))
        gt = _read_frames(clip.gt, start, count)[..., top : top + cfg.crop, left : left + cfg.crop]
        if count < cfg.frames:  # a still or very short clip: repeat its last frame (no motion)
            gt = torch.cat([gt, gt[-1:].expand(cfg.frames - count, -1, -1, -1)])
        if flip:
            gt = gt.flip(-1)
        if transpose:
            gt = gt.transpose(-1, -2)
        gt = gt.contiguous()
        lq, _ = self.degradation(gt, seed=seed, per_frame_noise=cfg.per_frame_noise)
        return {"gt": gt, "lq": lq, "clip": clip.name, "start": start, "seed": seed}
