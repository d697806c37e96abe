"""Score one trial's checkpoint on the validation set: what the sweep prints for its best trials.

The metrics are the training validation's (RGB PSNR/SSIM without border crop, and the
warping-free temporal change error, see dloral.train.validation), on more clips and frames, plus
seconds per frame of the merged model. The benchmark harness (dloral.bench) is the place for the
paper metric set; this is the quick ablation readout.
"""

from __future__ import annotations

import time
from typing import Any


def score_checkpoint(
    checkpoint: str, cfg_dict: dict[str, Any], clips: int, frames: int, threads: int = 1
) -> dict[str, Any]:
    """checkpoint: a folder path or storage URI of a training step folder. threads: torch's
    threads for it (a Ray task's CPUs); 0 leaves the process's setting alone (the driver)."""
    import torch
    from ray.tune import Checkpoint

    from dloral.data.readers import read_dataset
    from dloral.devices import resolve_device, synchronize
    from dloral.model.checkpoint import load_checkpoint
    from dloral.train.config import TrainConfig
    from dloral.train.recipe import validate

    if threads > 0:
        torch.set_num_threads(int(threads))
    cfg = TrainConfig.from_dict(cfg_dict)
    device = resolve_device(cfg.run.device)
    with Checkpoint(checkpoint).as_directory() as folder:
        model, _ = load_checkpoint(folder)
    model = model.to(device)
    model.set_stage("inference")
    model.merge_lora()
    data = cfg.data
    val = read_dataset(data.val_kind, data.val_path(), lq=data.val_lq)
    chosen = val.clips if clips <= 0 else val.clips[:clips]
    cfg.data.val_frames = frames
    synchronize(device)
    t0 = time.perf_counter()
    metrics, _ = validate(model, cfg, {"device": device, "val_clips": chosen})
    synchronize(device)
    seconds = time.perf_counter() - t0
    n = sum(min(frames, len(c)) for c in chosen)
    return {
        **metrics,
        "s_per_frame": seconds / max(n, 1),
        "clips": len(chosen),
        "frames": n,
        "dataset": f"{data.val_kind}:{data.val_path()}:{data.val_lq}",
        "device": str(device),
    }
