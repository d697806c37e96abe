import math
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pandas as pd
import pytest

from dloral.bench import results
from dloral.bench.registry import MetricInfo
from dloral.report.tables import MISSING, NOTED, comparison_table, per_clip_table

HIGHER = {"psnr": True, "lpips": False, "ewarp": False, "dover": True}
VALUES = {  # dataset -> metric -> method -> value (absent = not computed)
    "REDS4": {
        "psnr": {"A": 28.50, "B": 28.171, "C": 28.174, "D": 27.00},
        "lpips": {"A": 0.20, "B": 0.15, "C": 0.25},
        "ewarp": {"A": 0.0021, "B": 0.0015, "C": 0.0030, "D": 0.0018},
    },
    "Vid4": {
        "psnr": {"A": 26.001, "B": 26.004, "C": 25.50, "D": 25.00},
        "lpips": {"A": 0.30, "B": 0.30, "C": 0.20},
        "dover": {"A": 0.61},
    },
}


def make_agg(scale_column: bool = True) -> pd.DataFrame:
    records = [
        {
            "dataset": dataset,
            "method": method,
            "metric": metric,
            "higher_is_better": HIGHER[metric],
            "implementation": "test",
            "value": value,
            "clips": 4,
            "scale": 1000.0 if metric == "ewarp" else 1.0,
        }
        for dataset, metrics in VALUES.items()
        for metric, by_method in metrics.items()
        for method, value in by_method.items()
    ]
    agg = pd.DataFrame(records)
    return agg if scale_column else agg.drop(columns="scale")


def test_higher_is_better_best_bold_second_underlined_ties_after_rounding():
    t = comparison_table(make_agg())
    assert t.cell("A", "REDS4", "psnr") == ("28.50", "best")
    # 28.171 and 28.174 both show as 28.17: they share second place
    assert t.cell("B", "REDS4", "psnr") == ("28.17", "second")
    assert t.cell("C", "REDS4", "psnr") == ("28.17", "second")
    assert t.cell("D", "REDS4", "psnr") == ("27.00", None)


def test_two_equal_best_both_bold_and_next_distinct_value_underlined():
    t = comparison_table(make_agg())
    assert t.cell("A", "Vid4", "psnr") == ("26.00", "best")
    assert t.cell("B", "Vid4", "psnr") == ("26.00", "best")
    assert t.cell("C", "Vid4", "psnr") == ("25.50", "second")
    assert t.cell("D", "Vid4", "psnr")[1] is None


def test_lower_is_better_and_missing_value_is_a_dash_never_ranked():
    t = comparison_table(make_agg())
    assert t.cell("B", "REDS4", "lpips") == ("0.1500", "best")
    assert t.cell("A", "REDS4", "lpips") == ("0.2000", "second")
    assert t.cell("C", "REDS4", "lpips") == ("0.2500", None)
    assert t.cell("D", "REDS4", "lpips") == (MISSING, None)
    assert t.cell("C", "Vid4", "lpips") == ("0.2000", "best")
    # two distinct values: the tied 0.30s are the worst, so they are not underlined
    assert t.cell("A", "Vid4", "lpips") == t.cell("B", "Vid4", "lpips") == ("0.3000", None)


def test_scale_applies_to_values_from_column_or_argument():
    for agg, scales in ((make_agg(), None), (make_agg(scale_column=False), {"ewarp": 1000.0})):
        t = comparison_table(agg, scales=scales, digits={"ewarp": 2})
        assert t.cell("B", "REDS4", "ewarp") == ("1.50", "best")
        assert t.cell("D", "REDS4", "ewarp") == ("1.80", "second")
        assert t.cell("C", "REDS4", "ewarp") == ("3.00", None)
        assert "ewarp (×10⁻³)↓" in [text for text, _ in t.header[1]]


def test_single_value_column_gets_bold_only_and_absent_dataset_metric_has_no_column():
    t = comparison_table(make_agg())
    assert t.cell("A", "Vid4", "dover") == ("0.6100", "best")
    assert [t.cell(m, "Vid4", "dover") for m in "BCD"] == [(MISSING, None)] * 3
    assert ("Vid4", "ewarp") not in t.columns and ("REDS4", "dover") not in t.columns


def test_header_levels_carry_datasets_with_spans_and_metric_arrows():
    t = comparison_table(make_agg())
    assert t.header[0] == [("REDS4", 3), ("Vid4", 3)]
    assert [text for text, _ in t.header[1]] == [
        "psnr↑",
        "lpips↓",
        "ewarp (×10⁻³)↓",
        "psnr↑",
        "lpips↓",
        "dover↑",
    ]
    assert t.row_labels == ["A", "B", "C", "D"]


def test_digits_are_overridable():
    t = comparison_table(make_agg(), digits={"psnr": 3})
    assert t.cell("B", "REDS4", "psnr") == ("28.171", None)
    assert t.cell("C", "REDS4", "psnr") == ("28.174", "second")


def test_datasets_as_rows():
    t = comparison_table(make_agg(), rows="dataset", cols=("method", "metric"))
    assert t.row_labels == ["REDS4", "Vid4"]
    assert t.cell("REDS4", "A", "psnr") == ("28.50", "best")
    with pytest.raises(ValueError):
        comparison_table(make_agg(), rows="metric", cols=("dataset", "method"))


def test_markdown_marks_the_right_cells():
    md = comparison_table(make_agg()).to_markdown()
    lines = md.splitlines()
    assert lines[0].startswith("| method | REDS4 psnr↑ | REDS4 lpips↓ |")
    row_a = next(line for line in lines if line.startswith("| A |"))
    row_d = next(line for line in lines if line.startswith("| D |"))
    assert row_a.split(" | ")[1:3] == ["**28.50**", "<u>0.2000</u>"]
    assert f"| {MISSING} |" in row_d and "**" not in row_d.split(" | ")[2]


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.marked: dict[str, list[str]] = {"b": [], "u": []}

    def handle_starttag(self, tag, attrs):
        self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack.pop() == tag

    def handle_data(self, data):
        if self.stack and self.stack[-1] in self.marked:
            self.marked[self.stack[-1]].append(data)


def test_html_escapes_names_and_is_well_formed():
    agg = make_agg()
    agg["method"] = agg["method"].replace("A", "<Ours & co>")
    page = comparison_table(agg, caption="mean over clips; A<B").to_html()
    assert "&lt;Ours &amp; co&gt;" in page and "<Ours" not in page
    root = ET.fromstring(page)
    assert root.tag == "table" and root.find("caption").text == "mean over clips; A<B"
    assert len(root.find("thead").findall("tr")) == 2
    body = root.find("tbody").findall("tr")
    assert body[0].find("th").text == "<Ours & co>"
    assert body[0].findall("td")[0].find("b").text == "28.50"
    assert body[0].findall("td")[1].find("u").text == "0.2000"
    parser = _Cells()
    parser.feed(page)
    assert parser.stack == [] and "0.1500" in parser.marked["b"]


def test_per_clip_table_marks_each_clip():
    info = MetricInfo("psnr", True, "full_reference", "frame", "test")
    frames = {  # method -> clip -> per-frame values
        "A": {"000": [30.0, 31.0], "011": [25.0, 25.0]},
        "B": {"000": [29.0, 29.0], "011": [26.0, 26.0]},
        "C": {"000": [28.0, 28.0], "011": [26.0, 26.0]},
    }
    records = [
        r
        for method, clips in frames.items()
        for clip, values in clips.items()
        for r in results.rows("REDS4", method, clip, info, values, "cpu", "h")
    ]
    df = results.table(records)
    t = per_clip_table(df, "REDS4", "psnr")
    assert t.header[0] == [("REDS4: psnr↑", 2)]
    assert t.header[1] == [("000", 1), ("011", 1)]
    assert t.cell("A", "000") == ("30.50", "best")
    assert t.cell("B", "000") == ("29.00", "second")
    assert t.cell("A", "011") == ("25.00", None)  # the worst of two distinct values
    assert t.cell("B", "011") == t.cell("C", "011") == ("26.00", "best")
    with pytest.raises(ValueError):
        per_clip_table(df, "Vid4", "psnr")


def test_nan_value_is_treated_as_missing():
    agg = make_agg()
    agg.loc[(agg["method"] == "A") & (agg["metric"] == "psnr"), "value"] = math.nan
    t = comparison_table(agg)
    assert t.cell("A", "REDS4", "psnr") == (MISSING, None)
    assert t.cell("B", "REDS4", "psnr") == ("28.17", "best")


def test_noted_values_are_shown_with_a_mark_and_never_ranked():
    # PIQE's 100 where it found no active block (every frame of a real old-film clip did)
    agg = pd.DataFrame(
        {
            "dataset": "VideoLQ",
            "method": ["A", "B", "C"],
            "metric": "piqe",
            "higher_is_better": False,
            "implementation": "test",
            "value": [100.0, 35.0, 40.0],
            "clips": 1,
            "noted": [1, 0, 0],
        }
    )
    t = comparison_table(agg)
    assert t.cell("A", "VideoLQ", "piqe") == (f"100.0000{NOTED}", "noted")
    assert t.cell("B", "VideoLQ", "piqe") == ("35.0000", "best")
    assert t.cell("C", "VideoLQ", "piqe") == ("40.0000", None)  # two ranked: no "second"
    assert f"100.0000{NOTED}" in t.to_markdown() and "**100" not in t.to_markdown()


def test_second_is_underlined_only_above_a_worse_value():
    # two methods: "second" would be the worse one, so only the best is marked
    agg = make_agg()
    two = agg[agg["method"].isin(["A", "B"]) & (agg["dataset"] == "REDS4")]
    t = comparison_table(two)
    assert t.cell("A", "REDS4", "psnr") == ("28.50", "best")
    assert t.cell("B", "REDS4", "psnr") == ("28.17", None)
    assert "<u>" not in t.to_markdown() and "<u>" not in t.to_html()
    # a third method below them both: now B is second
    three = agg[agg["method"].isin(["A", "B", "D"]) & (agg["dataset"] == "REDS4")]
    assert comparison_table(three).cell("B", "REDS4", "psnr") == ("28.17", "second")


def test_unranked_rows_are_shown_but_take_no_place():
    # D would be second on ewarp: as an unranked (untrained) row, A takes its place
    t = comparison_table(make_agg(), unranked={"D"})
    assert t.cell("D", "REDS4", "ewarp") == ("1.8000", None)
    assert t.cell("B", "REDS4", "ewarp") == ("1.5000", "best")
    assert t.cell("A", "REDS4", "ewarp") == ("2.1000", "second")
    # C would be best on lpips: unranked, B best and A not second (only two ranked values)
    t = comparison_table(make_agg(), unranked={"C"})
    assert t.cell("C", "Vid4", "lpips") == ("0.2000", None)
    assert t.cell("A", "Vid4", "lpips") == t.cell("B", "Vid4", "lpips") == ("0.3000", "best")
    clips = per_clip_table(
        results.table(
            r
            for m, v in {"A": 30.0, "B": 29.0, "C": 28.0}.items()
            for r in results.rows(
                "REDS4", m, "000", MetricInfo("psnr", True, "fr", "frame", "t"), [v], "cpu", "h"
            )
        ),
        "REDS4",
        "psnr",
        unranked={"A"},
    )
    assert clips.cell("A", "000") == ("30.00", None) and clips.cell("B", "000")[1] == "best"
