"""Harness speed: frames/s of `run_bench` vs a plain per-frame loop with the same metric code.

    uv run python benchmarks/harness_speed.py                       # all 24 frames, 1 repeat
    uv run python benchmarks/harness_speed.py --frames 8 --repeats 3
    uv run python benchmarks/harness_speed.py --pyiqa-loop          # + a loop on pyiqa's PSNR/SSIM

Data: the embedded-udm10 BIx4 set (3 real clips, GT 256x256, 720x1280, 576x704; LQ x1/4),
the first `--frames` frames of each clip. Method: `bicubic` only (PIL bicubic x4 from
dloral.resize), so method time is negligible and the comparison is about metric computation.
Metrics: the default set that runs on a machine without weights: psnr, ssim, psnr_y, ssim_y,
piqe, ewarp@evalcrafter (suite flow: OpenCV DIS medium), tof@tecogan (Farneback, TecoGAN's
crop_8x8 and cutfr = 2). Both sides run in this process, on the CPU, with the same torch thread
count; frames/s = scored output frames / wall seconds.

(a) harness: `run_bench` on the embedded suite cut to that dataset (frames = --frames),
    methods=["bicubic"], the metric list above, flow "dis", device "cpu", force=True (no metric
    cache), tracking=False (no MLflow), visuals=False (the report's crops and x-t profiles are
    not metric work; the plain loop makes none), out_dir a fresh temporary folder. The wall time
    covers everything else `run_bench` does: building the metrics, checking the embedded data
    (sha256 of every file against the manifest; timed alone as `embedded_verify_s`), listing the
    dataset, decoding each GT and LQ PNG once per clip, the bicubic warm-up and timed pass,
    hashing the output, every metric on the whole clip per call (psnr/ssim/psnr_y/ssim_y share
    one quantisation of the clip, flow-based metrics share each pair's flow), the parquet writes
    after each clip (results and cache), and aggregate.csv / run.json / skipped.json at the end.
(b) plain: the loop a researcher writes without the harness, with THE SAME METRIC FUNCTIONS
    (the headline ratio is (a) over (b)): for each clip, for each metric, for each frame (pair
    for temporal metrics), read the frame(s) the metric needs from disk again (GT and LQ PNG for
    full-reference metrics; LQ only for PIQE), upscale the LQ with the same
    dloral.resize.resize_frames, and score that single frame (pair) with the harness's own
    scorer functions: dloral.bench.fullref (BasicSR convention) for psnr/ssim/psnr_y/ssim_y, the
    same pyiqa PIQE object, dloral.bench.temporal.ewarp with the evalcrafter keywords and the
    same DIS flow, dloral.bench.temporal.tof with TecoGAN's crop on the pairs TecoGAN's cutfr
    keeps, with the same Farneback flow. Each scorer is created once (in the timed wall, as on
    side (a)); the embedded-data check is not timed (a plain script does not verify its files).
    No results are written to disk (a plain loop keeps them in a list). Per-metric seconds are
    recorded, and the per-metric means of both sides, which must agree.
(c) plain_pyiqa (--pyiqa-loop): the loop of (b) with pyiqa's PSNR/SSIM (create_metric("psnr" |
    "ssim", test_y_channel=...)) instead of dloral.bench.fullref: NOT like for like (pyiqa's SSIM
    is a float torch conv2d, its Y is YIQ luma); recorded apart for what it is, the speed of a
    loop written on pyiqa, never as the headline.
Before timing, each side runs once untimed on 2 frames (imports, page cache, kernel set-up);
with --repeats > 1 the order of the sides rotates and the median wall time is reported.
Results go to benchmarks/results/harness-speed-embedded-cpu.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*kernels-community.*")

sys.path.insert(0, str(Path(__file__).parent))
from latency import environment, write_result  # noqa: E402

from dloral.provenance import bench_command  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DATASET = "embedded-udm10"
METRICS = ["psnr", "ssim", "psnr_y", "ssim_y", "piqe", "ewarp@evalcrafter", "tof@tecogan"]
FRAME_METRICS = ("psnr", "ssim", "psnr_y", "ssim_y", "piqe")
# our name -> (pyiqa name, create_metric keywords) used by the plain loop
PYIQA = {
    "psnr": ("psnr", {"test_y_channel": False}),
    "psnr_y": ("psnr", {"test_y_channel": True}),
    "ssim": ("ssim", {"test_y_channel": False}),
    "ssim_y": ("ssim", {"test_y_channel": True}),
    "piqe": ("piqe", {}),
}


def harness_suite(frames: int):
    from dloral.bench.suite import load_suite

    suite = load_suite("embedded")
    spec = next(d for d in suite.datasets if d.name == DATASET)
    return dataclasses.replace(
        suite,
        name="harness-speed",
        datasets=(dataclasses.replace(spec, frames=frames),),
        methods=("bicubic",),
        metrics=tuple(METRICS),
        options=dataclasses.replace(suite.options, flow="dis", device="cpu", latency_repeats=1),
    )


def run_harness(frames: int) -> dict:
    """Side (a): the harness end to end into a fresh out_dir; wall time of run_bench."""
    from dloral.bench.harness import run_bench

    suite = harness_suite(frames)
    with tempfile.TemporaryDirectory(prefix="harness-speed-") as tmp:
        t0 = time.perf_counter()
        res = run_bench(
            suite,
            methods=["bicubic"],
            metrics=METRICS,
            device="cpu",
            force=True,
            strict=False,
            out_dir=Path(tmp) / "bench",
            progress=None,
            tracking=False,
            visuals=False,
        )
        wall = time.perf_counter() - t0
        files = sorted(p.name for p in res.out_dir.iterdir())
    table = res.table
    scored = table[table["metric"].isin(METRICS)]
    frame_rows = scored[scored["level"] == "frame"]
    pair_rows = scored[scored["level"] == "pair"]
    means = {
        m: round(float(scored[scored["metric"] == m]["value"].mean()), 6)
        for m in METRICS
        if (scored["metric"] == m).any()
    }
    return {
        "wall_s": wall,
        "frames": int(frame_rows[["clip", "frame"]].drop_duplicates().shape[0]),
        "pairs": int(pair_rows[["clip", "frame"]].drop_duplicates().shape[0]),
        "metric_evaluations": {"computed": res.computed, "cached": res.cached},
        "skipped": res.skipped,
        "files_written": files,
        "implementations": {m: res.infos[m].implementation for m in METRICS if m in res.infos},
        "means": means,
    }


def _plain_scorers(impl: str) -> tuple[dict, dict[str, str]]:
    """The single-frame (pair) scorers of a plain loop: name -> fn(out, gt|None) -> list of
    values, and what ran. impl "dloral": the harness's own scorers (dloral.bench.registry, built
    as run_bench builds them); "pyiqa": pyiqa's PSNR/SSIM instead of dloral.bench.fullref."""
    from dloral.bench import registry, temporal
    from dloral.bench.flow import FarnebackFlow

    scorers, skipped, _ = registry.build_metrics(
        tuple(m for m in METRICS if m != "tof@tecogan"), torch.device("cpu"), flow="dis"
    )
    if skipped:
        raise RuntimeError(f"the plain loop cannot build {skipped}")
    fns = {m: (lambda out, gt, f=s.fn: f(out, gt).reshape(-1).tolist()) for m, s in scorers.items()}
    what = {m: f"{s.info.implementation}; called per frame (pair)" for m, s in scorers.items()}
    # tof@tecogan's scorer drops TecoGAN's 2 frames at each end of the clip it is given; on
    # one pair the loop asks only for the pairs TecoGAN keeps, so it calls tof without the cut
    farneback = FarnebackFlow()
    fns["tof@tecogan"] = lambda out, gt: temporal.tof(out, gt, flow=farneback, crop=True).tolist()
    what["tof@tecogan"] = (
        f"dloral.bench.temporal.tof(crop=True) per pair, flow {farneback.name}, on the pairs "
        "TecoGAN's cutfr keeps"
    )
    if impl == "pyiqa":
        import contextlib
        import io

        import pyiqa

        for m, (name, kw) in PYIQA.items():
            if m == "piqe":
                continue
            with contextlib.redirect_stdout(io.StringIO()):  # pyiqa prints while loading
                model = pyiqa.create_metric(name, device=torch.device("cpu"), **kw)
            fns[m] = lambda out, gt, model=model: [float(model(out, gt))]
            what[m] = f"pyiqa {pyiqa.__version__} create_metric({name!r}, **{kw}) per frame"
    return fns, what


def run_plain(frames: int, impl: str = "dloral") -> dict:
    """Side (b) (impl "dloral") or (c) ("pyiqa"): per clip, per metric, per frame (pair): read
    the PNGs again, upscale, score one frame (pair)."""
    from dloral.bench.temporal import TECOGAN_CUT
    from dloral.data.embedded import prepare_embedded
    from dloral.data.frames import read_image
    from dloral.data.readers import read_dataset
    from dloral.resize import resize_frames

    root = prepare_embedded() / DATASET  # built and verified before the clock starts
    t0 = time.perf_counter()
    ds = read_dataset("udm10", root, lq="BIx4")
    fns, implementations = _plain_scorers(impl)
    setup_s = time.perf_counter() - t0

    def upscale(lq: torch.Tensor, scale: int) -> torch.Tensor:
        h, w = lq.shape[-2:]
        return resize_frames(lq[None], (h * scale, w * scale))

    values: dict[str, list[float]] = {m: [] for m in METRICS}
    seconds = dict.fromkeys(METRICS, 0.0)
    n_frames = n_pairs = 0
    with torch.no_grad():
        for clip in ds.clips:
            names = clip.gt.names[: frames or None]
            lq_names = clip.lq.names[: frames or None]
            gt_dir, lq_dir, scale = clip.gt.path, clip.lq.path, clip.scale
            n_frames += len(names)
            n_pairs += len(names) - 1
            for metric in FRAME_METRICS:
                start = time.perf_counter()
                for gt_name, lq_name in zip(names, lq_names, strict=True):
                    out = upscale(read_image(lq_dir / lq_name), scale)
                    gt = None if metric == "piqe" else read_image(gt_dir / gt_name)[None]
                    values[metric] += fns[metric](out, gt)
                seconds[metric] += time.perf_counter() - start
            for metric in ("ewarp@evalcrafter", "tof@tecogan"):
                cut = TECOGAN_CUT if metric == "tof@tecogan" else 0
                start = time.perf_counter()
                for t in range(cut, len(names) - 1 - cut):
                    out = torch.cat(
                        [upscale(read_image(lq_dir / n), scale) for n in lq_names[t : t + 2]]
                    )
                    gt = None
                    if metric == "tof@tecogan":
                        gt = torch.stack([read_image(gt_dir / n) for n in names[t : t + 2]])
                    values[metric] += fns[metric](out, gt)
                seconds[metric] += time.perf_counter() - start
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "clips": len(ds.clips),
        "frames": n_frames,
        "pairs": n_pairs,
        "setup_s": round(setup_s, 3),
        "seconds_per_metric": {m: round(v, 3) for m, v in seconds.items()},
        "implementations": implementations,
        "means": {m: round(statistics.fmean(v), 6) for m, v in values.items() if v},
    }


def run_plain_pyiqa(frames: int) -> dict:
    return run_plain(frames, impl="pyiqa")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--frames", type=int, default=24, help="first N frames of each clip (24: all)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each side (median)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed 2-frame run")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/...)")
    p.add_argument(
        "--pyiqa-loop", action="store_true", help="also time a plain loop on pyiqa's PSNR/SSIM"
    )
    args = p.parse_args(argv)
    if args.frames < 6 or args.repeats < 1:
        p.error("--frames must be >= 6 (tof@tecogan drops 2 frames at each end), --repeats >= 1")
    from dloral.data.embedded import prepare_embedded

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    prepare_embedded()  # build the data if absent (untimed); then time one verification
    t0 = time.perf_counter()
    prepare_embedded()
    verify_s = time.perf_counter() - t0
    sides = {"harness": run_harness, "plain": run_plain}
    if args.pyiqa_loop:
        sides["plain_pyiqa"] = run_plain_pyiqa
    if not args.no_warmup:
        for fn in sides.values():
            fn(2)
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for i in range(args.repeats):
        names = list(sides)
        for key in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order
            r = sides[key](args.frames)
            runs[key].append(r)
            print(f"{key}: {r['frames']} frames in {r['wall_s']:.2f} s", flush=True)
    load_after = os.getloadavg()
    h = runs["harness"][-1]
    for key, rs in runs.items():
        if (rs[-1]["frames"], rs[-1]["pairs"]) != (h["frames"], h["pairs"]):
            raise RuntimeError(f"{key} scored other data than the harness: {rs[-1]}, {h}")
    wall = {k: statistics.median(r["wall_s"] for r in rs) for k, rs in runs.items()}
    fps = {k: h["frames"] / w for k, w in wall.items()}
    includes = {
        "harness": (
            "run_bench end to end: metric set-up, embedded-data verification (sha256 of every "
            "embedded PNG; embedded_verify_s alone), dataset listing, one decode of each GT/LQ "
            "PNG, bicubic warm-up + pass, output hash, metrics per clip (one quantisation shared "
            "by psnr/ssim/psnr_y/ssim_y, one flow per pair shared by flow metrics), "
            "results/cache parquet writes per clip, aggregate.csv/run.json/skipped.json; "
            "force=True, tracking=False, visuals=False"
        ),
        "plain": (
            "dataset listing (read_dataset), scorer creation (once per metric, the harness's "
            "own: dloral.bench.registry), then per clip x metric x frame (pair for temporal "
            "metrics): PNG reads of what the metric needs, bicubic upscale of the LQ, one call "
            "of the same scorer on that frame (pair); no disk writes. The like-for-like baseline"
        ),
        "plain_pyiqa": (
            "the plain loop with pyiqa's PSNR/SSIM instead of the harness's: not like for like "
            "(another implementation of the same metrics), recorded for what it is"
        ),
    }
    sides_out = {}
    for key, rs in runs.items():
        last = rs[-1]
        entry = {
            "frames_per_s": round(fps[key], 3),
            "wall_s_median": round(wall[key], 3),
            "wall_s_all": [round(r["wall_s"], 3) for r in rs],
            "includes": includes[key],
        }
        if key == "harness":
            entry["embedded_verify_s"] = round(verify_s, 3)
            entry.update({k: last[k] for k in ("metric_evaluations", "skipped", "files_written")})
        else:
            entry.update({k: last[k] for k in ("setup_s", "seconds_per_metric")})
        entry.update(implementations=last["implementations"], means=last["means"])
        sides_out[key] = entry
    record = {
        "benchmark": "harness-speed",
        "command": bench_command("harness_speed.py", argv),
        "dataset": f"{DATASET} (BIx4 LQ, GT)",
        "clips": runs["plain"][-1]["clips"],
        "method": "bicubic (dloral.resize PIL bicubic x4)",
        "metrics": METRICS,
        "flow": "ewarp@evalcrafter: OpenCV DIS medium (grayscale uint8); tof@tecogan: OpenCV "
        "Farneback (TecoGAN's parameters); the same on both sides",
        "frames_per_clip": args.frames,
        "frames_scored": h["frames"],
        "pairs_scored": h["pairs"],
        "repeats": args.repeats,
        "warmup": not args.no_warmup,
        "frames_per_s_definition": "scored output frames / median wall seconds of the side",
        **sides_out,
        "ratio_harness_over_plain": round(fps["harness"] / fps["plain"], 3),
        "ratio_definition": "harness frames/s over plain frames/s: the same metric functions "
        "on both sides (the headline)",
        **(
            {"ratio_harness_over_plain_pyiqa": round(fps["harness"] / fps["plain_pyiqa"], 3)}
            if "plain_pyiqa" in fps
            else {}
        ),
        "load_average_before_after": [round(v, 2) for v in (*load_before, *load_after)],
        "note": "2-core CPU machine; another process may have used the CPUs at the same time "
        "(see load_average_before_after), so the numbers may be contended",
        "total_runtime_s": round(time.perf_counter() - t_start, 1),
        "environment": environment(torch.device("cpu")),
    }
    out = Path(args.out) if args.out else RESULTS / "harness-speed-embedded-cpu.json"
    write_result(record, out)
    for key in runs:
        print(f"{key:>21}: {fps[key]:.2f} frames/s ({wall[key]:.2f} s)")
    print(
        f"ratio harness/plain (same metric code) {record['ratio_harness_over_plain']}x on "
        f"{h['frames']} frames ({h['pairs']} pairs); total {record['total_runtime_s']} s"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
