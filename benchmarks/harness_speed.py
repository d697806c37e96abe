"""Harness speed: frames/s of `run_bench` vs a plain per-frame pyiqa loop, same data, one run.

    uv run python benchmarks/harness_speed.py                       # all 24 frames, 1 repeat
    uv run python benchmarks/harness_speed.py --frames 8 --repeats 3

Data: the embedded-udm10 BIx4 set (3 real clips, GT 256x256, 180x320, 144x176; LQ x1/4),
the first `--frames` frames of each clip. Method: `bicubic` only (PIL bicubic x4 from
dloral.resize), so method time is negligible and the comparison is about metric computation.
Metrics: the whole set that runs on a machine without weights: psnr, ssim, psnr_y, ssim_y, piqe,
ewarp, tof, with OpenCV DIS (medium) flow on both sides. Both sides run in this process, on the
CPU, with the same torch thread count; frames/s = scored output frames / wall seconds.

(a) harness: `run_bench` on the embedded suite cut to that dataset (frames = --frames),
    methods=["bicubic"], the metric list above, flow "dis", device "cpu", force=True (no metric
    cache), tracking=False (no MLflow), out_dir a fresh temporary folder. The wall time covers
    everything `run_bench` does: building the metrics (pyiqa PIQE, DIS), checking the embedded
    data (prepare_embedded re-hashes every file of the embedded sets against the manifest;
    timed on its own as `embedded_verify_s`), listing the dataset, decoding each GT and LQ PNG
    once per clip, the bicubic warm-up and timed pass, hashing the output, psnr/ssim/psnr_y/
    ssim_y by dloral.bench.fullref (BasicSR's convention, numpy/cv2, whole clip per call), PIQE
    by pyiqa on batches of 8 frames, ewarp/tof by dloral.bench.temporal on the whole clip (each
    flow computed once per pair and direction), the parquet writes after each clip (results and
    cache), and aggregate.csv / run.json / skipped.json at the end.
(b) plain: the loop the issue names as the baseline, written as a researcher would without the
    harness: for each clip, for each metric, for each frame, read the frame(s) the metric needs
    from disk again (GT and LQ PNG for full-reference metrics; LQ only for PIQE, which has no
    reference), upscale the LQ with the same dloral.resize.resize_frames, and score that single
    frame. Each metric object is created once per metric name (its creation is in the timed
    wall, as on side (a); the embedded-data check is not: a plain script does not verify its
    files). Frame metrics are pyiqa's, on (1, 3, H, W) tensors:
    create_metric("psnr", test_y_channel=False), ("psnr", test_y_channel=True),
    ("ssim", test_y_channel=False), ("ssim", test_y_channel=True) and "piqe" (the same pyiqa
    PIQE the harness runs). Temporal metrics: for each pair (t, t+1) the two frames are read and
    upscaled again and scored as a 2-frame clip by the same dloral.bench.temporal.ewarp (LQ only)
    and .tof (GT and LQ) with a DisFlow created once: the same flows as the harness computes.
    No results are written to disk (a plain loop keeps them in a list).
(c) plain_dloral_metrics: the loop of (b) with the harness's own PSNR/SSIM code
    (dloral.bench.fullref, BasicSR convention, numpy/cv2) called per single frame instead of
    pyiqa's; PIQE and the temporal metrics as in (b). It splits the ratio in two: (a) vs (c) is
    what the harness's structure (decode and upscale once per clip, whole-clip metric calls)
    buys or costs, net of its bookkeeping (hashing, parquet, run files); (c) vs (b) is the
    PSNR/SSIM implementation (pyiqa's SSIM is a float torch conv2d; BasicSR's is cv2.filter2D).
    Per-metric seconds of (b) and (c) are recorded.
Not a strawman: the plain loop reads only what each metric needs, uses pyiqa where pyiqa has the
metric and the harness's own code where it does not, and scores nothing twice. The pyiqa
PSNR/SSIM differ from BasicSR's in convention (pyiqa's Y is YIQ luma, rounded for SSIM, in
torch), not in what is measured; per-metric means from both sides are recorded to show that.
Before timing, both sides run once untimed on 2 frames (imports, page cache, kernel set-up);
with --repeats > 1 the order of the sides alternates and the median wall time is reported.
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

RESULTS = Path(__file__).parent / "results"
DATASET = "embedded-udm10"
METRICS = ["psnr", "ssim", "psnr_y", "ssim_y", "piqe", "ewarp", "tof"]
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


def _frame_metrics(impl: str) -> tuple[dict, dict[str, str]]:
    """The per-frame scorers of a plain loop: name -> fn(out, gt|None) -> float, and what ran."""
    import contextlib
    import io

    import pyiqa

    from dloral.bench.registry import fullref_metric

    fns, what = {}, {}
    for m, (name, kw) in PYIQA.items():
        if impl == "dloral" and m != "piqe":  # the harness's own code, called per frame
            fr = fullref_metric(m)
            fns[m] = lambda out, gt, fr=fr: float(fr(out, gt)[0])
            what[m] = f"{fr.info.implementation}; called on single frames"
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pyiqa prints while loading
            model = pyiqa.create_metric(name, device=torch.device("cpu"), **kw)
        if model.metric_mode == "FR":
            fns[m] = lambda out, gt, model=model: float(model(out, gt))
        else:
            fns[m] = lambda out, gt, model=model: float(model(out))
        what[m] = f"pyiqa {pyiqa.__version__} create_metric({name!r}, **{kw}) on single frames"
    return fns, what


def run_plain(frames: int, impl: str = "pyiqa") -> dict:
    """Side (b): per clip, per metric, per frame: read PNGs again, upscale, score one frame.

    impl "pyiqa": pyiqa PSNR/SSIM (the baseline); "dloral": dloral.bench.fullref's, per frame."""
    from dloral.bench import temporal
    from dloral.bench.flow import DisFlow
    from dloral.data.embedded import prepare_embedded
    from dloral.data.frames import read_image
    from dloral.data.readers import read_dataset
    from dloral.resize import resize_frames

    root = prepare_embedded() / DATASET  # built and verified before the clock starts
    t0 = time.perf_counter()
    ds = read_dataset("udm10", root, lq="BIx4")
    fns, implementations = _frame_metrics(impl)
    flow = DisFlow()
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
                    values[metric].append(fns[metric](out, gt))
                seconds[metric] += time.perf_counter() - start
            for metric in ("ewarp", "tof"):
                start = time.perf_counter()
                for t in range(len(names) - 1):
                    out = torch.cat(
                        [upscale(read_image(lq_dir / n), scale) for n in lq_names[t : t + 2]]
                    )
                    if metric == "ewarp":
                        score = temporal.ewarp(out, flow=flow)
                    else:
                        gt = torch.stack([read_image(gt_dir / n) for n in names[t : t + 2]])
                        score = temporal.tof(out, gt, flow=flow)
                    values[metric].append(float(score[0]))
                seconds[metric] += time.perf_counter() - start
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "clips": len(ds.clips),
        "frames": n_frames,
        "pairs": n_pairs,
        "setup_s": round(setup_s, 3),
        "seconds_per_metric": {m: round(v, 3) for m, v in seconds.items()},
        "implementations": {
            **implementations,
            "ewarp": f"dloral.bench.temporal.ewarp on 2-frame clips, flow {flow.name}",
            "tof": f"dloral.bench.temporal.tof on 2-frame clips, flow {flow.name}",
        },
        "means": {m: round(statistics.fmean(v), 6) for m, v in values.items() if v},
    }


def run_plain_dloral(frames: int) -> dict:
    return run_plain(frames, impl="dloral")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--frames", type=int, default=24, help="first N frames of each clip (24: all)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each side (median)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed 2-frame run")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.frames < 2 or args.repeats < 1:
        p.error("--frames must be >= 2 (temporal metrics need pairs), --repeats >= 1")
    from dloral.data.embedded import prepare_embedded

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    prepare_embedded()  # build the data if absent (untimed); then time one verification
    t0 = time.perf_counter()
    prepare_embedded()
    verify_s = time.perf_counter() - t0
    sides = {"harness": run_harness, "plain": run_plain, "plain_dloral_metrics": run_plain_dloral}
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
            "PNG, bicubic warm-up + pass, output hash, metrics per clip, results/cache parquet "
            "writes per clip, aggregate.csv/run.json/skipped.json; force=True, tracking=False"
        ),
        "plain": (
            "dataset listing (read_dataset), metric creation (once per metric), then per clip x "
            "metric x frame (pair for ewarp/tof): PNG reads of what the metric needs, bicubic "
            "upscale of the LQ, one single-frame metric call (pyiqa PSNR/SSIM/PIQE, "
            "dloral.bench.temporal on 2-frame clips); no disk writes. The baseline of the issue"
        ),
        "plain_dloral_metrics": (
            "the same plain loop with the harness's own PSNR/SSIM code (dloral.bench.fullref) "
            "called per frame instead of pyiqa's: separates what the harness's structure saves "
            "from what its faster PSNR/SSIM implementation saves"
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
        "command": "uv run python benchmarks/harness_speed.py " + " ".join(argv or sys.argv[1:]),
        "dataset": f"{DATASET} (BIx4 LQ, GT)",
        "clips": runs["plain"][-1]["clips"],
        "method": "bicubic (dloral.resize PIL bicubic x4)",
        "metrics": METRICS,
        "flow": "OpenCV DIS medium (grayscale uint8), all sides",
        "frames_per_clip": args.frames,
        "frames_scored": h["frames"],
        "pairs_scored": h["pairs"],
        "repeats": args.repeats,
        "warmup": not args.no_warmup,
        "frames_per_s_definition": "scored output frames / median wall seconds of the side",
        **sides_out,
        "ratio_harness_over_plain": round(fps["harness"] / fps["plain"], 3),
        "ratio_harness_over_plain_dloral_metrics": round(
            fps["harness"] / fps["plain_dloral_metrics"], 3
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
        f"ratio harness/plain {record['ratio_harness_over_plain']}x, harness/plain with dloral "
        f"metrics {record['ratio_harness_over_plain_dloral_metrics']}x on {h['frames']} frames "
        f"({h['pairs']} pairs); total {record['total_runtime_s']} s"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
