"""The benchmark harness: suite datasets x methods x metrics -> one tidy results table.

Every folder method's outputs are checked against every clip before anything is scored. Per
clip, GT and LQ are decoded once and shared by every method and metric; each method's output is
computed once and scored by every metric. A clip counts once every method has it: the table of
complete clips is then written atomically to <out_dir>/results.parquet (an interrupt loses
nothing already written), with the clip's visual comparisons in <out_dir>/visuals/; at the end,
or at an interrupt or error, aggregate.csv (over complete clips only, with a `clips` column per
row), skipped.json and run.json (status finished | interrupted | failed, and why) join it, and
the MLflow run ends FINISHED, KILLED or FAILED. Metric values are cached across runs into the
same out_dir by (output_hash, metric, implementation) in cache.parquet; `force` recomputes.
Latency rows (s_per_frame with its fastest and slowest pass, peak_mem_gib) are measured for
methods run here (dloral.bench.methods says how). A DLoRAL method's output is kept in
<out_dir>/outputs (dloral.bench.outputs) and a later run into the same out_dir takes it from
there, with the latency measured when it was computed, instead of running the model again
(run.json's `outputs.reused` lists those clips); `force` runs it again.

Every method's output is scored as 8-bit frames (what its PNGs hold): a model run here is
quantised as a folder method's PNGs are, so no method is scored on finer values than another.

A method's output may lack a clip's first frame (DLoRAL with `first_frame = "skip"`, as the
reference's test script; a folder of the reference's outputs): only the frames both GT and the
output have are scored, frame numbers in the results stay the clip's, and run.json records each
method's first-frame policy (`first_frame`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

import pandas as pd
import torch

from dloral import provenance, signals
from dloral.atomic import atomic_write, atomic_write_json
from dloral.bench import fullref, registry, results, survey, temporal
from dloral.bench.methods import (
    ClipJob,
    MethodOutput,
    build_method,
    check_folders,
    check_weights,
    output_hash,
)
from dloral.bench.metric import MetricInfo
from dloral.bench.outputs import OutputStore, output_key
from dloral.bench.registry import ScoredMetric
from dloral.bench.suite import Suite, check_methods, check_metrics
from dloral.bench.visuals import VisualRecorder
from dloral.data.frames import quantized
from dloral.data.readers import Clip, Dataset, DatasetError, read_dataset
from dloral.data.synthetic import DegradeError
from dloral.data.synthetic import read_manifest as read_degraded_manifest
from dloral.devices import resolve_device
from dloral.tracking import end_run, experiment_id, log_metrics, log_params, mlflow_client

log = logging.getLogger(__name__)

EXPERIMENT = "dloral-bench"
RUN_STATUS = {"FINISHED": "finished", "KILLED": "interrupted", "FAILED": "failed"}  # run.json
DEFAULT_SCALE = 4
Progress = Callable[[dict], None]


@dataclass
class BenchResult:
    out_dir: Path
    table: pd.DataFrame  # this run's rows (cached ones included)
    aggregate: pd.DataFrame  # dataset x method x metric
    skipped: list[dict]  # {metric, reason, dataset?, clip?}
    computed: int = 0  # metric evaluations run
    cached: int = 0  # metric evaluations taken from the cache
    mlflow_run_id: str | None = None
    infos: dict[str, MetricInfo] = field(default_factory=dict)

    @property
    def results_path(self) -> Path:
        return self.out_dir / "results.parquet"


def _latency_info(name: str, implementation: str) -> MetricInfo:
    return MetricInfo(name, False, "latency", "clip", implementation, needs_gt=False)


def build_metrics(
    names: tuple[str, ...], device: torch.device, suite: Suite, strict: bool
) -> tuple[dict[str, ScoredMetric], list[dict], str | None]:
    """Build each metric once (dloral.bench.registry); unavailable ones go to the skipped list
    (or raise if strict). Also returns the flow estimator's name (None: none built). The
    suite's seed is DOVER's sampling seed."""
    opts = suite.options
    return registry.build_metrics(
        names, device, crop_border=opts.crop_border, flow=opts.flow, strict=strict, seed=opts.seed
    )


def _read_clip(
    clip: Clip, frames: int
) -> tuple[tuple[str, ...], torch.Tensor | None, torch.Tensor | None]:
    """Decode (up to `frames`) LQ and GT frames once: names, lq (T,3,h,w)|None, gt|None."""
    names, lqs, gts = [], [], []
    for name, lq, gt in islice(clip.frame_pairs(), frames or None):
        names.append(name)
        if lq is not None:
            lqs.append(lq)
        if gt is not None:
            gts.append(gt)
    lq = torch.stack(lqs) if lqs else None
    gt = torch.stack(gts) if gts else None
    return tuple(names), lq, gt


class _Cache:
    """Metric values of earlier runs, by (output_hash, metric, implementation)."""

    KEY = ["output_hash", "metric", "implementation"]

    def __init__(self, path: Path, use: bool):
        self.path = path
        old = pd.read_parquet(path) if use and path.is_file() else results.table([])
        self.frames = [old]
        self.index = {k: g for k, g in old.groupby(self.KEY)} if len(old) else {}

    def get(self, key: tuple[str, str, str]) -> pd.DataFrame | None:
        return self.index.get(key)

    def add(self, records: list[dict]) -> None:
        if records:
            self.frames.append(results.table(records))

    def write(self) -> None:
        df = pd.concat([f for f in self.frames if len(f)] or [results.table([])])
        df = df[df["kind"] != "latency"].drop_duplicates(self.KEY + ["frame"], keep="last")
        results.write_parquet(df, self.path)


def _lq_read(ds: Dataset) -> str | None:
    """Where under the dataset's root its clips' LQ frames were read from, the clip's own name
    as <clip>: e.g. "BIx4/<clip>" (the suite's `lq` may leave BIx4/BDx4 to the reader),
    "<clip>/input4" (SPMCS), "<clip>.mp4"; None for a set without LQ."""
    for clip in ds.clips:
        if clip.lq is not None:
            path = Path(clip.lq.path)
            try:
                rel = path.resolve().relative_to(Path(ds.root).resolve())
            except ValueError:
                rel = path
            parts = [
                "<clip>" + Path(p).suffix if Path(p).stem == clip.name else p for p in rel.parts
            ]
            return "/".join(parts)
    return None


def _embedded_manifest(name: str, root: Path) -> dict:
    path = root.parent / "manifest.json"
    if not path.is_file():
        return {}
    data = path.read_bytes()
    files = json.loads(data).get("files", {})
    mine = {k: v for k, v in files.items() if k.startswith(f"{name}/")}
    files_digest = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()
    return {
        "manifest": str(path),
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
        "files": len(mine),
        "files_sha256": files_digest,
    }


def _open_datasets(suite: Suite) -> list[tuple]:
    """(spec, Dataset, clips to run, manifest info) per suite dataset, all listed up front."""
    out = []
    for spec in suite.datasets:
        if spec.embedded:
            from dloral.data.embedded import prepare_embedded

            root = prepare_embedded() / spec.embedded
        else:
            root = Path(spec.root)
        ds: Dataset = read_dataset(spec.kind, root, lq=spec.lq)
        clips = ds.clips[: spec.clips] if spec.clips else ds.clips
        manifest = _embedded_manifest(spec.embedded, root) if spec.embedded else {}
        if not spec.embedded and spec.lq == "LQ":  # a set `dloral-exp data degrade` made?
            try:
                manifest = read_degraded_manifest(root) or {}
            except DegradeError as err:
                raise DatasetError(f"dataset {spec.name}: {err}") from err
        out.append((spec, ds, clips, manifest))
    return out


def _clip_names(spec, clip: Clip) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    """(dataset, clip, names of the frames scored, every frame name): as _read_clip and the
    ClipJob name them, without decoding a frame."""
    return spec.name, clip.name, clip.names[: spec.frames or None], (clip.gt or clip.lq).names


def _scale(spec, clip: Clip) -> int:
    if spec.scale and clip.scale and spec.scale != clip.scale:
        raise ValueError(
            f"{spec.name} clip {clip.name!r}: suite scale {spec.scale} but GT/LQ sizes give "
            f"x{clip.scale}"
        )
    return spec.scale or clip.scale or DEFAULT_SCALE


class _Tracking:
    """One MLflow run per benchmark run in experiment dloral-bench."""

    def __init__(self, enabled: bool):
        self.enabled, self.client, self.run_id = enabled, None, None

    def start(self, name: str, params: dict[str, str]) -> None:
        if not self.enabled:
            return
        self.client = mlflow_client()  # here, so that a store it cannot open fails the run
        exp_id = experiment_id(self.client, EXPERIMENT)
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        log_params(self.client, self.run_id, params)

    def finish(self, agg: pd.DataFrame, files: list[Path], status: str, reason: str) -> None:
        if self.run_id is None:
            return
        metrics = [
            (f"{r.dataset}/{r.method}/{mlflow_name(r.metric)}", float(r.value), 0)
            for r in agg.itertuples()
            if pd.notna(r.value) and abs(float(r.value)) != float("inf")
        ]
        log_metrics(self.client, self.run_id, metrics)
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
            elif path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), path.name)
        end_run(self.client, self.run_id, status, reason)


def mlflow_name(metric: str) -> str:
    """MLflow allows no "@" in a metric name: "tof@tecogan" is logged as "tof:tecogan"."""
    return metric.replace("@", ":")


def aggregate_table(df: pd.DataFrame, infos: dict[str, MetricInfo]) -> pd.DataFrame:
    """results.aggregate plus kind, level and scale of each metric."""
    if not len(df):
        return pd.DataFrame(
            columns=["dataset", "method", "metric", "higher_is_better", "implementation"]
            + ["value", "clips", "noted", "left_out", "clips_left_out", "kind", "level", "scale"]
        )
    agg = results.aggregate(df)
    agg["kind"] = [infos[m].kind if m in infos else "" for m in agg["metric"]]
    agg["level"] = [infos[m].level if m in infos else "" for m in agg["metric"]]
    agg["scale"] = [infos[m].scale if m in infos else 1.0 for m in agg["metric"]]
    return agg


def _latency_rows(
    job: ClipJob,
    method: str,
    output: MethodOutput,
    digest: str,
    suite: Suite,
    device: str,
    infos: dict[str, MetricInfo],
) -> list[dict]:
    """s_per_frame (with s_per_frame_min / _max, the fastest and slowest pass) and peak_mem_gib
    rows of a method run here (none for folder methods)."""
    if output.seconds_per_frame is None:
        return []
    passes = f"{suite.options.latency_repeats} timed passes after a warm-up"
    timing = [
        ("s_per_frame", output.seconds_per_frame, f"median of {passes}"),
        *zip(
            ("s_per_frame_min", "s_per_frame_max"),
            output.seconds_range or (),
            (f"fastest of {passes}", f"slowest of {passes}"),
            strict=False,
        ),
    ]
    out = []
    for metric, value, impl in timing:
        infos[metric] = info = _latency_info(metric, f"{impl}, wall clock / frames, {device}")
        out += results.rows(job.dataset, method, job.clip, info, [value], device, digest)
    if output.peak_mem_gib is not None:
        infos["peak_mem_gib"] = info = _latency_info("peak_mem_gib", output.memory_kind)
        out += results.rows(
            job.dataset, method, job.clip, info, [output.peak_mem_gib], device, digest
        )
    return out


def _score_method(
    runner,
    job: ClipJob,
    gt,
    scorers,
    cache: _Cache,
    skip,
    suite: Suite,
    device: str,
    infos: dict[str, MetricInfo],
    keep: Callable[[str, torch.Tensor], None] | None = None,
    store: OutputStore | None = None,
    reuse: bool = True,
    reused: Callable[[str], None] | None = None,
) -> tuple[list[dict], int, int, str, tuple[str, ...]]:
    """Run one method on one clip and score its output on the frames it has: (rows, computed,
    cached, first-frame policy, names of the frames it has). `keep(method, frames)` sees the
    output (the visual comparisons' crops), with black frames where it has none. With `store`,
    a model's output is kept there, and taken from there when it was made the same way
    (`reused(method)` is then called) instead of running the model again."""
    key = None
    if store is not None and hasattr(runner, "output_facts"):
        key = output_key(runner.output_facts(job))
    # a clip timed here takes a kept output only with the latency of as many timed passes
    timed = suite.options.latency_repeats if job.timed else 0
    kept = store.get(runner.name, job, key, timed) if key and reuse else None
    if kept is not None:
        output, digest = kept  # its hash checked against the kept one
        if reused is not None:
            reused(runner.name)
    else:
        output = runner.run(job)
        # scored as 8-bit frames, what its PNGs hold: as peers' outputs (folder methods) are
        # read, and as kept outputs are read back
        output.frames = quantized(output.frames)
        digest = output_hash(output.frames)
        if key:
            store.put(runner.name, job, key, output, digest, timed)
    covered = output.names if output.names is not None else job.names
    index = [job.names.index(n) for n in covered]
    if not index or index != list(range(index[0], index[0] + len(index))):
        raise ValueError(
            f"{runner.name}: {job.clip}: output frames {list(covered)[:5]} are not a run of "
            "consecutive clip frames"
        )
    if gt is not None and len(index) != len(job.names):
        gt = gt[index]
    if keep is not None:
        shown = output.frames
        if len(index) != len(job.names):
            shown = output.frames.new_zeros(len(job.names), *output.frames.shape[1:])
            shown[index] = output.frames
        keep(runner.name, shown)
    records = _latency_rows(job, runner.name, output, digest, suite, device, infos)
    computed = cached = 0
    # one quantisation of the clip for all of psnr/ssim/..., one flow per pair for all metrics
    with fullref.shared_preparation(), temporal.shared_flows():
        for name, scorer in scorers.items():
            info = scorer.info
            if info.needs_gt and gt is None:
                skip(name, f"needs GT; {job.dataset} has none", job.dataset)
                continue
            need = max(scorer.min_frames, 2 if info.level == "pair" else 1)
            if len(covered) < need:
                why = f"needs at least {need} frames, has {len(covered)}"
                skip(name, why, job.dataset, job.clip)
                continue
            hit = cache.get((digest, name, info.implementation))
            if hit is not None:
                cached += 1
                rows = hit.sort_values("frame").to_dict("records")
                for row in rows:
                    row.update(dataset=job.dataset, method=runner.name, clip=job.clip)
                records += rows
                continue
            values = scorer.fn(output.frames, gt).reshape(-1).tolist()
            computed += 1
            first = index[0] + scorer.first
            rows = results.rows(
                job.dataset, runner.name, job.clip, info, values, scorer.device, digest, first
            )
            cache.add(rows)
            records += rows
    return records, computed, cached, output.first_frame, tuple(covered)


def run_bench(
    suite: Suite,
    *,
    methods: list[str] | None = None,
    metrics: list[str] | None = None,
    device: str | None = None,
    force: bool = False,
    strict: bool = False,
    out_dir: str | Path | None = None,
    progress: Progress | None = None,
    tracking: bool = True,
    visuals: bool = True,
    save_outputs: bool = True,
) -> BenchResult:
    """Score every suite method on every clip with every metric; see the module doc for files.

    `save_outputs` keeps the outputs of the models run here (DLoRAL) in <out_dir>/outputs and
    takes them from there on a later run instead of running the model again (unless `force`;
    dloral.bench.outputs).

    `visuals` records each clip's crop and x-t profile of GT, LQ and every method into
    <out_dir>/visuals (dloral.bench.visuals), for `dloral-exp report`.

    methods/metrics override the suite's lists; device overrides [options] device.
    `progress(event)` is called with {"stage": "start"|"clip", ...} after each clip is on disk.
    """
    out = Path(out_dir) if out_dir is not None else Path("outputs") / "bench" / suite.name
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(
                f"{folder}: exists and is not a folder (the run's results go in {out})"
            )
    method_specs = check_methods(methods or list(suite.methods), "--method")
    metric_names = check_metrics(metrics or list(suite.metrics), "--metrics")
    dev = resolve_device(device or suite.options.device)
    runners = [build_method(s, device=str(dev), options=suite.options) for s in method_specs]
    check_weights(runners)  # every missing weight of every method at once, nothing built yet
    out.mkdir(parents=True, exist_ok=True)
    datasets = _open_datasets(suite)
    check_folders(
        runners, [_clip_names(spec, clip) for spec, _, clips, _ in datasets for clip in clips]
    )
    total = sum(len(clips) for _, _, clips, _ in datasets)
    scorers, skipped, flow_name = build_metrics(metric_names, dev, suite, strict)
    infos = {n: s.info for n, s in scorers.items()}
    cache = _Cache(out / "cache.parquet", use=not force)
    recorder = VisualRecorder(out / "visuals") if visuals else None
    store = OutputStore(out / "outputs") if save_outputs else None
    res = BenchResult(out, results.table([]), aggregate_table(results.table([]), {}), skipped)
    run_info = {
        "suite": suite.to_dict(),
        "methods": {m.name: m.describe() for m in runners},
        "method_specs": list(method_specs),
        "metrics": list(metric_names),
        "flow_estimator": flow_name,
        "device": str(dev),
        "crop_border": suite.options.crop_border,
        "seed": suite.options.seed,
        # per method: "skip" where its output lacked a clip's frame 0 (those frames not scored)
        "first_frame": {m.name: getattr(m, "first_frame", "self") for m in runners},
        "frames_scored": {},  # method -> "dataset/clip" -> {first, last, frames}
        "datasets": {
            s.name: {"kind": s.kind, "root": s.root, "lq_read": _lq_read(ds), **m}
            for s, ds, _, m in datasets
        },
        # the same facts as `dloral-exp doctor`: versions, device, every weight found or missing
        "versions": provenance.versions(),
        "machine": provenance.device(),
        "weights": survey.weights(),
        **provenance.git_state(),
        "command": sys.argv,
        "command_line": provenance.command_line(),  # as typed, shell-quoted
        "force": force,
        # the models' outputs kept (dloral.bench.outputs), and those taken from an earlier run
        "outputs": {"folder": str(store.root) if store else None, "reused": {}},
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(out / "run.json", run_info, default=str)
    tracker = _Tracking(tracking)
    records: list[dict] = []  # rows of complete clips only: every method scored them
    status, reason = "FINISHED", ""
    skipped_keys = {(s["metric"], s.get("dataset")) for s in skipped}

    def skip(metric: str, why: str, dataset: str, clip: str | None = None) -> None:
        if (metric, dataset) not in skipped_keys:
            skipped_keys.add((metric, dataset))
            entry = {"metric": metric, "reason": why, "dataset": dataset}
            skipped.append(entry | ({"clip": clip} if clip else {}))

    def note_reused(method: str, where: str) -> None:
        run_info["outputs"]["reused"].setdefault(method, []).append(where)

    done = 0
    try:  # from here on, run.json and the MLflow run end in a true state, whatever happens
        tracker.start(
            suite.name,
            {
                "suite": suite.name,
                "methods": ",".join(method_specs),
                "metrics": ",".join(metric_names),
                "device": str(dev),
                "flow": flow_name or "none",
            },
        )
        res.mlflow_run_id = tracker.run_id
        if progress:
            progress({"stage": "start", "total": total, "out_dir": str(out)})
        for spec, _ds, clips, _ in datasets:
            for number, clip in enumerate(clips):
                names, lq, gt = _read_clip(clip, spec.frames)
                scale = _scale(spec, clip)
                all_names = (clip.gt or clip.lq).names
                size = tuple(gt.shape[-2:]) if gt is not None else None
                if size is None and lq is not None:
                    size = (lq.shape[-2] * scale, lq.shape[-1] * scale)
                timed = not suite.options.latency_clips or number < suite.options.latency_clips
                job = ClipJob(spec.name, clip.name, names, all_names, lq, scale, size, timed)
                vis = (
                    recorder.start_clip(spec.name, clip.name, names, lq, gt, scale, size)
                    if recorder
                    else None
                )
                clip_rows: list[dict] = []
                computed = cached = 0
                for runner in runners:
                    rows, n_new, n_cached, first, covered = _score_method(
                        runner,
                        job,
                        gt,
                        scorers,
                        cache,
                        skip,
                        suite,
                        str(dev),
                        infos,
                        keep=partial(recorder.add, vis) if recorder else None,
                        store=store,
                        reuse=not force,
                        reused=partial(note_reused, where=f"{spec.name}/{clip.name}"),
                    )
                    if first == "skip":
                        run_info["first_frame"][runner.name] = "skip"
                    # the frames each method's output had, hence scored (a pair metric: the
                    # pairs of these; TecoGAN's protocols drop 2 more at each end)
                    run_info["frames_scored"].setdefault(runner.name, {})[
                        f"{spec.name}/{clip.name}"
                    ] = {"first": covered[0], "last": covered[-1], "frames": len(covered)}
                    # what a run learns about a method as it goes (DLoRAL: the clips whose VAE
                    # tiles waited in host memory)
                    run_info["methods"][runner.name] = runner.describe()
                    clip_rows += rows
                    computed += n_new
                    cached += n_cached
                # the clip counts once every method has it: an interrupt in the middle of a
                # clip leaves it out of results.parquet and aggregate.csv for all methods alike
                cache.write()  # first: every clip in results.parquet has its values cached
                records += clip_rows
                res.table = results.table(records)
                results.write_parquet(res.table, out / "results.parquet")
                done += 1
                res.computed += computed
                res.cached += cached
                if recorder:
                    recorder.finish_clip(vis)
                if progress:
                    progress(
                        {
                            "stage": "clip",
                            "dataset": spec.name,
                            "clip": clip.name,
                            "done": done,
                            "total": total,
                            "computed": computed,
                            "cached": cached,
                        }
                    )
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (dloral.signals routes it here)
        status, reason = "KILLED", f"interrupted by {signals.name()} after {done} of {total} clips"
        raise
    except BaseException as err:
        status, reason = "FAILED", f"{type(err).__name__}: {err}"
        raise
    finally:
        with signals.deferred():  # a second Ctrl-C does not cut the records short
            res.table = results.table(records)
            res.aggregate = aggregate_table(res.table, infos)
            res.infos = infos
            atomic_write(out / "aggregate.csv", lambda tmp: res.aggregate.to_csv(tmp, index=False))
            atomic_write_json(out / "skipped.json", skipped)
            run_info.update(
                status=RUN_STATUS[status],
                reason=reason,
                clips_done=done,
                clips_total=total,
                metric_evaluations={"computed": res.computed, "cached": res.cached},
                finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            atomic_write_json(out / "run.json", run_info, default=str)
            files = [
                out / f for f in ("results.parquet", "aggregate.csv", "run.json", "skipped.json")
            ]
            if recorder is not None:
                files.append(recorder.root)
            try:
                tracker.finish(res.aggregate, files, status, reason)
            except Exception as err:  # tracking must not hide the harness's own outcome
                log.warning("MLflow: could not finish run %s: %s", tracker.run_id, err)
    log.info("bench %s: %d clips, results in %s", suite.name, done, out)
    return res


__all__ = [
    "BenchResult",
    "ScoredMetric",
    "aggregate_table",
    "build_metrics",
    "mlflow_name",
    "run_bench",
]
