"""Figures for comparison reports of VSR methods and for sweep ablations.

- `quality_speed`: one dataset, a quality metric against seconds per frame, one point per method
  (annotated), with the Pareto front (no other method is both faster and better). Answers "what
  does the quality cost?".
- `per_frame_curves`: one clip, one stacked panel per metric (named above it), one line per
  method over the frame index. Shows where along a clip methods differ (a scene cut, a flicker
  burst) that the clip mean hides. Pair metrics (E*warp, tOF, tLP: value i is between frames i
  and i+1) sit at i + 0.5.
- `ablation`: one swept key against one validation metric, every trial a point, so the spread
  across seeds is visible; trials that ASHA stopped early are hollow (their value is from an
  earlier step), and for a few categories the per-category mean ± 1 std is drawn.

Methods named in `untrained` (labels already carrying tables.UNTRAINED) are drawn hollow and
dashed, left off the Pareto front unless `rank_untrained`, and the figure says why in a note.

All figures use matplotlib's object API (`Figure`, never pyplot): no global state, no backend to
choose, safe in worker processes. Axis labels carry each metric's direction (↑ / ↓) and, where a
`scale` is known, the printed unit as in `dloral.report.tables`. Text is at least FONT_MIN points
and per-frame figures have one size whatever the number of panels, so that a report shows them
alike. `save` writes a PNG atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dloral.atomic import atomic_write
from dloral.bench.results import CLIP_LEVEL
from dloral.report.tables import UNTRAINED, metric_label, metric_scales

__all__ = ["ablation", "per_frame_curves", "quality_speed", "save"]

SPEED_LABELS = {"s_per_frame": "seconds / frame"}
FONT_MIN = 9  # points: the smallest text in a figure (ticks, legends)
FONT = 10  # axis labels
CURVES_SIZE = (7.0, 5.6)  # inches, every per-frame figure, whatever its number of panels
UNTRAINED_NOTE = f"{UNTRAINED} untrained weights (run provenance): shown, not ranked"
MAX_CATEGORIES = 6  # an ablation key with at most this many distinct values is categorical
_JITTER = 0.2  # half-width of the spread of one category's points, in category units


def quality_speed(
    agg: pd.DataFrame,
    dataset: str,
    metric: str,
    speed: str = "s_per_frame",
    *,
    scales: dict[str, float] | None = None,
    untrained: Collection[str] = (),
    rank_untrained: bool = False,
) -> Figure:
    """Methods on `dataset` as points (x = `speed`, y = `metric`), each named, with Pareto front.

    agg is `dloral.bench.results.aggregate` output (its `scale` column is used when present). x is
    log-scaled when the speeds span more than 10x. Where agg has `<speed>_min` and `<speed>_max`
    (the fastest and slowest timed pass) they are drawn as horizontal bars. `untrained` methods
    are hollow and not on the front (unless `rank_untrained`).
    """
    _require_columns(agg, ("dataset", "method", "metric", "value", "higher_is_better"), "agg")
    on = agg[agg["dataset"] == dataset]
    if on.empty:
        raise ValueError(f"no rows for dataset {dataset!r}; datasets: {_names(agg['dataset'])}")
    for name in (metric, speed):
        if name not in set(on["metric"]):
            raise ValueError(
                f"metric {name!r} not found on dataset {dataset!r}; "
                f"metrics there: {_names(on['metric'])}"
            )
    on = on[on["metric"].isin([metric, speed])]
    if on.duplicated(["method", "metric"]).any():
        raise ValueError(f"agg has more than one value per (method, metric) on {dataset!r}")
    wide = on.pivot(index="method", columns="metric", values="value")
    wide = wide.reindex(list(dict.fromkeys(on["method"])))[[speed, metric]].dropna()
    if wide.empty:
        raise ValueError(
            f"no method on dataset {dataset!r} has both {metric!r} and {speed!r}; "
            f"{metric!r}: {_names(on.loc[on['metric'] == metric, 'method'])}, "
            f"{speed!r}: {_names(on.loc[on['metric'] == speed, 'method'])}"
        )
    higher = dict(zip(on["metric"], on["higher_is_better"].astype(bool), strict=True))
    scale = metric_scales(agg, scales)
    x = wide[speed].to_numpy(float) * scale.get(speed, 1.0)
    y = wide[metric].to_numpy(float) * scale.get(metric, 1.0)

    marked = np.array([str(m) in set(untrained) for m in wide.index], dtype=bool)
    spread = on_spread(agg, dataset, speed, list(wide.index))

    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    if spread is not None:
        lo, hi = (spread * scale.get(speed, 1.0)).T
        ax.errorbar(x, y, xerr=[x - lo, hi - x], fmt="none", ecolor="0.5", lw=1, zorder=2)
    ax.scatter(x[~marked], y[~marked], s=36, color="C0", zorder=3)
    if marked.any():
        ax.scatter(
            x[marked],
            y[marked],
            s=36,
            facecolors="none",
            edgecolors="C3",
            zorder=3,
            label=UNTRAINED_NOTE + ("" if rank_untrained else ", not on the front"),
        )
    for method, xi, yi in zip(wide.index, x, y, strict=True):
        ax.annotate(
            str(method), (xi, yi), xytext=(5, 4), textcoords="offset points", fontsize=FONT_MIN
        )
    ranked = np.ones(len(x), dtype=bool) if rank_untrained else ~marked
    idx = np.flatnonzero(ranked)
    front = idx[_pareto_front(x[idx], y[idx], higher[speed], higher[metric])]
    front = front[np.argsort(x[front], kind="stable")]
    if len(front) > 1:
        ax.plot(
            x[front],
            y[front],
            "--",
            drawstyle="steps-pre" if higher[speed] else "steps-post",  # the dominated region
            color="0.6",
            zorder=2,
            label="Pareto front",
        )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=FONT_MIN)
    if x.min() > 0 and x.max() / x.min() > 10:
        ax.set_xscale("log")
    speed_name = SPEED_LABELS.get(speed, speed)
    bars = " (bars: fastest to slowest pass)" if spread is not None else ""
    ax.set_xlabel(_axis_label(speed_name, higher[speed], scale.get(speed, 1.0)) + bars)
    ax.set_ylabel(_axis_label(metric, higher[metric], scale.get(metric, 1.0)))
    ax.set_title(f"{dataset}: {metric} vs {speed_name} ({len(wide)} methods)", fontsize=FONT)
    ax.grid(True, which="major", alpha=0.3)
    _readable(fig)
    return fig


def on_spread(agg: pd.DataFrame, dataset: str, speed: str, methods: list[str]) -> np.ndarray | None:
    """(len(methods), 2) of `<speed>_min`, `<speed>_max` on dataset; None unless all have both."""
    names = [f"{speed}_min", f"{speed}_max"]
    on = agg[(agg["dataset"] == dataset) & agg["metric"].isin(names)]
    if on.empty:
        return None
    wide = on.pivot_table(index="method", columns="metric", values="value")
    wide = wide.reindex(index=methods, columns=names)
    return None if wide.isna().any().any() else wide.to_numpy(float)


def per_frame_curves(
    df: pd.DataFrame,
    dataset: str,
    clip: str,
    metrics: Sequence[str],
    *,
    scales: dict[str, float] | None = None,
    untrained: Collection[str] = (),
) -> Figure:
    """One panel per metric of `metrics` present for the clip, one line per method over frames.

    df is the long results table; clip-level rows (frame == -1) are ignored. Pair-level values
    (between frames i and i+1) are drawn at x = i + 0.5. Each method keeps one colour throughout;
    `untrained` methods are dashed. The figure is CURVES_SIZE whatever the number of panels.
    """
    _require_columns(df, ("dataset", "method", "clip", "frame", "metric", "value"), "df")
    on = df[(df["dataset"] == dataset) & (df["clip"] == clip)]
    if on.empty:
        clips = df.loc[df["dataset"] == dataset, "clip"]
        where = f"clips there: {_names(clips)}" if len(clips) else f"datasets: {_names(df.dataset)}"
        raise ValueError(f"no rows for clip {clip!r} of dataset {dataset!r}; {where}")
    on = on[on["frame"] != CLIP_LEVEL]
    present = [m for m in dict.fromkeys(metrics) if m in set(on["metric"])]
    if not present:
        raise ValueError(
            f"none of {list(metrics)} has per-frame values for clip {clip!r} of dataset "
            f"{dataset!r}; per-frame metrics there: {_names(on['metric'])}"
        )
    if on.duplicated(["method", "metric", "frame"]).any():
        raise ValueError(f"more than one value per (method, metric, frame) for clip {clip!r}")
    scale = scales or {}
    colours = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(on["method"]))}

    fig = Figure(figsize=CURVES_SIZE, layout="constrained")
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    pairs: list[bool] = []
    for ax, metric in zip(axes, present, strict=True):
        rows = on[on["metric"] == metric]
        pair = "level" in rows.columns and (rows["level"] == "pair").all()
        higher = bool(rows["higher_is_better"].iloc[0]) if "higher_is_better" in rows else True
        for method, colour in colours.items():
            line = rows[rows["method"] == method].sort_values("frame")
            if line.empty:
                continue
            x = line["frame"].to_numpy(float) + (0.5 if pair else 0.0)
            y = line["value"].to_numpy(float) * scale.get(metric, 1.0)
            ax.plot(
                x,
                y,
                marker="o" if len(x) <= 50 else None,
                ms=3,
                color=colour,
                ls="--" if method in set(untrained) else "-",
                label=method,
            )
        # above the panel, not along its side: a long name (ewarp@evalcrafter (×10⁻³)) would
        # not fit the height of one of three stacked panels
        ax.set_title(_axis_label(metric, higher, scale.get(metric, 1.0)), loc="left", fontsize=FONT)
        ax.grid(True, alpha=0.3)
        pairs.append(pair)
    if all(pairs):
        axes[-1].set_xlabel("frame pair (i, i+1), drawn at i + 0.5")
    elif any(pairs):
        axes[-1].set_xlabel("frame; a frame pair (i, i+1) is drawn at i + 0.5")
    else:
        axes[-1].set_xlabel("frame")
    shown = set(on["method"])
    note = UNTRAINED_NOTE if any(m in shown for m in untrained) else None
    axes[0].legend(loc="best", fontsize=FONT_MIN, title=note, title_fontsize=FONT_MIN)
    fig.suptitle(f"{dataset} / {clip}", fontsize=FONT + 2)
    _readable(fig)
    return fig


def ablation(
    trials: pd.DataFrame,
    key: str,
    metric: str,
    *,
    higher_is_better: bool,
    log_x: bool = False,
    label: str | None = None,
) -> Figure:
    """Every sweep trial as a point of (trials[key], trials[metric]); ASHA-stopped ones hollow.

    A non-numeric key, or one with at most 6 distinct values, is categorical: points are spread
    evenly (deterministic jitter) around their category and the mean of all plotted trials of a
    category is drawn with ±1 std (sample, when >= 2 trials), joined by a line for numeric keys.
    Otherwise it is a scatter, log x if `log_x`. Trials without a metric or key value are left out.
    """
    missing = [c for c in (key, metric) if c not in trials.columns]
    if missing:
        raise ValueError(
            f"trials lack column(s) {missing}; available: {', '.join(map(str, trials.columns))}"
        )
    d = trials.dropna(subset=[metric, key])
    if d.empty:
        raise ValueError(
            f"no trial has a value for both {metric!r} and {key!r} ({len(trials)} rows)"
        )
    if "trial_id" in d.columns:
        d = d.sort_values("trial_id", kind="stable")
    keys, numeric = _key_values(d[key])
    categorical = not numeric or keys.nunique() <= MAX_CATEGORIES
    xlabel = label or key
    y = d[metric].to_numpy(float)

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    if categorical:
        categories = sorted(keys.unique()) if numeric else sorted(keys.unique(), key=str)
        position = {c: i for i, c in enumerate(categories)}
        x = np.array([position[k] for k in keys], dtype=float)
        for c in categories:  # spread each category's points evenly, in trial order
            idx = np.flatnonzero(keys.to_numpy() == c)
            if len(idx) > 1:
                x[idx] += np.linspace(-_JITTER, _JITTER, len(idx))
    else:
        if log_x and (keys <= 0).any():
            raise ValueError(f"log_x needs positive {key!r} values; min is {keys.min()}")
        x = keys.to_numpy(float)

    status = d["status"].astype(str) if "status" in d.columns else pd.Series("finished", d.index)
    step = d["step"] if "step" in d.columns else None
    for name in dict.fromkeys(sorted(status, key=lambda s: (s != "finished", s != "stopped", s))):
        mask = (status == name).to_numpy()
        hollow = name == "stopped"
        ax.scatter(
            x[mask],
            y[mask],
            s=30,
            marker="o" if name in ("finished", "stopped") else "^",
            facecolors="none" if hollow else ("C0" if name == "finished" else "C1"),
            edgecolors="C0" if name in ("finished", "stopped") else "C1",
            linewidths=1.2,
            zorder=3,
            label=_status_label(name, int(mask.sum()), None if step is None else step[mask]),
        )

    if categorical:
        stats = pd.DataFrame({"k": keys.to_numpy(), "y": y}).groupby("k")["y"]
        mean, std, count = stats.mean(), stats.std(), stats.count()
        pos = np.arange(len(categories), dtype=float)
        means = mean.reindex(categories).to_numpy(float)
        ax.plot(
            pos,
            means,
            marker="D",
            ms=7,
            color="black",
            linestyle="-" if numeric else "none",
            zorder=4,
            label="mean ± 1 std" if (count >= 2).any() else "mean",
        )
        bars = (count.reindex(categories) >= 2).to_numpy()
        if bars.any():
            ax.errorbar(
                pos[bars],
                means[bars],
                yerr=std.reindex(categories).to_numpy(float)[bars],
                fmt="none",
                ecolor="black",
                capsize=4,
                zorder=4,
            )
        ax.set_xticks(pos, [_category_label(c) for c in categories])
        ax.set_xlim(-0.6, len(categories) - 0.4)
    elif log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_axis_label(metric, higher_is_better, 1.0))
    ax.set_title(f"{metric} vs {xlabel} ({len(d)} trials)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def _readable(fig: Figure) -> None:
    """Axis labels at FONT points, tick labels at FONT_MIN."""
    for ax in fig.axes:
        ax.xaxis.label.set_fontsize(FONT)
        ax.yaxis.label.set_fontsize(FONT)
        ax.tick_params(labelsize=FONT_MIN)


def save(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write fig as a PNG at `dpi`; atomic (readers never see a half-written file)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _axis_label(name: str, higher: bool, scale: float) -> str:
    """e.g. "psnr ↑ (higher is better)", "ewarp (×10⁻³) ↓ (lower is better)"."""
    label = metric_label(name, higher, scale)  # the table header, arrow last
    return f"{label[:-1]} {label[-1]} ({'higher' if higher else 'lower'} is better)"


def _pareto_front(x: np.ndarray, y: np.ndarray, x_higher: bool, y_higher: bool) -> np.ndarray:
    """Indices of points no other point beats on both axes, sorted by x."""
    sx = x if x_higher else -x
    sy = y if y_higher else -y
    keep = [
        i
        for i in range(len(x))
        if not any(
            sx[j] >= sx[i] and sy[j] >= sy[i] and (sx[j] > sx[i] or sy[j] > sy[i])
            for j in range(len(x))
        )
    ]
    return np.array(sorted(keep, key=lambda i: x[i]), dtype=int)


def _key_values(values: pd.Series) -> tuple[pd.Series, bool]:
    """The key column as numbers when every value is one (bools stay categories), else as is."""
    if pd.api.types.is_bool_dtype(values):
        return values, False
    as_numbers = pd.to_numeric(values, errors="coerce")
    if as_numbers.notna().all():
        return as_numbers, True
    return values.astype(str), False


def _category_label(value: object) -> str:
    if isinstance(value, float | np.floating) and math.isfinite(value):
        return f"{value:g}"
    return str(value)


def _status_label(status: str, n: int, steps: pd.Series | None) -> str:
    text = {"stopped": "stopped early by ASHA"}.get(status, status)
    if steps is not None and steps.notna().any():
        lo, hi = int(steps.min()), int(steps.max())
        at = f"step {lo}" if lo == hi else f"steps {lo}–{hi}"
        text += f" ({at} compared)" if status == "stopped" else f" ({at})"
    return f"{text}, n={n}"


def _require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what} lacks column(s) {missing}; has: {', '.join(map(str, df.columns))}"
        )


def _names(values: pd.Series) -> str:
    names = list(dict.fromkeys(map(str, values)))
    return ", ".join(names) if names else "(none)"
