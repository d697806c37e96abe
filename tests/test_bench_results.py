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
