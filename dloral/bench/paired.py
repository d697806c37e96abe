"""Paired comparisons over clips: whether a method's lead in a table is more than its clips' luck.

A dataset's table ranks methods by their means over clips (`results.aggregate`). On UDM10's ten
clips or REDS4's four, a lead in the second decimal can be one clip's doing. Here each method is
set against the best one of a metric on the same clips, the per-clip means the table averages:

- `diff`: the mean of the per-clip differences (method - best), which is the difference of the
  table's two means;
- `ci_low`, `ci_high`: a 95% paired bootstrap interval of that mean (the clips resampled with
  replacement, 10,000 times, from a fixed seed; percentile interval), given from 5 clips on;
- `better`, `worse`: on how many clips the method is better or worse than the best, in the
  metric's direction;
- `p`: the two-sided p-value of a sign-flip permutation test of the mean difference (under "no
  difference" each clip's difference is as likely to have either sign): exact, every one of the
  2^n sign patterns, up to 16 clips, else 100,000 random patterns from a fixed seed. With n clips
  no p is below 2 / 2^n: four clips can never give p < 0.05.

Where a per-clip value is infinite (the PSNR of outputs equal to the GT) the mean difference is
infinite and there is no interval nor p (NaN); the clip counts still say who is ahead.

Clips, not frames, are the unit: a clip's frames are not independent samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection

import numpy as np
import pandas as pd

from dloral.bench import results

LEVEL = 0.95
RESAMPLES = 10_000
MIN_CLIPS_FOR_INTERVAL = 5
EXACT_UP_TO = 16  # clips; 2^16 sign patterns
DRAWS = 100_000  # random sign patterns above EXACT_UP_TO
SEED = 0


def sign_flip_p(diffs: np.ndarray, seed: int = SEED) -> float:
    """Two-sided p of mean(diffs) == 0 under random signs (see the module's doc)."""
    d = np.asarray(diffs, dtype=np.float64)
    observed = abs(d.mean())
    # a flipped pattern equal to the observed one up to rounding counts as at least as extreme
    tolerance = 1e-9 * max(float(np.abs(d).mean()), np.finfo(np.float64).tiny)
    if len(d) <= EXACT_UP_TO:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return float(np.mean(np.abs(signs @ d / len(d)) >= observed - tolerance))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(DRAWS, len(d)))
    extreme = int(np.sum(np.abs(signs @ d / len(d)) >= observed - tolerance))
    return (1 + extreme) / (1 + DRAWS)


def bootstrap_interval(diffs: np.ndarray, seed: int = SEED) -> tuple[float, float]:
    """95% percentile interval of mean(diffs) over clips resampled with replacement; NaNs below
    MIN_CLIPS_FOR_INTERVAL clips."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < MIN_CLIPS_FOR_INTERVAL:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(RESAMPLES, len(d)))].mean(axis=1)
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def against_best(df: pd.DataFrame, unranked: Collection[str] = ()) -> pd.DataFrame:
    """Per dataset and metric, every ranked method against the best one (`df`: the results
    table). Left out, as the table leaves them unranked: latency and memory, means made of
    noted values, `unranked` methods (untrained weights), and metrics with fewer than two
    methods or two clips."""
    clips = results.shared_clips(df)
    clips = clips[clips["value"].notna() & ~clips["method"].isin(list(unranked))]
    latency = set(df.loc[df["kind"] == "latency", "metric"])
    noted = clips.groupby(["dataset", "metric"])["noted"].transform("sum") > 0
    clips = clips[~clips["metric"].isin(latency) & ~noted]
    out = []
    for (dataset, metric), sub in clips.groupby(["dataset", "metric"], sort=False):
        wide = sub.pivot_table(index="clip", columns="method", values="value", aggfunc="first")
        wide = wide.dropna()
        if wide.shape[1] < 2 or wide.shape[0] < 2:
            continue
        higher = bool(sub["higher_is_better"].iloc[0])
        means = wide.mean()
        best = means.idxmax() if higher else means.idxmin()
        for method in wide.columns:
            if method == best:
                continue
            d = (wide[method] - wide[best]).to_numpy()
            finite = bool(np.isfinite(d).all())  # PSNR of a frame equal to the GT is inf
            low, high = bootstrap_interval(d) if finite else (float("nan"),) * 2
            ahead = d > 0 if higher else d < 0
            behind = d < 0 if higher else d > 0
            out.append(
                {
                    "dataset": dataset,
                    "metric": metric,
                    "method": method,
                    "best": best,
                    "clips": len(d),
                    "diff": float(d.mean()),
                    "ci_low": low,
                    "ci_high": high,
                    "better": int(ahead.sum()),
                    "worse": int(behind.sum()),
                    "p": sign_flip_p(d) if finite else float("nan"),
                    "higher_is_better": higher,
                }
            )
    columns = ["dataset", "metric", "method", "best", "clips", "diff", "ci_low", "ci_high"]
    return pd.DataFrame(out, columns=[*columns, "better", "worse", "p", "higher_is_better"])
