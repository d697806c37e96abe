"""Visual comparisons in a report: one clip's crops of GT, LQ and every method, and their x-t
profiles, as recorded by the benchmark harness (dloral.bench.visuals, whose `read_index` lists
them), composed into one figure.
"""

from __future__ import annotations

import textwrap
from collections.abc import Collection
from pathlib import Path

import numpy as np
from PIL import Image

from dloral.report.plots import FONT, FONT_MIN, UNTRAINED_NOTE

PANEL_CHARS = 18  # a panel title wraps at this many characters (a panel is 2 inches wide)


def visual_grid(entry: dict, labels: dict[str, str] | None = None, untrained: Collection[str] = ()):
    """One clip's comparison as a matplotlib Figure: context frame with the crop box, then a
    row of crops (GT, LQ, methods) and below each its x-t profile (time downwards). `labels`
    renames methods (e.g. with tables.UNTRAINED); `untrained` labels get a note below."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    folder = Path(entry["folder"])
    names = list(entry["images"])
    if not names:
        raise ValueError(f"{folder}: no images recorded for {entry['dataset']}/{entry['clip']}")
    shown = [(labels or {}).get(name, name) for name in names]
    n = len(names) + 1
    top, left, h, w = entry["box"]
    context = np.asarray(Image.open(folder / "context.png"))
    fig = Figure(figsize=(2.0 * n, 4.8), layout="constrained")
    axes = fig.subplots(2, n, height_ratios=[1.0, 0.8], squeeze=False)
    # the clip's name in full across the figure: a panel is too narrow for a long one
    fig.suptitle(
        f"{entry['dataset']} / {entry['clip']}, frame {entry['frame_name']}", fontsize=FONT + 1
    )
    # context: the frame (downsized) with the crop's box and the profile's row
    ax = axes[0][0]
    ax.imshow(context)
    k = context.shape[1] / entry["width"]
    ax.add_patch(Rectangle((left * k, top * k), w * k, h * k, fill=False, ec="red", lw=1.2))
    ax.axhline(entry["row"] * k, color="yellow", lw=0.6, ls="--")
    ax.set_title(textwrap.fill("the whole frame, the crop in red", PANEL_CHARS), fontsize=FONT_MIN)
    axes[1][0].text(
        0.5,
        0.5,
        "x-t profile:\nrow (yellow) of\nthe crop, time ↓",
        ha="center",
        va="center",
        fontsize=FONT_MIN,
    )
    for ax in (axes[0][0], axes[1][0]):
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1][0].axis("off")
    for j, (name, label) in enumerate(zip(names, shown, strict=True), 1):
        files = entry["images"][name]
        crop = np.asarray(Image.open(folder / files["crop"]))
        xt = np.asarray(Image.open(folder / files["xt"]))
        axes[0][j].imshow(crop, interpolation="nearest")
        axes[0][j].axhline(entry["row"] - top, color="yellow", lw=0.5, ls="--")
        axes[0][j].set_title(textwrap.fill(label, PANEL_CHARS), fontsize=FONT)
        axes[1][j].imshow(xt, interpolation="nearest", aspect="auto")
        axes[1][j].set_ylabel("frame", fontsize=FONT_MIN)
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks([])
            ax.tick_params(labelsize=FONT_MIN)
        axes[0][j].set_yticks([])
    if any(label in set(untrained) for label in shown):
        fig.supxlabel(UNTRAINED_NOTE, fontsize=FONT_MIN)
    return fig
