"""Optical flow for temporal metrics: one interface, three estimators, nothing downloaded.

Convention (all estimators): `estimate(frames_a, frames_b)` takes (N, 3, H, W) float RGB in
[0, 1] and returns float32 flow (N, 2, H, W) in pixels (x, y) on frames_a's grid, pointing from
a to b: a[p] ~ b[p + flow[p]]. So `flow_warp(frames_b, flow)` (dloral.model.spynet) brings b
onto a; torchvision RAFT, OpenCV DIS/Farneback and SPyNet all use this direction.

- `RaftFlow`: torchvision `raft_large`, weights from a local file only (`$DLORAL_RAFT_WEIGHTS` or
  the torch hub cache); frames mapped to [-1, 1] as `Raft_Large_Weights.transforms` does, padded
  by edge replication (centred, as RAFT's `InputPadder`) to a multiple of 8 and at least 128.
- `DisFlow`: OpenCV DIS on grayscale uint8, no weights (the offline default).
- `FarnebackFlow`: OpenCV Farneback with TecoGAN's tOF settings, no weights.
Every estimator's `name` records what ran; result rows must carry it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from dloral.bench.metric import MetricUnavailable
from dloral.data.frames import to_uint8
from dloral.devices import resolve_device
from dloral.weights import WeightsMissing, find_weights

log = logging.getLogger(__name__)

__all__ = [
    "DisFlow",
    "FarnebackFlow",
    "FlowEstimator",
    "RAFT_ENV",
    "RAFT_FILE",
    "RaftFlow",
    "RaftWeightsMissing",
    "load_flow_estimator",
    "locate_raft_weights",
]

# torchvision's Raft_Large_Weights.DEFAULT (C_T_SKHT_V2): the file torch.hub would cache.
RAFT_FILE = "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
RAFT_ENV = "DLORAL_RAFT_WEIGHTS"


class RaftWeightsMissing(MetricUnavailable, WeightsMissing):
    """RAFT-large weights are not here: the flow metrics cannot use RAFT (a MetricUnavailable)."""


class FlowEstimator(Protocol):
    name: str

    def estimate(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) [0, 1] RGB pairs -> (N, 2, H, W) float32 pixels, a[p] ~ b[p + flow]."""
        ...


def _check_pair(frames_a: torch.Tensor, frames_b: torch.Tensor) -> None:
    if frames_a.dim() != 4 or frames_a.shape[1] != 3 or frames_a.shape != frames_b.shape:
        raise ValueError(
            f"flow needs two (N, 3, H, W) batches of equal shape, got {tuple(frames_a.shape)} "
            f"and {tuple(frames_b.shape)}"
        )


def _gray_uint8(frame: torch.Tensor) -> np.ndarray:
    import cv2

    return cv2.cvtColor(to_uint8(frame), cv2.COLOR_RGB2GRAY)


class _OpenCVFlow:
    """Per-pair OpenCV flow on grayscale uint8 (RGB -> gray by cv2.cvtColor, as TecoGAN)."""

    name = ""

    def _pair(self, gray_a: np.ndarray, gray_b: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def estimate(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        _check_pair(frames_a, frames_b)
        flows = [
            torch.from_numpy(self._pair(_gray_uint8(a), _gray_uint8(b))).permute(2, 0, 1)
            for a, b in zip(frames_a, frames_b, strict=True)
        ]
        return torch.stack(flows).float().to(frames_a.device)


class DisFlow(_OpenCVFlow):
    """OpenCV dense inverse search (Kroeger et al. 2016) with a named preset; no weights."""

    PRESETS = ("ultrafast", "fast", "medium")

    def __init__(self, preset: str = "medium", note: str = ""):
        import cv2

        if preset not in self.PRESETS:
            raise ValueError(f"DIS preset must be one of {', '.join(self.PRESETS)}; got {preset!r}")
        self._dis = cv2.DISOpticalFlow_create(
            getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{preset.upper()}")
        )
        self.name = f"opencv DIS {preset} (opencv {cv2.__version__}, grayscale uint8)" + note

    def _pair(self, gray_a: np.ndarray, gray_b: np.ndarray) -> np.ndarray:
        return self._dis.calc(gray_a, gray_b, None)


class FarnebackFlow(_OpenCVFlow):
    """OpenCV Farneback with TecoGAN's metrics.py settings (0.5, 3, 15, 3, 5, 1.2, 0)."""

    def __init__(self):
        import cv2

        self.name = (
            f"opencv Farneback (opencv {cv2.__version__}, grayscale uint8; pyr_scale 0.5, "
            "levels 3, winsize 15, iterations 3, poly_n 5, poly_sigma 1.2)"
        )

    def _pair(self, gray_a: np.ndarray, gray_b: np.ndarray) -> np.ndarray:
        import cv2

        return cv2.calcOpticalFlowFarneback(gray_a, gray_b, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def _hub_raft_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / RAFT_FILE


def locate_raft_weights(weights: str | os.PathLike | None = None) -> Path:
    """RAFT-large state_dict: explicit path (file or folder), $DLORAL_RAFT_WEIGHTS, torch hub."""
    found, looked = find_weights(
        RAFT_FILE,
        (
            (weights, "weights argument"),
            (os.environ.get(RAFT_ENV), f"${RAFT_ENV}"),
            (_hub_raft_path(), "torch hub cache, torch.hub.get_dir()/checkpoints"),
        ),
    )
    if found is not None:
        return found
    raise RaftWeightsMissing(
        f"RAFT-large weights ({RAFT_FILE}) for flow-based metrics not found. Looked in:\n  - "
        + "\n  - ".join(looked)
        + f"\nThis machine cannot download them. Copy {RAFT_FILE} from a connected machine's "
        f'~/.cache/torch/hub/checkpoints/ (created by `python -c "import torchvision; '
        f'torchvision.models.optical_flow.raft_large(weights=\\"DEFAULT\\")"`) into '
        f"{_hub_raft_path().parent}, or set {RAFT_ENV}=/path/to/{RAFT_FILE}; "
        "or use the DIS estimator (kind='dis')."
    )


class RaftFlow:
    """torchvision RAFT-large from a local state_dict; `iterations` refinement steps."""

    def __init__(
        self,
        weights: str | os.PathLike,
        device: torch.device | str = "cpu",
        iterations: int = 20,
        batch_size: int = 4,
    ):
        import torchvision
        from torchvision.models.optical_flow import raft_large

        path = Path(weights)
        self.device = torch.device(device)
        self.iterations = int(iterations)
        self.batch_size = int(batch_size)
        model = raft_large(weights=None, progress=False)  # random init: nothing is fetched
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise MetricUnavailable(
                f"{path} is not a torchvision raft_large state_dict ({RAFT_FILE} is); "
                f"princeton-vl RAFT checkpoints such as raft-things.pth use other key names. "
                f"Load error: {str(err)[:300]}"
            ) from err
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.name = (
            f"raft_large (torchvision {torchvision.__version__}, weights {path}, "
            f"{self.iterations} iterations)"
        )

    def estimate(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        _check_pair(frames_a, frames_b)
        h, w = frames_a.shape[-2:]
        # RAFT needs sides divisible by 8 and >= 128 (its 4-level correlation pyramid at 1/8)
        ph, pw = max(-h % 8, 128 - h), max(-w % 8, 128 - w)
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # left, right, top, bottom
        out = []
        with torch.inference_mode():
            for i in range(0, frames_a.shape[0], self.batch_size):
                a, b = (
                    F.pad(
                        x[i : i + self.batch_size].float().to(self.device) * 2 - 1, pad, "replicate"
                    )
                    for x in (frames_a, frames_b)
                )
                flow = self.model(a, b, num_flow_updates=self.iterations)[-1]
                out.append(flow[..., pad[2] : pad[2] + h, pad[0] : pad[0] + w].float())
        return torch.cat(out).to(frames_a.device)


def load_flow_estimator(
    kind: str = "auto",
    device: torch.device | str = "auto",
    weights: str | os.PathLike | None = None,
    iterations: int = 20,
) -> FlowEstimator:
    """kind: `raft` (needs local weights, else MetricUnavailable), `dis`, `farneback`, or `auto`
    (RAFT when its weights are found, else DIS medium, saying so in `name`)."""
    if kind == "dis":
        return DisFlow()
    if kind == "farneback":
        return FarnebackFlow()
    if kind not in ("raft", "auto"):
        raise ValueError(f"flow kind must be auto, raft, dis or farneback; got {kind!r}")
    try:
        path = locate_raft_weights(weights)
    except MetricUnavailable:
        if kind == "raft":
            raise
        log.warning("RAFT weights %s not found; temporal metrics use OpenCV DIS flow", RAFT_FILE)
        return DisFlow(note=f"; auto fallback: RAFT weights {RAFT_FILE} not found")
    return RaftFlow(path, resolve_device(str(device)), iterations=iterations)
