"""Every optional weight the suite can use: found or not, where it was looked for, and the env
var that moves that place. Nothing is loaded or downloaded.

Benchmarks record this list in run.json; `dloral-exp doctor` prints it.
"""

from __future__ import annotations

import os
from typing import Any

from dloral.weights import WeightsMissing

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
    from dloral.bench.dover import DOVER_ENV, locate_dover_weights
    from dloral.bench.flow import RAFT_ENV, locate_raft_weights
    from dloral.bench.iqa import IQA_METRICS, weights_status
    from dloral.model.backbone import SD21_ENV, locate_sd21
    from dloral.weights import (
        SPYNET_ENV,
        TAGGER_ENV,
        TINY_VAE_ENV,
        VGG16_ENV,
        locate_spynet,
        locate_tagger,
        locate_tiny_vae,
        locate_vgg16,
    )

    out = [
        _weight("SD 2.1-base", "profile sd21 (upscale, train, bench)", SD21_ENV, locate_sd21),
        _weight(
            "tiny VAE (trained on embedded-train)",
            "profile tiny (`dloral-exp data prepare` trains it)",
            TINY_VAE_ENV,
            locate_tiny_vae,
        ),
        _weight(
            "SPyNet (BasicVSR)",
            "CFR flow, model.cfr.spynet (sd21 default; tiny runs zero-flow)",
            SPYNET_ENV,
            locate_spynet,
        ),
        _weight("VGG16 (LPIPS loss)", "training loss.lpips", VGG16_ENV, locate_vgg16),
        _weight(
            "tagger module",
            "tagger prompts (upscale --tagger, loss.prompt_source = tagger)",
            TAGGER_ENV,
            locate_tagger,
        ),
        _weight("RAFT-large", "E*warp / tOF flow (else OpenCV DIS)", RAFT_ENV, locate_raft_weights),
        _weight(
            "DOVER (VQAssessment)",
            "bench metrics dover@overall, dover@technical, dover@aesthetic",
            DOVER_ENV,
            locate_dover_weights,
        ),
        _weight(
            "official DLoRAL model.pkl",
            "bench/upscale --checkpoint",
            OFFICIAL_CKPT_ENV,
            _official_checkpoint,
        ),
    ]
    for metric in IQA_METRICS:
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
        raise WeightsMissing(
            f"not configured: set {OFFICIAL_CKPT_ENV}=/path/to/model.pkl (the release's "
            "checkpoint) or pass --checkpoint"
        )
    if not os.path.isfile(value):
        raise WeightsMissing(f"{value} (from ${OFFICIAL_CKPT_ENV}): not found")
    return value
