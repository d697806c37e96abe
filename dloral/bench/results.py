"""The benchmark's one results table: tidy, long, written atomically to parquet.

One row per (dataset, method, clip, frame, metric) value; clip-level metrics use frame = -1.
Each row carries how it was made (direction, kind, level, implementation, flow estimator,
device) so that any aggregate or report can say it. Aggregates are computed from the table,
never stored by hand:

    per clip:    mean over the clip's frames (or pairs) that every method has on that clip
    per dataset: mean over clips of the per-clip means (each clip counts once, as BasicSR's and
                 the VSR papers' per-sequence averages do)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from dloral.atomic import atomic_write
from dloral.bench.metric import MetricInfo, note

COLUMNS = (
    "dataset",
    "method",
    "clip",
    "frame",
    "metric",
    "value",
    "higher_is_better",
    "kind",
    "level",
    "implementation",
    "device",
    "output_hash",
    "note",  # why a value is not an ordinary measurement (dloral.bench.metric.note), else ""
)
CLIP_LEVEL = -1  # the frame index of a value that covers the whole clip


def rows(
    dataset: str,
    method: str,
    clip: str,
    info: MetricInfo,
    values: Iterable[float],
    device: str,
    output_hash: str,
    first: int = 0,
) -> list[dict]:
    """Rows for one metric on one clip; values are per frame/pair, or one value for the clip.
    `first`: the clip frame index of the first value (1 when the output lacks frame 0)."""
    values = list(values)
    frames = [CLIP_LEVEL] if info.level == "clip" else range(first, first + len(values))
    return [
        {
            "dataset": dataset,
            "method": method,
            "clip": clip,
            "frame": int(f),
            "metric": info.name,
            "value": float(v),
            "higher_is_better": info.higher_is_better,
            "kind": info.kind,
            "level": info.level,
            "implementation": info.implementation,
            "device": device,
            "output_hash": output_hash,
            "note": note(info.name, float(v)),
        }
        for f, v in zip(frames, values, strict=True)
    ]


def table(records: Iterable[dict]) -> pd.DataFrame:
    df = pd.DataFrame(list(records), columns=list(COLUMNS))
    df["note"] = df["note"].fillna("").astype(str)  # rows cached before notes existed
    return df


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Atomic: a reader (or an interrupted run) never sees half a table."""
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def _noted(df: pd.DataFrame) -> pd.Series:
    if "note" not in df.columns:
        return pd.Series(0, index=df.index)
    return (df["note"].fillna("").astype(str) != "").astype(int)


def shared_frames(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with `left_out` (1: a frame or pair value that not every method has on that clip,
    left out of the means) and `unaligned` (1: a clip-level value of a clip whose methods scored
    different frames, told by their frame values, else their pair values). A method without
    frame 0 (DLoRAL with first_frame "skip", as the reference's test script; the reference's
    outputs) so takes frame 0 and the pair (0, 1) out of every method's mean on that clip: each
    is averaged over the same frames. Latency rows are not frames of a comparison and are left
    as they are."""
    df = df.assign(left_out=0, unaligned=0)
    scored = df["kind"] != "latency"
    framed = scored & df["level"].isin(["frame", "pair"])
    if framed.any():
        keys = ["dataset", "clip", "metric"]
        methods = df[framed].groupby(keys)["method"].transform("nunique")
        # a NaN (e.g. a pair with no valid pixel under an empty="nan" protocol) is no value
        present = df[framed].assign(method=df["method"].where(df["value"].notna()))
        having = present.groupby([*keys, "frame"])["method"].transform("nunique")
        df.loc[framed, "left_out"] = (having < methods).astype(int)
        # the frames each method scored on a clip: its frame values', else its pair values'
        frames = df[framed & (df["level"] == "frame")]
        pairs = df[framed & (df["level"] == "pair")]
        pairs = pairs[~_clip_keys(pairs).isin(_clip_keys(frames))]
        covered = (
            pd.concat([frames, pairs])
            .groupby(["dataset", "clip", "method"])["frame"]
            .agg(lambda f: tuple(sorted(set(f))))
        )
        differ = covered.groupby(["dataset", "clip"]).nunique()
        at_clip = scored & (df["level"] == "clip")
        in_differ = _clip_keys(df).isin(differ.index[differ > 1])
        df.loc[at_clip & in_differ, "unaligned"] = 1
    return df


def _clip_keys(df: pd.DataFrame) -> pd.MultiIndex:
    return pd.MultiIndex.from_frame(df[["dataset", "clip"]])


def per_clip(df: pd.DataFrame) -> pd.DataFrame:
    """Mean of each clip's values over the frames (pairs) every method has on that clip;
    `noted`: how many of them carry a note or cover other frames than another method's
    (clip-level values); `left_out`: values left out because another method lacks them."""
    keys = ["dataset", "method", "metric", "clip", "higher_is_better", "implementation"]
    df = shared_frames(df)
    df = df.assign(
        noted=_noted(df) + df["unaligned"],
        value=df["value"].where(df["left_out"] == 0),
    )
    return df.groupby(keys, as_index=False).agg(
        value=("value", "mean"), noted=("noted", "sum"), left_out=("left_out", "sum")
    )


def shared_clips(df: pd.DataFrame) -> pd.DataFrame:
    """`per_clip`, its value NaN on a clip where not every method has that metric (a metric one
    method could not score on a clip, e.g. too few frames, takes that clip out of every
    method's mean: `clips_left_out` 1): the per-clip values the dataset means average."""
    clips = per_clip(df)
    scored = clips["value"].notna()
    methods = clips.groupby(["dataset", "metric"])["method"].transform("nunique")
    having = clips.assign(method=clips["method"].where(scored))
    having = having.groupby(["dataset", "metric", "clip"])["method"].transform("nunique")
    shared = having == methods
    return clips.assign(
        clips_left_out=(~shared & scored).astype(int), value=clips["value"].where(shared)
    )


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """dataset x method x metric: mean over clips of per-clip means, over the clips every
    method has a value of that metric for (`shared_clips`), with clip count, the number of
    values with a note (`noted`: a report shows such a mean but does not rank it) and of values
    left out because not every method has them (`left_out`, `clips_left_out`)."""
    clips = shared_clips(df)
    keys = ["dataset", "method", "metric", "higher_is_better", "implementation"]
    return clips.groupby(keys, as_index=False).agg(
        value=("value", "mean"),
        clips=("value", "count"),
        noted=("noted", "sum"),
        left_out=("left_out", "sum"),
        clips_left_out=("clips_left_out", "sum"),
    )
