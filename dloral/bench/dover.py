"""DOVER video quality (Wu et al., ICCV 2023; VQAssessment/DOVER), scored as the official
scripts score one video: two views, two raw scores, the official normalisation and fusion.

Facts, each from the official file named:
- Views (dover/datasets/dover_datasets.py, options of `val-l1080p` in dover.yml, the set
  evaluate_one_video.py and evaluate_a_set_of_videos.py sample with):
  technical: `UnifiedFrameSampler(32, 3, 2)`: 3 segments of the video, one 32-frame run at
  stride 2 in each at a random start (`np.random.randint`; none when the segment is shorter than
  65 frames), indices modulo the frame count (a short clip repeats); `get_spatial_fragments`:
  7x7 fragments of 32x32 pixels, one per grid cell at a random offset in the cell
  (`torch.randint`, drawn for rows then columns, new offsets every 32 frames; none along a side
  whose cells are not wider than 32), spliced into a 224x224 view; 3 clips of 32 frames. A clip
  smaller than 224 on a side is first upscaled (bilinear, by 1/min(H/224, W/224), back to uint8
  by truncation), but the grid and offsets are those of the size before upscaling, so the
  fragments come from the top-left H x W of the upscaled frames: the official code's order.
  aesthetic: `UnifiedFrameSampler(1, 32, 2)`: one frame from each of 32 segments (their first
  frame unless a segment is longer than 2 frames); `get_resized_video`: torchvision
  `Resize((224, 224))` on the uint8 frames, which under the official torch~=1.13 /
  torchvision 0.14 (requirements.txt) is bilinear without antialiasing, rounded to uint8;
  1 clip of 32 frames.
- Normalisation (evaluate_one_video.py): (x - mean) / std per RGB channel, x in [0, 255],
  mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375).
- Raw score of a branch: its head's score map averaged over clips and positions (`r.mean()`).
- Fusion (`fuse_results` of evaluate_a_set_of_videos.py; evaluate_one_video.py's gives the same
  overall): t = (technical - 0.1107) / 0.07355, a = (aesthetic + 0.08285) / 0.03774,
  technical = sigmoid(t), aesthetic = sigmoid(a), overall = sigmoid(0.6104 t + 0.3896 a);
  the CSV of evaluate_a_set_of_videos.py prints them x100.
Randomness: the temporal starts come from a numpy RandomState and the fragment offsets from a
torch Generator, both seeded with `seed` for every clip, in the official order of draws: the same
clip and seed give the same score, another seed other fragments.
Weights: the official `DOVER.pth` (github.com/QualityAssessment/DOVER releases v0.1.0, or
huggingface.co/teowu/DOVER), from $DLORAL_DOVER_WEIGHTS or $TORCH_HOME/hub/checkpoints/; loaded
strictly (every key, no other). The network is dloral.bench.dover_net.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dloral.bench.dover_net import DoverNet, WindowAttention3D, relative_position_index
from dloral.bench.metric import MetricUnavailable
from dloral.weights import find_weights, hub_checkpoints, sha256

log = logging.getLogger(__name__)

__all__ = [
    "DOVER_ENV",
    "DOVER_FILE",
    "DoverScorer",
    "DoverWeightsMissing",
    "aesthetic_view",
    "dover_views",
    "fragments_view",
    "frame_indices",
    "fuse",
    "load_dover",
    "locate_dover_weights",
    "sample_frames",
]

DOVER_FILE = "DOVER.pth"
DOVER_ENV = "DLORAL_DOVER_WEIGHTS"
DOVER_URLS = (
    "https://github.com/QualityAssessment/DOVER/releases/download/v0.1.0/DOVER.pth",
    "https://huggingface.co/teowu/DOVER/resolve/main/DOVER.pth",
)

# evaluate_one_video.py: per-channel mean and std of [0, 255] RGB
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
# dover.yml, data.val-l1080p.args.sample_types
FRAGMENTS, FRAGMENT_SIZE, CLIP_LEN, FRAME_INTERVAL, TECHNICAL_CLIPS = 7, 32, 32, 2, 3
AESTHETIC_SIZE, AESTHETIC_T_FRAG = 224, 32
# evaluate_a_set_of_videos.py, fuse_results: (raw - mean) / std, then weights of the overall
TECHNICAL_MEAN, TECHNICAL_STD = 0.1107, 0.07355
AESTHETIC_MEAN, AESTHETIC_STD = -0.08285, 0.03774
TECHNICAL_WEIGHT, AESTHETIC_WEIGHT = 0.6104, 0.3896


class DoverWeightsMissing(MetricUnavailable):
    """DOVER.pth is not on this machine; the message says where it was looked for."""


# ---- views (dover_datasets.py) --------------------------------------------------------------


def sample_frames(
    num_frames: int, run: int, segments: int, interval: int, rng: np.random.RandomState
) -> np.ndarray:
    """`UnifiedFrameSampler(run, segments, interval)(num_frames)`: in each of `segments` equal
    segments, `run` frames `interval` apart from a random start (0 when the segment is no longer
    than run * interval); all indices modulo num_frames. (segments * run,) int32."""
    starts = np.array([num_frames // segments * i for i in range(segments)], dtype=np.int32)
    length = num_frames // segments
    if length > run * interval:
        offsets = rng.randint(0, length - run * interval, size=segments)
    else:
        offsets = np.zeros(segments, dtype=np.int32)
    indices = np.arange(run)[None, :] * interval + offsets[:, None] + starts[:, None]
    return np.mod(indices.reshape(-1), num_frames).astype(np.int32)


def fragments_view(video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`get_spatial_fragments` with dover.yml's technical options: uint8 (3, T, H, W), T a
    multiple of 32 -> float (3, T, 224, 224) of 7x7 fragments of 32x32 pixels."""
    size = FRAGMENTS * FRAGMENT_SIZE
    frames, height, width = video.shape[-3:]  # the grid's size: before upscaling, as official
    ratio = min(height / size, width / size)
    if ratio < 1:  # upscale so that the short side is 224; truncated back to uint8
        scaled = F.interpolate(video / 255.0, scale_factor=1 / ratio, mode="bilinear")
        video = (scaled * 255.0).to(video.dtype)
    video = video.float()  # the same integers; float copies below are 4x faster than uint8's
    if frames % CLIP_LEN:
        raise ValueError(f"fragments: {frames} frames is not a multiple of {CLIP_LEN}")
    rows = [min(height // FRAGMENTS * i, height - FRAGMENT_SIZE) for i in range(FRAGMENTS)]
    cols = [min(width // FRAGMENTS * i, width - FRAGMENT_SIZE) for i in range(FRAGMENTS)]
    shape = (FRAGMENTS, FRAGMENTS, frames // CLIP_LEN)
    offsets = []
    for cell in (height // FRAGMENTS, width // FRAGMENTS):  # rows first, as the official draws
        if cell > FRAGMENT_SIZE:
            offsets.append(torch.randint(cell - FRAGMENT_SIZE, shape, generator=generator))
        else:
            offsets.append(torch.zeros(shape, dtype=torch.long))
    dy, dx = offsets
    view = torch.zeros(video.shape[:-2] + (size, size))
    fs = FRAGMENT_SIZE
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            for t in range(frames // CLIP_LEN):
                y, x = top + int(dy[i, j, t]), left + int(dx[i, j, t])
                ts = slice(t * CLIP_LEN, (t + 1) * CLIP_LEN)
                view[:, ts, i * fs : (i + 1) * fs, j * fs : (j + 1) * fs] = video[
                    :, ts, y : y + fs, x : x + fs
                ]
    return view


def aesthetic_view(video: torch.Tensor) -> torch.Tensor:
    """`get_resized_video`: uint8 (3, T, H, W) -> uint8 (3, T, 224, 224), bilinear without
    antialiasing (torchvision 0.14's tensor Resize), rounded."""
    frames = video.permute(1, 0, 2, 3).float()
    size = (AESTHETIC_SIZE, AESTHETIC_SIZE)
    resized = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    return resized.round().to(torch.uint8).permute(1, 0, 2, 3)


def _normalise(view: torch.Tensor, clips: int) -> torch.Tensor:
    """(3, clips * t, H, W) in [0, 255] -> (clips, 3, t, H, W), mean/std normalised."""
    mean = torch.tensor(MEAN).view(3, 1, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1, 1)
    view = (view.float() - mean) / std
    return view.reshape(3, clips, -1, *view.shape[-2:]).transpose(0, 1)


def to_video_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Clip float (T, 3, H, W) in [0, 1] -> uint8 (3, T, H, W), rounded as image writers do."""
    if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"DOVER scores a (T, 3, H, W) RGB clip, got {tuple(frames.shape)}")
    if min(frames.shape[-2:]) < FRAGMENT_SIZE:
        raise ValueError(
            f"DOVER needs frames of at least {FRAGMENT_SIZE}x{FRAGMENT_SIZE} pixels (its "
            f"fragments), got {frames.shape[-2]}x{frames.shape[-1]}"
        )
    u8 = frames.detach().float().cpu().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return u8.permute(1, 0, 2, 3)


def frame_indices(num_frames: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """The frames of each view, drawn technical first (dover.yml's order): (96,), (32,)."""
    technical = sample_frames(num_frames, CLIP_LEN, TECHNICAL_CLIPS, FRAME_INTERVAL, rng)
    run = CLIP_LEN // AESTHETIC_T_FRAG
    aesthetic = sample_frames(num_frames, run, AESTHETIC_T_FRAG, FRAME_INTERVAL, rng)
    return technical, aesthetic


def dover_views(frames: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The two normalised views of a clip (T, 3, H, W) in [0, 1]: technical (3, 3, 32, 224,
    224) and aesthetic (1, 3, 32, 224, 224); the same clip and seed give the same views."""
    video = to_video_uint8(frames)
    technical, aesthetic = frame_indices(video.shape[1], np.random.RandomState(seed))
    generator = torch.Generator().manual_seed(seed)
    return {
        "technical": _normalise(
            fragments_view(video[:, torch.from_numpy(technical).long()], generator),
            TECHNICAL_CLIPS,
        ),
        "aesthetic": _normalise(aesthetic_view(video[:, torch.from_numpy(aesthetic).long()]), 1),
    }


# ---- fusion (evaluate_a_set_of_videos.py, fuse_results) ------------------------------------


def fuse(technical: float, aesthetic: float) -> dict[str, float]:
    """Raw branch scores -> {"overall", "technical", "aesthetic"} in (0, 1)."""
    t = (technical - TECHNICAL_MEAN) / TECHNICAL_STD
    a = (aesthetic - AESTHETIC_MEAN) / AESTHETIC_STD
    x = t * TECHNICAL_WEIGHT + a * AESTHETIC_WEIGHT
    return {"overall": _sigmoid(x), "technical": _sigmoid(t), "aesthetic": _sigmoid(a)}


def _sigmoid(x: float) -> float:
    return float(1 / (1 + np.exp(-np.float64(x))))


# ---- weights --------------------------------------------------------------------------------


def locate_dover_weights(weights: str | os.PathLike | None = None) -> Path:
    """DOVER.pth: explicit path (file or folder), $DLORAL_DOVER_WEIGHTS, torch hub."""
    found, looked = find_weights(
        DOVER_FILE,
        (
            (weights, "weights argument"),
            (os.environ.get(DOVER_ENV), f"${DOVER_ENV}"),
            (hub_checkpoints() / DOVER_FILE, "torch hub cache, torch.hub.get_dir()/checkpoints"),
        ),
    )
    if found is not None:
        return found
    raise DoverWeightsMissing(
        f"DOVER weights ({DOVER_FILE}, the official VQAssessment/DOVER model) not found. Looked "
        "in:\n  - "
        + "\n  - ".join(looked)
        + f"\nThis machine cannot download them. Download {DOVER_URLS[0]} (or {DOVER_URLS[1]}) "
        f"on a connected machine and copy it into {hub_checkpoints()} ($TORCH_HOME moves it), "
        f"or set {DOVER_ENV}=/path/to/{DOVER_FILE}."
    )


def load_dover(path: str | os.PathLike, device: str | torch.device = "cpu") -> DoverNet:
    """DoverNet with the weights of `path`, every key of the official layout and no other."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, pickled objects
        raise MetricUnavailable(f"{path}: cannot be read as a DOVER state dict: {err}") from err
    if not isinstance(state, dict):
        raise MetricUnavailable(f"{path}: holds a {type(state).__name__}, not a state dict")
    with torch.device("meta"):  # shapes only: no random init that the file would overwrite
        net = DoverNet()
    expected = net.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise MetricUnavailable(
            f"{path} is not the official {DOVER_FILE} layout: {len(missing)} missing key(s) "
            f"{sorted(missing)[:5]}, {len(unexpected)} unexpected {sorted(unexpected)[:5]}"
        )
    for key, value in expected.items():
        if value.shape != state[key].shape:
            raise MetricUnavailable(
                f"{path}: {key} has shape {tuple(state[key].shape)}, "
                f"DOVER's is {tuple(value.shape)}"
            )
    net.load_state_dict(state, strict=True, assign=True)
    for name, module in net.named_modules():  # computed, not learned: must be the model's own
        if isinstance(module, WindowAttention3D):
            own = relative_position_index(module.window)
            if not torch.equal(module.relative_position_index, own):
                raise MetricUnavailable(
                    f"{path}: {name}.relative_position_index differs from the index Swin3D "
                    f"computes for its window; not the official {DOVER_FILE}"
                )
    return net.float().eval().requires_grad_(False).to(device)


@dataclass
class DoverScorer:
    """A loaded DOVER: scores(frames) -> {"overall", "technical", "aesthetic"} of one clip.
    The last clip's raw scores are kept: the three protocols of one output cost one run."""

    net: DoverNet
    weights: Path
    weights_sha256: str
    seed: int = 0
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        self._last: tuple[torch.Tensor, int, dict[str, float]] | None = None

    @classmethod
    def load(cls, weights: str | os.PathLike | None, device: torch.device, seed: int = 0):
        path = locate_dover_weights(weights)
        log.info("DOVER: loading %s", path)
        return cls(load_dover(path, device), path, sha256(path), seed, torch.device(device))

    def describe(self) -> str:
        return (
            f"weights {self.weights} (sha256 {self.weights_sha256}), seed {self.seed}; views "
            "(dover.yml val-l1080p): technical 3 x 32 frames of 7x7 32-px fragments, aesthetic "
            "32 frames resized to 224x224"
        )

    def raw_scores(self, frames: torch.Tensor) -> dict[str, float]:
        """Clip (T, 3, H, W) in [0, 1] -> the raw {"technical", "aesthetic"} scores."""
        last = self._last
        if last is not None and last[0] is frames and last[1] == frames._version:
            return last[2]
        views = dover_views(frames, self.seed)
        with torch.inference_mode():
            raw = self.net({k: v.to(self.device) for k, v in views.items()})
        raw = {branch: float(score) for branch, score in raw.items()}
        self._last = (frames, frames._version, raw)
        return raw

    def scores(self, frames: torch.Tensor) -> dict[str, float]:
        """Clip (T, 3, H, W) in [0, 1] -> {"overall", "technical", "aesthetic"} in (0, 1)."""
        raw = self.raw_scores(frames)
        return fuse(raw["technical"], raw["aesthetic"])
