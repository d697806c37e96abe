"""Resizing with PIL's bicubic kernel (a = -0.5), the one the reference upsamples LQ frames with.

Runs on float32 channels (PIL mode "F"), so nothing is quantised to uint8 on the way.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_bicubic(frame: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """frame (C, H, W) float -> (C, size[0], size[1]) float, PIL bicubic per channel."""
    h, w = size
    if tuple(frame.shape[-2:]) == (h, w):
        return frame
    src = frame.detach().float().cpu().numpy()
    out = np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(ch, dtype=np.float32)).resize(
                    (w, h), Image.BICUBIC
                )
            )
            for ch in src
        ]
    )
    return torch.from_numpy(out).to(frame.device)
