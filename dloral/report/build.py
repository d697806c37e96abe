"""`dloral-exp report`: comparison reports from benchmark runs and sweeps.

A report is a folder: index.html (self-contained: inline CSS, no script, no request outside the
folder; opens from disk), report.md (the same content for a repository or a paper draft) and
images/ (every plot and visual comparison as PNG). Both documents are rendered from one list of
blocks, so they always say the same. The header names the code and command that made each
set of results and, separately, those that built the report. Every section ends with its
provenance: datasets and their manifest hashes, metric implementations, flow estimator, weights
used or missing, device, versions, git commit, seeds and the command that made the numbers.

Methods whose recorded weights are untrained (run.json, dloral.report.sources.untrained_methods)
carry tables.UNTRAINED in every table, plot and visual, with a note saying why; they are never
ranked nor on a Pareto front unless `rank_untrained`.
"""

from __future__ import annotations

import html
import json
import math
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dloral.atomic import atomic_write_text
from dloral.bench import paired, results
from dloral.bench.registry import resolve
from dloral.report import plots, tables
from dloral.report.sources import BenchRun, SweepRun, higher_is_better, untrained_methods
from dloral.report.tables import UNTRAINED
from dloral.report.visuals import visual_grid
from dloral.trials import (
    COMPARISON_HEADER,
    EVAL_COLUMNS,
    NOISE_RULE,
    SweepSpec,
    comparison_cells,
)

KIND_ORDER = ("full_reference", "no_reference", "temporal", "latency")
QUALITY_PREFERENCE = ("musiq", "lpips", "clipiqa", "dists", "maniqa", "niqe", "piqe", "psnr")
CURVE_METRICS = ("psnr", "ssim", "lpips", "ewarp", "tof", "tlp")
SPREAD = ("s_per_frame_min", "s_per_frame_max")  # said in the caption, not columns of a table


# ----- the document model: blocks rendered to Markdown and HTML -----------------------------
@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str  # plain text; `code` spans are kept


@dataclass
class Table:
    table: tables.ComparisonTable


@dataclass
class Grid:
    """A plain table: header + rows of text."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Image:
    path: str  # relative to the report folder
    caption: str


@dataclass
class Report:
    title: str
    blocks: list[Any] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    out: Path = Path(".")

    @property
    def index(self) -> Path:
        return self.out / "index.html"

    @property
    def markdown(self) -> Path:
        return self.out / "report.md"


def _code(text: str, html_out: bool) -> str:
    """Escape for the target; `...` spans become <code> in HTML."""
    if not html_out:
        return text
    parts = re.split(r"`([^`]*)`", text)
    return "".join(
        f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p).replace("\n", "<br>")
        for i, p in enumerate(parts)
    )


def to_markdown(report: Report) -> str:
    out = [f"# {report.title}", ""]
    for b in report.blocks:
        if isinstance(b, Heading):
            out += [f"{'#' * (b.level + 1)} {b.text}", ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Table):
            out += [b.table.to_markdown()]
        elif isinstance(b, Grid):
            out.append(tables.md_row(b.header))
            out.append("|" + "|".join([" --- "] * len(b.header)) + "|")
            out += [tables.md_row([c.replace("\n", "<br>") for c in r]) for r in b.rows]
            out += [""] + ([b.caption, ""] if b.caption else [])
        elif isinstance(b, Image):
            out += [f"![{Path(b.path).stem}]({b.path})", "", f"*{b.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "DejaVu Sans", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
h3 { margin-top: 1.6em; }
.scroll { overflow-x: auto; margin: .6em 0 1.2em; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: .25em .6em; border-bottom: 1px solid #e3e3e3; text-align: right; }
thead th { border-bottom: 2px solid #888; text-align: center; }
tbody th { text-align: left; font-weight: 600; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: .9em; padding-top: .4em; }
.gallery { display: flex; flex-wrap: wrap; gap: .5em 1.5em; align-items: flex-start; }
figure { margin: .6em 0 1em; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: .9em; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; font-size: .92em; }
table.grid td, table.grid th { text-align: left; vertical-align: top; }
"""


def to_html(report: Report) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{esc(report.title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(report.title)}</h1>",
    ]
    in_gallery = False
    for b in report.blocks:
        if isinstance(b, Image) != in_gallery:  # consecutive figures share a wrapping row
            out.append('<div class="gallery">' if not in_gallery else "</div>")
            in_gallery = not in_gallery
        if isinstance(b, Heading):
            anchor = re.sub(r"[^0-9a-z]+", "-", b.text.lower()).strip("-")
            out.append(f'<h{b.level + 1} id="{anchor}">{esc(b.text)}</h{b.level + 1}>')
        elif isinstance(b, Para):
            out.append(f"<p>{_code(b.text, True)}</p>")
        elif isinstance(b, Table):
            out.append(f'<div class="scroll">{b.table.to_html()}</div>')
        elif isinstance(b, Grid):
            rows = ["<tr>" + "".join(f"<th>{esc(h)}</th>" for h in b.header) + "</tr>"]
            rows += [
                "<tr>" + "".join(f"<td>{_code(c, True)}</td>" for c in r) + "</tr>" for r in b.rows
            ]
            cap = f"<caption>{esc(b.caption)}</caption>" if b.caption else ""
            out.append(
                f'<div class="scroll"><table class="grid">{cap}{"".join(rows)}</table></div>'
            )
        elif isinstance(b, Image):
            out.append(
                f'<figure><img src="{esc(b.path)}" alt="{esc(b.caption)}">'
                f"<figcaption>{esc(b.caption)}</figcaption></figure>"
            )
    if in_gallery:
        out.append("</div>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# ----- building ------------------------------------------------------------------------------
class _Builder:
    def __init__(self, report: Report):
        self.report = report
        self.images = report.out / "images"
        self.images.mkdir(parents=True, exist_ok=True)

    def add(self, *blocks) -> None:
        self.report.blocks.extend(blocks)

    def section(self, heading: str, figures: list[tuple[Any, str, str]]) -> None:
        """A level-2 heading and its (figure, name, caption) list; nothing when empty."""
        if figures:
            self.add(Heading(2, heading))
            for fig, name, caption in figures:
                self.figure(fig, name, caption)

    def figure(self, fig, name: str, caption: str) -> None:
        path = plots.save(fig, self.images / f"{_slug(name)}.png")
        self.report.images.append(path)
        self.add(Image(f"images/{path.name}", caption))


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "-", text).strip("-") or "x"


def _sentence(text: str | None) -> str:
    """A description as a sentence followed by a space ("" when there is none)."""
    text = (text or "").strip().rstrip(".")
    return f"{text}. " if text else ""


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return tables.MISSING
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _metric_order(agg: pd.DataFrame, suite_order: list[str]) -> list[str]:
    kinds = dict(zip(agg["metric"], agg.get("kind", pd.Series([""] * len(agg))), strict=True))
    names = list(dict.fromkeys(agg["metric"]))

    def key(m: str):
        kind = str(kinds.get(m, ""))
        k = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
        return (k, suite_order.index(m) if m in suite_order else len(suite_order), m)

    return sorted(names, key=key)


def _dataset_table(
    sub: pd.DataFrame, order: list[str], caption: str, unranked: set[str]
) -> tables.ComparisonTable:
    """One dataset's methods x metrics, metrics in `order`; the heading above names the dataset,
    so the table's dataset header level is dropped."""
    sub = sub.sort_values("metric", key=lambda m: m.map(order.index), kind="stable")
    table = tables.comparison_table(sub, caption=caption, unranked=unranked)
    table.header = table.header[1:]
    return table


@dataclass
class _Marks:
    """How one report shows a run's methods: label per method (UNTRAINED after an untrained one),
    why each marked label is untrained, and whether marked methods are ranked all the same."""

    label: dict[str, str]
    why: dict[str, str]  # marked label -> reason
    rank: bool = False

    @classmethod
    def of(cls, runs: list[BenchRun], rank: bool) -> _Marks:
        why = {m: r for run in runs for m, r in untrained_methods(run.run).items()}
        return cls(
            {m: f"{m} {UNTRAINED}" for m in why},
            {f"{m} {UNTRAINED}": r for m, r in why.items()},
            rank,
        )

    @property
    def marked(self) -> set[str]:
        return set(self.why)

    @property
    def unranked(self) -> set[str]:
        return set() if self.rank else self.marked

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        return df.assign(method=df["method"].map(lambda m: self.label.get(m, m))) if len(df) else df

    def note(self, methods) -> str:
        """The footnote for the marked ones among `methods` ("" when none is)."""
        here = [m for m in dict.fromkeys(methods) if m in self.why]
        if not here:
            return ""
        reasons = ", ".join(f"{m.removesuffix(' ' + UNTRAINED)} ({self.why[m]})" for m in here)
        ranked = (
            "Ranked all the same (--rank-untrained)."
            if self.rank
            else "Shown, not ranked (--rank-untrained ranks them)."
        )
        return f" {UNTRAINED} untrained weights, as the run recorded them: {reasons}. {ranked}"


def _timing_note(sub: pd.DataFrame, table: pd.DataFrame, dataset: str) -> str:
    """How s_per_frame and peak_mem_gib were measured on `dataset`, with the passes' spread."""
    parts = []
    impl = table.loc[table["dataset"] == dataset].drop_duplicates("metric")
    impl = dict(zip(impl["metric"], impl["implementation"], strict=True))
    if "s_per_frame" in impl:
        spread = sub[sub["metric"].isin(SPREAD)].pivot_table(
            index="method", columns="metric", values="value", sort=False
        )
        ranges = ", ".join(
            f"{m} {r[SPREAD[0]]:.4f}–{r[SPREAD[1]]:.4f}"
            for m, r in spread.iterrows()
            if set(SPREAD) <= set(r.dropna().index)
        )
        parts.append(
            f"s_per_frame: {impl['s_per_frame']}"
            + (f"; fastest–slowest pass (mean over clips): {ranges}" if ranges else "")
        )
    if "peak_mem_gib" in impl:
        parts.append(f"peak_mem_gib: {impl['peak_mem_gib']}")
    return "".join(f" {p}." for p in parts)


def bench_section(
    b: _Builder,
    run: BenchRun,
    per_clip: tuple[str, ...],
    max_clips: int,
    quality: str | None,
    rank_untrained: bool = False,
    against: str | None = None,
) -> None:
    info = run.run
    suite = info.get("suite") or {}
    marks = _Marks.of([run], rank_untrained)
    b.add(Heading(1, f"Benchmark: {run.name}"))
    status = info.get("status", "unknown")
    done = f"{info.get('clips_done', '?')} of {info.get('clips_total', '?')} clips"
    b.add(
        Para(
            f"{_sentence(suite.get('description'))}Status: {status}, {done}. "
            f"Source: `{run.origin}`."
        )
    )
    if status != "finished":
        b.add(
            Para(
                f"This run did not finish ({info.get('reason') or status}): numbers cover the "
                "clips it completed."
            )
        )
    agg, df = marks.apply(run.aggregate), marks.apply(run.table)
    if agg.empty:
        b.add(Para("No results in this run."))
        return
    order = _metric_order(agg, list(info.get("metrics") or []))
    frames = {d.get("name"): d.get("frames", 0) for d in suite.get("datasets", [])}
    for dataset in dict.fromkeys(agg["dataset"]):
        sub = agg[agg["dataset"] == dataset]
        clips = int(sub["clips"].max()) if "clips" in sub else 0
        nf = frames.get(dataset) or "all"
        cap = (
            f"{dataset}: mean over {clips} clip(s) of per-clip means (first {nf} frames of each); "
            f"crop border {info.get('crop_border', 0)}; ↑ higher / ↓ lower is better; best bold, "
            "second underlined (where a worse value exists); – not measured; name@protocol: the "
            "published code a temporal metric reproduces (README, Benchmarks and metrics)."
        )
        mine = df[df["dataset"] == dataset]
        cap += _left_out_note(sub)
        cap += _noted_note(sub, mine)
        cap += marks.note(sub["method"]) + _timing_note(sub, df, dataset)
        shown = sub[~sub["metric"].isin(SPREAD)]
        table = _dataset_table(shown, order, cap, marks.unranked)
        b.add(Heading(2, f"{dataset}"), Table(table))
        for metric in map(resolve, per_clip):
            if not ((df["dataset"] == dataset) & (df["metric"] == metric)).any():
                b.add(Para(f"Per-clip {metric}: no values on {dataset}."))
                continue
            on = df[(df["dataset"] == dataset) & (df["metric"] == metric)]
            t = tables.per_clip_table(
                df,
                dataset,
                metric,
                caption=f"{dataset}: {metric} per clip." + marks.note(on["method"]),
                unranked=marks.unranked,
            )
            b.add(Table(t))
        _paired(b, mine, sub, marks, against)
    _bench_plots(b, run, agg, df, marks, max_clips, quality)
    _bench_visuals(b, run, marks, max_clips)
    _skipped(b, run)
    b.add(Heading(2, "Provenance"))
    _bench_provenance(b, run)


def _noted_note(sub: pd.DataFrame, mine: pd.DataFrame) -> str:
    """Why values of one dataset's aggregate `sub` (from the results `mine`) show a dagger."""
    if "noted" not in sub or not (sub["noted"].fillna(0) > 0).any():
        return ""
    notes = list(dict.fromkeys(mine.loc[mine["note"].fillna("") != "", "note"]))
    if results.shared_frames(mine)["unaligned"].any():
        notes.append("a clip-level value over other frames than another method's")
    return f" {tables.NOTED} shown, not ranked: " + "; ".join(notes) + "."


def _left_out_note(sub: pd.DataFrame) -> str:
    """What the means of one dataset's aggregate left out, to be the same for every method."""
    out = ""
    if "left_out" in sub and (sub["left_out"].fillna(0) > 0).any():
        out += (
            " Every method is averaged over the frames (pairs) all methods have on a clip: "
            f"{int(sub['left_out'].sum())} values left out where not every method has one "
            "(e.g. a method without a clip's first frame: first_frame skip, as the "
            "reference's test script)."
        )
    if "clips_left_out" in sub and (sub["clips_left_out"].fillna(0) > 0).any():
        out += (
            " A metric is averaged over the clips every method has it for: "
            f"{int(sub['clips_left_out'].sum())} per-clip values left out."
        )
    return out


def _paired(
    b: _Builder, df: pd.DataFrame, agg: pd.DataFrame, marks: _Marks, against: str | None = None
) -> None:
    """Each ranked method against the best of each metric, or against `against`, clip by clip
    (dloral.bench.paired)."""
    reference = None
    if against is not None:
        reference = _reference_label(against, list(dict.fromkeys(df["method"])), marks)
        if isinstance(reference, Para):  # not here, untrained or ambiguous: say so
            b.add(reference)
            return
    pairs = paired.against_best(df, unranked=marks.unranked, reference=reference)
    if pairs.empty:
        return
    order = _metric_order(agg, [])
    pairs = pairs.sort_values("metric", key=lambda m: m.map(order.index), kind="stable")
    if reference is None:
        head = "Each method against the best of each metric on the same clips"
        family = (
            "p (Holm) adjusts p for comparing several methods with the best of a metric "
            "(Holm's step-down): read that one when there are many methods; neither undoes "
            "picking the best from the same clips."
        )
    else:
        head = f"Each method against {reference} (named with --against) on the same clips"
        family = (
            f"p (Holm) adjusts p for comparing several methods with {reference} (Holm's "
            "step-down): read that one when there are many methods; the method compared with "
            "was named, not picked from these clips."
        )
    b.add(
        Grid(
            list(tables.PAIRED_HEADER),
            tables.paired_rows(pairs, tables.metric_scales(agg, None)),
            f"{head}: Δ mean is the "
            "difference of the two means above, in their units; p a two-sided sign-flip "
            "permutation test over clips (exact up to 16 clips; with n clips no p is below "
            "2/2^n); 95% CI the shifts that test does not reject (– with 5 clips or fewer), so "
            f"it holds 0 exactly when p > 0.05. {family} A "
            "difference whose interval holds 0 may be which clips the set has rather than the "
            "methods.",
        )
    )


def _reference_label(against: str, methods: list[str], marks: _Marks) -> str | Para:
    """The label `against` has in a table of `methods` (a run's own, or "name (run)" in the
    joined table), or a note on why there are no comparisons with it here."""
    plain = {m: m.removesuffix(f" {UNTRAINED}") for m in methods}
    found = [m for m, p in plain.items() if against in (p, p.rsplit(" (", 1)[0])]
    if not found:
        return Para(
            f"No clip-by-clip comparisons with {against} (--against): it has no results here."
        )
    if len(found) > 1:
        return Para(
            f"No clip-by-clip comparisons with {against} (--against) in this joined table: "
            f"several runs have it ({', '.join(found)}); each run's own section compares with "
            "its own."
        )
    if found[0] in marks.unranked:
        return Para(
            f"No clip-by-clip comparisons with {against} (--against): its weights are "
            "untrained and it is not ranked (--rank-untrained ranks it)."
        )
    return found[0]


def _run_labels(benches: list[BenchRun]) -> list[str]:
    """Each run's label: its suite's name, with #2, #3, ... after a name an earlier run has."""
    seen: dict[str, int] = {}
    out = []
    for run in benches:
        seen[run.name] = seen.get(run.name, 0) + 1
        out.append(run.name if seen[run.name] == 1 else f"{run.name}#{seen[run.name]}")
    return out


_DATA_KEYS = {"kind": "reader kind", "scale": "scale", "lq": "LQ folder", "files": "files digest"}


def _data_of(run: BenchRun, dataset: str) -> dict[str, Any]:
    """What a run recorded of its dataset: the reader kind, the scale, the LQ folder it read
    (`lq_read`, else the suite's `lq` where it named one) and the files' digest of an embedded
    or degraded set's manifest (its frames' content, not paths)."""
    spec = next(
        (d for d in (run.run.get("suite") or {}).get("datasets", []) if d.get("name") == dataset),
        {},
    )
    files = (run.run.get("datasets") or {}).get(dataset) or {}
    data = {
        "kind": spec.get("kind"),
        "scale": spec.get("scale"),
        "lq": files.get("lq_read") or spec.get("lq"),
        "files": files.get("files_sha256"),
    }
    return {k: v for k, v in data.items() if v is not None}


def _same_data(runs: list[tuple[str, BenchRun]], dataset: str) -> tuple[str, list[str]]:
    """(why the (label, run) pairs that scored `dataset` did not score the same data, "" where
    nothing they recorded differs; notes on what only some of them recorded, so was not
    checked)."""
    seen = [(label, _data_of(run, dataset)) for label, run in runs]
    unchecked = []
    for key, what in _DATA_KEYS.items():
        values = {label: d[key] for label, d in seen if key in d}
        if len(set(map(str, values.values()))) > 1:
            shown = "; ".join(f"{label}: {str(v)[:16]}" for label, v in values.items())
            return f"{dataset} not put together: its runs scored other data ({what}: {shown})", []
        lacking = [label for label, d in seen if key not in d]
        if values and lacking:
            unchecked.append(
                f"{dataset}: the runs' {what} not compared, {', '.join(lacking)} did not record it"
            )
    return "", unchecked


def combine(benches: list[BenchRun]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """All runs' results in one table, for datasets more than one run scored: (aggregate,
    results table, notes). The means are taken from the joined results table, so every method
    is averaged over the frames and clips all of them have (`results.aggregate`), whichever run
    scored it, and the methods can be set against each other clip by clip.

    A dataset whose runs recorded other data (reader kind, scale, LQ folder read, or the files'
    digest of a manifest) is left out. A method that two runs both scored is one method where
    their values agree on every frame both have (and keeps the frames either has; its latency
    and memory from the first run, every run measuring them anew), else it is labelled by run,
    "method (suite)" (suite#2, ... for a second run of a suite). A metric computed by different
    implementations in different runs (RAFT vs DIS flow, another crop border, ...) is not
    comparable: it is left out. The notes say which and why. `untrained` is True for a method
    its run recorded as untrained.
    """
    labelled = list(zip(_run_labels(benches), benches, strict=True))
    frames, meta = [], []
    for label, run in labelled:
        t = run.table.copy()
        t["run"] = label
        t["untrained"] = t["method"].isin(list(untrained_methods(run.run)))
        frames.append(t)
        cols = [c for c in ("metric", "kind", "scale") if c in run.aggregate.columns]
        meta.append(run.aggregate[cols])
    table = pd.concat(frames, ignore_index=True)
    shared = table.groupby("dataset")["run"].nunique()
    table = table[table["dataset"].isin(shared[shared > 1].index)]
    notes = []
    for dataset in dict.fromkeys(table["dataset"]):
        runs = [(label, run) for label, run in labelled if (run.table["dataset"] == dataset).any()]
        differ, unchecked = _same_data(runs, dataset)
        notes += [differ] if differ else unchecked
        if differ:
            table = table[table["dataset"] != dataset]
    impl = table.groupby(["dataset", "metric"])["implementation"].nunique()
    for dataset, metric in impl[impl > 1].index:
        runs = table[(table["dataset"] == dataset) & (table["metric"] == metric)]
        runs = runs.drop_duplicates(["run", "implementation"])
        ways = "; ".join(
            f"{r}: {i}" for r, i in zip(runs["run"], runs["implementation"], strict=True)
        )
        notes.append(f"{metric} on {dataset} left out, computed differently: {ways}")
        table = table[~((table["dataset"] == dataset) & (table["metric"] == metric))]
    # the same method scored by two runs: one method where every frame both have agrees
    latency = table["kind"] == "latency"
    at = ["dataset", "method", "metric", "clip", "frame"]
    differ = table[~latency].groupby(at)["value"].nunique(dropna=False)
    clashing = set(differ[differ > 1].index.droplevel([2, 3, 4]))
    apart = pd.Series(
        [(d, m) in clashing for d, m in zip(table["dataset"], table["method"], strict=True)],
        index=table.index,
        dtype=bool,
    )
    once = ~apart & ~latency & ~table.duplicated(at)  # the first run's value of each frame
    # latency and memory of the first run that measured them
    first = table[latency].drop_duplicates(at[:3])[[*at[:3], "run"]]
    timed = pd.MultiIndex.from_frame(table[[*at[:3], "run"]]).isin(pd.MultiIndex.from_frame(first))
    table = table[apart | once | (~apart & latency & timed)]
    table = table.assign(
        method=[
            f"{m} ({r})" if (d, m) in clashing else m
            for d, m, r in zip(table["dataset"], table["method"], table["run"], strict=True)
        ]
    )
    untrained = set(table.loc[table["untrained"], "method"])
    agg = results.aggregate(table.drop(columns=["run", "untrained"]))
    meta = pd.concat(meta, ignore_index=True).drop_duplicates("metric")
    agg = agg.merge(meta, on="metric", how="left")
    agg["untrained"] = agg["method"].isin(untrained)
    return agg, table.drop(columns="run"), notes


def combined_section(
    b: _Builder, benches: list[BenchRun], rank_untrained: bool = False, against: str | None = None
) -> None:
    agg, table, notes = combine(benches)
    if agg.empty:
        for note in notes:
            b.add(Para(note + "."))
        return
    why = {m: r for run in benches for m, r in untrained_methods(run.run).items()}
    label = {  # "dloral-tiny (embedded)" is the untrained dloral-tiny of run embedded
        m: f"{m} {UNTRAINED}" for m in agg.loc[agg["untrained"], "method"]
    }
    marks = _Marks(
        label,
        {f"{m} {UNTRAINED}": why.get(m.rsplit(" (", 1)[0], "recorded untrained") for m in label},
        rank_untrained,
    )
    agg = marks.apply(agg[~agg["metric"].isin(SPREAD)])
    table = marks.apply(table)
    names = ", ".join(r.name for r in benches)
    b.add(Heading(1, "All benchmark runs together"))
    b.add(
        Para(
            f"Methods of {names} on the datasets more than one run scored, from their results "
            "joined: every method averaged over the frames and clips all of them have; each "
            "run's own section below gives its provenance."
        )
    )
    order = _metric_order(agg, [])
    for dataset in dict.fromkeys(agg["dataset"]):
        sub, mine = agg[agg["dataset"] == dataset], table[table["dataset"] == dataset]
        cap = (
            f"{dataset}: every run's methods, mean over {int(sub['clips'].max())} clip(s) of "
            "per-clip means over the frames every method has; best bold, second underlined "
            "(where a worse value exists)."
            + _left_out_note(sub)
            + _noted_note(sub, mine)
            + marks.note(sub["method"])
        )
        t = _dataset_table(sub, order, cap, marks.unranked)
        b.add(Heading(2, f"{dataset} (all runs)"), Table(t))
        _paired(b, mine, sub, marks, against)
    for note in notes:
        b.add(Para(note + "."))


def _skipped(b: _Builder, run: BenchRun) -> None:
    if not run.skipped:
        return
    rows = [
        [s["metric"], s.get("dataset", "all datasets"), s.get("reason", "")] for s in run.skipped
    ]
    b.add(
        Grid(
            ["metric skipped", "where", "why"],
            rows,
            "Metrics the suite asked for but that "
            "were not measured (absent weights or inputs): never shown as numbers.",
        )
    )


def _pick_quality(agg: pd.DataFrame, dataset: str, quality: str | None) -> list[str]:
    have = set(agg.loc[agg["dataset"] == dataset, "metric"])
    if quality:
        return [quality] if quality in have else []
    picks = [m for m in QUALITY_PREFERENCE if m in have]
    return list(dict.fromkeys(picks[:1] + [m for m in ("psnr",) if m in have]))


def _bench_plots(
    b: _Builder,
    run: BenchRun,
    agg: pd.DataFrame,
    df: pd.DataFrame,
    marks: _Marks,
    max_clips: int,
    quality: str | None,
) -> None:
    """Quality vs speed and per-frame curves; agg and df carry the report's method labels."""
    speed_blocks = []
    for dataset in dict.fromkeys(agg["dataset"]):
        if "s_per_frame" not in set(agg.loc[agg["dataset"] == dataset, "metric"]):
            continue
        for metric in _pick_quality(agg, dataset, quality):
            fig = plots.quality_speed(
                agg, dataset, metric, untrained=marks.marked, rank_untrained=marks.rank
            )
            speed_blocks.append(
                (
                    fig,
                    f"{run.name}-{dataset}-{metric}-speed",
                    f"{dataset}: {metric} vs seconds per frame "
                    f"({run.run.get('device', '?')}, methods run by the harness)."
                    + marks.note(agg.loc[agg["dataset"] == dataset, "method"]),
                )
            )
    b.section("Quality vs speed", speed_blocks)
    curves = []
    scored = df[df["frame"] >= 0]
    scales = tables.metric_scales(agg, None)
    for dataset in dict.fromkeys(scored["dataset"]):
        clips = list(dict.fromkeys(scored.loc[scored["dataset"] == dataset, "clip"]))
        for clip in clips[:max_clips]:
            on = scored[(scored["dataset"] == dataset) & (scored["clip"] == clip)]
            have = set(on["metric"])
            metrics = [m for c in CURVE_METRICS for m in sorted(have) if m.split("@")[0] == c][:3]
            if metrics:
                fig = plots.per_frame_curves(
                    df, dataset, clip, metrics, scales=scales, untrained=marks.marked
                )
                curves.append(
                    (
                        fig,
                        f"{run.name}-{dataset}-{clip}-frames",
                        f"{dataset}/{clip}: {', '.join(metrics)} per frame "
                        "(pair metrics between frames t and t+1)." + marks.note(on["method"]),
                    )
                )
    b.section("Per-frame curves", curves)


def _bench_visuals(b: _Builder, run: BenchRun, marks: _Marks, max_clips: int) -> None:
    if not run.visuals:
        return
    b.add(Heading(2, "Visual comparisons"))
    b.add(
        Para(
            "The same crop (the most textured window of the middle frame) from GT, LQ (its "
            "pixels repeated, not interpolated) and each method; below each, the x-t profile: "
            "the dashed row of the crop over every frame, time downwards. Flicker shows as "
            "horizontal streaks, temporal smoothness as continuous vertical structure."
        )
    )
    per_dataset: dict[str, int] = {}
    for entry in run.visuals:
        n = per_dataset.get(entry["dataset"], 0)
        if n >= max_clips:
            continue
        per_dataset[entry["dataset"]] = n + 1
        top, left, h, w = entry["box"]
        shown = [marks.label.get(m, m) for m in entry["images"]]
        b.figure(
            visual_grid(entry, marks.label, untrained=marks.marked),
            f"{run.name}-{entry['dataset']}-{entry['clip']}-visual",
            f"{entry['dataset']}/{entry['clip']}, frame {entry['frame_name']}: crop "
            f"{w}x{h} at (x={left}, y={top}), x-t row y={entry['row']}." + marks.note(shown),
        )


def _versions_line(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def _git_line(info: dict[str, Any]) -> str:
    """`commit` and whether the tree had uncommitted changes (when that was recorded)."""
    commit = info.get("git_commit", "unknown")
    dirty = info.get("git_dirty")
    state = {True: " (with uncommitted changes)", False: " (clean)"}.get(dirty, "")
    return f"`{commit}`{state}"


def _command(info: dict[str, Any]) -> str:
    """The command a run recorded, as typed (shell-quoted); a run recorded before the typed
    line was kept shows its argv with the script's name only."""
    if info.get("command_line"):
        return f"`{info['command_line']}`"
    argv = [str(a) for a in info.get("command") or []]
    if not argv:
        return "not recorded"
    return f"`{shlex.join([Path(argv[0]).name, *argv[1:]])}`"


def _machine_line(machine: dict[str, Any], device: str | None = None) -> str:
    gpus = ", ".join(machine.get("gpus", [])) or "no GPU"
    head = f"{device} on " if device else ""
    # the processor and its kernels' instruction set (records from before 2026-12-02 have none)
    cpu = ", ".join(machine[k] for k in ("cpu", "cpu_capability") if machine.get(k))
    return (
        f"{head}{machine.get('platform', '?')}, Python {machine.get('python', '?')}, "
        f"{machine.get('cpu_count', '?')} CPU cores{f' ({cpu})' if cpu else ''}, {gpus}"
    )


def _bench_provenance(b: _Builder, run: BenchRun) -> None:
    info = run.run
    rows = []
    for name, d in (info.get("datasets") or {}).items():
        manifest = d.get("manifest_sha256")
        files = d.get("files_sha256")
        where = d.get("root", "?")
        if manifest:
            what = (
                f"manifest sha256 `{manifest[:16]}…`, its {d.get('files')} files' entries "
                f"sha256 `{files[:16]}…`"
            )
        else:
            what = "no manifest (a local dataset folder: cite its path and version)"
        rows.append([f"dataset {name}", f"{d.get('kind')} at `{where}`; {what}"])
    impl = run.table.drop_duplicates(["metric", "implementation", "device"])
    for r in impl.itertuples():
        rows.append([f"metric {r.metric}", f"{r.implementation} (on {r.device})"])
    rows.append(["flow estimator", info.get("flow_estimator") or "none (no temporal metric)"])
    for name, m in (info.get("methods") or {}).items():
        rows.append([f"method {name}", json.dumps(m, sort_keys=True, default=str)])
    for w in info.get("weights") or []:
        if w.get("found"):
            state = f"found: `{w['path']}`" if w.get("path") else "no file needed"
        else:
            env = w.get("env") or ""
            state = "missing" + (f" (${env})" if env.strip("-") else "")
        rows.append([f"weights {w['name']}", f"{state}; used by {w.get('used_by', '?')}"])
    rows.append(["device", _machine_line(info.get("machine") or {}, info.get("device"))])
    rows.append(["versions", _versions_line(info.get("versions") or {})])
    rows.append(["git commit", _git_line(info)])
    rows.append(["seed", str(info.get("seed"))])
    rows.append(["command", _command(info)])
    rows.append(
        [
            "run",
            f"{info.get('started', '?')} to {info.get('finished', '?')}, "
            f"evaluations computed {info.get('metric_evaluations', {})}",
        ]
    )
    b.add(Grid(["what", "value"], rows))


# ----- sweeps ----------------------------------------------------------------------------------
def sweep_section(b: _Builder, sweep: SweepRun) -> None:
    s = sweep.spec.sweep if sweep.spec is not None else {}
    summary = sweep.summary
    b.add(Heading(1, f"Sweep: {sweep.name}"))
    if sweep.trials.empty:  # stopped or failed before any trial reported (Ray starting, say)
        b.add(
            Para(
                f"{_sentence(s.get('description'))}Status {summary.status}: no trial had "
                f"reported when the sweep stopped, so there is nothing to compare. "
                f"Source: `{sweep.origin}`."
            )
        )
        b.add(Heading(2, "Provenance"))
        _sweep_provenance(b, sweep)
        return
    counts = sweep.trials["status"].value_counts().to_dict()
    wall = summary.wall_s
    runs = sweep.spec.invocations if sweep.spec is not None else []
    over = f" over {len(runs)} driver runs" if len(runs) > 1 else ""
    if any(r.get("recorded") is False for r in runs):
        over = " over its driver runs (of those before dloral recorded them, only the last)"
    b.add(
        Para(
            f"{_sentence(s.get('description'))}Family `{s.get('family', '?')}`; status "
            f"{summary.status}; trials {counts}; wall "
            f"{_fmt(wall, 0) if wall else '?'} s{over}. Judged on `{sweep.metric}` "
            f"({s.get('mode', '?')}), scheduler {s.get('scheduler', '?')}. "
            f"Source: `{sweep.origin}`."
        )
    )
    _best_table(b, sweep)
    _comparisons(b, sweep)
    _trials_grid(b, sweep)
    _ablation_plots(b, sweep)
    _curves(b, sweep)
    b.add(Heading(2, "Provenance"))
    _sweep_provenance(b, sweep)


def _best_table(b: _Builder, sweep: SweepRun) -> None:
    recs, dataset = [], None
    for item in sweep.summary.best:
        if item["rank"] != 1:
            continue
        ev, trial = item["eval"], item["trial"]
        dataset = ev.get("dataset", dataset)
        for m in EVAL_COLUMNS:
            v = ev.get(m)
            if isinstance(v, int | float):
                recs.append(
                    {
                        "dataset": "evaluation",
                        "method": item["arm"],
                        "metric": m,
                        "value": float(v),
                        "higher_is_better": higher_is_better(m),
                    }
                )
        v = trial.metrics.get(sweep.metric)
        if isinstance(v, int | float):
            recs.append(
                {
                    "dataset": "validation",
                    "method": item["arm"],
                    "metric": sweep.metric,
                    "value": float(v),
                    "higher_is_better": higher_is_better(sweep.metric),
                }
            )
    if not recs:
        b.add(Para("No arm has an evaluated best trial (evaluation off, or no trial finished)."))
        return
    agg = pd.DataFrame(recs)
    cap = (
        f"Best trial per arm: `{sweep.metric}` at its last validation, then its final "
        f"checkpoint scored on {dataset or 'the validation set'}; best bold, second underlined."
    )
    table = tables.comparison_table(agg, rows="method", caption=cap)
    table.corner = "arm"
    b.add(Heading(2, "Best per arm"), Table(table))


def _comparisons(b: _Builder, sweep: SweepRun) -> None:
    """Every pair of arms over their seeds, as the sweep judged them (summary.json)."""
    comparisons = sweep.summary.comparisons
    if not comparisons:
        return
    metric = comparisons[0]["metric"]
    b.add(
        Heading(2, "Arm vs arm"),
        Grid(
            list(COMPARISON_HEADER),
            [comparison_cells(c) for c in comparisons],
            f"`{metric}` at each trial's last validation, mean over the arm's seeds (n: trials "
            f"run to the end). Rule: {NOISE_RULE}.",
        ),
    )


def _trials_grid(b: _Builder, sweep: SweepRun) -> None:
    keys, metrics = sweep.keys, sweep.metrics
    rows = []
    for t in sweep.trials.to_dict("records"):
        rows.append(
            [
                t["trial_id"],
                *(_fmt(t.get(k)) for k in keys),
                t["status"],
                _fmt(t.get("step")),
                *(_fmt(t.get(m)) for m in metrics),
            ]
        )
    b.add(
        Heading(2, "Trials"),
        Grid(
            ["trial", *keys, "status", "step", *metrics],
            rows,
            "Every trial; 'stopped' trials were ended early by ASHA and are compared at the "
            "step shown.",
        ),
    )


def _ablation_plots(b: _Builder, sweep: SweepRun) -> None:
    figs = []
    dims = sweep.dims
    for key in sweep.keys:
        if key not in sweep.trials or sweep.trials[key].nunique() < 2:
            continue
        for metric in [sweep.metric] + [m for m in sweep.metrics if m != sweep.metric]:
            if sweep.trials[metric].notna().sum() == 0:
                continue
            fig = plots.ablation(
                sweep.trials,
                key,
                metric,
                higher_is_better=higher_is_better(metric),
                log_x=dims.get(key) == "loguniform",
            )
            figs.append(
                (
                    fig,
                    f"{sweep.name}-{key}-{metric}",
                    f"{metric} vs {key}: every trial (hollow: stopped early), mean ± std "
                    "per value where it repeats (other keys and seeds vary).",
                )
            )
    b.section("Ablations", figs)


def _curves(b: _Builder, sweep: SweepRun) -> None:
    from matplotlib.figure import Figure

    if sweep.history is None:
        b.add(Para(f"Validation curves: {sweep.history_note}."))
        return
    h = sweep.history
    metrics = list(dict.fromkeys(h["metric"]))
    fig = Figure(figsize=(6.4, 2.6 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    labels = {
        t: ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(r.get(k))}" for k in sweep.keys)
        for t, r in zip(sweep.trials["trial_id"], sweep.trials.to_dict("records"), strict=True)
    }
    for ax, metric in zip(axes, metrics, strict=True):
        for trial, g in h[h["metric"] == metric].groupby("trial_id", sort=True):
            g = g.sort_values("step")
            ax.plot(g["step"], g["value"], marker="o", ms=3, label=labels.get(trial, trial))
        ax.set_ylabel(f"{metric} {'↑' if higher_is_better(metric) else '↓'}")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("training step")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", fontsize=7, ncols=2)
    b.add(Heading(2, "Validation curves"))
    b.figure(
        fig,
        f"{sweep.name}-curves",
        "Each trial's in-training validation, read from its MLflow run.",
    )


def _sweep_provenance(b: _Builder, sweep: SweepRun) -> None:
    spec = sweep.spec
    if spec is None:
        b.add(Para(f"No sweep.json beside the summary (`{sweep.origin}`): provenance unknown."))
        return
    s, base = spec.sweep, spec.base
    rows = [
        ["experiment", f"`{spec.path}`"],
        ["space", json.dumps(spec.dims)],
        [
            "scheduler",
            f"{s.get('scheduler')} {json.dumps(s.get('asha', {}))}"
            if s.get("scheduler") == "asha"
            else str(s.get("scheduler")),
        ],
        [
            "seeds",
            f"model.seed {base.get('model', {}).get('seed')}, run.seed "
            f"{base.get('run', {}).get('seed')} (unless swept); samples per point "
            f"{s.get('num_samples')}",
        ],
        ["model profile", str(base.get("model", {}).get("profile"))],
        [
            "training data",
            f"{base.get('data', {}).get('train_kind')} at "
            f"`{base.get('data', {}).get('train_root')}`",
        ],
        [
            "validation data",
            f"{base.get('data', {}).get('val_kind')} at "
            f"`{base.get('data', {}).get('val_root')}` "
            f"({base.get('data', {}).get('val_clips')} clips x "
            f"{base.get('data', {}).get('val_frames')} frames)",
        ],
        [
            "MLflow",
            f"`{spec.tracking_uri}` experiment {spec.mlflow_experiment}, "
            f"parent run `{spec.parent_run_id}`",
        ],
    ]
    evals = [it["eval"] for it in sweep.summary.best]
    if evals and evals[0].get("dataset"):
        rows.append(
            [
                "evaluation",
                f"{evals[0]['dataset']}, {evals[0].get('frames')} frames, "
                f"on {evals[0].get('device')}",
            ]
        )
    prov = spec.provenance
    if prov:
        rows.append(["device", _machine_line(prov.get("machine") or {})])
        rows.append(["versions", _versions_line(prov.get("versions") or {})])
        rows.append(["git commit", _git_line(prov)])
    else:
        rows.append(
            [
                "versions, device, git",
                "not recorded (sweep made before dloral recorded them in sweep.json)",
            ]
        )
    rows.append(["started", spec.created])
    for i, inv in enumerate(spec.invocations, 1):
        rows.append([f"driver run {i}", _invocation_text(inv)])
    b.add(Grid(["what", "value"], rows))


def _invocation_text(inv: dict[str, Any]) -> str:
    """One run of a sweep's driver: its command, code, start and how it ended."""
    if inv.get("recorded") is False:
        return (
            f"the runs before dloral recorded them (their commands and code unknown); the last "
            f"of them took {_fmt(inv.get('wall_s'), 0)} s and left the sweep {inv.get('ended')}"
        )
    code = _git_line(inv) if inv.get("git_commit") else "git not recorded"
    if inv.get("ended"):
        end = f"ended {inv['ended']} after {_fmt(inv.get('wall_s'), 0)} s"
    else:
        end = "no end recorded (the driver was killed, or is still running)"
    return f"`{inv.get('command_line', '?')}` at {code}, started {inv.get('started')}, {end}"


def _sweep_command(spec: SweepSpec | None) -> str:
    """The command that made a sweep, and how many times it was resumed."""
    runs = spec.invocations if spec is not None else []
    recorded = [r for r in runs if r.get("recorded") is not False]
    if not recorded:
        return "not recorded"
    first = f"`{recorded[0].get('command_line', '?')}`"
    if len(recorded) < len(runs):
        first = f"(earlier runs not recorded) {first}"
    more = len(recorded) - 1  # every recorded run after the first is a --resume
    times = "once" if more == 1 else f"{more} times"
    return first + (f", then resumed {times} with `--resume`" if more else "")


# ----- the report --------------------------------------------------------------------------
def build_report(
    out: str | Path,
    benches: list[BenchRun] = (),
    sweeps: list[SweepRun] = (),
    *,
    title: str | None = None,
    per_clip: tuple[str, ...] = (),
    max_clips: int = 3,
    quality: str | None = None,
    rank_untrained: bool = False,
    against: str | None = None,
) -> Report:
    """Write out/index.html, out/report.md and out/images/*.png; return the Report.
    `rank_untrained` ranks methods with untrained weights too (they stay marked). `against`:
    the clip-by-clip comparisons set every method against this one, not the best."""
    from dloral import provenance

    if not benches and not sweeps:
        raise ValueError("a report needs at least one benchmark run or sweep")
    if against is not None:
        have = sorted({m for r in benches for m in r.aggregate["method"]})
        if against not in have:
            raise ValueError(
                f"--against {against}: no benchmark run in this report has that method; they "
                "have " + (", ".join(have) or "none")
            )
    for folder in (Path(out) / "images", Path(out), *Path(out).parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder}: exists and is not a folder (a report is a folder)")
    if quality is not None and benches:
        quality = resolve(quality)
        have = sorted(set().union(*(set(r.aggregate["metric"]) for r in benches)))
        if quality not in have:
            raise ValueError(
                f"--quality {quality}: no benchmark run in this report has it; they have "
                + ", ".join(have)
            )
    names = [r.name for r in benches] + [s.name for s in sweeps]
    report = Report(title or f"dloral report: {', '.join(names)}", out=Path(out))
    b = _Builder(report)
    for old in b.images.glob("*.png"):  # a rebuilt report shows only what it was made from
        old.unlink()
    made = time.strftime("%Y-%m-%d %H:%M:%S %z")
    rows = []
    for run in benches:
        info = run.run
        when = f"{info.get('started', '?')} to {info.get('finished', '?')}"
        rows.append([f"results: {run.name} ({when})", _command(info), _git_line(info)])
    for sweep in sweeps:
        prov = sweep.spec.provenance if sweep.spec is not None else {}
        code = _git_line(prov) if prov.get("git_commit") else "not recorded"
        started = sweep.spec.created if sweep.spec is not None else "?"
        rows.append([f"results: sweep {sweep.name} ({started})", _sweep_command(sweep.spec), code])
    rows.append(
        [
            f"this report ({made})",
            f"`{provenance.command_line()}`",
            f"{_git_line(provenance.git_state())}, dloral {provenance.versions().get('dloral')}",
        ]
    )
    b.add(
        Grid(
            ["made", "by the command", "with the code at commit"],
            rows,
            "The results and this report may come from different code: each row names its own. "
            "Sources: " + "; ".join(x.origin for x in [*benches, *sweeps]) + ".",
        )
    )
    if len(benches) > 1:
        combined_section(b, benches, rank_untrained, against)
    for run in benches:
        bench_section(b, run, per_clip, max_clips, quality, rank_untrained, against)
    for sweep in sweeps:
        sweep_section(b, sweep)
    atomic_write_text(report.markdown, to_markdown(report))
    atomic_write_text(report.index, to_html(report))
    return report
