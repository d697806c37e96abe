"""What every metric value carries: direction, kind, level and implementation; and the error
of a metric that cannot run here. dloral.bench.registry holds each metric's facts and builder.

Frames are float tensors in [0, 1], RGB, shape (T, 3, H, W) (one clip). A metric returns one
value per frame (shape (T,)), per frame pair for temporal metrics (shape (T-1,)), or one value
for the clip (0-d); the harness stores every value with the MetricInfo fields below, so a table
row always says which way is better and which code made it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    name: str  # as reported, e.g. "psnr", "ssim_y", "lpips", "ewarp@evalcrafter" (name@protocol)
    higher_is_better: bool
    kind: str  # "full_reference" | "no_reference" | "temporal"
    level: str  # "frame" | "pair" | "clip": what one value covers
    implementation: str  # code and convention, e.g. "dloral.bench.fullref: RGB, crop 0, uint8"
    scale: float = 1.0  # values are multiplied by this (E*warp is reported x1e3, i.e. "x10^-3")
    needs_gt: bool = True


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (weights missing, optional package absent). The message names
    the file, the folder it was looked for in and the env var that moves that folder."""


# values that are a convention of the metric's code rather than a measurement: (metric, value)
# -> the note stored with them; a report shows them but does not rank them
NOTED_VALUES = {
    ("piqe", 100.0): "PIQE found no active block: 100 by its definition, not a measurement",
}


def note(metric: str, value: float) -> str:
    """The note a value carries ("" for an ordinary value)."""
    return NOTED_VALUES.get((metric, value), "")
