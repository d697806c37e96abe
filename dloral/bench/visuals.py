"""Visual comparisons: the same crop of GT, LQ and every method's output, and x-t profiles.

The benchmark harness records them while it has the frames in memory (methods are run once per
clip; nothing is re-run for a report). Per clip it picks one frame (the middle one) and one crop:
the window of most texture in the reference (GT, else LQ upsampled), where methods differ most
visibly. It then saves, for GT, LQ and each method:

    <role>-crop.png   the crop of the chosen frame (LQ: its pixels repeated x scale, not smoothed)
    <role>-xt.png     the temporal profile: row `row` of the crop's columns over every frame,
                      one image row per frame (an x-t slice, as VSR papers show flicker)

plus `context.png` (the whole GT/LQ frame, downsized, for where the crop is). `index.json` in the
visuals folder lists every clip's files with the frame, box and row, and is rewritten atomically
after each clip; `read_index` reads it back. dloral.report.visuals composes one clip's images
into a report figure.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dloral.atomic import atomic_write, atomic_write_json
from dloral.data.frames import to_uint8

INDEX = "index.json"
CROP = 96  # output pixels: a 24x24 LQ patch at x4
CONTEXT_WIDTH = 320


@dataclass
class ClipVisual:
    dataset: str
    clip: str
    folder: Path
    frame: int  # index within the scored frames
    frame_name: str
    box: tuple[int, int, int, int]  # (top, left, height, width) in output pixels
    row: int  # the x-t profile's row, in output pixels
    scale: int
    width: int  # the whole frame's width in output pixels (context.png is downsized from it)
    images: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> {crop, xt}

    def to_dict(self, root: Path) -> dict:
        return {
            "dataset": self.dataset,
            "clip": self.clip,
            "frame": self.frame,
            "frame_name": self.frame_name,
            "box": list(self.box),
            "row": self.row,
            "scale": self.scale,
            "width": self.width,
            "folder": str(self.folder.relative_to(root)),
            "images": self.images,
        }


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", text).strip("_") or "x"


def texture_box(ref: torch.Tensor, size: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the size x size window with most gradient energy in ref (3, H, W);
    windows on a stride of size/4, clamped to the frame; deterministic (first maximum)."""
    _, h, w = ref.shape
    ch, cw = min(size, h), min(size, w)
    gray = ref.mean(0, keepdim=True)[None]  # (1, 1, H, W)
    gy = (gray[..., 1:, :] - gray[..., :-1, :]).abs()[..., :, :-1]
    gx = (gray[..., :, 1:] - gray[..., :, :-1]).abs()[..., :-1, :]
    energy = F.pad(gx + gy, (0, 1, 0, 1))
    stride = max(1, min(ch, cw) // 4)
    sums = F.avg_pool2d(energy, (ch, cw), stride=stride)[0, 0]
    i = int(torch.argmax(sums))
    top, left = divmod(i, sums.shape[1])
    return top * stride, left * stride, ch, cw


def _save_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


class VisualRecorder:
    """Records one benchmark run's visual comparisons under `root` (cleared at start)."""

    def __init__(self, root: str | Path, crop: int = CROP):
        self.root = Path(root)
        self.crop = crop
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.clips: list[ClipVisual] = []

    def start_clip(
        self,
        dataset: str,
        clip: str,
        names: tuple[str, ...],
        lq: torch.Tensor | None,
        gt: torch.Tensor | None,
        scale: int,
        out_size: tuple[int, int] | None,
    ) -> ClipVisual | None:
        """Choose frame, crop and row; save GT and LQ. None when the clip has no frames."""
        if not names or (lq is None and gt is None):
            return None
        t = len(names) // 2
        lq_up = None
        if lq is not None:
            lq_up = lq.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
            if out_size is not None:
                lq_up = lq_up[..., : out_size[0], : out_size[1]]
        ref = gt if gt is not None else lq_up
        box = texture_box(ref[t], self.crop)
        folder = self.root / _slug(dataset) / _slug(clip)
        row = box[0] + box[2] // 2
        vis = ClipVisual(dataset, clip, folder, t, names[t], box, row, scale, ref.shape[-1])
        context = to_uint8(ref[t])
        ctx = Image.fromarray(context)
        if ctx.width > CONTEXT_WIDTH:
            ctx = ctx.resize((CONTEXT_WIDTH, round(ctx.height * CONTEXT_WIDTH / ctx.width)))
        _save_png(folder / "context.png", np.asarray(ctx))
        if gt is not None:
            self.add(vis, "GT", gt, role="gt")
        if lq_up is not None:
            self.add(vis, f"LQ (pixels ×{scale})", lq_up, role="lq")
        return vis

    def add(self, vis: ClipVisual | None, label: str, frames: torch.Tensor, role: str = "") -> None:
        """Save `frames`' crop and x-t profile under `label` (a method name, GT or LQ)."""
        if vis is None:
            return
        top, left, h, w = vis.box
        if frames.shape[-2] < top + h or frames.shape[-1] < left + w:
            return  # an output of another size cannot show the same crop
        role = role or f"m{len(vis.images)}-{_slug(label)}"
        crop = to_uint8(frames[vis.frame, :, top : top + h, left : left + w])
        xt = frames[:, :, vis.row, left : left + w]  # (T, 3, w)
        xt_img = (xt.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 1).numpy()
        _save_png(vis.folder / f"{role}-crop.png", crop)
        _save_png(vis.folder / f"{role}-xt.png", np.ascontiguousarray(xt_img))
        vis.images[label] = {"crop": f"{role}-crop.png", "xt": f"{role}-xt.png"}

    def finish_clip(self, vis: ClipVisual | None) -> None:
        if vis is None:
            return
        self.clips.append(vis)
        atomic_write_json(self.root / INDEX, [c.to_dict(self.root) for c in self.clips])


def read_index(root: str | Path) -> list[dict]:
    """index.json entries with `folder` made absolute; [] when the run recorded none."""
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    for e in entries:
        e["folder"] = str(root / e["folder"])
    return entries
