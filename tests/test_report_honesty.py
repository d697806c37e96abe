"""A report that does not flatter: a real benchmark run (real bikes frames; bicubic, a blurred
peer labelled "random-init", and the all-random tiny DLoRAL
model, `dloral:tiny-random`) rendered and read back. The
untrained model is marked from the run's recorded provenance and never ranked; titles fit inside
the figures; every figure is shown at its own size in Chromium, bold and underline in plain
colours; the header names the code of the results and of the report separately."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import read_clip
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from typer.testing import CliRunner

from dloral import provenance
from dloral.bench import harness
from dloral.bench.suite import load_suite
from dloral.cli import app
from dloral.data.frames import write_png
from dloral.report import build, plots, sources
from dloral.report.browser import BrowserError, check_page, find_chromium
from dloral.report.tables import UNTRAINED
from dloral.report.visuals import visual_grid
from dloral.resize import bi_downsample

# a long clip name, as in embedded-videolq, whose title the visuals used to cut off
CLIPS = {"carphone_distorted": (20, 40)}
FRAMES = 2
TINY = f"dloral-tiny-random {UNTRAINED}"
SUITE = """
[suite]
name = "honest"
description = "bicubic, a blurred peer and the untrained tiny model"

[[datasets]]
name = "mini-udm"
kind = "udm10"
root = "{root}"
lq = "BIx4"
scale = 4

[methods]
names = ["bicubic", "folder:random-init={root}/peers/blur", "dloral:tiny-random"]

[metrics]
names = ["psnr", "ssim", "ewarp", "piqe"]

[options]
flow = "dis"
process_size = 64
"""


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, bikes_path) -> Path:
    """1 clip x 2 real 64x64 frames (names 00000.png, ... as the embedded sets), their x4 LQ,
    a 5x5 box-blurred GT as a peer named "random-init" (a name, not a provenance)."""
    import torch

    root = tmp_path_factory.mktemp("honest")
    for clip, (top, left) in CLIPS.items():
        gt = read_clip(bikes_path, FRAMES, (top, left, 64, 64), (64, 64))
        blur = torch.nn.functional.avg_pool2d(gt, 5, 1, 2, count_include_pad=False)
        for i, (g, lq, b) in enumerate(zip(gt, bi_downsample(gt, 4), blur, strict=True)):
            write_png(g, root / "GT" / clip / f"{i:05d}.png")
            write_png(lq, root / "BIx4" / clip / f"{i:05d}.png")
            write_png(b, root / "peers" / "blur" / clip / f"{i:05d}.png")
    (root / "suite.toml").write_text(SUITE.format(root=root))
    out = tmp_path_factory.mktemp("bench") / "honest"
    harness.run_bench(load_suite(root / "suite.toml"), out_dir=out, tracking=False)
    return out


@pytest.fixture(scope="module")
def report(bench_run, tmp_path_factory) -> build.Report:
    out = tmp_path_factory.mktemp("reports") / "honest"
    return build.build_report(out, [sources.load_bench(bench_run)], per_clip=("piqe",))


def _row(md: str, label: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {label} |"))


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip("|").split(" | ")][1:]


def test_untrained_model_is_marked_and_never_ranked_though_best_on_piqe(report, bench_run):
    md = report.markdown.read_text()
    agg = pd.read_csv(bench_run / "aggregate.csv")
    piqe = agg[agg["metric"] == "piqe"].set_index("method")["value"]
    # the premise: PIQE scores the untrained model's noise best (lowest) of the three
    assert piqe.idxmin() == "dloral-tiny-random", piqe
    table = md[md.index("### mini-udm") :]
    tiny = _row(table, TINY)
    assert "**" not in tiny and "<u>" not in tiny  # never bold nor underlined
    header = _cells(next(line for line in table.splitlines() if line.startswith("| method |")))
    col = header.index("piqe↓")
    # the bold goes to the best of the others, in the column where the tiny model is lowest
    others = agg[(agg["metric"] == "piqe") & (agg["method"] != "dloral-tiny-random")]
    ranked = others[others["noted"] == 0].set_index("method")["value"]  # † values are not
    assert len(ranked), others
    assert _cells(_row(table, ranked.idxmin()))[col] == f"**{ranked.min():.4f}**"
    # on PSNR the best of the two ranked methods is bold
    psnr = agg[agg["metric"] == "psnr"].set_index("method")["value"].drop("dloral-tiny-random")
    best = _cells(_row(table, psnr.idxmax()))[header.index("psnr↑")]
    assert best == f"**{psnr.max():.2f}**"
    # the footnote says which method and why, from run.json
    assert (
        f"{UNTRAINED} untrained weights, as the run recorded them: dloral-tiny-random (random-init "
        "backbone). Shown, not ranked (--rank-untrained ranks them)."
    ) in table
    # the peer is *named* random-init, but nothing recorded says it is untrained: not marked
    assert _row(table, "random-init") and f"random-init {UNTRAINED}" not in md
    # the per-clip table, every figure caption that shows the tiny model, and the visuals
    per_clip = md[md.index("| method | mini-udm: piqe↓ carphone_distorted") :]
    assert "**" not in _row(per_clip, TINY)
    captions = re.findall(r"^\*(.*)\*$", md, re.M)
    assert captions and all(UNTRAINED in c for c in captions), captions
    # two ranked methods: a best per column, no "second" underline anywhere
    assert "<u>" not in md


def test_pareto_front_and_figures_leave_out_the_untrained_model(report, bench_run):
    run = sources.load_bench(bench_run)
    marks = build._Marks.of([run], rank=False)
    agg = marks.apply(run.aggregate)
    ax = plots.quality_speed(agg, "mini-udm", "piqe", untrained=marks.marked).axes[0]
    (front,) = [line for line in ax.lines if line.get_label() == "Pareto front"] or [None]
    tiny_speed = agg.query("method == @TINY and metric == 's_per_frame'")["value"].item()
    # bicubic is the only ranked method with a speed: no front at all, and the tiny model's
    # point is hollow, named with its mark, the legend saying why
    assert front is None
    assert any(t.get_text() == TINY for t in ax.texts)
    assert any("untrained weights" in t.get_text() for t in ax.get_legend().get_texts())
    ranked = plots.quality_speed(
        agg, "mini-udm", "piqe", untrained=marks.marked, rank_untrained=True
    )
    (front,) = [line for line in ranked.axes[0].lines if line.get_label() == "Pareto front"]
    assert tiny_speed in front.get_xdata()  # best PIQE: on the front once ranked
    # the speed plot draws each method's fastest-to-slowest pass as a bar
    assert "fastest to slowest pass" in ax.get_xlabel()
    # per-frame curves and visual comparisons carry the mark and the note
    curves = plots.per_frame_curves(
        marks.apply(run.table), "mini-udm", "carphone_distorted", ["psnr"], untrained=marks.marked
    )
    legend = curves.axes[0].get_legend()
    assert TINY in [t.get_text() for t in legend.get_texts()]
    assert "untrained weights" in legend.get_title().get_text()
    fig = visual_grid(run.visuals[0], marks.label, untrained=marks.marked)
    assert TINY in [" ".join(ax.get_title().split()) for ax in fig.axes]  # titles may wrap
    assert "untrained weights" in fig.get_supxlabel()


@pytest.fixture(scope="module")
def ranked(bench_run, tmp_path_factory) -> Path:
    """The report made by `dloral-exp report --rank-untrained`."""
    out = tmp_path_factory.mktemp("ranked") / "r"
    res = CliRunner().invoke(
        app, ["report", "--bench", str(bench_run), "--out", str(out), "--rank-untrained"]
    )
    assert res.exit_code == 0, res.output
    return out


def test_rank_untrained_ranks_it_and_keeps_the_mark(ranked):
    md = (ranked / "report.md").read_text()
    table = md[md.index("### mini-udm") :]
    header = _cells(next(line for line in table.splitlines() if line.startswith("| method |")))
    assert _cells(_row(table, TINY))[header.index("piqe↓")].startswith("**")
    assert "Ranked all the same (--rank-untrained)." in table
    # three ranked methods: psnr's middle one is now underlined as second
    assert "<u>" in table


def test_the_mark_follows_the_recorded_provenance_not_the_name(bench_run, tmp_path):
    info = json.loads((bench_run / "run.json").read_text())
    assert info["methods"]["dloral-tiny-random"]["untrained"] == "random-init backbone"
    assert sources.untrained_methods(info) == {"dloral-tiny-random": "random-init backbone"}
    # a run recorded before methods stated it: the random-init backbone still says it
    old = json.loads(json.dumps(info))
    del old["methods"]["dloral-tiny-random"]["untrained"]
    assert list(sources.untrained_methods(old)) == ["dloral-tiny-random"]
    # a dloral method whose recorded weights are trained is not marked, whatever its name
    trained = json.loads(json.dumps(old))
    trained["methods"]["dloral-tiny-random"]["weights"] = "/ckpt/sd21"
    trained["methods"]["dloral-tiny-random"]["model"]["backbone_weights"] = "/ckpt/sd21"
    assert sources.untrained_methods(trained) == {}
    copy = tmp_path / "trained"
    shutil.copytree(bench_run, copy)
    (copy / "run.json").write_text(json.dumps(trained))
    made = build.build_report(tmp_path / "rep", [sources.load_bench(copy)], max_clips=1)
    md = made.markdown.read_text()
    assert UNTRAINED not in md and "| dloral-tiny-random |" in md


def test_the_table_of_several_runs_marks_and_skips_it_too(bench_run, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(bench_run, again)
    info = json.loads((again / "run.json").read_text())
    info["suite"]["name"] = "again"
    (again / "run.json").write_text(json.dumps(info))
    runs = [sources.load_bench(bench_run), sources.load_bench(again)]
    md = build.build_report(tmp_path / "rep", runs, max_clips=1).markdown.read_text()
    table = md[md.index("### mini-udm (all runs)") : md.index("# Benchmark: honest")]
    assert "**" not in _row(table, TINY) and "| dloral-tiny-random |" not in table
    assert "untrained weights, as the run recorded them: dloral-tiny-random (random-init" in table


def _texts_outside(fig) -> list[str]:
    """Visible texts of fig whose drawn extent leaves the figure (cut off in the PNG)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox
    out = []
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip():
            continue
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.x1 > box.x1 + 1 or e.y0 < box.y0 - 1 or e.y1 > box.y1 + 1:
            out.append(t.get_text())
    return out


def test_visual_titles_fit_inside_the_figure_and_name_the_clip_in_full(bench_run):
    run = sources.load_bench(bench_run)
    marks = build._Marks.of([run], rank=False)
    for entry in run.visuals:
        labels = {**marks.label, "random-init": "random-init (a peer with a much longer name)"}
        fig = visual_grid(entry, labels, untrained=marks.marked)
        assert _texts_outside(fig) == [], entry["clip"]
        assert f"{entry['clip']}, frame {entry['frame_name']}" in fig.get_suptitle()
        assert min(t.get_fontsize() for t in fig.findobj(Text) if t.get_text()) >= plots.FONT_MIN


def test_report_header_names_the_code_of_the_results_and_of_the_report_apart(
    bench_run, tmp_path, monkeypatch
):
    info = json.loads((bench_run / "run.json").read_text())
    assert info["command_line"] == provenance.command_line()  # recorded by the harness
    # results made elsewhere: another commit, uncommitted changes, a quoted argument
    old = tmp_path / "old"
    shutil.copytree(bench_run, old)
    info.update(git_commit="0123abc", git_dirty=True)
    info["command_line"] = "dloral-exp bench 'my suite.toml' --force"
    (old / "run.json").write_text(json.dumps(info))
    # this report typed as `dloral-exp report ...`, the console script found on PATH
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "dloral-exp"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    argv = [str(script), "report", "--bench", str(old), "--title", "two words"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, *argv])
    made = build.build_report(tmp_path / "rep", [sources.load_bench(old)], max_clips=1)
    md = made.markdown.read_text()
    head = md[: md.index("## Benchmark")]
    results = next(r for r in head.splitlines() if r.startswith("| results: honest"))
    assert "`dloral-exp bench 'my suite.toml' --force`" in results
    assert "`0123abc` (with uncommitted changes)" in results
    mine = next(r for r in head.splitlines() if r.startswith("| this report"))
    assert f"`dloral-exp report --bench {old} --title 'two words'`" in mine
    git = provenance.git_state()
    assert f"`{git['git_commit']}`" in mine and "0123abc" not in mine
    # a run recorded before the typed line was kept: its argv, the script by its name
    del info["command_line"]
    info["command"] = ["/some/venv/bin/dloral-exp", "bench", "my suite.toml"]
    assert build._command(info) == "`dloral-exp bench 'my suite.toml'`"


def test_command_line_is_what_the_user_typed():
    python = ["python", "-m", "dloral.cli", "bench", "a b"]
    assert (
        provenance.command_line(["/x/dloral/cli.py", "bench", "a b"], python)
        == "python -m dloral.cli bench 'a b'"
    )
    # a script not on PATH keeps the path it was run by
    assert provenance.command_line(["./tools/run", "x"], ["py", "./tools/run", "x"]) == (
        "./tools/run x"
    )


def _need_browser() -> None:
    try:
        find_chromium()
    except BrowserError as err:
        if os.environ.get("DLORAL_REQUIRE_BROWSER"):
            raise
        pytest.skip(str(err))


SIZES = """JSON.stringify({
  images: Array.from(document.images).map(i => ({
    src: i.getAttribute('src'), natural: [i.naturalWidth, i.naturalHeight],
    shown: [i.clientWidth, i.clientHeight]})),
  marks: ['td b', 'td u'].map(sel => {
    const el = document.querySelector(sel);
    if (!el) return null;
    const s = getComputedStyle(el), cell = getComputedStyle(el.closest('td'));
    return {sel, color: s.color, cell: cell.color, weight: s.fontWeight,
            line: s.textDecorationLine};
  })
})"""


def test_report_in_chromium_shows_figures_at_their_size_and_plain_marks(ranked):
    _need_browser()
    page = check_page(ranked / "index.html", evaluate=SIZES)
    assert page.errors == [], page.messages
    got = json.loads(page.evaluated)
    assert any(i["src"].endswith("-frames.png") for i in got["images"])
    # no figure is shrunk: its text shows at the size it was drawn (a 3-panel per-frame figure
    # used to be squeezed into 420 px of height)
    for image in got["images"]:
        assert image["shown"][0] >= 0.9 * image["natural"][0], image
    bold, under = got["marks"]
    assert bold and bold["color"] == bold["cell"] and int(bold["weight"]) >= 700
    assert under and under["color"] == under["cell"] and "underline" in under["line"]
