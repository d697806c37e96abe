"""Comparison tables as VSR papers print them: best value bold, second underlined, per column.

The second place is underlined only where a ranked value is worse than it (three or more
distinct values): with two methods "second" would mark the worse one. Rows given as `unranked`
(methods with untrained weights, marked UNTRAINED) are shown but never ranked.

Input is `dloral.bench.results.aggregate` output (or the harness's aggregate.csv, whose `scale`
column is used when present). Cells are plain (text, mark) pairs; markdown and HTML render them.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from dloral.bench import results

Mark = Literal["best", "second", "noted"] | None
Cell = tuple[str, Mark]
MISSING = "–"
NOTED = "†"  # a value with a note (e.g. PIQE's 100 for no active block): shown, not ranked
UNTRAINED = "‡"  # after a method whose recorded weights are untrained: shown, not ranked
DIGITS = {"psnr": 2, "ssim": 4, "lpips": 4}  # by metric family (the name before any "_")
DEFAULT_DIGITS = 4
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
_AXES = ("dataset", "method", "metric")


@dataclass
class ComparisonTable:
    """header: one list of (text, colspan) per level; cells[i][j] is (row_labels[i], columns[j])."""

    corner: str
    header: list[list[tuple[str, int]]]
    row_labels: list[str]
    columns: list[tuple[str, ...]]  # keys in `cols` order, e.g. ("REDS4", "psnr")
    cells: list[list[Cell]]
    caption: str | None = None

    def cell(self, row: str, *column: str) -> Cell:
        return self.cells[self.row_labels.index(row)][self.columns.index(column)]

    def to_markdown(self) -> str:
        """One header line (levels joined by spaces); **best**, <u>second</u>."""
        labels: list[list[str]] = [[] for _ in self.cells[0]] if self.cells else []
        for level in self.header:
            j = 0
            for text, span in level:
                for k in range(j, j + span):
                    labels[k].append(text)
                j += span
        head = [self.corner] + [" ".join(parts) for parts in labels]
        lines = [md_row(head), "|" + "|".join([" --- "] + [" ---: "] * len(labels)) + "|"]
        for label, row in zip(self.row_labels, self.cells, strict=True):
            marked = [_wrap(t, m, "**", "**", "<u>", "</u>") for t, m in row]
            lines.append(md_row([label, *marked]))
        out = "\n".join(lines) + "\n"
        return out + (f"\n{self.caption}\n" if self.caption else "")

    def to_html(self) -> str:
        """A <table> with one header row per level; <b>best</b>, <u>second</u>; text escaped."""
        esc = html.escape
        out = ["<table>"]
        if self.caption:
            out.append(f"<caption>{esc(self.caption)}</caption>")
        out.append("<thead>")
        for i, level in enumerate(self.header):
            ths = [f'<th rowspan="{len(self.header)}">{esc(self.corner)}</th>'] if i == 0 else []
            ths += [f'<th colspan="{span}">{esc(text)}</th>' for text, span in level]
            out.append("<tr>" + "".join(ths) + "</tr>")
        out.append("</thead>")
        out.append("<tbody>")
        for label, row in zip(self.row_labels, self.cells, strict=True):
            tds = [f"<th>{esc(label)}</th>"]
            tds += [f"<td>{_wrap(esc(t), m, '<b>', '</b>', '<u>', '</u>')}</td>" for t, m in row]
            out.append("<tr>" + "".join(tds) + "</tr>")
        out.append("</tbody>")
        out.append("</table>")
        return "\n".join(out) + "\n"


def comparison_table(
    agg: pd.DataFrame,
    *,
    rows: str = "method",
    cols: Sequence[str] = ("dataset", "metric"),
    scales: dict[str, float] | None = None,
    digits: dict[str, int] | None = None,
    caption: str | None = None,
    unranked: Collection[str] = (),
) -> ComparisonTable:
    """rows x cols of agg's `value`, each value times its metric's scale and rounded.

    Per column, the best value is bold and the second underlined in the metric's direction.
    Ties are decided on the displayed (rounded) values, as papers do: all tied values share a
    rank and the next distinct value is second, underlined only when a worse ranked value
    exists. Missing values show as "–" and are not ranked; a value made of noted values (agg's
    `noted` > 0, e.g. PIQE's 100 where it found no active block) shows with "†" and is not
    ranked either; nor are the values of the `unranked` rows (labels of the `rows` axis).
    """
    cols = tuple(cols)
    if "metric" not in cols or sorted((rows, *cols)) != sorted(_AXES):
        raise ValueError(f"rows + cols must be {_AXES} with metric in cols, got {rows!r}, {cols}")
    if agg.duplicated(list(_AXES)).any():
        raise ValueError("agg has more than one value per (dataset, method, metric)")
    scale_of = metric_scales(agg, scales)
    higher = dict(zip(agg["metric"], agg["higher_is_better"].astype(bool), strict=True))
    row_keys = list(dict.fromkeys(agg[rows].astype(str)))
    col_keys = list(dict.fromkeys(zip(*(agg[c].astype(str) for c in cols), strict=True)))
    order = [list(dict.fromkeys(k[i] for k in col_keys)) for i in range(len(cols))]
    col_keys.sort(key=lambda k: [order[i].index(v) for i, v in enumerate(k)])  # group levels
    values = {
        (str(r[rows]), tuple(str(r[c]) for c in cols)): float(r["value"])
        for r in agg.to_dict("records")
    }
    noted = {
        (str(r[rows]), tuple(str(r[c]) for c in cols))
        for r in agg.to_dict("records")
        if pd.notna(r.get("noted")) and r.get("noted", 0) > 0
    }
    m = cols.index("metric")
    header = [
        _spans(
            col_keys,
            i,
            (lambda k: metric_label(k[m], higher[k[m]], scale_of.get(k[m], 1.0)))
            if i == m
            else (lambda k, i=i: k[i]),
        )
        for i in range(len(cols))
    ]
    columns = [
        _rank_column(
            [values.get((r, k), math.nan) for r in row_keys],
            higher[k[m]],
            scale_of.get(k[m], 1.0),
            _digits(k[m], digits),
            [(r, k) in noted for r in row_keys],
            [r in set(unranked) for r in row_keys],
        )
        for k in col_keys
    ]
    cells = [list(row) for row in zip(*columns, strict=True)] if columns else []
    return ComparisonTable(rows, header, row_keys, col_keys, cells, caption)


def per_clip_table(
    df: pd.DataFrame,
    dataset: str,
    metric: str,
    *,
    scales: dict[str, float] | None = None,
    digits: dict[str, int] | None = None,
    caption: str | None = None,
    unranked: Collection[str] = (),
) -> ComparisonTable:
    """methods x clips of one dataset and metric (mean of each clip's frames), marked per clip;
    `unranked` methods are shown, not ranked."""
    clips = results.per_clip(df)
    clips = clips[(clips["dataset"] == dataset) & (clips["metric"] == metric)]
    if clips.empty:
        raise ValueError(f"no values for metric {metric!r} on dataset {dataset!r}")
    agg = clips.rename(columns={"clip": "_clip", "dataset": "_dataset"})
    agg = agg.assign(dataset=agg["_clip"].astype(str))
    table = comparison_table(
        agg,
        scales=scales,
        digits=digits,
        caption=caption,
        cols=("metric", "dataset"),
        unranked=unranked,
    )
    label, span = table.header[0][0]
    table.header[0] = [(f"{dataset}: {label}", span)]
    table.columns = [(clip,) for _, clip in table.columns]  # cell(method, clip)
    return table


def _rank_column(
    values: list[float],
    higher: bool,
    scale: float,
    digits: int,
    noted: list[bool] | None = None,
    unranked: list[bool] | None = None,
) -> list[Cell]:
    """Format one column and mark best/second on the rounded values (ties share a rank; second
    only above a worse value); noted values are shown with NOTED, and they and the unranked
    ones are left out of the ranking."""
    noted = noted or [False] * len(values)
    unranked = unranked or [False] * len(values)
    shown = [None if math.isnan(v) else round(v * scale, digits) + 0.0 for v in values]
    ranked = {
        s for s, n, u in zip(shown, noted, unranked, strict=True) if s is not None and not (n or u)
    }
    distinct = sorted(ranked, reverse=higher)
    places = ("best", "second") if len(distinct) >= 3 else ("best",)
    rank: dict[float, Mark] = dict(zip(distinct, places, strict=False))
    return [
        (MISSING, None)
        if s is None
        else (f"{s:.{digits}f}{NOTED}", "noted")
        if n
        else (f"{s:.{digits}f}", None if u else rank.get(s))
        for s, n, u in zip(shown, noted, unranked, strict=True)
    ]


PAIRED_HEADER = (
    "metric",
    "method",
    "against",
    "Δ mean",
    "95% CI",
    "clips better / worse",
    "p",
    "p (Holm)",
)


def paired_rows(pairs: pd.DataFrame, scales: dict[str, float]) -> list[list[str]]:
    """Rows of PAIRED_HEADER from `dloral.bench.paired.against_best`: differences in the
    table's printed units and digits (one more digit), signed; "–" for no interval."""

    def num(metric: str, v: float, sign: str = "+") -> str:
        if math.isnan(v):
            return MISSING
        return f"{v * scales.get(metric, 1.0):{sign}.{_digits(metric, None) + 1}f}"

    out = []
    for r in pairs.to_dict("records"):
        m, scale = r["metric"], scales.get(r["metric"], 1.0)
        interval = (
            MISSING
            if math.isnan(r["ci_low"])
            else f"[{num(m, r['ci_low'], '')}, {num(m, r['ci_high'], '')}]"
        )
        out.append(
            [
                metric_label(m, bool(r["higher_is_better"]), scale),
                str(r["method"]),
                str(r["best"]),
                num(m, r["diff"]),
                interval,
                f"{r['better']} / {r['worse']} of {r['clips']}",
                MISSING if math.isnan(r["p"]) else f"{r['p']:.3g}",
                MISSING if math.isnan(r["p_holm"]) else f"{r['p_holm']:.3g}",
            ]
        )
    return out


def metric_scales(agg: pd.DataFrame, scales: dict[str, float] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    if "scale" in agg.columns:
        out.update(
            {m: float(s) for m, s in zip(agg["metric"], agg["scale"], strict=True) if pd.notna(s)}
        )
    out.update(scales or {})
    return out


def _digits(metric: str, digits: dict[str, int] | None) -> int:
    if digits and metric in digits:
        return digits[metric]
    return DIGITS.get(metric.split("_")[0], DEFAULT_DIGITS)


def metric_label(metric: str, higher: bool, scale: float) -> str:
    """e.g. "psnr↑", "ewarp (×10⁻³)↓": displayed numbers are in units of 1/scale."""
    arrow = "↑" if higher else "↓"
    if scale == 1.0:
        return f"{metric}{arrow}"
    exponent = math.log10(scale)
    if exponent.is_integer():
        unit = "10" + str(-int(exponent)).translate(_SUPERSCRIPT)
    else:
        unit = f"{1 / scale:g}"
    return f"{metric} (×{unit}){arrow}"


def _spans(
    keys: list[tuple[str, ...]], level: int, label: Callable[[tuple[str, ...]], str]
) -> list[tuple[str, int]]:
    """(label, colspan) of header `level`: a run of keys merges while levels 0..level agree."""
    out: list[tuple[str, int]] = []
    for j, key in enumerate(keys):
        if j and keys[j - 1][: level + 1] == key[: level + 1]:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((label(key), 1))
    return out


def _wrap(text: str, mark: Mark, b0: str, b1: str, u0: str, u1: str) -> str:
    if mark == "best":
        return f"{b0}{text}{b1}"
    if mark == "second":
        return f"{u0}{text}{u1}"
    return text


def md_row(parts: list[str]) -> str:
    return "| " + " | ".join(p.replace("|", "\\|") for p in parts) + " |"
