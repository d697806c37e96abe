"""The data settings as plain dataclasses: dataset kinds, the training sampler and the shift
pseudo-videos, and where the embedded sets live. No torch here, so a training config is read and
checked in a fraction of a second; the readers and the sampler import these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dloral.weights import DATA_DIR_ENV, data_dir

DEFAULT_DIR_ENV = DATA_DIR_ENV  # where the embedded sets are prepared (dloral.data.embedded)


KINDS = (
    "udm10",
    "spmcs",
    "vid4",
    "reds4",
    "reds30",
    "videolq",
    "youhq",
    "folders",
    "videos",
    "shift",
)
GT_ONLY_KINDS = ("youhq", "shift")  # the kinds that take an lq_root


@dataclass
class ShiftConfig:
    """Pseudo-videos of the ``shift`` kind: one still image, `frames` shifted windows."""

    frames: int = 10  # the reference's LSDIR clips have 10 frames (yjsunnn/DLoRAL issue #14)
    max_step: int = 8  # largest shift between consecutive frames, pixels per axis
    seed: int = 0  # with the image's name, fixes every clip's shifts

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"data.shift.frames must be >= 1; got {self.frames}")
        if self.max_step < 0:
            raise ValueError(f"data.shift.max_step must be >= 0; got {self.max_step}")


CROP_MODES = ("random", "center", "center_round")
AUGMENTS = ("flip_transpose", "dihedral", "none")


@dataclass
class SamplerConfig:
    frames: int = 3  # frames per sample
    crop: int = 512  # GT crop size (LQ is crop / scale)
    scale: int = 4
    samples: int = 1000  # length of one epoch
    seed: int = 0
    # every frame_stride-th frame from the start (the reference's Pexels clips: 10)
    frame_stride: int = 1
    # short side resized to this (PIL BOX) before cropping; 0: off (the reference: 512)
    resize_short_side: int = 0
    # random | center (floor((H - crop) / 2), as PIL resize_and_crop) | center_round
    # (round((H - crop) / 2), as torchvision's CenterCrop)
    crop_mode: str = "random"
    # flip_transpose: random horizontal flip and random H/W swap (4 of the 8 dihedral
    # transforms); dihedral: one of all 8, as the reference's Augment_RGB_torch; none
    augment: str = "flip_transpose"
    # true: each frame its own noise sample (the clip's kind and level), as real video noise and
    # RealBasicVSR's RandomNoise; false: one noise field frozen over the clip's frames
    per_frame_noise: bool = True

    def __post_init__(self):
        if self.crop % self.scale:
            raise ValueError(f"crop {self.crop} must be a multiple of scale {self.scale}")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1; got {self.frames}")
        if self.frame_stride < 1:
            raise ValueError(f"data.sampler.frame_stride must be >= 1; got {self.frame_stride}")
        if self.resize_short_side and self.resize_short_side < self.crop:
            raise ValueError(
                f"data.sampler.resize_short_side must be 0 (off) or at least the {self.crop}px "
                f"crop; got {self.resize_short_side}"
            )
        if self.crop_mode not in CROP_MODES:
            raise ValueError(
                f"data.sampler.crop_mode must be one of {CROP_MODES}; got {self.crop_mode!r}"
            )
        if self.augment not in AUGMENTS:
            raise ValueError(
                f"data.sampler.augment must be one of {AUGMENTS}; got {self.augment!r}"
            )


def default_dir() -> Path:
    """$DLORAL_DATA_DIR or data/embedded: the sets, and the tiny VAE trained on embedded-train."""
    return data_dir()
