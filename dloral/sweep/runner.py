"""The sweep driver: a Ray Tune Tuner around the training recipe, logged to MLflow.

    start (or join) Ray -> resolve paths the trials need -> MLflow parent run -> Tuner.fit
    -> close every trial's MLflow run -> score the best trial(s) per ablation arm -> summary

Durable state lives in the sweep folder (`<sweep.storage>/<name>-<date-time>/`): Tune's own
experiment state and trial checkpoints, plus `sweep.json` (the resolved definition and MLflow ids)
and `summary.json` (trials, best per arm, evaluation), all written atomically. `--resume` reads
`sweep.json` back and calls `Tuner.restore`, so finished trials are not run again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dloral import signals
from dloral.sweep import cluster
from dloral.sweep.spec import Experiment, SweepError, experiment_from_spec
from dloral.tracking import (
    PARENT_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    close_if_running,
    end_run,
    experiment_id,
    flatten,
    log_metrics,
    log_params,
    mlflow_client,
    reopen_run,
    tracking_uri,
)
from dloral.train.config import TrainConfig
from dloral.trials import (
    EVAL_COLUMNS,
    METRICS,
    SUMMARY_FILE,
    SWEEP_FILE,
    ArmBest,
    ArmComparison,
    SweepSpec,
    SweepSummary,
    TrialRow,
    compare_arms,
)

log = logging.getLogger(__name__)

TRIAL_END_FILE = "trial_end.json"  # beside Tune's files in the trial's folder


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the sweep; its state is saved in `sweep_dir` (resumable)."""

    def __init__(self, sweep_dir: str):
        super().__init__(sweep_dir)
        self.sweep_dir = sweep_dir


@dataclass
class SweepResult(SweepSummary):
    """summary.json's record plus the parent MLflow run of the sweep."""

    parent_run_id: str | None = None
    wall_s_run: float = 0.0  # this driver's wall time (wall_s: every driver run of the sweep)
    driver_runs: int = 1  # the first run and each --resume


# ----- storage (a local folder or any pyarrow filesystem URI) --------------------------------
def _is_uri(path: str) -> bool:
    return "://" in path


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if _is_uri(base) else str(Path(base, *parts))


def _write_text(path: str, text: str) -> None:
    if _is_uri(path):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_output_stream(inner) as f:  # object stores replace whole objects
            f.write(text.encode())
        return
    from dloral.atomic import atomic_write_text

    atomic_write_text(Path(path), text)


def _read_text(path: str) -> str | None:
    if _is_uri(path):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        if fs.get_file_info(inner).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(inner) as f:
            return f.read().decode()
    p = Path(path)
    return p.read_text() if p.is_file() else None


def _list_dirs(base: str, prefix: str) -> list[str]:
    if _is_uri(base):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(base)
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
        names = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
    else:
        names = [p.name for p in Path(base).glob("*") if p.is_dir()] if Path(base).is_dir() else []
    return sorted(n for n in names if n.startswith(prefix))


def find_sweep_dir(exp: Experiment) -> str:
    """The most recent sweep folder of this experiment (for --resume)."""
    storage = _storage(exp)
    names = [
        n for n in _list_dirs(storage, f"{exp.name}-") if _read_text(_join(storage, n, SWEEP_FILE))
    ]
    if not names:
        raise SweepError(f"no sweep of {exp.name!r} to resume under {storage}")
    return _join(storage, names[-1])


def check_trusted(sweep_dir: str) -> None:
    """`--resume` hands the sweep folder to Ray Tune, which unpickles its files (tuner.pkl,
    trial params): running code that whoever can write there put there. Resume only from a
    folder the current user owns and nobody else can write to (checked for the folder, its
    trial folders and every pickle in them). Remote storage (s3://, gs://) cannot be checked
    here; its bucket permissions are the boundary."""
    if _is_uri(sweep_dir):
        return
    root = Path(sweep_dir)
    if not root.is_dir():
        raise SweepError(f"{sweep_dir}: no such sweep folder")
    me = os.getuid()
    paths = [root, *(p for p in root.iterdir() if p.is_dir()), *root.rglob("*.pkl")]
    for path in paths:
        st = path.lstat()
        who = "owned by uid " + str(st.st_uid) if st.st_uid != me else None
        if who is None and st.st_mode & 0o002:  # group write is left to the user's umask
            who = "writable by others"
        if who:
            raise SweepError(
                f"{path} is {who}: --resume unpickles Ray Tune's files in the sweep folder, so "
                "it only resumes a folder that the current user owns and others cannot write "
                f"(fix with `chmod -R o-w {root}`, or copy the folder as yourself)"
            )


def _claim_sweep_id(storage: str, sweep_id: str) -> str:
    """`sweep_id`, or `sweep_id`-2, -3, ...: on a local storage the sweep's folder is made here,
    at once and exclusively, so two sweeps started in the same second get a folder each (the
    folder's sweep.json comes only after the data and the MLflow run, seconds later)."""
    if _is_uri(storage):
        return sweep_id
    Path(storage).mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = sweep_id if n == 1 else f"{sweep_id}-{n}"
        try:
            (Path(storage) / candidate).mkdir()
            return candidate
        except FileExistsError:
            continue
    raise SweepError(f"{storage}: 999 sweep folders named {sweep_id}[-N]; clean some up")


def _hold(sweep_dir: str) -> ExitStack:
    """The lock of a local sweep folder, held until the ExitStack is closed (or the process
    ends); a SweepError naming the folder when another driver holds it."""
    from dloral.atomic import FolderBusy, folder_lock

    held = ExitStack()
    if not _is_uri(sweep_dir):
        try:
            held.enter_context(folder_lock(sweep_dir))
        except FolderBusy as err:
            raise SweepError(
                f"{sweep_dir}: another dloral-exp sweep is running this sweep (it holds the "
                "folder's lock); wait for it, or stop it and then resume"
            ) from err
    return held


def _storage(exp: Experiment) -> str:
    s = exp.sweep.storage
    return s if _is_uri(s) else str(Path(s).resolve())


# ----- what the trials need, resolved once on the driver --------------------------------------
def _absolute_tracking_uri(uri: str) -> str:
    """Trials run in their own working folders: a relative SQLite/file URI is made absolute."""
    for scheme in ("sqlite:///", "file:"):
        if uri.startswith(scheme):
            rest = uri[len(scheme) :]
            return uri if rest.startswith("/") else scheme + str(Path(rest).resolve())
    if "://" not in uri and not uri.startswith("databricks"):
        return str(Path(uri).resolve())  # a bare folder, as MLflow accepts
    return uri


def _resolve_data(exp: Experiment, cfg: TrainConfig) -> None:
    """Prepare the embedded sets and the tiny VAE once, here (trials would race), and pin
    absolute roots and the VAE's path (trials run in folders of their own)."""
    from dloral.data.embedded import prepare_embedded
    from dloral.model.tiny_vae import uses_embedded_vae
    from dloral.train.recipe import prepare_first_use
    from dloral.weights import locate_tiny_vae

    data = exp.base.setdefault("data", {})
    if not cfg.data.train_root or not cfg.data.val_root:
        prepare_embedded(cfg.data.train_path().parent)
    data["train_root"] = str(cfg.data.train_path().resolve())
    data["val_root"] = str(cfg.data.val_path().resolve())
    if uses_embedded_vae(cfg.model):
        prepare_first_use(cfg.model)
        path = locate_tiny_vae().resolve()
        exp.base.setdefault("model", {})["tiny_vae_path"] = str(path)


def _preflight(exp: Experiment, cfg: TrainConfig) -> None:
    """Fail in a second, not after every trial's retries: weights a trial requires must exist."""
    from dloral.weights import WeightsMissing, locate_vgg16

    searched = {d.key for d in exp.dims}
    may_use_lpips = cfg.loss.weights.lpips > 0 or "loss.weights.lpips" in searched
    if cfg.loss.lpips == "required" and may_use_lpips and "loss.lpips" not in searched:
        try:
            locate_vgg16()
        except WeightsMissing as err:
            raise SweepError(f"{exp.path}: loss.lpips = 'required', but {err}") from err


# ----- Ray ---------------------------------------------------------------------------------
RAY_START_TIMEOUT = "timed out during startup"  # ray/_private/node.py's message


def _ray_environment() -> None:
    """Ray's settings from the environment, which Ray reads once, when it is first imported:
    set before any `import ray` here."""
    # Under `uv run`, Ray would otherwise rebuild the project's environment for every worker from
    # a copy of the working folder; our workers use this interpreter (and on a cluster, the
    # environment each node was set up with). Set it to 1 to get Ray's uv behaviour back.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # small trials report checkpoints often; Tune's "snapshotting may become a bottleneck"
    # warning is noise at this scale
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


class _RayResumeHint(logging.Filter):
    """Ray Tune's "... interrupted ... Resume experiment with: Tuner.restore(...)", printed
    before dloral's own message at every stop: that call does not resume a dloral sweep or
    run (`dloral-exp sweep --resume`, `train --resume` do; their messages say so)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("has been interrupted" in text and ".restore(" in text)


def _drop_ray_resume_hints() -> None:
    # after an interrupt, and as a resume restores, Tune warns once per trial that never
    # started ("Failed to fetch metrics"); summary.json lists those trials as unfinished
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    tune_log = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _RayResumeHint) for f in tune_log.filters):
        tune_log.addFilter(_RayResumeHint())


# the GCS address of the Ray this process started on this machine (ray.init without an address)
_LOCAL_RAY: str | None = None


def start_ray(address: str | None, verbose: bool = False) -> None:
    """Join `address` (or $RAY_ADDRESS), else start Ray on this machine (`ray_is_own` tells
    which, afterwards)."""
    global _LOCAL_RAY
    _ray_environment()
    import ray

    _drop_ray_resume_hints()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    options = dict(
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )
    if address is None:
        try:
            ray.init(**options)
            _LOCAL_RAY = ray.get_runtime_context().gcs_address
        except SystemExit as err:
            # ray.init installs a SIGTERM handler that calls sys.exit(15) before ours is back:
            # a SIGTERM while Ray starts stops the sweep as Ctrl-C does, resumable
            if err.code != signal.SIGTERM:
                raise
            signals.record(signal.SIGTERM)
            raise KeyboardInterrupt from None
        except Exception as err:  # Ray raises a bare Exception for this one
            if RAY_START_TIMEOUT not in str(err):
                raise
            raise SweepError(
                f"Ray's local start-up timed out: {err} Ray waits a fixed 30 s for its node, "
                "which a loaded machine can miss. Run the sweep again (with --resume: the sweep "
                "folder is kept), or start Ray once with `ray start --head` and pass its address "
                "with --address."
            ) from None
    else:
        try:
            cluster.join(address, **options)
        except cluster.ClusterError as err:
            raise SweepError(str(err)) from None
    # Ray's core installs a C++ SIGTERM handler that dumps a stack and aborts the driver (-6):
    # SIGTERM must stop the sweep the way Ctrl-C does, saving its state
    signals.install()


def _ray_running() -> bool:
    _ray_environment()
    import ray

    return ray.is_initialized()


def ray_is_own() -> bool:
    """Whether the Ray this process talks to is one it started on this machine (by an earlier
    sweep in this process too): its trials ran here, and the driver can run their evaluation
    itself instead of paying a Ray worker's start (~20 s of imports on CPU) per best trial."""
    if not _ray_running():
        return False
    import ray

    return _LOCAL_RAY is not None and ray.get_runtime_context().gcs_address == _LOCAL_RAY


# ----- MLflow --------------------------------------------------------------------------------
class Tracking:
    """The sweep's parent MLflow run and the clean-up of its trials' runs."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.client = uri, mlflow_client(uri)
        self.experiment_id = experiment_id(self.client, experiment)

    def start_parent(
        self, exp: Experiment, base: TrainConfig, sweep_id: str, sweep_dir: str
    ) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=sweep_id,
            tags={
                SWEEP_TAG: sweep_id,
                "dloral.family": exp.sweep.family,
                "dloral.sweep_dir": sweep_dir,
                "dloral.experiment_file": str(exp.path),
                "dloral.scheduler": exp.sweep.scheduler,
                "mlflow.note.content": exp.sweep.description or f"sweep {exp.name}",
            },
        )
        params = {f"space.{d.key}": d.describe() for d in exp.dims}
        params |= {
            f"sweep.{k}": v
            for k, v in flatten(exp.to_dict()["sweep"]).items()
            if not k.startswith("space")
        }
        params |= {f"base.{k}": v for k, v in flatten(base.to_dict()).items()}
        log_params(self.client, run.info.run_id, params)
        return run.info.run_id

    def trial_runs(self, parent: str) -> dict[str, Any]:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent}'"
        )
        return {r.data.tags.get(TRIAL_TAG, r.info.run_id): r for r in runs}

    def record_failed(self, parent: str, trial_id: str, values: dict, reason: str) -> None:
        """A trial that failed before its recipe opened a run still gets one, FAILED, with
        its values and the reason, so the sweep's tree in MLflow lists every trial."""
        from dloral.sweep.trial import trial_run_name

        sweep_id = self.client.get_run(parent).data.tags.get(SWEEP_TAG, "")
        run = self.client.create_run(
            self.experiment_id,
            run_name=trial_run_name(trial_id, values),
            tags={PARENT_TAG: parent, TRIAL_TAG: trial_id, SWEEP_TAG: sweep_id},
        )
        log_params(self.client, run.info.run_id, values)
        end_run(self.client, run.info.run_id, "FAILED", reason)

    def close(self, run, status: str, reason: str | None = None) -> None:
        """End a run that is still RUNNING (a trial stopped by ASHA or killed never ends its
        own run); runs that already ended keep their status."""
        close_if_running(self.client, run, status, reason)


def _trial_callback(spec: SweepSpec, exp: Experiment):
    from ray.tune import Callback

    class TrialEvents(Callback):
        """Lines on the console as trials start, report and end; a trial's MLflow run is
        closed as soon as Tune ends the trial (early stop, error), and the end is written
        beside the trial (`trial_end.json`): Tune marks a trial it stops because the driver
        was interrupted TERMINATED too, and only this record tells the two apart."""

        def on_trial_start(self, iteration, trials, trial, **info):
            log.info("trial %s started: %s", trial.trial_id, _values(trial.config, spec))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            metric = spec.metric
            if metric in result:
                log.info(
                    "trial %s step %d: %s=%.4f",
                    trial.trial_id,
                    result.get("step", 0),
                    metric,
                    result[metric],
                )

        def on_trial_complete(self, iteration, trials, trial, **info):
            step = int((trial.last_result or {}).get("step", 0))
            early = step < _max_steps(exp, _values(trial.config, spec))
            end = f"stopped early by the {exp.sweep.scheduler} scheduler" if early else "finished"
            log.info("trial %s %s at step %d", trial.trial_id, end, step)
            _write_text(
                _join(spec.sweep_dir, trial.trial_id, TRIAL_END_FILE),
                json.dumps({"status": "stopped" if early else "finished", "step": step}),
            )
            reason = f"stopped early by {exp.sweep.scheduler} at step {step}" if early else None
            self._close(trial, "FINISHED", reason)

        def on_trial_error(self, iteration, trials, trial, **info):
            reason = _error_text(trial)
            log.warning("trial %s failed: %s", trial.trial_id, reason)
            self._close(trial, "FAILED", reason)

        def _close(self, trial, status: str, reason: str | None) -> None:
            if not spec.tracking_uri:
                return
            tracking = Tracking(spec.tracking_uri, spec.mlflow_experiment)
            run = tracking.trial_runs(spec.parent_run_id).get(trial.trial_id)
            if run is not None:
                tracking.close(run, status, reason)
            elif status == "FAILED":
                values = _values(trial.config, spec)
                tracking.record_failed(spec.parent_run_id, trial.trial_id, values, reason)

    return TrialEvents()


def _values(config: dict[str, Any] | None, spec: SweepSpec) -> dict[str, Any]:
    """The trial's searched values (a trial Tune created but never started has no config)."""
    return {k: config[k] for k in spec.keys if k in config} if config else {}


def _max_steps(exp: Experiment, values: dict[str, Any]) -> int:
    """The trial's own run length: `run.max_steps` may be one of the searched keys."""
    return exp.train_config(values).run.max_steps


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "the trial failed (no error file)"


def _trial_dirname(trial) -> str:
    return trial.trial_id


# ----- the sweep -------------------------------------------------------------------------
def run_sweep(
    exp: Experiment,
    *,
    address: str | None = None,
    resume: bool | str = False,
    max_concurrent: int | None = None,
    tracking: bool = True,
    evaluate: bool = True,
    verbose: bool = False,
    on_table: Callable[[SweepResult, Experiment], None] | None = None,
) -> SweepResult:
    """Run a sweep (or resume one: resume=True for the latest of this experiment, or a folder).
    Returns the trials, the best per arm and their evaluation."""
    t_start = time.perf_counter()
    joining = address or os.environ.get("RAY_ADDRESS")
    if joining and not _ray_running():
        try:  # seconds, before any sweep folder or MLflow run exists
            cluster.check_reachable(joining)
        except cluster.ClusterError as err:
            raise SweepError(str(err)) from None
    if resume:
        sweep_dir = resume if isinstance(resume, str) else find_sweep_dir(exp)
        check_trusted(sweep_dir)
        saved = _read_text(_join(sweep_dir, SWEEP_FILE))
        if saved is None:
            raise SweepError(f"{sweep_dir}: no {SWEEP_FILE}, not a dloral sweep folder")
        spec = SweepSpec.from_dict(json.loads(saved), _join(sweep_dir, SWEEP_FILE))
        if spec.status == "finished":  # resuming would evaluate it and log its results again
            raise SweepError(
                f"{sweep_dir}: finished; nothing to resume (its results: "
                f"`dloral-exp report --sweep {sweep_dir}`; a new sweep: drop --resume)"
            )
        exp = experiment_from_spec(spec)
        base = exp.train_config({})
    else:
        given = exp.train_config({})
        if not (address or os.environ.get("RAY_ADDRESS")):
            _preflight(exp, given)  # on a cluster the weights live on the workers, not the driver
        _resolve_data(exp, given)
        base = exp.train_config({})  # with the data roots pinned: what every trial starts from
        storage = _storage(exp)  # the folder, once nothing before it can fail
        sweep_id = _claim_sweep_id(storage, f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        sweep_dir = _join(storage, sweep_id)
        if _read_text(_join(sweep_dir, SWEEP_FILE)) is not None:
            raise SweepError(f"{sweep_dir} already exists; resume it with --resume")
        spec = SweepSpec(
            path=str(exp.path),
            sweep=exp.to_dict()["sweep"],
            base=exp.base,
            keys=[d.key for d in exp.dims],
            dims=[[d.key, d.kind, d.args] for d in exp.dims],
            sweep_id=sweep_id,
            sweep_dir=sweep_dir,
            threads=max(1, math.floor(exp.sweep.resources.cpu)),
            metric=exp.sweep.metric,
            mlflow_experiment=exp.sweep.mlflow_experiment,
            tracking_uri=_absolute_tracking_uri(tracking_uri()) if tracking else None,
            created=time.strftime("%Y-%m-%dT%H:%M:%S"),
            status="running",
            provenance=_provenance(),
        )
        if spec.tracking_uri:
            t = Tracking(spec.tracking_uri, exp.sweep.mlflow_experiment)
            spec.experiment_id = t.experiment_id
            spec.parent_run_id = t.start_parent(exp, base, sweep_id, sweep_dir)
        _write_spec(spec)

    held = _hold(sweep_dir)  # one driver per sweep folder: a --resume while it runs is refused
    result = SweepResult(sweep_dir, "failed", parent_run_id=spec.parent_run_id)
    try:
        _begin_invocation(spec, bool(resume))
        tracker = Tracking(spec.tracking_uri, spec.mlflow_experiment) if spec.tracking_uri else None
        parent = spec.parent_run_id
        if tracker and resume:
            reopen_run(tracker.client, parent)
    except BaseException as err:  # this driver run ends here; the sweep stays as it was
        with signals.deferred():
            if isinstance(err, KeyboardInterrupt):
                result.status = "interrupted"
            _end_invocation(spec, result, t_start)
            _write_spec(spec)
        held.close()
        raise

    owns_ray = not _ray_running()
    try:
        start_ray(address, verbose)
        grid = _fit(exp, spec, base, bool(resume), max_concurrent)
        result.trials = _rows(grid, spec, exp)
        # Tune turns Ctrl-C into a saved, resumable state and returns: trials left unfinished,
        # or fewer trials than the space holds, mean the driver was stopped.
        unfinished = any(t.status == "unfinished" for t in result.trials)
        if unfinished or len(result.trials) < exp.trial_count():
            raise KeyboardInterrupt
        if all(t.status == "failed" for t in result.trials):  # nothing to compare: a failure
            first = next((t.error for t in result.trials if t.error), "no error recorded")
            raise SweepError(
                f"every trial failed ({len(result.trials)}); the first error: {first}. Each "
                f"trial's error is in {_join(sweep_dir, SUMMARY_FILE)}"
            )
        result.status = "finished"
        _close_all(tracker, parent, result.trials)
        result.best = best_per_arm(result.trials, exp)
        result.comparisons = arm_comparisons(result.trials, exp)
        if evaluate and result.best:
            evaluate_best(result.best, exp, spec, in_process=ray_is_own())
        if on_table:
            on_table(result, exp)
        if tracker:  # the copies in MLflow (`report --sweep <run id>`) as the files end
            _end_invocation(spec, result, t_start)
            spec.status = result.status
            tracker.client.log_dict(parent, spec.to_dict(), SWEEP_FILE)
            _log_summary(tracker, parent, result, exp)
    except KeyboardInterrupt as err:
        result.status = "interrupted"
        with signals.deferred():  # a second Ctrl-C does not leave runs RUNNING
            if tracker:
                _close_all(tracker, parent, result.trials)
                reason = f"sweep interrupted ({signals.name()}); continue with --resume"
                tracker.close(tracker.client.get_run(parent), "KILLED", reason)
        raise SweepInterrupted(sweep_dir) from err
    except BaseException as err:
        if tracker:
            _close_all(tracker, parent, [])
            tracker.close(tracker.client.get_run(parent), "FAILED", f"{type(err).__name__}: {err}")
        raise
    finally:
        with signals.deferred():
            _finish_records(spec, result, t_start)
        if owns_ray and _ray_running():  # also when stopped while Ray was starting
            import ray

            ray.shutdown()
        if owns_ray:  # every trial ran on this machine, and none runs any more
            from dloral.sweep.distributed import remove_rank_scratch
            from dloral.sweep.trial import remove_sweep_scratch

            remove_sweep_scratch(spec.sweep_id)
            remove_rank_scratch(spec.sweep_id)
        held.close()  # last: another driver may take the folder from here
    return result


def _begin_invocation(spec: SweepSpec, resume: bool) -> None:
    """Record this driver run in sweep.json before it starts anything: the command as typed and
    the code it ran (a resume may run other code than the first run did)."""
    from dloral import provenance

    if resume and not spec.invocations:  # a sweep made before dloral recorded its driver runs
        old = json.loads(_read_text(_join(spec.sweep_dir, SUMMARY_FILE)) or "{}")
        spec.invocations.append(
            {"recorded": False, "wall_s": old.get("wall_s") or 0.0, "ended": spec.status}
        )
    spec.invocations.append(
        {
            "command_line": provenance.command_line(),
            **provenance.git_state(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "resume": resume,
        }
    )
    _write_spec(spec)


def _end_invocation(spec: SweepSpec, result: SweepResult, t_start: float) -> None:
    """This driver run's wall time and end, once (the MLflow copies and the files then say the
    same), and the sweep's wall time over every run of its driver."""
    last = spec.invocations[-1] if spec.invocations else {}
    if not last.get("ended"):
        result.wall_s_run = time.perf_counter() - t_start
        last.update(
            wall_s=round(result.wall_s_run, 1),
            ended=result.status,
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
    result.wall_s = spec.wall_s or result.wall_s_run
    result.driver_runs = max(1, len(spec.invocations))


def _finish_records(spec: SweepSpec, result: SweepResult, t_start: float) -> None:
    """sweep.json's status and summary.json, also when interrupted: which trials are done,
    which will resume; this driver run's wall time and end, and the sweep's over every run."""
    _end_invocation(spec, result, t_start)
    spec.status = result.status
    if not result.trials:  # Tune gave this run no trials (it failed or stopped first): the
        # trials an earlier run recorded stay, so a later --resume knows they ran
        old = json.loads(_read_text(_join(spec.sweep_dir, SUMMARY_FILE)) or "{}")
        if old.get("trials"):
            where = _join(spec.sweep_dir, SUMMARY_FILE)
            result.trials = SweepSummary.from_dict(old, where).trials
    _write_spec(spec)
    _write_text(_join(spec.sweep_dir, SUMMARY_FILE), json.dumps(result.to_dict(), indent=2))


def _write_spec(spec: SweepSpec) -> None:
    _write_text(_join(spec.sweep_dir, SWEEP_FILE), json.dumps(spec.to_dict(), indent=2))


def _fit(exp: Experiment, spec: SweepSpec, base: TrainConfig, resume: bool, max_concurrent):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = exp.sweep
    trainable, auto_concurrent = _trainable(spec, s, base.run.workers)
    sweep_dir = spec.sweep_dir
    if resume and not tune.Tuner.can_restore(sweep_dir):
        summary = json.loads(_read_text(_join(sweep_dir, SUMMARY_FILE)) or "{}")
        if summary.get("trials"):
            raise SweepError(f"{sweep_dir}: Tune has no experiment state to resume")
        # stopped before Tune saved its state (Ray was starting): no trial ran, so the sweep
        # starts its trials now, in its folder, under its MLflow run
        log.info("%s: no trial had started; starting them", sweep_dir)
    elif resume:
        tuner = tune.Tuner.restore(
            sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=False
        )
        return _fit_restoring_signals(tuner)
    if s.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=longest_run(exp, base),
            grace_period=s.asha.grace_period,
            reduction_factor=s.asha.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    storage, name = sweep_dir.rsplit("/", 1)
    tuner = tune.Tuner(
        trainable,
        param_space={d.key: d.domain() for d in exp.dims},
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            scheduler=scheduler,
            num_samples=s.num_samples,
            max_concurrent_trials=(max_concurrent or s.max_concurrent) or auto_concurrent,
            trial_dirname_creator=_trial_dirname,
            # later trials skip the worker start-up and imports; a trial of several workers
            # must end with its actor, which owns its Ray Train run
            reuse_actors=base.run.workers == 1,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints),
            callbacks=[_trial_callback(spec, exp)],
            verbose=0,
        ),
    )
    return _fit_restoring_signals(tuner)


def longest_run(exp: Experiment, base: TrainConfig) -> int:
    """The longest trial's run length: ASHA's last rung. `run.max_steps` may be searched."""
    for d in exp.dims:
        if d.key == "run.max_steps":
            ends = d.args if d.kind in ("grid", "choice") else d.args[:2]
            return max(int(v) for v in ends)
    return base.run.max_steps


def _trainable(spec: SweepSpec, s, workers: int) -> tuple[Any, int | None]:
    """Tune's trainable and, when several workers make a trial, how many trials the cluster
    holds at once. One worker: the trial is the training process, with [sweep.resources].
    Several: the trial starts a Ray Train run of `workers` processes with [sweep.resources]
    each, and only waits for it (no CPU of its own; Ray wants some resource in a trial's
    bundle, so 1 MiB of memory)."""
    from ray import tune

    if workers == 1:
        from dloral.sweep.trial import run_trial

        resources = {"cpu": s.resources.cpu, "gpu": s.resources.gpu}
        return tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources), None
    import ray

    from dloral.sweep.distributed import check_cluster, run_trial_on_workers

    check_cluster(workers, s.resources.cpu, s.resources.gpu)
    have = ray.cluster_resources()
    fits = [have.get("CPU", 0) // (workers * s.resources.cpu)]
    if s.resources.gpu:
        fits.append(have.get("GPU", 0) // (workers * s.resources.gpu))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial_on_workers, spec=spec), {"cpu": 0, "memory": 2**20}
    )
    return trainable, max(1, int(min(fits)))


def _fit_restoring_signals(tuner):
    """Tuner.fit with the driver's SIGINT handler given back afterwards. Tune turns the first
    Ctrl-C (and SIGTERM, routed to it by dloral.signals) into a saved, resumable state; but on a
    normal end it leaves its handler installed, which would swallow a Ctrl-C during the
    evaluation that follows."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}
    try:
        return tuner.fit()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _rows(grid, spec: SweepSpec, exp: Experiment) -> list[TrialRow]:
    from ray.tune.experiment import Trial

    # Tune's own trial states, in memory. ResultGrid has no public per-trial status, and the
    # public ExperimentAnalysis(path) reads the experiment state on disk, which can lag behind
    # at an interrupt (a trial that just finished read as unfinished): tests/test_faults.py.
    analysis = getattr(grid, "_experiment_analysis", None)
    states = {t.trial_id: t.status for t in getattr(analysis, "trials", [])}
    rows = []
    for r in grid:
        m = r.metrics or {}
        step = int(m.get("step", 0))
        trial_id = str(m.get("trial_id") or r.path.rsplit("/", 1)[-1])
        values = _values(r.config, spec)
        state = states.get(trial_id, Trial.TERMINATED)
        if r.error is not None:
            state = Trial.ERROR
        end = _read_text(_join(spec.sweep_dir, trial_id, TRIAL_END_FILE))
        rows.append(
            TrialRow(
                trial_id=trial_id,
                values=values,
                status=trial_status(state, step, _max_steps(exp, values), end),
                step=step,
                metrics={k: float(v) for k, v in m.items() if k in METRICS},
                checkpoint=_checkpoint_uri(r.checkpoint) or _train_checkpoint(m, spec),
                mlflow_run_id=m.get("mlflow_run_id"),
                error=_short(r.error),
                train_time_s=float(m.get("time_total_s", 0.0)),
            )
        )
    return rows


def trial_status(state: str, step: int, own_end: int, end_record: str | None) -> str:
    """A trial's status in the results from Tune's state, its last reported step, its own run
    length (`run.max_steps` may be searched) and its `trial_end.json` (None if absent)."""
    from ray.tune.experiment import Trial

    if state == Trial.ERROR:
        return "failed"
    if state != Trial.TERMINATED:
        return "unfinished"
    if step >= own_end:
        return "finished"
    if end_record is not None and json.loads(end_record).get("status") == "stopped":
        return "stopped"  # by the scheduler (ASHA), at one of its rungs
    return "unfinished"  # Tune stopped it because the driver was interrupted


def _checkpoint_uri(ckpt) -> str | None:
    """A local path, or scheme://path for remote storage (what ray's Checkpoint(path) takes)."""
    if ckpt is None:
        return None
    kind = getattr(ckpt.filesystem, "type_name", "local")
    return ckpt.path if kind == "local" else f"{kind}://{ckpt.path}"


def _train_checkpoint(metrics: dict[str, Any], spec: SweepSpec) -> str | None:
    """The checkpoint of a trial of several workers: its Ray Train run's, in the sweep storage,
    whose path TuneReportCallback adds to the reported metrics."""
    path = metrics.get("checkpoint_path")
    if path and _is_uri(spec.sweep_dir) and "://" not in path:
        return f"{spec.sweep_dir.split('://', 1)[0]}://{path}"
    return path


def _short(err) -> str | None:
    if err is None:
        return None
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def _close_all(tracker: Tracking | None, parent, rows: list[TrialRow]) -> None:
    """Nothing stays RUNNING: finished/stopped trials FINISHED, failed ones FAILED with the
    reason, and trials the driver left unfinished (or does not know) KILLED (resumable)."""
    if tracker is None or parent is None:
        return
    by_id = {r.trial_id: r for r in rows}
    runs = tracker.trial_runs(parent)
    for row in rows:
        if row.status == "failed" and row.trial_id not in runs:
            tracker.record_failed(parent, row.trial_id, row.values, row.error or "failed")
    for trial_id, run in runs.items():
        row = by_id.get(trial_id)
        if row is None or row.status == "unfinished":
            stopped = "sweep driver stopped; continue with --resume"
            if row is not None and run.info.status == "FAILED":  # an attempt failed; Tune
                # retries it on --resume (summary.json: unfinished), so the run says KILLED
                end_run(tracker.client, run.info.run_id, "KILLED", stopped)
            else:
                tracker.close(run, "KILLED", stopped)
        elif row.status == "failed":
            tracker.close(run, "FAILED", row.error)
        else:
            early = row.status == "stopped"  # only asha stops trials
            reason = f"stopped early by asha at step {row.step}" if early else None
            tracker.close(run, "FINISHED", reason)


def _provenance() -> dict[str, Any]:
    """The driver's versions, device and git state (what a report of this sweep cites)."""
    from dloral import provenance

    return {
        "versions": provenance.versions(),
        "machine": provenance.device(),
        **provenance.git_state(),
    }


# ----- best per arm and their evaluation -------------------------------------------------
def arm_label(values: dict[str, Any], arms: list[str]) -> str:
    if not arms:
        return "all"
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={values.get(k)}" for k in arms)


def best_per_arm(rows: list[TrialRow], exp: Experiment) -> list[ArmBest]:
    """The top `evaluate.top` trials of each arm by the sweep metric, preferring trials that
    ran to the end (a trial stopped early is compared at an earlier step)."""
    metric, sign = exp.sweep.metric, 1 if exp.sweep.mode == "max" else -1
    arms: dict[str, list[TrialRow]] = {}
    for row in rows:
        if row.status in ("finished", "stopped") and metric in row.metrics:
            arms.setdefault(arm_label(row.values, exp.arms), []).append(row)
    best: list[ArmBest] = []
    for label, members in sorted(arms.items()):
        members.sort(key=lambda r: (r.status == "finished", sign * r.metrics[metric]), reverse=True)
        for rank, row in enumerate(members[: exp.sweep.evaluate.top], 1):
            best.append(ArmBest(arm=label, rank=rank, trial=row, eval={}))
    return best


def arm_comparisons(rows: list[TrialRow], exp: Experiment) -> list[ArmComparison]:
    """Every pair of arms on the sweep metric, the difference of their means against the
    spread of their seeds (dloral.trials.NOISE_RULE): trials that ran to the end only, so
    every value is taken at the same step."""
    metric = exp.sweep.metric
    values: dict[str, list[float]] = {}
    for row in rows:
        if row.status in ("finished", "stopped") and metric in row.metrics:
            finished = values.setdefault(arm_label(row.values, exp.arms), [])
            if row.status == "finished":
                finished.append(row.metrics[metric])
    return compare_arms(values, metric)


def evaluate_best(
    best: list[ArmBest], exp: Experiment, spec: SweepSpec, in_process: bool = False
) -> None:
    """Score each best trial's last checkpoint on the validation set (more clips and frames
    than the in-training validation): as Ray tasks with the trials' resources on a cluster, or
    here, one after the other, when Ray runs on this machine (no worker start-up to pay)."""
    import ray

    from dloral.sweep.evaluate import score_checkpoint

    s = exp.sweep
    if in_process:
        task = _Local(score_checkpoint)
    else:
        task = ray.remote(num_cpus=s.resources.cpu, num_gpus=s.resources.gpu)(score_checkpoint)
    refs = []
    for item in best:
        row = item["trial"]
        if row.checkpoint is None:
            item["eval"] = {"error": "no checkpoint"}
            refs.append(None)
            continue
        cfg = exp.train_config(row.values).to_dict()
        refs.append(
            task.remote(
                row.checkpoint,
                cfg,
                s.evaluate.clips,
                s.evaluate.frames,
                0 if in_process else spec.threads,
            )
        )
    for item, ref in zip(best, refs, strict=True):
        if ref is None:
            continue
        try:
            item["eval"] = ref() if in_process else ray.get(ref)
        except Exception as err:  # one bad checkpoint does not lose the others' scores
            item["eval"] = {"error": _short(err)}


class _Local:
    """`.remote(...)` that defers the call to this process (same interface as a Ray task)."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return lambda: self.fn(*args)


def _log_summary(tracker: Tracking, parent: str, result: SweepResult, exp: Experiment) -> None:
    """Best-trial summary on the parent run: metrics per arm, tags, the table as artifacts."""
    import re

    metrics = []
    for item in result.best:
        if item["rank"] != 1:
            continue
        label = re.sub(r"[^0-9A-Za-z_\-. /]", "_", item["arm"].replace(", ", "/"))
        row = item["trial"]
        for k, v in row.metrics.items():
            metrics.append((f"best/{label}/{k}", v, row.step))
        for k, v in item["eval"].items():
            if isinstance(v, int | float) and math.isfinite(v):
                metrics.append((f"eval/{label}/{k}", float(v), 0))
    counts: dict[str, int] = {}
    for r in result.trials:
        counts[r.status] = counts.get(r.status, 0) + 1
    metrics += [(f"trials/{k}", float(v), 0) for k, v in counts.items()]
    log_metrics(tracker.client, parent, metrics)
    done = [r for r in result.trials if exp.sweep.metric in r.metrics]
    if done:
        sign = 1 if exp.sweep.mode == "max" else -1
        top = max(done, key=lambda r: (r.status == "finished", sign * r.metrics[exp.sweep.metric]))
        tracker.client.set_tag(parent, "dloral.best_trial", top.trial_id)
        tracker.client.set_tag(parent, "dloral.best_values", json.dumps(top.values))
    tracker.client.log_text(parent, evaluation_markdown(result.best, exp), "evaluation.md")
    tracker.client.log_dict(parent, result.to_dict(), SUMMARY_FILE)
    end_run(tracker.client, parent, "FINISHED")


def evaluation_markdown(best: list[ArmBest], exp: Experiment) -> str:
    """The evaluation table as Markdown (what the parent run and the summary show)."""
    metric = exp.sweep.metric
    head = ["arm", "rank", "trial", "status", "step", metric, *EVAL_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for item in best:
        row, ev = item["trial"], item["eval"]
        cells = [
            item["arm"],
            str(item["rank"]),
            row.trial_id,
            row.status,
            str(row.step),
            f"{row.metrics.get(metric, float('nan')):.4f}",
            *(_fmt(ev.get(c)) for c in EVAL_COLUMNS),
        ]
        if "error" in ev:
            cells[-1] += f" (error: {ev['error']})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) else "-"
