"""What this machine has: every optional weight the suite can use, device, versions, settings.

`dloral-exp doctor` prints it; benchmarks record the same dict with their results. Each weight
entry says whether it was found, where it was looked for, and the env var that moves that place.
Nothing is loaded or downloaded.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

PACKAGES = (
    "dloral",
    "torch",
    "torchvision",
    "diffusers",
    "peft",
    "transformers",
    "ray",
    "mlflow",
    "pyiqa",
    "opencv-python-headless",
    "pandas",
    "numpy",
    "lpips",
)
OFFICIAL_CKPT_ENV = "DLORAL_CHECKPOINT"  # the official release's model.pkl, for benchmarks


def _weight(name: str, used_by: str, env: str, locate) -> dict[str, Any]:
    """Run a locate function; a not-found error's message lists where it looked."""
    try:
        path = locate()
        return {"name": name, "used_by": used_by, "found": True, "path": str(path), "env": env}
    except Exception as err:  # each locator raises its own "not found" error with the places
        return {
            "name": name,
            "used_by": used_by,
            "found": False,
            "looked": str(err),
            "env": env,
        }


def weights() -> list[dict[str, Any]]:
    from dloral.bench.flow import RAFT_ENV, locate_raft_weights
    from dloral.bench.iqa import IQA_METRICS, weights_status
    from dloral.model.backbone import SD21_ENV, locate_sd21
    from dloral.train.losses import VGG16_ENV, locate_vgg16

    out = [
        _weight("SD 2.1-base", "profile sd21 (upscale, train, bench)", SD21_ENV, locate_sd21),
        _weight("VGG16 (LPIPS loss)", "training loss.lpips", VGG16_ENV, locate_vgg16),
        _weight("RAFT-large", "E*warp / tOF flow (else OpenCV DIS)", RAFT_ENV, locate_raft_weights),
        _weight(
            "official DLoRAL model.pkl",
            "bench/upscale --checkpoint",
            OFFICIAL_CKPT_ENV,
            _official_checkpoint,
        ),
    ]
    for metric in [*IQA_METRICS, "dover"]:
        status = weights_status(metric)
        entry = {
            "name": f"pyiqa {metric}",
            "used_by": "bench metrics",
            "found": status["found"],
            "env": ", ".join(status["env"]) or "-",
        }
        if status["found"]:
            entry["path"] = "; ".join(status["paths"])
        else:
            missing = [f"{f['file']} in {f['folder']}" for f in status["files"] if not f["found"]]
            entry["looked"] = status.get("note") or "missing: " + "; ".join(missing)
        out.append(entry)
    return out


def _official_checkpoint():
    value = os.environ.get(OFFICIAL_CKPT_ENV)
    if not value:
        raise FileNotFoundError(
            f"not configured: set {OFFICIAL_CKPT_ENV}=/path/to/model.pkl (the release's "
            "checkpoint) or pass --checkpoint"
        )
    if not os.path.isfile(value):
        raise FileNotFoundError(f"{value} (from ${OFFICIAL_CKPT_ENV}): not found")
    return value


def device() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    import cv2

    out["cv2"] = cv2.__version__  # the OpenCV build that computes DIS flow
    return out


def settings() -> dict[str, str]:
    from dloral.data.embedded import DEFAULT_DIR_ENV, default_dir
    from dloral.tracking import tracking_uri

    address = os.environ.get("RAY_ADDRESS")
    return {
        "mlflow_tracking_uri": tracking_uri()
        + ("" if "MLFLOW_TRACKING_URI" in os.environ else " (default; $MLFLOW_TRACKING_URI)"),
        "ray": f"cluster {address} ($RAY_ADDRESS)" if address else "local: ray.init() here",
        "embedded_data": f"{default_dir()} (${DEFAULT_DIR_ENV})",
    }


def git_state() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it (numbers from
    uncommitted code say so); "unknown" outside a git checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=here
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown"}
    return {"git_commit": commit, "git_dirty": dirty}


def collect() -> dict[str, Any]:
    """Everything doctor reports, as plain data (JSON-ready)."""
    return {
        "device": device(),
        "versions": versions(),
        "settings": settings(),
        "weights": weights(),
    }
