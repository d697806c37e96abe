"""Paired comparisons over clips: whether a method's lead in a table is more than its clips' luck.

A dataset's table ranks methods by their means over clips (`results.aggregate`). On UDM10's ten
clips or REDS4's four, a lead in the second decimal can be one clip's doing. Here each method is
set against the best one of a metric on the same clips, the per-clip means the table averages:

- `diff`: the mean of the per-clip differences (method - best), which is the difference of the
  table's two means;
- `ci_low`, `ci_high`: a 95% interval of that mean, the shifts the test below does not reject
  (the differences less a shift whose sign-flip p stays above 0.05; bounds found by bisection):
  it holds 0 exactly when p > 0.05, and like the test it assumes only that each clip's
  difference is symmetric about the shift. With 5 clips or fewer no shift is rejected (p is
  never below 2/2^n = 0.0625), so there is no interval (NaN);
- `better`, `worse`: on how many clips the method is better or worse than the best, in the
  metric's direction;
- `p`: the two-sided p-value of a sign-flip permutation test of the mean difference (under "no
  difference" each clip's difference is as likely to have either sign): exact, every one of the
  2^n sign patterns, up to 16 clips, else 100,000 random patterns from a fixed seed. With n clips
  no p is below 2 / 2^n: four clips can never give p < 0.05;
- `p_holm`: p adjusted by Holm's step-down method over one metric's comparisons (every method
  against the same best), which keeps the chance of any false "ahead" among them at 0.05 when
  p_holm < 0.05. It does not undo picking the best from the same clips.

With a `reference` (a method named before the results are seen, e.g. the one a paper
proposes) every method is set against it instead: nothing is picked from the clips, and
p_holm holds for the comparisons made.

Where a per-clip value is infinite (the PSNR of outputs equal to the GT) the mean difference is
infinite and there is no interval nor p (NaN); the clip counts still say who is ahead.

Clips, not frames, are the unit: a clip's frames are not independent samples.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pandas as pd

from dloral.bench import results

ALPHA = 0.05  # 95% intervals
EXACT_UP_TO = 16  # clips; 2^16 sign patterns
DRAWS = 100_000  # random sign patterns above EXACT_UP_TO
SEED = 0
BISECTIONS = 32  # the bounds to 2^-32 of the differences' spread


def _signs(n: int, seed: int) -> np.ndarray:
    """Every sign pattern of n clips (n <= EXACT_UP_TO: the bits of 0 .. 2^n - 1), else DRAWS
    random ones."""
    if n <= EXACT_UP_TO:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
        return 1.0 - 2.0 * bits
    return np.random.default_rng(seed).choice((1.0, -1.0), size=(DRAWS, n))


def _p(d: np.ndarray, signs: np.ndarray) -> float:
    observed = abs(d.mean())
    # a flipped pattern equal to the observed one up to rounding counts as at least as extreme
    tolerance = 1e-9 * max(float(np.abs(d).mean()), np.finfo(np.float64).tiny)
    extreme = int(np.sum(np.abs(signs @ d / len(d)) >= observed - tolerance))
    if len(d) <= EXACT_UP_TO:
        return extreme / len(signs)
    return (1 + extreme) / (1 + len(signs))


def sign_flip_p(diffs: np.ndarray, seed: int = SEED) -> float:
    """Two-sided p of mean(diffs) == 0 under random signs (see the module's doc)."""
    d = np.asarray(diffs, dtype=np.float64)
    return _p(d, _signs(len(d), seed))


def sign_flip_interval(diffs: np.ndarray, seed: int = SEED) -> tuple[float, float]:
    """The shifts m whose sign_flip_p(diffs - m) is above ALPHA, as (low, high): bisection from
    the mean (p = 1) out to beyond the farthest difference (p = 2/2^n, or about it); NaNs
    where no shift is rejected (5 clips or fewer)."""
    d = np.asarray(diffs, dtype=np.float64)
    return _interval(d, _signs(len(d), seed))


def _interval(d: np.ndarray, signs: np.ndarray) -> tuple[float, float]:
    spread = float(d.max() - d.min()) or max(abs(float(d.mean())), 1.0)
    bounds = []
    for far in (d.min() - spread, d.max() + spread):
        if _p(d - far, signs) > ALPHA:
            return float("nan"), float("nan")
        inside, outside = float(d.mean()), float(far)
        for _ in range(BISECTIONS):
            mid = (inside + outside) / 2
            if _p(d - mid, signs) > ALPHA:
                inside = mid
            else:
                outside = mid
        bounds.append(inside)
    return bounds[0], bounds[1]


def against_best(
    df: pd.DataFrame, unranked: Collection[str] = (), reference: str | None = None
) -> pd.DataFrame:
    """Per dataset and metric, every ranked method against the best one (`df`: the results
    table), or against `reference` where that method has values (the `best` column names it).
    Left out, as the table leaves them unranked: latency and memory, a method's mean made of
    noted values (its `noted` in `results.aggregate`), `unranked` methods (untrained
    weights), and metrics with fewer than two methods or two clips."""
    clips = results.shared_clips(df)
    # noted as the aggregate counts it: over all the method's clips, left out ones included
    noted = clips.groupby(["dataset", "metric", "method"])["noted"].transform("sum") > 0
    latency = set(df.loc[df["kind"] == "latency", "metric"])
    clips = clips[
        clips["value"].notna()
        & ~clips["method"].isin(list(unranked))
        & ~clips["metric"].isin(latency)
        & ~noted
    ]
    out = []
    for (dataset, metric), sub in clips.groupby(["dataset", "metric"], sort=False):
        wide = sub.pivot_table(index="clip", columns="method", values="value", aggfunc="first")
        wide = wide.dropna()
        if wide.shape[1] < 2 or wide.shape[0] < 2:
            continue
        higher = bool(sub["higher_is_better"].iloc[0])
        means = wide.mean()
        if reference is not None and reference not in wide.columns:
            continue
        best = reference if reference is not None else means.idxmax() if higher else means.idxmin()
        for method in wide.columns:
            if method == best:
                continue
            d = (wide[method] - wide[best]).to_numpy()
            finite = bool(np.isfinite(d).all())  # PSNR of a frame equal to the GT is inf
            signs = _signs(len(d), SEED)  # one set of patterns for the test and its interval
            low, high = _interval(d, signs) if finite else (float("nan"),) * 2
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
                    "p": _p(d, signs) if finite else float("nan"),
                    "higher_is_better": higher,
                }
            )
    columns = ["dataset", "metric", "method", "best", "clips", "diff", "ci_low", "ci_high"]
    columns += ["better", "worse", "p", "p_holm", "higher_is_better"]
    pairs = pd.DataFrame(out, columns=columns)
    if len(pairs):
        pairs["p_holm"] = pairs.groupby(["dataset", "metric"], sort=False)["p"].transform(holm)
    return pairs


def holm(p: pd.Series) -> pd.Series:
    """Holm's step-down adjustment of the p-values of one metric's comparisons (each method
    against the best): the k-th smallest of m is multiplied by m - k + 1, kept at least its
    predecessor's, capped at 1; NaN (no test) stays NaN and is not counted in m."""
    tested = p.dropna().sort_values(kind="stable")
    m = len(tested)
    scaled = (tested * np.arange(m, 0, -1)).cummax().clip(upper=1.0)
    return scaled.reindex(p.index)
