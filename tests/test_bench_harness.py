"""The benchmark harness on a tiny udm10-layout set of real bikes frames: suites, methods,
results table, cache, interruption, skipped metrics, run.json and the `bench` command."""

import json
import math
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

from dloral.bench import harness
from dloral.bench.methods import FolderMethod, MethodError, build_method, output_hash
from dloral.bench.suite import SuiteError, load_suite, parse_suite
from dloral.bench.visuals import read_index
from dloral.data.frames import read_image, to_uint8, write_png
from dloral.resize import resize_frames

CLIPS = {"clipA": (100, 300), "clipB": (20, 40)}  # crop offsets (top, left) in bikes.mp4
FRAMES = 3


@pytest.fixture(scope="module")
def udm(tmp_path_factory, bikes_path) -> Path:
    """root/GT/<clip>/ + root/BIx4/<clip>/, 2 clips x 3 real 64x64 frames, plus peer outputs:
    peers/gt (the GT itself) and peers/blur (a degraded copy)."""
    root = tmp_path_factory.mktemp("udm")
    return write_udm_set(root, bikes_path, CLIPS, FRAMES, blur=3, gt_peer=True)


def suite_toml(root: Path, methods: list[str], metrics: list[str], extra: str = "") -> str:
    return f"""
[suite]
name = "tmp"
description = "test"

[[datasets]]
name = "mini"
kind = "udm10"
root = "{root}"
lq = "BIx4"
scale = 4
{extra}

[methods]
names = {json.dumps(methods)}

[metrics]
names = {json.dumps(metrics)}

[options]
flow = "dis"
process_size = 64
batch_size = 4
"""


def write_suite(tmp_path: Path, *args, name: str = "suite.toml", **kwargs) -> Path:
    path = tmp_path / name
    path.write_text(suite_toml(*args, **kwargs))
    return path


def test_bench_scores_bicubic_folder_and_tiny_with_skips(udm, tmp_path):
    methods = ["bicubic", f"folder:gt={udm / 'peers/gt'}", "dloral:tiny"]
    metrics = ["psnr", "ssim_y", "ewarp", "tof@dloral", "tof", "lpips"]
    suite = load_suite(write_suite(tmp_path, udm, methods, metrics))
    out = tmp_path / "out"
    res = harness.run_bench(suite, out_dir=out, tracking=False)

    df = pd.read_parquet(out / "results.parquet")
    assert list(df.columns) == list(harness.results.COLUMNS)
    scored = df[df["kind"] != "latency"]
    # 3 methods x 2 clips x (psnr, ssim_y: 3 frames; ewarp, tof@dloral: 2 pairs); lpips and
    # tof@tecogan (TecoGAN drops 2 frames at each end: it needs 6) skipped
    assert len(scored) == 3 * 2 * (3 + 3 + 2 + 2)
    counts = scored.groupby(["method", "clip", "metric"]).size()
    assert counts.xs("psnr", level="metric").eq(FRAMES).all()
    assert counts.xs("ewarp@evalcrafter", level="metric").eq(FRAMES - 1).all()
    assert set(scored["metric"]) == {"psnr", "ssim_y", "ewarp@evalcrafter", "tof@dloral"}
    # the folder method holding the GT itself: infinite PSNR, SSIM 1, zero tOF
    gt_rows = scored[scored["method"] == "gt"]
    assert gt_rows.loc[gt_rows["metric"] == "psnr", "value"].map(math.isinf).all()
    assert gt_rows.loc[gt_rows["metric"] == "ssim_y", "value"].eq(1.0).all()
    assert gt_rows.loc[gt_rows["metric"] == "tof@dloral", "value"].abs().max() < 1e-6
    bic = scored[(scored["method"] == "bicubic") & (scored["metric"] == "psnr")]
    assert bic["value"].between(20, 60).all()
    # cross-check one value by hand: PSNR of PIL-bicubic x4 of the LQ PNG vs the GT PNG (uint8)
    lq0 = read_image(udm / "BIx4" / "clipA" / "0000.png")
    up = (resize_frames(lq0[None], (64, 64))[0] * 255).round()
    mse = ((up - read_image(udm / "GT" / "clipA" / "0000.png") * 255).round() ** 2).mean()
    by_hand = 10 * math.log10(255**2 / float(mse))
    row0 = bic[(bic["clip"] == "clipA") & (bic["frame"] == 0)]["value"].item()
    assert row0 == pytest.approx(by_hand, abs=1e-3)
    ewarp_impl = scored.loc[scored["metric"] == "ewarp@evalcrafter", "implementation"].iloc[0]
    assert "DIS" in ewarp_impl and "EvalCrafter" in ewarp_impl

    # latency rows for the methods run here, none for the folder method
    lat = df[df["kind"] == "latency"]
    assert set(lat["method"]) == {"bicubic", "dloral-tiny"}
    assert set(lat["metric"]) == {"s_per_frame", "s_per_frame_min", "s_per_frame_max"} | {
        "peak_mem_gib"
    }
    assert (lat["frame"] == -1).all() and (lat["value"] > 0).all()
    speed = lat.pivot_table(index=["method", "clip"], columns="metric", values="value")
    assert (speed["s_per_frame_min"] <= speed["s_per_frame"]).all()
    assert (speed["s_per_frame"] <= speed["s_per_frame_max"]).all()
    # the tiny model's own tensors alone are more than bicubic's whole peak
    mem = speed["peak_mem_gib"]
    assert mem["dloral-tiny"].min() > mem["bicubic"].max()

    # aggregate = mean over clips of per-clip means
    agg = pd.read_csv(out / "aggregate.csv")
    row = agg[(agg["method"] == "bicubic") & (agg["metric"] == "psnr")].iloc[0]
    expected = bic.groupby("clip")["value"].mean().mean()
    assert row["value"] == pytest.approx(expected) and row["clips"] == 2
    assert bool(row["higher_is_better"])
    assert res.aggregate["value"][res.aggregate["metric"] == "ewarp@evalcrafter"].notna().all()

    skipped = json.loads((out / "skipped.json").read_text())
    lpips = [s for s in skipped if s["metric"] == "lpips"]
    assert lpips and "alexnet" in lpips[0]["reason"].lower() and "missing" in lpips[0]["reason"]
    teco = [s for s in skipped if s["metric"] == "tof@tecogan"]
    assert teco and teco[0]["reason"] == "needs at least 6 frames, has 3"
    run = json.loads((out / "run.json").read_text())
    assert "DIS" in run["flow_estimator"]
    assert {"torch", "torchvision", "pyiqa", "cv2"} <= set(run["versions"])
    assert run["status"] == "finished"
    # the tiny model as training starts it: the trained VAE, LoRAs and CFR as initialised
    assert run["methods"]["dloral-tiny"]["weights"] == "tiny-pretrained-vae"
    assert run["methods"]["dloral-tiny"]["untrained"] == (
        "no trained checkpoint (LoRAs and CFR as initialised)"
    )
    assert "untrained" not in run["methods"]["bicubic"]
    assert run["methods"]["dloral-tiny"]["options"]["lora"] == "merged"

    # output hashes: the folder method's hash is that of the GT frames
    gt_frames = torch.stack(
        [read_image(udm / "GT" / "clipA" / f"{i:04d}.png") for i in range(FRAMES)]
    )
    hashes = scored[(scored["method"] == "gt") & (scored["clip"] == "clipA")]["output_hash"]
    assert set(hashes) == {output_hash(gt_frames)}

    # visual comparisons: per clip the same crop of GT, LQ and every method, and x-t profiles
    index = read_index(out / "visuals")
    assert [(e["dataset"], e["clip"]) for e in index] == [("mini", "clipA"), ("mini", "clipB")]
    entry = index[0]
    assert list(entry["images"]) == ["GT", "LQ (pixels ×4)", "bicubic", "gt", "dloral-tiny"]
    top, left, h, w = entry["box"]
    assert (h, w) == (64, 64) and entry["frame"] == FRAMES // 2
    folder = Path(entry["folder"])
    crops = {k: np.asarray(Image.open(folder / v["crop"])) for k, v in entry["images"].items()}
    gt_png = to_uint8(gt_frames[entry["frame"]])[top : top + h, left : left + w]
    assert np.array_equal(crops["GT"], gt_png) and np.array_equal(crops["gt"], gt_png)
    assert not np.array_equal(crops["bicubic"], gt_png)
    xt = np.asarray(Image.open(folder / entry["images"]["GT"]["xt"]))
    assert xt.shape == (FRAMES, w, 3)
    for t in range(FRAMES):
        assert np.array_equal(xt[t], to_uint8(gt_frames[t])[entry["row"], left : left + w])


def test_rerun_uses_cache_and_force_recomputes(udm, tmp_path, monkeypatch):
    methods = ["bicubic", f"folder:blur={udm / 'peers/blur'}"]
    suite = load_suite(write_suite(tmp_path, udm, methods, ["psnr", "ssim", "ewarp"]))
    out = tmp_path / "out"
    first = harness.run_bench(suite, out_dir=out, tracking=False)
    assert (first.computed, first.cached) == (2 * 2 * 3, 0)
    calls, decoded = [], []
    build, read = harness.build_metrics, harness._read_clip

    def counting_metrics(*args, **kwargs):  # wrap every scorer to count real evaluations
        built, skipped, flow = build(*args, **kwargs)
        for s in built.values():
            s.fn = (lambda f: lambda *a: calls.append(1) or f(*a))(s.fn)
        return built, skipped, flow

    monkeypatch.setattr(harness, "build_metrics", counting_metrics)
    monkeypatch.setattr(
        harness, "_read_clip", lambda clip, n: decoded.append(clip.name) or read(clip, n)
    )
    again = harness.run_bench(suite, out_dir=out, tracking=False)
    assert calls == [] and (again.computed, again.cached) == (0, 12)
    assert decoded == ["clipA", "clipB"]  # GT/LQ decoded once per clip, shared by both methods
    cols = ["method", "clip", "frame", "metric", "value"]
    a = first.table[first.table["kind"] != "latency"][cols].reset_index(drop=True)
    b = again.table[again.table["kind"] != "latency"][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    forced = harness.run_bench(suite, out_dir=out, tracking=False, force=True)
    assert len(calls) == 12 and (forced.computed, forced.cached) == (12, 0)


def test_interrupt_keeps_finished_clips_on_disk(udm, tmp_path):
    suite = load_suite(write_suite(tmp_path, udm, ["bicubic"], ["psnr"]))
    out = tmp_path / "out"

    def stop_after_first_clip(event):
        if event["stage"] == "clip":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harness.run_bench(suite, out_dir=out, tracking=False, progress=stop_after_first_clip)
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["clip"]) == {"clipA"}
    assert len(df[df["metric"] == "psnr"]) == FRAMES
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "interrupted" and run["clips_done"] == 1
    # which signal is told by test_faults_bench (this process's signal history is shared)
    assert re.fullmatch(r"interrupted by SIG(INT|TERM) after 1 of 2 clips", run["reason"])


def test_interrupt_mid_clip_leaves_that_clip_out_for_every_method(udm, tmp_path, monkeypatch):
    """Stopped while the folder method reads clipB, after bicubic scored it: clipB is in no
    table or aggregate, so every aggregate row covers the same complete clip (clipA)."""
    suite = load_suite(
        write_suite(tmp_path, udm, ["bicubic", f"folder:gt={udm / 'peers/gt'}"], ["psnr"])
    )
    out = tmp_path / "out"
    run_folder = FolderMethod.run

    def interrupted_on_clip_b(self, job):
        if job.clip == "clipB":
            raise KeyboardInterrupt
        return run_folder(self, job)

    monkeypatch.setattr(FolderMethod, "run", interrupted_on_clip_b)
    with pytest.raises(KeyboardInterrupt):
        harness.run_bench(suite, out_dir=out, tracking=False)
    assert set(pd.read_parquet(out / "results.parquet")["clip"]) == {"clipA"}
    agg = pd.read_csv(out / "aggregate.csv")
    assert set(agg["method"]) == {"bicubic", "gt"}
    assert agg["clips"].eq(1).all(), agg[["method", "metric", "clips"]]
    bic = agg.query("method == 'bicubic' and metric == 'psnr'")["value"].item()
    df = pd.read_parquet(out / "results.parquet")
    assert bic == pytest.approx(
        df.query("method == 'bicubic' and metric == 'psnr'")["value"].mean()
    )
    run = json.loads((out / "run.json").read_text())
    assert (run["status"], run["clips_done"], run["clips_total"]) == ("interrupted", 1, 2)


def test_folder_outputs_of_every_clip_checked_before_any_scoring(udm, tmp_path):
    """Two folder methods wrong on the last clip only: one error naming both methods, the clip
    and the paths, and nothing scored or written (no results.parquet, no run.json)."""
    lost, extra = tmp_path / "lost", tmp_path / "extra"
    for peers in (lost, extra):
        shutil.copytree(udm / "peers" / "gt", peers)
    shutil.rmtree(lost / "clipB")
    shutil.copy(extra / "clipB" / "0000.png", extra / "clipB" / "0009.png")
    methods = ["bicubic", f"folder:lost={lost}", f"folder:extra={extra}"]
    suite = load_suite(write_suite(tmp_path, udm, methods, ["psnr"]))
    out = tmp_path / "out"
    with pytest.raises(MethodError) as err:
        harness.run_bench(suite, out_dir=out, tracking=False)
    text = str(err.value)
    assert "2 problem(s), nothing scored" in text
    assert f"lost: no outputs for mini clip 'clipB': neither {lost / 'clipB'}" in text
    assert f"extra: mini clip 'clipB' in {extra / 'clipB'}: extra frame(s) 0009" in text
    assert "clipA" not in text
    assert not (out / "results.parquet").exists() and not (out / "run.json").exists()


def test_a_frames_limit_takes_a_folder_holding_only_the_scored_frames(udm, tmp_path):
    """A suite scoring each clip's first 2 frames takes outputs of those 2 alone (a run with
    the same limit kept only those, README: kept outputs read back as a folder method); with
    every frame scored the third is missing again."""
    peers = tmp_path / "peers"
    shutil.copytree(udm / "peers" / "gt", peers)
    for clip in CLIPS:
        (peers / clip / "0002.png").unlink()
    limited = write_suite(tmp_path, udm, [f"folder:peer={peers}"], ["psnr"], extra="frames = 2")
    res = harness.run_bench(load_suite(limited), out_dir=tmp_path / "a", tracking=False)
    psnr = res.table[res.table["metric"] == "psnr"]
    assert sorted(set(psnr["frame"])) == [0, 1] and len(psnr) == 2 * len(CLIPS)
    every = write_suite(tmp_path, udm, [f"folder:peer={peers}"], ["psnr"], name="all.toml")
    with pytest.raises(MethodError, match=r"clipA.*missing frame\(s\) 0002 \(2 files for 3"):
        harness.run_bench(load_suite(every), out_dir=tmp_path / "b", tracking=False)
    # scoring 1 frame, a folder of 2 of the 3 is neither the whole clip nor the scored frames
    # (as a folder shifted by a frame would be): refused, naming what is missing
    one = write_suite(
        tmp_path, udm, [f"folder:peer={peers}"], ["psnr"], extra="frames = 1", name="one.toml"
    )
    with pytest.raises(MethodError, match=r"missing frame\(s\) 0002 \(2 files for 1 scored"):
        harness.run_bench(load_suite(one), out_dir=tmp_path / "c", tracking=False)
    # the scored frames without the clip's first (the reference's outputs): frame 1 scored
    for clip in CLIPS:
        (peers / clip / "0000.png").unlink()
    res = harness.run_bench(load_suite(limited), out_dir=tmp_path / "d", tracking=False)
    assert sorted(set(res.table.loc[res.table["metric"] == "psnr", "frame"])) == [1]


def test_gt_less_set_skips_fullref_and_scores_ewarp(udm, tmp_path):
    lq_only = tmp_path / "videolq"
    shutil.copytree(udm / "BIx4", lq_only)
    path = tmp_path / "s.toml"
    text = suite_toml(lq_only, ["bicubic"], ["psnr", "ewarp", "tof"])
    path.write_text(text.replace('kind = "udm10"', 'kind = "videolq"').replace('lq = "BIx4"', ""))
    res = harness.run_bench(load_suite(path), out_dir=tmp_path / "out", tracking=False)
    assert set(res.table.loc[res.table["kind"] != "latency", "metric"]) == {"ewarp@evalcrafter"}
    reasons = {s["metric"]: s["reason"] for s in res.skipped}
    assert "GT" in reasons["psnr"] and "GT" in reasons["tof@tecogan"]


def test_folder_method_missing_frame_or_wrong_size_names_clip_and_frame(udm, tmp_path):
    peers = tmp_path / "peers"
    shutil.copytree(udm / "peers" / "gt", peers)
    (peers / "clipB" / "0002.png").unlink()
    method = FolderMethod("peer", str(peers))
    names = ("0000.png", "0001.png", "0002.png")
    with pytest.raises(MethodError, match=r"peer.*clipB.*missing frame\(s\) 0002"):
        method.frames_for("mini", "clipB", names, names)
    write_png(torch.rand(3, 32, 32), peers / "clipB" / "0002.png")
    suite = load_suite(write_suite(tmp_path, udm, [f"folder:peer={peers}"], ["psnr"]))
    with pytest.raises(MethodError, match=r"peer.*clipB.*0002.png.*32x32"):  # mixed sizes
        harness.run_bench(suite, out_dir=tmp_path / "out", tracking=False)
    for i in range(FRAMES):  # all frames the wrong size
        write_png(torch.rand(3, 32, 32), peers / "clipB" / f"{i:04d}.png")
    with pytest.raises(MethodError, match=r"peer.*clipB.*frame 0000.png.*32x32.*expected 64x64"):
        harness.run_bench(suite, out_dir=tmp_path / "out", tracking=False)
    (peers / "clipA" / "0007.png").write_bytes((peers / "clipA" / "0000.png").read_bytes())
    with pytest.raises(MethodError, match=r"clipA.*extra frame\(s\) 0007"):
        harness.run_bench(suite, out_dir=tmp_path / "out", tracking=False)
    shutil.rmtree(peers / "clipA")
    with pytest.raises(MethodError, match=r"no outputs for mini clip 'clipA'"):
        harness.run_bench(suite, out_dir=tmp_path / "out", tracking=False)


def test_suite_errors_name_file_key_and_valid_choices(udm, tmp_path, monkeypatch):
    path = write_suite(tmp_path, udm, ["bicubic"], ["psnr", "sharpness"])
    with pytest.raises(SuiteError, match=r"suite.toml.*sharpness.*valid: psnr, ssim"):
        load_suite(path)
    path = write_suite(tmp_path, udm, ["bilinear"], ["psnr"])
    with pytest.raises(SuiteError, match=r"suite.toml.*'bilinear'.*bicubic, dloral:"):
        load_suite(path)
    path = write_suite(tmp_path, udm, ["bicubic"], ["psnr"], extra="colour = 1")
    with pytest.raises(SuiteError, match=r"suite.toml.*unknown key\(s\) colour.*valid: clips"):
        load_suite(path)
    with pytest.raises(SuiteError, match=r"unknown suite 'nope'; shipped: .*embedded"):
        load_suite("nope")
    monkeypatch.delenv("DLORAL_UDM10", raising=False)
    with pytest.raises(SuiteError, match=r"udm10.toml.*DLORAL_UDM10.*not set.*GT/<clip>"):
        load_suite("udm10")
    monkeypatch.setenv("DLORAL_UDM10", str(tmp_path / "absent"))
    with pytest.raises(SuiteError, match=r"absent.*does not exist"):
        load_suite("udm10")
    with pytest.raises(SuiteError, match=r"\[options\] flow='pwc'"):
        parse_suite(
            {
                "suite": {"name": "x"},
                "datasets": [{"name": "d", "kind": "udm10", "root": str(udm)}],
                "methods": {"names": ["bicubic"]},
                "metrics": {"names": ["psnr"]},
                "options": {"flow": "pwc"},
            }
        )
    reference_like = {
        "first_frame": "skip",
        "size_to_8": "lanczos",
        "previous": "reencode",
        "color_fix": "wavelet",
    }
    table = {
        "suite": {"name": "x"},
        "datasets": [{"name": "d", "kind": "udm10", "root": str(udm)}],
        "methods": {"names": ["dloral:tiny-random"]},
        "metrics": {"names": ["psnr"]},
        "options": reference_like,
    }
    with pytest.raises(SuiteError, match=r"\[options\] previous='again'; valid: carry, reencode"):
        parse_suite({**table, "options": {**reference_like, "previous": "again"}})
    # the reference's inference switches reach DLoRAL's pipeline and its description
    suite = parse_suite(table)
    method = build_method("dloral:tiny-random", device="cpu", options=suite.options)
    opt = method._upscaler(4).opt
    assert (opt.first_frame, opt.size_to_8, opt.previous, opt.color_fix) == (
        "skip",
        "lanczos",
        "reencode",
        "wavelet",
    )
    assert reference_like.items() <= method.describe()["options"].items()


def test_mlflow_run_finished_with_aggregates_and_killed_on_interrupt(udm, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's local artifact store lands here
    suite = load_suite(write_suite(tmp_path, udm, ["bicubic"], ["psnr", "tof@dloral"]))
    res = harness.run_bench(suite, out_dir=tmp_path / "out")
    client = MlflowClient(uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["metrics"] == "psnr,tof@dloral"
    psnr = res.aggregate.query("metric == 'psnr'")["value"].item()
    assert run.data.metrics["mini/bicubic/psnr"] == pytest.approx(psnr)
    # the protocol is in the name (MLflow allows no "@": tof@dloral is logged as tof:dloral)
    tof = res.aggregate.query("metric == 'tof@dloral'")["value"].item()
    assert run.data.metrics["mini/bicubic/tof:dloral"] == pytest.approx(tof)
    artifacts = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"results.parquet", "aggregate.csv", "run.json", "skipped.json"} <= artifacts

    def interrupt(event):
        if event["stage"] == "clip":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harness.run_bench(suite, out_dir=tmp_path / "out2", progress=interrupt)
    exp = client.get_experiment_by_name("dloral-bench")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "KILLED"
    assert "after 1 of 2 clips" in runs[0].data.tags["dloral.status_reason"]


def test_mlflow_store_that_cannot_open_leaves_run_json_failed(udm, tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("a file where the store's folder should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'taken' / 'mlflow.db'}")
    suite = load_suite(write_suite(tmp_path, udm, ["bicubic"], ["psnr"]))
    out = tmp_path / "out"
    with pytest.raises(FileExistsError):
        harness.run_bench(suite, out_dir=out)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["clips_done"] == 0
    assert run["reason"].startswith("FileExistsError") and str(tmp_path / "taken") in run["reason"]


def test_shipped_embedded_suite_parses():
    suite = load_suite("embedded")
    assert [d.embedded for d in suite.datasets] == ["embedded-udm10", "embedded-videolq"]
    assert suite.methods == ("bicubic", "dloral:tiny")
    assert {"psnr", "lpips"} <= set(suite.metrics)
    # bare temporal names (and dover) are their published default protocols
    assert {"ewarp@evalcrafter", "tof@tecogan", "tlp@tecogan", "dover@overall"} <= set(
        suite.metrics
    )


def test_cli_bench_prints_table_and_exits_2_on_bad_suite(udm, tmp_path):
    from dloral.cli import app

    path = write_suite(tmp_path, udm, ["bicubic", f"folder:gt={udm / 'peers/gt'}"], ["psnr"])
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["bench", str(path), "--out", str(out), "--no-tracking"])
    assert result.exit_code == 0, result.output
    assert "psnr ↑" in result.output and "s_per_frame ↓" in result.output
    assert "mini" in result.output and "inf" in result.output
    # each method against the best, clip by clip: the GT's PSNR is infinite, so no p
    assert "against the best, clip by clip" in result.output
    assert re.search(
        r"mini\s*│ psnr↑\s*│ bicubic │ gt\s*│\s*-inf │\s*– │\s*0 / 2 of 2 │ – │", result.output
    )
    assert (out / "results.parquet").is_file()
    bad = write_suite(tmp_path, udm, ["bicubic"], ["psnr", "sharpness"], name="bad.toml")
    result = runner.invoke(app, ["bench", str(bad), "--out", str(out), "--no-tracking"])
    assert result.exit_code == 2 and "sharpness" in result.output
    result = runner.invoke(app, ["bench", str(path), "--metrics", "psnr,blur", "--no-tracking"])
    assert result.exit_code == 2 and "blur" in result.output
    # an --out that is a file, a device torch does not know: named, no traceback
    (tmp_path / "a-file").write_text("x")
    args = ["bench", str(path), "--no-tracking", "--out", str(tmp_path / "a-file")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "a-file: exists and is not a folder" in result.output
    result = runner.invoke(app, [*args[:-1], str(tmp_path / "a-file" / "sub")])  # under a file
    assert result.exit_code == 2 and "a-file: exists and is not a folder" in result.output
    result = runner.invoke(app, ["bench", str(path), "--no-tracking", "--device", "foo"])
    assert result.exit_code == 2 and "device must be auto, cpu, cuda or cuda:N; got 'foo'" in (
        result.output
    )


def test_dloral_method_loads_the_checkpoint_a_run_or_trial_logged_to_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from dloral.bench.methods import build_method, mlflow_checkpoint
    from dloral.model.checkpoint import save_checkpoint
    from dloral.model.dloral import DLoRAL, DLoRALConfig

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.create_experiment("dloral-sweeps")
    model = DLoRAL(DLoRALConfig.from_dict({"profile": "tiny", "seed": 3}))
    folder = save_checkpoint(model, tmp_path / "step-000004")
    run = client.create_run(exp, tags={"dloral.trial_id": "abcde_00001"})
    client.log_artifacts(run.info.run_id, str(folder), artifact_path="checkpoint")
    client.create_run(exp, tags={"dloral.trial_id": "abcde_00002"})  # logged no checkpoint

    by_run = mlflow_checkpoint(run.info.run_id, tmp_path / "a")
    by_trial = mlflow_checkpoint("abcde_00001", tmp_path / "b")
    for got in (by_run, by_trial):
        assert (got / "dloral.safetensors").read_bytes() == (
            folder / "dloral.safetensors"
        ).read_bytes()
    method = build_method("dloral:mlflow:abcde_00001", device="cpu")
    assert method.name == "dloral-abcde_00001" and method.describe()["source"].startswith("mlflow:")
    with pytest.raises(MethodError, match="no checkpoint artifact"):
        mlflow_checkpoint("abcde_00002")
    with pytest.raises(MethodError, match="no MLflow run or sweep trial"):
        mlflow_checkpoint("nope_00000")


def test_first_frame_skip_scores_only_frames_the_output_has(udm, tmp_path):
    peers = tmp_path / "peers"  # the reference's layout: GT copies without frame 0
    shutil.copytree(udm / "peers" / "gt", peers)
    for clip in CLIPS:
        (peers / clip / "0000.png").unlink()
    methods = ["bicubic", f"folder:ref={peers}", "dloral:tiny"]
    path = write_suite(tmp_path, udm, methods, ["psnr", "ewarp"])
    path.write_text(path.read_text() + 'first_frame = "skip"\n')
    suite = load_suite(path)
    out = tmp_path / "out"
    harness.run_bench(suite, out_dir=out, tracking=False)
    df = pd.read_parquet(out / "results.parquet")
    scored = df[df["kind"] != "latency"]
    frames = scored.groupby(["method", "metric"])["frame"].apply(lambda f: sorted(set(f)))
    assert frames["bicubic", "psnr"] == [0, 1, 2]
    assert frames["ref", "psnr"] == frames["dloral-tiny", "psnr"] == [1, 2]  # clip frame numbers
    pair = "ewarp@evalcrafter"
    assert frames["ref", pair] == frames["dloral-tiny", pair] == [1]  # one pair left
    # GT frames 1 and 2 were matched to the outputs for frames 1 and 2 (not 0 and 1)
    assert (
        scored.loc[(scored["method"] == "ref") & (scored["metric"] == "psnr"), "value"]
        .map(math.isinf)
        .all()
    )
    # every method's mean over the same frames: bicubic's frame 0 and pair (0, 1) left out
    agg = pd.read_csv(out / "aggregate.csv").set_index(["method", "metric"])
    for metric, dropped in (("psnr", 0), (pair, 0)):
        ours = scored[(scored["method"] == "bicubic") & (scored["metric"] == metric)]
        shared = ours[ours["frame"] > dropped].groupby("clip")["value"].mean().mean()
        assert agg.loc[("bicubic", metric), "value"] == pytest.approx(shared, rel=1e-12)
        assert agg.loc[("bicubic", metric), "value"] != pytest.approx(
            ours.groupby("clip")["value"].mean().mean(), rel=1e-9
        )
        assert agg.loc[("bicubic", metric), "left_out"] == len(CLIPS)
        assert agg.loc[("ref", metric), "left_out"] == agg.loc[("ref", metric), "noted"] == 0
    from dloral.report import build, sources

    # a run written by older code (no left_out, means over each method's own frames): the
    # report takes the means from the table as this code does
    old = agg.reset_index().drop(columns=["left_out", "clips_left_out"])
    old.loc[old["method"] == "bicubic", "value"] += 1.0
    old.to_csv(out / "aggregate.csv", index=False)
    loaded = sources.load_bench(out).aggregate.set_index(["method", "metric"])
    assert loaded.loc[("bicubic", "psnr"), "value"] == agg.loc[("bicubic", "psnr"), "value"]
    assert loaded.loc[("bicubic", "psnr"), "scale"] == agg.loc[("bicubic", "psnr"), "scale"]
    made = build.build_report(tmp_path / "report", [sources.load_bench(out)])
    text = made.markdown.read_text()
    assert "averaged over the frames (pairs) all methods have on a clip" in text
    assert f"{2 * len(CLIPS)} values left out" in text  # bicubic's frame 0 and pair (0, 1)
    run = json.loads((out / "run.json").read_text())
    assert run["first_frame"] == {"bicubic": "self", "ref": "skip", "dloral-tiny": "skip"}
    scored_frames = run["frames_scored"]
    assert {c["frames"] for c in scored_frames["bicubic"].values()} == {FRAMES}
    assert {c["frames"] for c in scored_frames["ref"].values()} == {FRAMES - 1}
    assert {c["first"] for c in scored_frames["dloral-tiny"].values()} == {"0001.png"}
    assert run["methods"]["dloral-tiny"]["options"]["first_frame"] == "skip"
    entry = read_index(out / "visuals")[0]
    xt = np.asarray(Image.open(Path(entry["folder"]) / entry["images"]["dloral-tiny"]["xt"]))
    assert xt.shape[0] == FRAMES and not xt[0].any() and xt[1:].any()  # no frame 0: black row


@pytest.fixture()
def passes(monkeypatch) -> list[int]:
    """The frames of every pass DLoRAL's model makes (warm-up, timed or untimed), in order."""
    from dloral.bench.methods import DLoRALMethod

    made, real_pass = [], DLoRALMethod._pass
    monkeypatch.setattr(
        DLoRALMethod,
        "_pass",
        lambda self, n, lq, s: made.append(len(n)) or real_pass(self, n, lq, s),
    )
    return made


def test_a_models_outputs_are_kept_and_not_run_again(udm, tmp_path, passes):
    """DLoRAL's frames go to <out>/outputs and a second run scores them without running the
    model; a changed frame, another seed or --force run it again; the kept folder also scores
    as a folder method, to the same values."""

    suite_path = write_suite(tmp_path, udm, ["dloral:tiny"], ["psnr", "ewarp"])
    suite, out = load_suite(suite_path), tmp_path / "out"
    first = harness.run_bench(suite, out_dir=out, tracking=False)
    assert passes == [2] + [FRAMES] * 3 * 2  # a warm-up, then 3 timed passes per clip
    kept = out / "outputs" / "dloral-tiny" / "mini"
    table = first.table
    for clip in CLIPS:
        record = json.loads((kept / clip / "output.json").read_text())
        frames = torch.stack([read_image(kept / clip / f"{i:04d}.png") for i in range(FRAMES)])
        rows = table[(table["clip"] == clip) & (table["kind"] != "latency")]
        assert set(rows["output_hash"]) == {output_hash(frames)} == {record["output_hash"]}
    run = json.loads((out / "run.json").read_text())
    assert run["outputs"] == {"folder": str(out / "outputs"), "reused": {}}

    passes.clear()
    again = harness.run_bench(suite, out_dir=out, tracking=False)
    assert passes == []  # not even the warm-up: the model never ran
    run = json.loads((out / "run.json").read_text())
    assert run["outputs"]["reused"] == {"dloral-tiny": ["mini/clipA", "mini/clipB"]}
    cols = ["method", "clip", "frame", "metric", "value", "output_hash"]
    pd.testing.assert_frame_equal(
        first.table[cols].reset_index(drop=True), again.table[cols].reset_index(drop=True)
    )  # latency rows too: those of the run that computed the output

    # a kept frame changed on disk: that clip's output is made again and replaced
    frame = kept / "clipB" / "0001.png"
    write_png(read_image(frame) * 0.5, frame)
    passes.clear()
    harness.run_bench(suite, out_dir=out, tracking=False)
    assert passes == [2] + [FRAMES] * 3
    assert json.loads((out / "run.json").read_text())["outputs"]["reused"] == {
        "dloral-tiny": ["mini/clipA"]
    }
    restored = torch.stack([read_image(kept / "clipB" / f"{i:04d}.png") for i in range(FRAMES)])
    assert (
        output_hash(restored)
        == json.loads((kept / "clipB" / "output.json").read_text())["output_hash"]
    )

    # made otherwise (another seed, fewer frames), or --force: run again
    fewer = tmp_path / "fewer.toml"
    fewer.write_text(suite_path.read_text().replace("scale = 4", "scale = 4\nframes = 2"))
    passes.clear()
    harness.run_bench(load_suite(fewer), out_dir=out, tracking=False)
    assert passes == [2] + [2] * 3 * 2
    assert sorted(p.name for p in (kept / "clipA").iterdir()) == [
        "0000.png",
        "0001.png",
        "output.json",
    ]  # the third frame of the earlier output is gone with it
    reseeded = tmp_path / "reseeded.toml"
    reseeded.write_text(
        suite_path.read_text().replace("batch_size = 4", "batch_size = 4\nseed = 5")
    )
    passes.clear()
    harness.run_bench(load_suite(reseeded), out_dir=out, tracking=False)
    assert len(passes) == 1 + 3 * 2
    passes.clear()
    harness.run_bench(suite, out_dir=out, tracking=False, force=True)
    assert len(passes) == 1 + 3 * 2

    # the kept frames scored as a folder method give the model's values
    folder = load_suite(
        write_suite(tmp_path, udm, [f"folder:kept={kept}"], ["psnr", "ewarp"], name="f.toml")
    )
    as_folder = harness.run_bench(folder, out_dir=tmp_path / "f", tracking=False)
    model_rows = harness.run_bench(suite, out_dir=out, tracking=False).table
    values = ["clip", "frame", "metric", "value"]
    pd.testing.assert_frame_equal(
        as_folder.table[values].reset_index(drop=True),
        model_rows[model_rows["kind"] != "latency"][values].reset_index(drop=True),
    )
    # without saving: nothing kept
    harness.run_bench(suite, out_dir=tmp_path / "n", tracking=False, save_outputs=False)
    assert not (tmp_path / "n" / "outputs").exists()


def test_latency_clips_times_only_the_first_clips_of_each_dataset(udm, tmp_path, passes):
    toml = suite_toml(udm, ["bicubic", "dloral:tiny"], ["psnr"])
    path = tmp_path / "suite.toml"
    path.write_text(toml.replace("batch_size = 4", "batch_size = 4\nlatency_clips = 1"))
    res = harness.run_bench(load_suite(path), out_dir=tmp_path / "out", tracking=False)
    assert passes == [2, FRAMES, FRAMES, FRAMES, FRAMES]  # clipA: warm-up + 3 timed; clipB: 1
    lat = res.table[res.table["kind"] == "latency"]
    assert set(lat["clip"]) == {"clipA"} and set(lat["method"]) == {"bicubic", "dloral-tiny"}
    scored = res.table[res.table["metric"] == "psnr"]
    assert set(scored["clip"]) == {"clipA", "clipB"}  # every clip is still scored
    agg = res.aggregate.set_index(["method", "metric"])
    assert agg.loc[("dloral-tiny", "s_per_frame"), "clips"] == 1
    assert agg.loc[("dloral-tiny", "psnr"), "clips"] == 2
    path.write_text(toml.replace("batch_size = 4", "batch_size = 4\nlatency_clips = -1"))
    with pytest.raises(SuiteError, match="latency_clips"):
        load_suite(path)


def test_a_kept_output_timed_otherwise_is_made_again_for_a_clip_timed_now(udm, tmp_path, passes):

    toml = suite_toml(udm, ["dloral:tiny"], ["psnr"])
    path, out = tmp_path / "suite.toml", tmp_path / "out"
    path.write_text(toml.replace("batch_size = 4", "batch_size = 4\nlatency_clips = 1"))
    harness.run_bench(load_suite(path), out_dir=out, tracking=False)
    path.write_text(toml)  # every clip timed now: clipB's kept output has no latency
    passes.clear()
    res = harness.run_bench(load_suite(path), out_dir=out, tracking=False)
    assert passes == [2, FRAMES, FRAMES, FRAMES]  # clipB only: warm-up and 3 timed passes
    lat = res.table[res.table["kind"] == "latency"]
    assert set(lat["clip"]) == {"clipA", "clipB"}
    assert json.loads((out / "run.json").read_text())["outputs"]["reused"] == {
        "dloral-tiny": ["mini/clipA"]
    }


def test_a_dloral_method_of_a_training_run_loads_its_latest_checkpoint(tmp_path):
    from dloral.model.checkpoint import save_checkpoint
    from dloral.model.dloral import DLoRAL, DLoRALConfig

    run = tmp_path / "run"
    for step, variant in ((2, "full"), (4, "off")):
        model = DLoRAL(DLoRALConfig.from_dict({"cfr": {"variant": variant}}))
        save_checkpoint(model, run / "checkpoints" / f"step-{step:06d}")
    (run / "checkpoints" / "latest").write_text("step-000004")
    method = build_method(f"dloral:{run}", device="cpu")
    described = method.describe()
    assert described["checkpoint"] == str(run / "checkpoints" / "step-000004")
    assert described["model"]["cfr_variant"] == "off"
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(MethodError, match=r"latest: no finished checkpoint"):
        build_method(f"dloral:{run}", device="cpu").describe()


def test_pyiqas_ssim_convention_scores_as_pyiqa_does_beside_basicsrs(udm, tmp_path):
    """ssim_y_pyiqa: pyiqa.create_metric("ssim") with its defaults, the SSIM column of papers
    scored with pyiqa (DOVE's eval_metrics.py), on the same 8-bit frames as BasicSR's ssim_y."""
    import pyiqa

    blur = udm / "peers" / "blur"
    suite = load_suite(
        write_suite(tmp_path, udm, [f"folder:blur={blur}"], ["ssim_y", "ssim_y_pyiqa"])
    )
    res = harness.run_bench(suite, out_dir=tmp_path / "out", tracking=False, visuals=False)
    table = res.table.set_index(["metric", "clip", "frame"])["value"]
    reference = pyiqa.create_metric("ssim", device="cpu")
    for clip in CLIPS:
        for i in range(FRAMES):
            out = read_image(blur / clip / f"{i:04d}.png")[None]
            gt = read_image(udm / "GT" / clip / f"{i:04d}.png")[None]
            expected = reference(out, gt).item()
            assert table["ssim_y_pyiqa", clip, i] == pytest.approx(expected, abs=1e-6)
            # not BasicSR's: another Y, another rounding
            assert abs(table["ssim_y", clip, i] - expected) > 1e-4
    crop = write_suite(tmp_path, udm, ["bicubic"], ["ssim_y_pyiqa"])
    crop.write_text(crop.read_text() + "crop_border = 4\n")
    res = harness.run_bench(load_suite(crop), out_dir=tmp_path / "c", tracking=False, visuals=False)
    assert "crops nothing" in res.skipped[0]["reason"]


def test_the_reference_scripts_frame_names_are_matched_by_index(udm, tmp_path):
    """The reference's test script writes <clip>/frame_%04d.png by clip frame index, from 1:
    a folder of those is scored as the GT-named copy is, and run.json says how it matched."""
    named, numbered = udm / "peers" / "blur", tmp_path / "reference"
    for clip in CLIPS:
        for i in range(1, FRAMES):
            (numbered / clip).mkdir(parents=True, exist_ok=True)
            shutil.copy(named / clip / f"{i:04d}.png", numbered / clip / f"frame_{i:04d}.png")
    methods = [f"folder:named={named}", f"folder:ref={numbered}"]
    suite = load_suite(write_suite(tmp_path, udm, methods, ["psnr"]))
    res = harness.run_bench(suite, out_dir=tmp_path / "out", tracking=False, visuals=False)
    table = res.table[res.table["metric"] == "psnr"].set_index(["method", "clip", "frame"])
    for clip in CLIPS:
        for i in range(1, FRAMES):
            assert table.loc[("ref", clip, i), "value"] == table.loc[("named", clip, i), "value"]
    assert ("ref", "clipA", 0) not in table.index
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["methods"]["ref"]["frame_names"] == [
        "frame_%04d.png by clip frame index (the reference's)"
    ]
    assert run["first_frame"]["ref"] == "skip"
    # a file named otherwise among them: no index matching, the names must be the clip's
    shutil.copy(named / "clipA" / "0002.png", numbered / "clipA" / "extra.png")
    with pytest.raises(MethodError, match=r"missing frame\(s\) 0000, 0001"):
        harness.run_bench(suite, out_dir=tmp_path / "out2", tracking=False, visuals=False)


def test_the_lq_folder_read_is_recorded_with_the_clip_as_a_placeholder(udm, tmp_path):
    """run.json's datasets.<name>.lq_read tells runs on other LQ apart (the report joins runs
    only on the same): the folder under the root, the clip's own name as <clip>."""
    from dloral.data.readers import read_dataset

    frame, gt = torch.rand(3, 16, 16), torch.rand(3, 64, 64)
    for seq in ("seqA", "seqB"):  # SPMCS's own layout: <seq>/truth, <seq>/input4
        for i in range(2):
            write_png(gt, tmp_path / "spmcs" / seq / "truth" / f"{i:04d}.png")
            write_png(frame, tmp_path / "spmcs" / seq / "input4" / f"{i:04d}.png")
    assert harness._lq_read(read_dataset("spmcs", tmp_path / "spmcs")) == "<clip>/input4"
    assert harness._lq_read(read_dataset("udm10", udm, lq="BIx4")) == "BIx4/<clip>"
