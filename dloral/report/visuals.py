"""Visual comparisons in a report: one clip's crops of GT, LQ and every method, and their x-t
profiles, as recorded by the benchmark harness (dloral.bench.visuals, whose `read_index` lists
them), composed into one figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def visual_grid(entry: dict):
    """One clip's comparison as a matplotlib Figure: context frame with the crop box, then a
    row of crops (GT, LQ, methods) and below each its x-t profile (time downwards)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    folder = Path(entry["folder"])
    labels = list(entry["images"])
    if not labels:
        raise ValueError(f"{folder}: no images recorded for {entry['dataset']}/{entry['clip']}")
    n = len(labels) + 1
    top, left, h, w = entry["box"]
    context = np.asarray(Image.open(folder / "context.png"))
    fig = Figure(figsize=(2.0 * n, 4.4), layout="constrained")
    axes = fig.subplots(2, n, height_ratios=[1.0, 0.8], squeeze=False)
    # context: the frame (downsized) with the crop's box and the profile's row
    ax = axes[0][0]
    ax.imshow(context)
    k = context.shape[1] / entry["width"]
    ax.add_patch(Rectangle((left * k, top * k), w * k, h * k, fill=False, ec="red", lw=1.2))
    ax.axhline(entry["row"] * k, color="yellow", lw=0.6, ls="--")
    ax.set_title(f"{entry['clip']} frame {entry['frame_name']}", fontsize=8)
    axes[1][0].text(
        0.5,
        0.5,
        "x-t profile:\nrow (yellow) of\nthe crop, time ↓",
        ha="center",
        va="center",
        fontsize=8,
    )
    for ax in (axes[0][0], axes[1][0]):
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1][0].axis("off")
    for j, label in enumerate(labels, 1):
        files = entry["images"][label]
        crop = np.asarray(Image.open(folder / files["crop"]))
        xt = np.asarray(Image.open(folder / files["xt"]))
        axes[0][j].imshow(crop, interpolation="nearest")
        axes[0][j].axhline(entry["row"] - top, color="yellow", lw=0.5, ls="--")
        axes[0][j].set_title(label, fontsize=8)
        axes[1][j].imshow(xt, interpolation="nearest", aspect="auto")
        axes[1][j].set_ylabel("frame", fontsize=7)
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks([])
            ax.tick_params(labelsize=6)
        axes[0][j].set_yticks([])
    return fig
