"""Real-world-degraded LQ for a GT benchmark set, made once, seeded, and written down.

Real-VSR papers score synthetic sets (UDM10, SPMCS, REDS4, ...) on LQ frames made from the GT
with a real-world degradation pipeline (Real-ESRGAN / RealBasicVSR style), not on the classic
BIx4/BDx4 inputs; the LQ frames are made once and every method is run on the same files (DOVE
releases its degraded UDM10 and SPMCS that way: GT/ + LQ/ per set, zhengchen1999/DOVE
datasets/README.md). `degrade_set(kind, root, out)` does this for any GT set the readers know:

- every clip's GT frames are degraded with dloral.data.degradation.VideoDegradation, the same
  pipeline (and, by default, the same config) the training sampler draws from: one parameter
  draw per clip (blur kernels, resizes, noise kind and level, JPEG qualities), applied to one
  frame at a time (memory does not grow with the clip), the noise sample changing from frame to
  frame (`per_frame_noise`, as the sampler; off: the same sample for every frame);
- each clip's seed is derived from the set's seed and the clip's name (sha256), and each frame's
  noise seed from the clip's seed and the frame's index, so a clip's LQ does not depend on which
  other clips the set holds;
- a peer layout (udm10, spmcs, vid4) is read from its GT/ alone (whatever LQ folders it has);
  an --out that is, holds or lies in the source is refused (it would change the GT);
- out/LQ/<clip>/<GT frame stem>.png are the LQ frames, out/GT/<clip> a symbolic link to the GT
  clip's folder (`gt="copy"`: a copy of its frames, a set that can be moved or sent on its
  own): DOVE's layout, read by the ``udm10`` kind with ``lq = "LQ"`` (the suites'
  `*-real` files); out/manifest.json records the source set, the pipeline's config, every clip's
  seed and draw, the GT frames' sha256 and the written files' sha256, the versions and commit.

The set is written in a temporary folder and renamed into place: an interrupted run leaves
none. The same command gives the same files (tested).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

FORMAT = "dloral-degraded/1"
MANIFEST = "manifest.json"
GT_MODES = {
    "link": "GT/<clip> links to the absolute GT folder recorded as `gt`",
    "copy": "GT/<clip> holds copies of the GT frames of the folder recorded as `gt`",
}


class DegradeError(ValueError):
    """A set that cannot be degraded as asked; the message names the clip or the setting."""


def clip_seed(seed: int, clip: str) -> int:
    """The seed of one clip: a function of the set's seed and the clip's name only."""
    digest = hashlib.sha256(f"{seed}:{clip}".encode()).hexdigest()
    return int(digest[:15], 16)


def frame_seed(clip: int, index: int) -> int:
    """The noise seed of frame `index` of a clip whose seed is `clip`."""
    return int(hashlib.sha256(f"{clip}:{index}".encode()).hexdigest()[:15], 16)


PEER_KINDS = ("udm10", "spmcs", "vid4")  # root/GT/<clip>/ beside root/<LQ>/<clip>/


def _gt_set(kind: str, root: Path, lq: str | None, gt_root: str | Path | None):
    """(the source's clips with their GT, whether it was read from GT/ alone): a peer layout's
    GT/ alone (its LQ folders are not needed, whichever it has), else the set as read_dataset
    reads it."""
    from dloral.data.readers import DatasetError, read_dataset

    if kind in PEER_KINDS and (root / "GT").is_dir() and gt_root is None:
        try:  # GT/<clip>/ frames (read as the youhq kind reads a folder), nothing else read
            return read_dataset("youhq", root / "GT"), True
        except DatasetError as err:
            raise DegradeError(f"{kind} GT {root / 'GT'}: {err}") from err
    try:
        return read_dataset(kind, root, lq=lq, gt_root=gt_root), False
    except DatasetError as err:
        raise DegradeError(str(err)) from err


def _check_apart(out: Path, sources: list[Path]) -> None:
    """Refuse an --out that is, holds or lies inside a source folder: writing it (or replacing
    it with --force) would change or delete the GT."""
    target = out.resolve()
    for source in sources:
        if target == source or target in source.parents or source in target.parents:
            raise DegradeError(
                f"--out {out} overlaps the source {source}: writing there would change or "
                f"delete the GT; choose a folder outside the set"
            )


def _versions() -> dict[str, str]:
    """The versions the frames depend on: provenance's, and Pillow's (it writes the PNGs)."""
    from importlib.metadata import PackageNotFoundError, version

    from dloral.provenance import versions

    out = {k: v for k, v in versions().items() if k in ("dloral", "torch", "torchvision", "numpy")}
    try:
        out["pillow"] = version("pillow")
    except PackageNotFoundError:
        out["pillow"] = "not installed"
    return out


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
    gt: str = "link",
    progress=None,
) -> dict[str, Any]:
    """Write `out` (LQ/, GT/ links or copies as `gt` says, manifest.json) from the GT clips of
    the set `kind` at `root` (`lq`, `gt_root`: as read_dataset takes them, to find the GT);
    the manifest."""
    import shutil

    import torch

    from dloral.atomic import atomic_folder, atomic_write_json
    from dloral.data.degradation import DegradationConfig, VideoDegradation
    from dloral.data.frames import write_png
    from dloral.provenance import git_state
    from dloral.weights import sha256

    out, root = Path(out), Path(root)
    if gt not in GT_MODES:
        raise DegradeError(f"--gt {gt!r}: one of {', '.join(GT_MODES)}")
    dataset, from_gt = _gt_set(kind, root, lq, gt_root)
    clips = [c for c in dataset.clips if c.gt is not None]
    if not clips:
        raise DegradeError(f"{kind} at {root}: no clip has GT frames to degrade")
    sources = [root.resolve()] + ([Path(gt_root).resolve()] if gt_root else [])
    _check_apart(out, sources + [c.gt.path.resolve() for c in clips])
    for clip in clips:
        source = clip.gt
        if "/" in clip.name or "\\" in clip.name:
            raise DegradeError(
                f"{kind} clip {clip.name!r}: a nested clip name; the degraded set holds "
                f"LQ/<clip>/ folders one level deep (degrade each category's folder on its own)"
            )
        if not source.path.is_dir():
            raise DegradeError(
                f"{kind} clip {clip.name!r}: its GT {source.path} is not a folder of frames (a "
                f"video or a still image); degrade reads GT frame folders (decode a video to PNG "
                f"first)"
            )
        height, width = source.size
        if height % scale or width % scale:
            raise DegradeError(
                f"{kind} clip {clip.name!r}: GT frames {width}x{height} are not a multiple of "
                f"the scale {scale}; the LQ grid would not align with the GT"
            )
    try:
        cfg = DegradationConfig.from_toml(config) if config else DegradationConfig.from_toml()
        cfg = replace(cfg, scale=scale)
    except (OSError, ValueError, KeyError) as err:
        raise DegradeError(f"--config {config}: {err}") from err
    pipeline = VideoDegradation(cfg, scale=scale)
    records = []
    with atomic_folder(out) as tmp, torch.no_grad():
        files: dict[str, str] = {}
        for clip in clips:
            source = clip.gt
            seed_ = clip_seed(seed, clip.name)
            height, width = source.size
            draw = pipeline.sample(torch.Generator().manual_seed(seed_))
            folder = tmp / "LQ" / clip.name
            # one frame at a time (memory flat in the clip's length): the clip's draw, and the
            # frame's noise from its own seed (frame 0's for every frame: one noise sample)
            for index, (name, frame) in enumerate(source.frames()):
                noise = frame_seed(seed_, index if per_frame_noise else 0)
                generator = torch.Generator().manual_seed(noise)
                lq_frame = pipeline.apply(frame[None], draw, generator, per_frame_noise=True)[0]
                path = folder / f"{Path(name).stem}.png"
                write_png(lq_frame, path)
                files[path.relative_to(tmp).as_posix()] = sha256(path)
            gt_folder = tmp / "GT" / clip.name
            gt_folder.parent.mkdir(parents=True, exist_ok=True)
            if gt == "copy":  # the frames read, nothing else of the folder
                gt_folder.mkdir()
                for name in source.names:
                    shutil.copy2(source.path / name, gt_folder / name)
            else:
                gt_folder.symlink_to(source.path.resolve(), target_is_directory=True)
            records.append(
                {
                    "name": clip.name,
                    "frames": len(source.names),
                    "gt": str(source.path.resolve()),
                    "gt_size": [height, width],
                    "lq_size": list(lq_frame.shape[-2:]),
                    "gt_sha256": _gt_digest(source.path, source.names),
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
                "root": str(root.resolve()),
                "read": "GT/ alone" if from_gt else "as the kind's reader reads it",
                "lq": None if from_gt else lq,
                "gt_root": str(gt_root) if gt_root else None,
            },
            "scale": scale,
            "seed": seed,
            "clip_seed": "int(sha256(f'{seed}:{clip name}')[:15], 16): the clip's draw",
            "noise": (
                "each frame on its own, the clip's draw; noise from "
                + (
                    "int(sha256(f'{clip seed}:{frame index}')[:15], 16) (a new sample per frame)"
                    if per_frame_noise
                    else "frame 0's seed, int(sha256(f'{clip seed}:0')[:15], 16), for every "
                    "frame (one noise sample for the clip)"
                )
            ),
            "per_frame_noise": per_frame_noise,
            "gt_sha256": "sha256 of the lines '<frame file>:<its sha256>', in frame order",
            "gt_folders": gt,
            "gt_folders_are": GT_MODES[gt],
            "degradation": {
                "pipeline": "dloral.data.degradation.VideoDegradation (Real-ESRGAN second order, "
                "one draw per clip)",
                "config_file": str(config) if config else "dloral/data/realesrgan.toml",
                "config": json.loads(json.dumps(asdict(cfg))),
            },
            "clips": records,
            "files": files,
            "versions": _versions(),
            **git_state(),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """What a benchmark records of a degraded set at `root` (its manifest's path, sha256, seed,
    source and noise), after checking every LQ file against the manifest's sha256; None where
    `root` holds no degraded set's manifest. A file that differs is a DegradeError naming it:
    the manifest would describe other frames than those scored."""
    from dloral.weights import sha256

    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        manifest = json.loads(data)
    except ValueError as err:
        raise DegradeError(f"{path}: not a JSON manifest ({err})") from err
    if manifest.get("format") != FORMAT:
        return None
    differ = [
        rel
        for rel, digest in manifest.get("files", {}).items()
        if not (Path(root) / rel).is_file() or sha256(Path(root) / rel) != digest
    ]
    if differ:
        raise DegradeError(
            f"{root}: {len(differ)} LQ file(s) differ from {path} (e.g. {', '.join(differ[:3])}); "
            f"the manifest no longer describes these frames: make the set again with "
            f"`dloral-exp data degrade ... --force`"
        )
    gt_differ = _gt_differ(Path(root), manifest.get("clips", []))
    if gt_differ:
        raise DegradeError(
            f"{root}: the GT of {len(gt_differ)} clip(s) differs from {path}: "
            f"{'; '.join(gt_differ[:3])}. The manifest no longer describes these frames: make "
            f"the set again (`--gt copy` keeps a copy of the GT inside it, so that it can move)"
        )
    return {
        "degraded_set": str(path),
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
        "files": len(manifest.get("files", {})),
        # the frames alone (LQ files and GT clips by content, no paths): the same for the same
        # set wherever it was made or moved, to tell runs on the same frames
        "files_sha256": hashlib.sha256(
            json.dumps(
                {
                    "lq": manifest.get("files", {}),
                    "gt": {c.get("name"): c.get("gt_sha256") for c in manifest.get("clips", [])},
                },
                sort_keys=True,
            ).encode()
        ).hexdigest(),
        "lq_verified": True,
        "gt_verified": True,
        "gt_folders": manifest.get("gt_folders", "link"),
        "seed": manifest.get("seed"),
        "per_frame_noise": manifest.get("per_frame_noise"),
        "source": manifest.get("source"),
    }


def _gt_digest(folder: Path, names) -> str:
    """A clip's `gt_sha256`: sha256 of the lines '<frame file>:<its sha256>', in frame order."""
    from dloral.weights import sha256

    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}:{sha256(folder / name)}\n".encode())
    return digest.hexdigest()


def _gt_differ(root: Path, clips: list[dict]) -> list[str]:
    """What differs between each clip's GT/<clip> and its manifest record: a folder that is gone
    (a link whose GT moved) or frames other than those digested as `gt_sha256`."""
    from dloral.data.frames import FrameError, open_frames

    differ = []
    for clip in clips:
        folder = root / "GT" / str(clip.get("name"))
        try:
            names = open_frames(folder).names
        except FrameError as err:
            where = f" (a link to {os.readlink(folder)})" if folder.is_symlink() else ""
            differ.append(f"GT/{clip.get('name')}{where}: {err}")
            continue
        if _gt_digest(folder, names) != clip.get("gt_sha256"):
            differ.append(
                f"GT/{clip.get('name')}: its {len(names)} frame(s) are not the "
                f"{clip.get('frames')} the LQ was made from (their sha256 differ)"
            )
    return differ
