"""The tidy results table: rows carry their provenance; aggregates weight clips equally."""

import pandas as pd
import pytest

from dloral.bench.registry import MetricInfo
from dloral.bench.results import CLIP_LEVEL, aggregate, rows, table, write_parquet

PSNR = MetricInfo("psnr", True, "full_reference", "frame", "test: RGB, crop 0")
DOVER = MetricInfo("dover", True, "no_reference", "clip", "test", needs_gt=False)


def _table():
    records = rows("ds", "m", "short", PSNR, [30.0, 32.0], "cpu", "h1")
    records += rows("ds", "m", "long", PSNR, [20.0] * 6, "cpu", "h2")
    records += rows("ds", "m", "short", DOVER, [0.7], "cpu", "h1")
    return table(records)


def test_rows_carry_direction_and_implementation_and_clip_level_frame():
    df = _table()
    assert list(df.columns)[:6] == ["dataset", "method", "clip", "frame", "metric", "value"]
    psnr = df[df["metric"] == "psnr"]
    assert psnr["higher_is_better"].all()
    assert (psnr["implementation"] == "test: RGB, crop 0").all()
    assert sorted(psnr[psnr["clip"] == "short"]["frame"]) == [0, 1]
    assert df[df["metric"] == "dover"]["frame"].tolist() == [CLIP_LEVEL]


def test_dataset_mean_weights_each_clip_once():
    agg = aggregate(_table()).set_index("metric")
    # clip means 31 and 20 -> 25.5; a frame-weighted mean would give (62 + 120) / 8 = 22.75
    assert agg.loc["psnr", "value"] == pytest.approx(25.5)
    assert agg.loc["psnr", "clips"] == 2 and agg.loc["dover", "clips"] == 1


def test_parquet_is_written_whole_and_reads_back(tmp_path):
    df = _table()
    path = write_parquet(df, tmp_path / "results.parquet")
    back = pd.read_parquet(path)
    pd.testing.assert_frame_equal(back, df)
    assert [p.name for p in tmp_path.iterdir()] == ["results.parquet"]  # no temp file left


def test_value_count_must_match_the_metric_level():
    with pytest.raises(ValueError):
        rows("ds", "m", "c", DOVER, [0.1, 0.2], "cpu", "h")


def test_piqe_of_a_frame_without_active_blocks_is_100_and_noted():
    import torch

    from dloral.bench.iqa import iqa_metric

    piqe = iqa_metric("piqe", device=torch.device("cpu"))  # no weights needed
    flat, textured = torch.full((3, 64, 64), 0.5), torch.rand(3, 64, 64)
    values = piqe(torch.stack([flat, textured])).tolist()
    assert values[0] == 100.0 and values[1] < 100.0  # PIQE's convention, not a measurement
    df = table(rows("ds", "m", "clip", piqe.info, values, "cpu", "h"))
    assert "no active block" in df["note"][0] and df["note"][1] == ""
    agg = aggregate(df)
    assert agg["noted"].tolist() == [1]
    # a PSNR of 100 is an ordinary value
    assert table(rows("ds", "m", "c", PSNR, [100.0], "cpu", "h"))["note"].tolist() == [""]


def test_methods_are_averaged_over_the_frames_they_all_have():
    """A method without frame 0 (the reference's outputs): every method's mean on that clip is
    over frames 1.., the value left out counted; a clip-level value of that clip covers other
    frames for each method, so it is noted (shown, not ranked); a clip every method covers
    alike is untouched."""
    records = rows("ds", "all", "a", PSNR, [10.0, 30.0, 32.0], "cpu", "h1")
    records += rows("ds", "skip", "a", PSNR, [29.0, 33.0], "cpu", "h2", first=1)
    records += rows("ds", "all", "b", PSNR, [20.0, 22.0], "cpu", "h3")
    records += rows("ds", "skip", "b", PSNR, [21.0, 23.0], "cpu", "h4")
    records += rows("ds", "all", "a", DOVER, [0.7], "cpu", "h1")
    records += rows("ds", "skip", "a", DOVER, [0.6], "cpu", "h2")
    records += rows("ds", "all", "b", DOVER, [0.5], "cpu", "h3")
    records += rows("ds", "skip", "b", DOVER, [0.4], "cpu", "h4")
    agg = aggregate(table(records)).set_index(["method", "metric"])
    assert agg.loc[("all", "psnr"), "value"] == pytest.approx((31.0 + 21.0) / 2)  # not 24 on a
    assert agg.loc[("skip", "psnr"), "value"] == pytest.approx((31.0 + 22.0) / 2)
    assert agg.loc[("all", "psnr"), "left_out"] == 1 and agg.loc[("skip", "psnr"), "left_out"] == 0
    assert agg.loc[("all", "psnr"), "noted"] == agg.loc[("skip", "psnr"), "noted"] == 0
    # DOVER on clip a covers frames 0-2 for one method, 1-2 for the other: noted; b is not
    assert agg.loc[("all", "dover"), "noted"] == agg.loc[("skip", "dover"), "noted"] == 1
    assert agg.loc[("all", "dover"), "value"] == pytest.approx(0.6)  # still shown


def test_a_nan_is_no_value_and_a_clip_one_method_lacks_is_no_ones():
    """A NaN pair (no valid pixel under an empty="nan" protocol) leaves that pair out of every
    method's mean; a clip where one method has no value of a metric (e.g. too few frames for
    it) leaves that clip out of every method's mean of that metric."""
    records = rows("ds", "x", "a", PSNR, [10.0, 20.0, 30.0], "cpu", "h1")
    records += rows("ds", "y", "a", PSNR, [11.0, float("nan"), 31.0], "cpu", "h2")
    records += rows("ds", "x", "b", PSNR, [40.0, 40.0], "cpu", "h3")
    records += rows("ds", "x", "a", DOVER, [0.5], "cpu", "h1")
    records += rows("ds", "y", "a", DOVER, [0.4], "cpu", "h2")
    agg = aggregate(table(records)).set_index(["method", "metric"])
    assert agg.loc[("x", "psnr"), "value"] == pytest.approx(20.0)  # frames 0, 2 of clip a
    assert agg.loc[("y", "psnr"), "value"] == pytest.approx(21.0)
    assert agg.loc[("x", "psnr"), "left_out"] == 1  # its frame 1 on clip a
    assert agg.loc[("x", "psnr"), "clips"] == 1 and agg.loc[("x", "psnr"), "clips_left_out"] == 1
    assert agg.loc[("y", "psnr"), "clips_left_out"] == 0
    assert agg.loc[("x", "dover"), "clips"] == agg.loc[("y", "dover"), "clips"] == 1


def test_a_clip_level_value_is_noted_when_only_pair_values_tell_the_frames_differ():
    EWARP = MetricInfo("ewarp", False, "temporal", "pair", "test")
    records = rows("ds", "all", "a", EWARP, [1.0, 2.0, 3.0], "cpu", "h1")
    records += rows("ds", "skip", "a", EWARP, [2.5, 3.5], "cpu", "h2", first=1)
    records += rows("ds", "all", "a", DOVER, [0.7], "cpu", "h1")
    records += rows("ds", "skip", "a", DOVER, [0.6], "cpu", "h2")
    agg = aggregate(table(records)).set_index(["method", "metric"])
    assert agg.loc[("all", "dover"), "noted"] == agg.loc[("skip", "dover"), "noted"] == 1
    assert agg.loc[("all", "ewarp"), "value"] == pytest.approx(2.5)  # pairs 1, 2 only
