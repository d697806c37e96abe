"""What a report is made from: benchmark runs and sweeps, on disk or in MLflow.

A benchmark run is the harness's folder (results.parquet, aggregate.csv, run.json, skipped.json,
visuals/), named by path, by suite name (outputs/bench/<suite>) or by the id of its MLflow run in
experiment dloral-bench (the same files are its artifacts). A sweep is its folder (sweep.json,
summary.json), named by path, by experiment name (the newest outputs/sweeps/<name>-<time>/ with a
summary) or by the id of its MLflow parent run. Trials' validation histories come from MLflow
when the sweep's tracking store can be read.
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dloral.bench import results
from dloral.bench.registry import DEFAULT_PROTOCOL
from dloral.bench.visuals import read_index
from dloral.trials import METRICS, SUMMARY_FILE, SWEEP_FILE, SweepSpec, SweepSummary

BENCH_ROOT = Path("outputs") / "bench"
SWEEP_ROOT = Path("outputs") / "sweeps"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# directions of the metrics sweeps report: val/* (the sweep's METRICS) and the same names in the
# best-arm evaluation, plus its seconds per frame
SWEEP_DIRECTIONS = {k.rsplit("/", 1)[-1]: mode == "max" for k, mode in METRICS.items()}
SWEEP_DIRECTIONS["s_per_frame"] = False
# what dloral.bench.results.aggregate computes from the table (the rest of aggregate.csv is kept)
_RECOMPUTED = {
    "higher_is_better",
    "implementation",
    "value",
    "clips",
    "noted",
    "left_out",
    "clips_left_out",
}


class ReportError(ValueError):
    """A report source that cannot be read; the message names the file or the id."""


@dataclass
class BenchRun:
    name: str  # the suite's name
    folder: Path
    origin: str  # where it was read from, as the report cites it
    table: pd.DataFrame  # results.parquet (long: one value per dataset/method/clip/frame/metric)
    aggregate: pd.DataFrame  # aggregate.csv
    run: dict[str, Any]  # run.json
    skipped: list[dict]
    visuals: list[dict] = field(default_factory=list)


@dataclass
class SweepRun:
    name: str  # the sweep id, <experiment>-<time>
    folder: Path | None
    origin: str
    spec: SweepSpec | None  # sweep.json (None when only the summary could be read)
    summary: SweepSummary
    trials: pd.DataFrame  # the trials table (SweepSummary.table)
    history: pd.DataFrame | None = None  # trial_id, metric, step, value (from MLflow)
    history_note: str = ""  # why there is no history, when there is none

    @property
    def keys(self) -> list[str]:
        if self.spec is not None and self.spec.keys:
            return list(self.spec.keys)
        return list(dict.fromkeys(k for t in self.summary.trials for k in t.values))

    @property
    def dims(self) -> dict[str, str]:
        """key -> kind of search space (grid, choice, uniform, loguniform, ...)."""
        return {d[0]: d[1] for d in self.spec.dims} if self.spec is not None else {}

    @property
    def metric(self) -> str:
        return self.spec.metric if self.spec is not None else "val/psnr"

    @property
    def metrics(self) -> list[str]:
        return [c for c in self.trials.columns if c.startswith("val/")]


def higher_is_better(metric: str) -> bool:
    """Direction of a sweep metric (val/psnr, eval psnr, ...); unknown names raise."""
    base = metric.rsplit("/", 1)[-1]
    if base not in SWEEP_DIRECTIONS:
        raise ReportError(f"no known direction for metric {metric!r}; known: {SWEEP_DIRECTIONS}")
    return SWEEP_DIRECTIONS[base]


# ----- benchmark runs ----------------------------------------------------------------------
def available_benches(root: Path = BENCH_ROOT) -> list[str]:
    return sorted(p.parent.name for p in root.glob("*/run.json")) if root.is_dir() else []


def load_bench(ref: str | Path, root: Path = BENCH_ROOT) -> BenchRun:
    """A benchmark run by folder, suite name or MLflow run id (see the module doc)."""
    path = Path(ref)
    if (path / "run.json").is_file() or (path / "results.parquet").is_file():
        return read_bench(path, str(path))
    if (root / str(ref) / "run.json").is_file():
        return read_bench(root / str(ref), str(root / str(ref)))
    if _RUN_ID.match(str(ref)):
        folder, origin = _download(str(ref), "dloral-bench")
        return read_bench(folder, origin)
    have = ", ".join(available_benches(root)) or "none"
    raise ReportError(
        f"--bench {ref}: no benchmark run at {path}/run.json or {root / str(ref)}/run.json, "
        f"and not an MLflow run id. Runs in {root}: {have}. "
        "Make one with `dloral-exp bench embedded`."
    )


UNRECORDED = "unrecorded"


def _protocols_named(df: pd.DataFrame) -> pd.DataFrame:
    """A run made before protocols were named stored "tof", "tlp", "ewarp" bare: those become
    "tof@unrecorded" etc., never read as today's default protocol of the same name."""
    bare = df["metric"].isin(list(DEFAULT_PROTOCOL))
    if bare.any():
        df = df.copy()
        df.loc[bare, "metric"] = df.loc[bare, "metric"] + f"@{UNRECORDED}"
    return df


def read_bench(folder: Path, origin: str) -> BenchRun:
    for name in ("run.json", "results.parquet", "aggregate.csv"):
        if not (folder / name).is_file():
            raise ReportError(f"{folder / name}: missing; a benchmark run's folder holds {name}")
    try:
        run = json.loads((folder / "run.json").read_text())
        table = pd.read_parquet(folder / "results.parquet")
        agg = pd.read_csv(folder / "aggregate.csv")
        skipped_path = folder / "skipped.json"
        skipped = json.loads(skipped_path.read_text()) if skipped_path.is_file() else []
    except (ValueError, OSError) as err:
        raise ReportError(f"{folder}: cannot read the benchmark run: {err}") from err
    agg["higher_is_better"] = agg["higher_is_better"].astype(bool)
    table, agg = _protocols_named(table), _protocols_named(agg)
    if "note" not in table.columns:
        table["note"] = ""
    if len(table) and {"level", "kind"} <= set(table.columns):
        # the means as this code takes them (a run's aggregate.csv may come from older code)
        keys = ["dataset", "method", "metric"]
        kept = [c for c in agg.columns if c in keys or c not in _RECOMPUTED]
        agg = results.aggregate(table).merge(agg[kept], on=keys, how="left")
    if "noted" not in agg.columns:
        agg["noted"] = 0
    name = (run.get("suite") or {}).get("name") or folder.name
    return BenchRun(name, folder, origin, table, agg, run, skipped, read_index(folder / "visuals"))


def untrained_methods(run: dict[str, Any]) -> dict[str, str]:
    """Method -> why its weights are untrained, from the run's recorded provenance (run.json's
    `methods`): the method's own `untrained` statement, or, in a run recorded before methods
    made one, a backbone recorded as random-init. Never from the method's name."""
    out = {}
    for name, method in (run.get("methods") or {}).items():
        if not isinstance(method, dict):
            continue
        if "untrained" in method:
            why = method["untrained"]
        else:
            model = method.get("model") if isinstance(method.get("model"), dict) else {}
            random = "random-init" in (method.get("weights"), model.get("backbone_weights"))
            why = "random-init backbone" if random else None
        if why:
            out[name] = str(why)
    return out


# ----- sweeps ------------------------------------------------------------------------------
def available_sweeps(root: Path = SWEEP_ROOT) -> list[str]:
    return sorted(p.parent.name for p in root.glob("*/summary.json")) if root.is_dir() else []


def default_sources(
    bench_root: Path = BENCH_ROOT, sweep_root: Path = SWEEP_ROOT
) -> tuple[list[str], list[str]]:
    """What `dloral-exp report` shows when no source is named: every benchmark run, and the
    newest sweep of each experiment (sweep folders are <experiment>-<YYYYmmdd-HHMMSS>)."""
    newest: dict[str, str] = {}
    for name in available_sweeps(sweep_root):  # sorted: the newest of an experiment last
        newest[re.sub(r"-\d{8}-\d{6}$", "", name)] = str(sweep_root / name)
    return available_benches(bench_root), list(newest.values())


def load_sweep(ref: str | Path, root: Path = SWEEP_ROOT, history: bool = True) -> SweepRun:
    """A sweep by folder, experiment name (newest run) or MLflow parent run id."""
    path = Path(ref)
    if (path / "summary.json").is_file():
        sweep = read_sweep(path, str(path))
    elif (path / "sweep.json").is_file():
        raise ReportError(
            f"{path}: sweep.json but no summary.json yet: the sweep is running or stopped before "
            "any trial ended (`dloral-exp sweep --resume --sweep-dir` continues it)"
        )
    elif runs := sorted(root.glob(f"{ref}-*/summary.json")) if root.is_dir() else []:
        folder = runs[-1].parent  # names end in the start time: the newest sorts last
        sweep = read_sweep(folder, str(folder))
    elif _RUN_ID.match(str(ref)):
        folder, origin = _download(str(ref), "dloral-sweeps")
        sweep = read_sweep(folder, origin)
    else:
        have = ", ".join(available_sweeps(root)) or "none"
        raise ReportError(
            f"--sweep {ref}: no summary.json at {path}, no sweep {ref}-<time> in {root}, and not "
            f"an MLflow run id. Sweeps in {root}: {have}. Make one with `dloral-exp sweep`."
        )
    if history:
        sweep.history, sweep.history_note = _history(sweep)
    return sweep


def read_sweep(folder: Path, origin: str) -> SweepRun:
    summary_path, spec_path = folder / SUMMARY_FILE, folder / SWEEP_FILE
    try:
        summary = SweepSummary.from_dict(json.loads(summary_path.read_text()), str(summary_path))
        spec = None
        if spec_path.is_file():
            spec = SweepSpec.from_dict(json.loads(spec_path.read_text()), str(spec_path))
    except (ValueError, OSError) as err:  # RecordError is a ValueError naming the file
        raise ReportError(f"{folder}: cannot read the sweep: {err}") from err
    name = spec.sweep_id if spec is not None else Path(summary.sweep_dir or folder).name
    return SweepRun(name, folder, origin, spec, summary, summary.table())


def _history(sweep: SweepRun) -> tuple[pd.DataFrame | None, str]:
    """Every trial's val/* history from its MLflow run; (None, why) when it cannot be read."""
    uri = sweep.spec.tracking_uri if sweep.spec is not None else None
    ids = [i for i in sweep.trials.get("mlflow_run_id", []) if isinstance(i, str) and i]
    if not uri or not ids:
        return None, "no MLflow runs recorded for this sweep (tracking was off)"
    try:
        from dloral.tracking import mlflow_client

        client = mlflow_client(uri)
        rows = []
        pairs = zip(sweep.trials["trial_id"], sweep.trials["mlflow_run_id"], strict=True)
        for trial_id, run_id in pairs:
            if not isinstance(run_id, str):
                continue
            for metric in sweep.metrics:
                for m in client.get_metric_history(run_id, metric):
                    rows.append((trial_id, metric, m.step, m.value))
    except Exception as err:  # an unreachable or moved store: the report says so, no curves
        return None, f"MLflow store {uri} could not be read: {type(err).__name__}: {err}"
    if not rows:
        return None, f"the trials' MLflow runs in {uri} hold no validation history"
    return pd.DataFrame(rows, columns=["trial_id", "metric", "step", "value"]), ""


# ----- MLflow ------------------------------------------------------------------------------
def _download(run_id: str, experiment: str) -> tuple[Path, str]:
    """A run's artifacts into a temporary folder (removed at exit): (folder, origin)."""
    from mlflow.exceptions import MlflowException

    from dloral.tracking import mlflow_client, tracking_uri

    uri = tracking_uri()
    client = mlflow_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ReportError(f"MLflow run {run_id} not found in {uri}: {err.message}") from err
    exp = client.get_experiment(run.info.experiment_id).name
    if exp != experiment:
        raise ReportError(f"MLflow run {run_id} is in experiment {exp!r}, not {experiment!r}")
    tmp = Path(tempfile.mkdtemp(prefix=f"dloral-report-{run_id[:8]}-"))
    atexit.register(shutil.rmtree, tmp, True)
    folder = Path(client.download_artifacts(run_id, "", str(tmp)))
    return folder, f"MLflow run {run_id} ({experiment}, {uri})"
