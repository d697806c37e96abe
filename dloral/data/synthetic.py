"""Real-world-degraded LQ for a GT benchmark set, made once, seeded, and written down.

Real-VSR papers score synthetic sets (UDM10, SPMCS, REDS4, ...) on LQ frames made from the GT
with a real-world degradation pipeline (Real-ESRGAN / RealBasicVSR style), not on the classic
BIx4/BDx4 inputs; the LQ frames are made once and every method is run on the same files (DOVE
releases its degraded UDM10 and SPMCS that way: GT/ + LQ/ per set, zhengchen1999/DOVE
datasets/README.md). `degrade_set(kind, root, out)` does this for any GT set the readers know:

- every clip's GT frames are degraded with dloral.data.degradation.VideoDegradation, the same
  pipeline (and, by default, the same config) the training sampler draws from: one parameter
  draw per clip, the noise sample changing from frame to frame (`per_frame_noise`, as the
  sampler; off: one noise sample for the clip);
- each clip's seed is derived from the set's seed and the clip's name (sha256), so a clip's LQ
  does not depend on which other clips the set holds;
- out/LQ/<clip>/<GT frame stem>.png are the LQ frames, out/GT/<clip> a symbolic link to the GT
  clip's folder: DOVE's layout, read by the ``udm10`` kind with ``lq = "LQ"`` (the suites'
  `*-real` files); out/manifest.json records the source set, the pipeline's config, every clip's
  seed and draw, the GT frames' sha256 and the written files' sha256, the versions and commit.

The set is written in a temporary folder and renamed into place: an interrupted run leaves
none. The same command gives the same files (tested).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

FORMAT = "dloral-degraded/1"
MANIFEST = "manifest.json"


class DegradeError(ValueError):
    """A set that cannot be degraded as asked; the message names the clip or the setting."""


def clip_seed(seed: int, clip: str) -> int:
    """The seed of one clip: a function of the set's seed and the clip's name only."""
    digest = hashlib.sha256(f"{seed}:{clip}".encode()).hexdigest()
    return int(digest[:15], 16)


def degrade_set(
    kind: str,
    root: str | Path,
    out: str | Path,
    *,
    lq: str | None = None,
    gt_root: str | Path | None = None,
    scale: int = 4,
    seed: int = 0,
    per_frame_noise: bool = True,
    config: str | Path | None = None,
    progress=None,
) -> dict[str, Any]:
    """Write `out` (LQ/, GT/ links, manifest.json) from the GT clips of the set `kind` at
    `root` (`lq`, `gt_root`: as read_dataset takes them, to find the GT); the manifest."""
    import torch

    from dloral.atomic import atomic_folder, atomic_write_json
    from dloral.data.degradation import DegradationConfig, VideoDegradation
    from dloral.data.frames import write_png
    from dloral.data.readers import DatasetError, read_dataset
    from dloral.provenance import git_state, versions
    from dloral.weights import sha256

    out = Path(out)
    try:
        dataset = read_dataset(kind, root, lq=lq, gt_root=gt_root)
    except DatasetError as err:
        raise DegradeError(str(err)) from err
    clips = [c for c in dataset.clips if c.gt is not None]
    if not clips:
        raise DegradeError(f"{kind} at {root}: no clip has GT frames to degrade")
    cfg = DegradationConfig.from_toml(config) if config else DegradationConfig.from_toml()
    pipeline = VideoDegradation(cfg, scale=scale)
    records = []
    with atomic_folder(out) as tmp, torch.no_grad():
        files: dict[str, str] = {}
        for clip in clips:
            gt = clip.gt
            if gt.is_video:
                raise DegradeError(
                    f"{kind} clip {clip.name!r}: its GT is a video ({gt.path}); degrade reads GT "
                    f"frame folders (decode the video to PNG frames first)"
                )
            height, width = gt.size
            if height % scale or width % scale:
                raise DegradeError(
                    f"{kind} clip {clip.name!r}: GT frames {width}x{height} are not a multiple of "
                    f"the scale {scale}; the LQ grid would not align with the GT"
                )
            frames = torch.stack([frame for _, frame in gt.frames()])
            seed_ = clip_seed(seed, clip.name)
            generator = torch.Generator().manual_seed(seed_)
            draw = pipeline.sample(generator)
            degraded = pipeline.apply(frames, draw, generator, per_frame_noise)
            del frames
            folder = tmp / "LQ" / clip.name
            for name, frame in zip(gt.names, degraded, strict=True):
                path = folder / f"{Path(name).stem}.png"
                write_png(frame, path)
                files[path.relative_to(tmp).as_posix()] = sha256(path)
            link = tmp / "GT" / clip.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(gt.path.resolve(), target_is_directory=True)
            gt_digest = hashlib.sha256()
            for path in sorted(p for p in gt.path.iterdir() if p.is_file()):
                gt_digest.update(f"{path.name}:{sha256(path)}\n".encode())
            records.append(
                {
                    "name": clip.name,
                    "frames": len(gt.names),
                    "gt": str(gt.path.resolve()),
                    "gt_size": [height, width],
                    "lq_size": list(degraded.shape[-2:]),
                    "gt_sha256": gt_digest.hexdigest(),
                    "seed": seed_,
                    "draw": draw.describe(),
                }
            )
            if progress is not None:
                progress(clip.name, len(records), len(clips))
        manifest = {
            "format": FORMAT,
            "layout": 'udm10 kind, lq = "LQ" (GT/ + LQ/, DOVE\'s release layout)',
            "source": {
                "kind": kind,
                "root": str(Path(root).resolve()),
                "lq": lq,
                "gt_root": str(gt_root) if gt_root else None,
            },
            "scale": scale,
            "seed": seed,
            "clip_seed": "int(sha256(f'{seed}:{clip name}')[:15], 16)",
            "per_frame_noise": per_frame_noise,
            "degradation": {
                "pipeline": "dloral.data.degradation.VideoDegradation (Real-ESRGAN second order, "
                "one draw per clip)",
                "config_file": str(config) if config else "dloral/data/realesrgan.toml",
                "config": json.loads(json.dumps(asdict(cfg))),
            },
            "clips": records,
            "files": files,
            "versions": {k: v for k, v in versions().items() if k in ("dloral", "torch", "numpy")},
            **git_state(),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest
