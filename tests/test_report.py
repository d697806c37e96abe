"""`dloral-exp report` on a real benchmark run (real bikes frames, bicubic vs a blurred peer):
the documents, their tables and images, provenance, MLflow as a source, headless Chromium."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_udm_set
from PIL import Image
from typer.testing import CliRunner

from dloral.bench import harness, results
from dloral.bench.suite import load_suite
from dloral.bench.visuals import texture_box
from dloral.cli import app
from dloral.report import build, sources
from dloral.report.browser import BrowserError, check_page, find_chromium

CLIPS = {"clipA": (100, 300), "clipB": (20, 40)}
FRAMES = 4
SUITE = """
[suite]
name = "mini"
description = "two real clips"

[[datasets]]
name = "mini-udm"
kind = "udm10"
root = "{root}"
lq = "BIx4"
scale = 4

[methods]
names = ["bicubic", "folder:blur={root}/peers/blur"]

[metrics]
names = ["psnr", "ssim", "ewarp", "lpips"]

[options]
flow = "dis"
seed = 7
"""


@pytest.fixture(scope="module")
def mini(tmp_path_factory, bikes_path) -> Path:
    """A udm10-layout set of 2 clips x 4 real 64x64 frames and a blurred peer's outputs."""
    root = write_udm_set(tmp_path_factory.mktemp("mini"), bikes_path, CLIPS, FRAMES, blur=5)
    (root / "suite.toml").write_text(SUITE.format(root=root))
    return root


@pytest.fixture(scope="module")
def bench_run(mini, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "mini"
    harness.run_bench(load_suite(mini / "suite.toml"), out_dir=out, tracking=False)
    return out


@pytest.fixture(scope="module")
def report(bench_run, tmp_path_factory) -> build.Report:
    run = sources.load_bench(bench_run)
    out = tmp_path_factory.mktemp("reports") / "mini"
    return build.build_report(out, [run], per_clip=("psnr",))


def test_report_tables_follow_the_results_and_every_image_exists(report, bench_run):
    md = report.markdown.read_text()
    df = pd.read_parquet(bench_run / "results.parquet")
    # the paper table: per metric, the best method's mean of per-clip means is bold
    agg = results.aggregate(df)
    for metric in ("psnr", "ssim"):
        sub = agg[agg["metric"] == metric].set_index("method")["value"]
        best, other = sub.idxmax(), sub.idxmin()
        row = next(line for line in md.splitlines() if line.startswith(f"| {best} |"))
        digits = 2 if metric == "psnr" else 4
        assert f"**{sub[best]:.{digits}f}**" in row
        row = next(line for line in md.splitlines() if line.startswith(f"| {other} |"))
        # two methods: the other one is the worse, never underlined as "second"
        assert f"| {sub[other]:.{digits}f} |" in row and "<u>" not in row
    # each method against the best, clip by clip (dloral.bench.paired): two clips give no
    # interval, and a p no smaller than 2 / 2^2
    psnr = agg[agg["metric"] == "psnr"].set_index("method")["value"]
    best, other = psnr.idxmax(), psnr.idxmin()
    row = next(line for line in md.splitlines() if line.startswith(f"| psnr↑ | {other} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:5] == [best, f"{psnr[other] - psnr[best]:+.3f}", "–"]
    assert cells[5].endswith("of 2") and float(cells[6]) >= 0.5
    assert cells[7] == cells[6]  # one comparison: Holm leaves p as it is
    assert "two-sided sign-flip permutation test over clips" in md
    ewarp = agg[agg["metric"] == "ewarp@evalcrafter"].set_index("method")["value"]
    assert "ewarp@evalcrafter (×10⁻³)↓" in md and f"{ewarp.min() * 1000:.4f}" in md
    # per-clip breakdown on request: one column per clip, values = the clip's frame mean
    clip_a = df[(df["method"] == "bicubic") & (df["metric"] == "psnr") & (df["clip"] == "clipA")]
    assert "mini-udm: psnr↑ clipA" in md and f"{clip_a['value'].mean():.2f}" in md
    # lpips has no weights here: listed as skipped with the missing file, never as a number
    assert re.search(r"\| lpips \| all datasets \| .*alexnet", md)
    assert "lpips↓" not in md
    # images: quality vs speed, per-frame curves and a visual comparison per clip
    names = sorted(p.name for p in report.images)
    assert names == sorted(
        ["mini-mini-udm-psnr-speed.png"]
        + [f"mini-mini-udm-{c}-{k}.png" for c in CLIPS for k in ("frames", "visual")]
    )
    for path in report.images:
        img = np.asarray(Image.open(path).convert("RGB"))
        assert img.shape[0] > 100 and img.std() > 10, path
        assert f"](images/{path.name})" in md
        assert f'src="images/{path.name}"' in report.index.read_text()


def test_report_provenance_names_data_metrics_flow_weights_versions_and_seed(report, bench_run):
    md = report.markdown.read_text()
    run = json.loads((bench_run / "run.json").read_text())
    prov = md[md.index("### Provenance") :]
    assert "| flow estimator | opencv DIS" in prov
    assert "| metric psnr | dloral.bench.fullref (BasicSR)" in prov
    assert "| metric ewarp@evalcrafter | dloral.bench.temporal.ewarp [evalcrafter/" in prov
    assert f"`{run['git_commit']}`" in prov
    assert f"torch {run['versions']['torch']}" in prov and "pyiqa" in prov
    machine = run["machine"]  # which processor, and the instruction set its kernels used
    (device,) = [line for line in prov.splitlines() if line.startswith("| device |")]
    assert f"CPU cores ({machine['cpu']}, {machine['cpu_capability']})" in device
    assert "| seed | 7 |" in prov
    assert re.search(r"\| weights RAFT-large \| (missing|found)", prov)
    assert "| dataset mini-udm | udm10 at" in prov
    assert "method blur" in prov and "method bicubic" in prov
    # the same blocks render to HTML: escaped, code spans, no script
    html = report.index.read_text()
    assert "<script" not in html and html.count("<table") == len(re.findall(r"^\| --- ", md, re.M))
    assert "<b>" in html and "<u>" not in html  # two methods: a best, no second


def _need_browser() -> None:
    try:
        find_chromium()
    except BrowserError as err:
        if os.environ.get("DLORAL_REQUIRE_BROWSER"):
            raise
        pytest.skip(str(err))


def test_report_opens_in_headless_chromium_without_errors(report, tmp_path):
    _need_browser()
    shot = tmp_path / "shot.png"
    page = check_page(report.index, shot)
    assert page.errors == [], page.messages
    assert page.title.startswith("dloral report")
    html = report.index.read_text()
    assert page.tables == html.count("<table") >= 4  # dataset, per-clip, skipped, provenance
    assert page.images == page.images_loaded == len(report.images)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[1] == 1280 and img.shape[0] > 900 and img.std() > 10
    # the check can fail: a missing image is a console error naming the file
    missing = report.images[0]
    data = missing.read_bytes()
    missing.unlink()
    try:
        broken = check_page(report.index)
    finally:
        missing.write_bytes(data)
    assert broken.images_loaded == broken.images - 1
    assert any(missing.name in e for e in broken.errors), broken.messages


def test_report_reads_the_benchmark_back_from_its_mlflow_run(mini, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    suite = load_suite(mini / "suite.toml")
    res = harness.run_bench(suite, out_dir=tmp_path / "out", metrics=["psnr"])
    run = sources.load_bench(res.mlflow_run_id)
    assert run.origin.startswith(f"MLflow run {res.mlflow_run_id}")
    local = pd.read_parquet(tmp_path / "out" / "results.parquet")
    pd.testing.assert_frame_equal(run.table, local)
    assert [v["clip"] for v in run.visuals] == list(CLIPS)
    assert all((Path(v["folder"]) / "gt-crop.png").is_file() for v in run.visuals)
    made = build.build_report(tmp_path / "rep", [run])
    assert f"MLflow run {res.mlflow_run_id}" in made.markdown.read_text()
    with pytest.raises(sources.ReportError, match="not 'dloral-sweeps'"):
        sources.load_sweep(res.mlflow_run_id)


def test_cli_report_writes_the_report_and_names_bad_sources(bench_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["report"])
    assert res.exit_code == 2 and "dloral-exp bench embedded" in res.output
    res = runner.invoke(app, ["report", "--bench", "nowhere"])
    assert res.exit_code == 2 and "nowhere" in res.output and "run.json" in res.output
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "sweep.json").write_text("{}")
    res = runner.invoke(app, ["report", "--sweep", str(tmp_path / "half")])
    assert res.exit_code == 2 and "no summary.json yet" in res.output
    # a sweep stopped before any trial reported (while Ray started): reported as such
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "summary.json").write_text(
        json.dumps({"sweep_dir": str(tmp_path / "stopped"), "status": "interrupted", "trials": []})
    )
    res = runner.invoke(app, ["report", "--sweep", "stopped", "--out", "reports/s"])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "reports" / "s" / "report.md").read_text()
    assert "Status interrupted: no trial had reported" in text
    res = runner.invoke(app, ["report", "--bench", str(bench_run), "--out", "reports/x"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "reports" / "x" / "index.html").is_file()
    # a results folder without its parquet is named
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text((bench_run / "run.json").read_text())
    res = runner.invoke(app, ["report", "--bench", str(broken)])
    assert res.exit_code == 2 and "results.parquet: missing" in res.output
    # an --out that is a file, a --quality no run has: named, no traceback
    (tmp_path / "a-file").write_text("x")
    res = runner.invoke(app, ["report", "--bench", str(bench_run), "--out", "a-file"])
    assert res.exit_code == 2 and "a-file: exists and is not a folder" in res.output
    res = runner.invoke(app, ["report", "--bench", str(bench_run), "--quality", "musiq"])
    assert res.exit_code == 2 and "--quality musiq: no benchmark run" in res.output
    assert "psnr" in res.output


def test_texture_box_finds_the_textured_window():
    frame = torch.full((3, 120, 160), 0.5)
    g = torch.Generator().manual_seed(0)
    frame[:, 60:100, 90:130] = torch.rand(3, 40, 40, generator=g)
    top, left, h, w = texture_box(frame, 32)
    assert (h, w) == (32, 32)
    assert 60 <= top and top + h <= 100 and 90 <= left and left + w <= 130
    assert texture_box(frame[:, :20, :24], 32) == (0, 0, 20, 24)  # clamped to the frame


def test_two_runs_share_one_table_without_mixing_metric_implementations(mini, bench_run, tmp_path):
    # a second run on the same clips: bicubic again, the GT as a peer, E*warp by Farneback flow
    text = SUITE.format(root=mini).replace('flow = "dis"', 'flow = "farneback"')
    text = text.replace(f'"folder:blur={mini}/peers/blur"', f'"folder:gt={mini}/GT"')
    text = text.replace('name = "mini"', 'name = "mini2"')
    (tmp_path / "s2.toml").write_text(text)
    out2 = tmp_path / "mini2"
    harness.run_bench(
        load_suite(tmp_path / "s2.toml"), out_dir=out2, tracking=False, metrics=["psnr", "ewarp"]
    )
    runs = [sources.load_bench(bench_run), sources.load_bench(out2)]
    agg, _, notes = build.combine(runs)
    psnr = agg[agg["metric"] == "psnr"].set_index("method")["value"]
    # bicubic is deterministic: both runs agree, so it is one row; blur and gt from each run
    assert sorted(psnr.index) == ["bicubic", "blur", "gt"] and psnr["gt"] == float("inf")
    first = runs[0].aggregate
    assert (
        psnr["bicubic"]
        == first[(first.method == "bicubic") & (first.metric == "psnr")]["value"].item()
    )
    # E*warp by DIS in one run and by Farneback in the other: left out, and the note says why
    assert "ewarp@evalcrafter" not in set(agg["metric"])
    assert len(notes) == 1 and "ewarp@evalcrafter on mini-udm left out" in notes[0]
    assert "DIS" in notes[0] and "Farneback" in notes[0].replace("farneback", "Farneback")
    made = build.build_report(tmp_path / "rep", runs)
    md = made.markdown.read_text()
    assert "## All benchmark runs together" in md and "### mini-udm (all runs)" in md
    row = next(line for line in md.splitlines() if line.startswith("| gt |"))
    assert "**inf**" in row


def test_a_run_from_before_protocols_never_shares_a_column_with_a_protocol(
    mini, bench_run, tmp_path
):
    # the same run, as a run made before protocols were named would have stored it
    old = tmp_path / "old"
    shutil.copytree(bench_run, old)
    table = pd.read_parquet(old / "results.parquet").drop(columns="note")
    table["metric"] = table["metric"].str.replace("ewarp@evalcrafter", "ewarp")
    table.to_parquet(old / "results.parquet", index=False)
    agg = pd.read_csv(old / "aggregate.csv").drop(columns="noted")
    agg["metric"] = agg["metric"].str.replace("ewarp@evalcrafter", "ewarp")
    agg.to_csv(old / "aggregate.csv", index=False)
    run = json.loads((old / "run.json").read_text())
    run["suite"]["name"] = "old"
    (old / "run.json").write_text(json.dumps(run))

    runs = [sources.load_bench(bench_run), sources.load_bench(old)]
    assert "ewarp@unrecorded" in set(runs[1].aggregate["metric"])
    assert "ewarp" not in set(runs[1].table["metric"])
    combined, _, _ = build.combine(runs)
    now = combined[combined["metric"] == "ewarp@evalcrafter"]
    assert len(now) and (now["implementation"].str.contains("EvalCrafter")).all()
    then = combined[combined["metric"] == "ewarp@unrecorded"]
    assert len(then) == len(now)  # its own column, beside the protocol's


def _copy_run(bench_run, folder, name, edit_table, edit_run=None):
    """The run at bench_run as another suite `name` would have written it, its results table
    (and aggregate.csv's rows) passed through edit_table, its run.json through edit_run."""
    shutil.copytree(bench_run, folder)
    table = edit_table(pd.read_parquet(folder / "results.parquet"))
    table.to_parquet(folder / "results.parquet", index=False)
    agg = pd.read_csv(folder / "aggregate.csv")
    agg = agg[agg["method"].isin(set(table["method"]))]
    agg.to_csv(folder / "aggregate.csv", index=False)
    run = json.loads((folder / "run.json").read_text())
    run["suite"]["name"] = name
    (folder / "run.json").write_text(json.dumps(edit_run(run) if edit_run else run))
    return sources.load_bench(folder)


def test_runs_together_are_averaged_over_shared_frames_and_compared_clip_by_clip(
    bench_run, tmp_path
):
    def late_peer(t):  # a peer that, like the reference's test script, lacks frame 0
        t = t[t["method"] == "blur"].assign(method="late")
        return t[(t["frame"] != 0) | (t["level"] == "clip")]

    def with_dover(t):  # a clip-level score per method and clip, as DOVER's
        one = t[(t["metric"] == "psnr") & (t["frame"] == 0)]
        clip = one.assign(metric="dover@overall", frame=-1, level="clip", kind="no_reference")
        return pd.concat([t, clip.assign(value=0.5, implementation="test")])

    first = _copy_run(bench_run, tmp_path / "first", "mini", with_dover)
    second = _copy_run(bench_run, tmp_path / "late", "late", lambda t: late_peer(with_dover(t)))
    agg, table, notes = build.combine([first, second])
    assert notes == [] and set(table["method"]) == {"bicubic", "blur", "late"}
    psnr = agg[agg["metric"] == "psnr"].set_index("method")["value"]
    # every method over frames 1.. of each clip, as the late peer has them
    own = first.table[(first.table["metric"] == "psnr") & (first.table["frame"] >= 1)]
    for method in ("bicubic", "blur"):
        clips = own[own["method"] == method].groupby("clip")["value"].mean()
        assert psnr[method] == pytest.approx(clips.mean())
        assert psnr[method] != pytest.approx(
            first.aggregate.set_index(["metric", "method"]).loc[("psnr", method), "value"]
        )
    assert psnr["late"] == pytest.approx(psnr["blur"])  # the same frames
    md = build.build_report(tmp_path / "rep", [first, second]).markdown.read_text()
    together = md.split("## All benchmark runs together")[1].split("# Benchmark:")[0]
    assert "values left out where not every method has one" in together
    # DOVER of the whole clip, where the late peer scored other frames: shown, not ranked
    assert "0.5000†" in together
    assert "† shown, not ranked: a clip-level value over other frames" in together
    assert "| psnr↑ | bicubic |" in together and "sign-flip permutation test" in together

    assert first.run["datasets"]["mini-udm"]["lq_read"] == "BIx4/<clip>"  # what it read

    # a run of the same dataset name on other LQ frames is not put in the same table
    def other_lq(run):
        run["suite"]["datasets"][0]["lq"] = "BDx4"
        run["datasets"]["mini-udm"]["lq_read"] = "BDx4/<clip>"
        return run

    third = _copy_run(bench_run, tmp_path / "bd", "bd", late_peer, other_lq)
    agg, _, notes = build.combine([first, third])
    assert agg.empty and len(notes) == 1
    assert notes[0] == (
        "mini-udm not put together: its runs scored other data "
        "(LQ folder: mini: BIx4/<clip>; bd: BDx4/<clip>)"
    )

    # a run that recorded no LQ folder (suite lq left to the reader, before lq_read): joined,
    # and the note says what could not be compared
    def unrecorded(run):
        run["suite"]["datasets"][0]["lq"] = None
        del run["datasets"]["mini-udm"]["lq_read"]
        return run

    older = _copy_run(bench_run, tmp_path / "older", "older", late_peer, unrecorded)
    agg, _, notes = build.combine([first, older])
    assert not agg.empty
    assert notes == ["mini-udm: the runs' LQ folder not compared, older did not record it"]


def test_runs_together_tell_one_method_from_two_by_their_frames(bench_run, tmp_path):
    first = sources.load_bench(bench_run)

    def bicubic_and_late(t):  # bicubic as it was, beside a peer without frame 0
        late = t[(t["method"] == "blur") & (t["frame"] != 0)].assign(method="late")
        return pd.concat([t[t["method"] == "bicubic"], late])

    # bicubic scored alike by both runs, though each run's own mean differs (other frames)
    second = _copy_run(bench_run, tmp_path / "late", "late", bicubic_and_late)
    own = [
        r.aggregate.set_index(["metric", "method"]).loc[("psnr", "bicubic"), "value"]
        for r in (first, second)
    ]
    assert own[0] != pytest.approx(own[1])
    agg, _, _ = build.combine([first, second])
    assert sorted(set(agg["method"])) == ["bicubic", "blur", "late"]

    # the same suite run again with other values: each run's own, labelled apart
    def brighter(t):
        return t.assign(value=t["value"].where(t["metric"] != "psnr", t["value"] + 1))

    again = _copy_run(bench_run, tmp_path / "again", "mini", brighter)
    agg, _, _ = build.combine([first, again])
    psnr = agg[agg["metric"] == "psnr"].set_index("method")["value"]
    mine = first.aggregate.set_index(["metric", "method"])["value"]
    labels = ["bicubic (mini)", "bicubic (mini#2)", "blur (mini)", "blur (mini#2)"]
    assert sorted(psnr.index) == sorted(labels)
    assert psnr["bicubic (mini)"] == pytest.approx(mine["psnr", "bicubic"])
    assert psnr["bicubic (mini#2)"] == pytest.approx(mine["psnr", "bicubic"] + 1)


def test_report_sets_every_method_against_a_named_one(bench_run, tmp_path, monkeypatch):
    """`report --against METHOD`: the clip-by-clip table compares with that method, as named
    (not the best of each metric), and says so; a method no run has is named with the ones
    they have."""
    from dloral.bench import paired

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(
        app, ["report", "--bench", str(bench_run), "--against", "blur", "--out", "r"]
    )
    assert res.exit_code == 0, res.output
    md = " ".join((tmp_path / "r" / "report.md").read_text().split())
    assert "Each method against blur (named with --against) on the same clips" in md
    assert "the method compared with was named, not picked from these clips" in md
    table = pd.read_parquet(bench_run / "results.parquet")
    want = paired.against_best(table, reference="blur").set_index("metric")
    assert set(want["method"]) == {"bicubic"} and set(want["best"]) == {"blur"}
    diff = want.loc["psnr", "diff"]  # the report's row: bicubic against blur, its Δ
    assert f"| psnr↑ | bicubic | blur | {diff:+.3f} |" in md
    res = runner.invoke(app, ["report", "--bench", str(bench_run), "--against", "uav"])
    assert res.exit_code == 2 and "--against uav: no benchmark run" in res.output
    assert "bicubic, blur" in res.output


def test_a_named_method_that_cannot_be_compared_with_is_said_why():
    """--against in one table: the method as the table labels it (untrained ‡, "name (run)"
    in a joined table), or a note: not here, untrained and unranked, or in several runs."""
    from dloral.report.build import Para, _Marks, _reference_label

    marks = _Marks({"dloral-tiny": "dloral-tiny ‡"}, {"dloral-tiny ‡": "random-init"})
    methods = ["bicubic", "blur (a)", "blur (b)", "uav (b)", "dloral-tiny ‡"]
    assert _reference_label("bicubic", methods, marks) == "bicubic"
    assert _reference_label("uav", methods, marks) == "uav (b)"
    said = {
        name: _reference_label(name, methods, marks).text
        for name in ("star", "blur", "dloral-tiny")
    }
    assert "it has no results here" in said["star"]
    assert "several runs have it (blur (a), blur (b))" in said["blur"]
    assert "its weights are untrained" in said["dloral-tiny"]
    ranked = _Marks(marks.label, marks.why, rank=True)  # --rank-untrained
    assert _reference_label("dloral-tiny", methods, ranked) == "dloral-tiny ‡"
    assert isinstance(_reference_label("star", methods, marks), Para)
