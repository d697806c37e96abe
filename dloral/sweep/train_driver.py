"""`dloral-exp train --workers N`: one training run on N Ray Train workers (DDP).

    start (or join) Ray -> check the cluster holds N workers -> TorchTrainer (dloral.sweep.
    distributed) -> wait, with Ctrl-C / SIGTERM handled here -> rank 0's RunResult

The run folder holds what the single-process run writes (config.toml, checkpoints/, the MLflow
run id, result.json: rank 0 writes them) plus `ray/`, Ray Train's copies of the reported
checkpoints, which a restarted worker group resumes from. On a cluster the run folder must be
on a file system every node reaches (rank 0 may run on any node).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from dloral import signals
from dloral.sweep.distributed import (
    ClusterTooSmall,
    WorkerJob,
    check_cluster,
    remove_rank_scratch,
    trainer,
)
from dloral.tracking import close_if_running, experiment_id, find_run, mlflow_client

log = logging.getLogger(__name__)

RAY_TRAIN_DIR = "ray"  # in the run folder: Ray Train's copies of the reported checkpoints
RUN_DIR_TAG = "dloral.run_dir"  # on the MLflow run (MlflowTracker): finds it again


def train_on_workers(
    cfg,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    tracking: bool = True,
    address: str | None = None,
    cpus_per_worker: float = 1,
    max_failures: int = 2,
    verbose: bool = False,
):
    """One training run on `cfg.run.workers` Ray Train workers, on this machine (Ray started
    here) or the cluster at `address` / $RAY_ADDRESS. One GPU per worker when the cluster has
    GPUs and `run.device` allows, else CPUs. Blocks until the run ends and returns rank 0's
    RunResult. Ctrl-C / SIGTERM stop the workers and mark the MLflow run KILLED."""
    import ray

    from dloral.sweep.runner import _absolute_tracking_uri, start_ray
    from dloral.tracking import tracking_uri
    from dloral.train.recipe import RunResult, latest_checkpoint, stop_reason

    run_dir = Path(run_dir).resolve()
    if resume and latest_checkpoint(run_dir) is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds a run; resume it or choose another dir")
    _prepare_data(cfg)  # once, here: workers on this machine would race to build it
    uri = _absolute_tracking_uri(tracking_uri()) if tracking else None
    job = WorkerJob(
        config=cfg.to_dict(),
        run_dir=str(run_dir),
        resume=resume,
        threads=max(1, math.floor(cpus_per_worker)),
        cwd=os.getcwd(),
        scratch_tag=uuid.uuid4().hex[:12],
        tracker=(
            None
            if uri is None
            else {
                "experiment": cfg.run.mlflow_experiment,
                "uri": uri,
                "key": {RUN_DIR_TAG: str(run_dir)},
            }
        ),
    )
    owns_ray = not ray.is_initialized()
    try:
        start_ray(address, verbose)
        gpu = _gpus_per_worker(cfg.run.device)
        check_cluster(cfg.run.workers, cpus_per_worker, gpu)
        fit = trainer(
            job,
            cfg.run.workers,
            cpu=cpus_per_worker,
            gpu=gpu,
            storage=str(run_dir),
            name=RAY_TRAIN_DIR,
            max_failures=max_failures,
            keep=cfg.run.keep_checkpoints,
        )
        log.info(
            "training on %d Ray Train workers (%g CPU, %g GPU each)",
            cfg.run.workers,
            cpus_per_worker,
            gpu,
        )
        try:
            outcome = _fit_interruptibly(fit)
        except KeyboardInterrupt:
            with signals.deferred():
                ray.shutdown()  # the workers belong to this driver: they stop with it
                _close(job, "KILLED", stop_reason(run_dir))
            raise
        except BaseException as err:
            _close(job, "FAILED", f"{type(err).__name__}: {_first_line(err)}")
            _raise_diverged(err)
            raise
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
        if owns_ray:  # every worker ran on this machine, and none runs any more
            remove_rank_scratch(job.scratch_tag)
    done = run_dir / "result.json"  # rank 0's, when its node shares this file system
    record = json.loads(done.read_text()) if done.is_file() else {}
    checkpoint = record.get("checkpoint") or getattr(outcome.checkpoint, "path", None)
    return RunResult(
        run_dir,
        record.get("status", "finished"),
        record.get("step", cfg.run.max_steps),
        Path(checkpoint) if checkpoint else None,
        record.get("metrics", {}),
        _run_id(job),
    )


def _prepare_data(cfg) -> None:
    from dloral.data.embedded import prepare_embedded

    if not cfg.data.train_root or not cfg.data.val_root:
        prepare_embedded(cfg.data.train_path().parent)


def _gpus_per_worker(device: str) -> float:
    """1 when the cluster has GPUs and `run.device` is auto or cuda; 0 otherwise."""
    import ray

    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if device.startswith("cuda") and not has_gpus:
        raise ClusterTooSmall(f"run.device = {device!r}, but the Ray cluster has no GPU")
    return 1.0 if has_gpus and device != "cpu" else 0.0


def _fit_interruptibly(fit):
    """trainer.fit() in a thread, so that Ctrl-C / SIGTERM reach this driver's own handler
    (in the main thread Ray Train installs one that only asks the workers to stop)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fit.fit()
        except BaseException as err:  # handed to the main thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _run_id(job: WorkerJob) -> str | None:
    spec = job.tracker
    if spec is None:
        return None
    client = mlflow_client(spec["uri"])
    return find_run(client, experiment_id(client, spec["experiment"]), spec["key"])


def _close(job: WorkerJob, status: str, reason: str) -> None:
    """End the run's MLflow run with `status` unless rank 0 already ended it."""
    run_id = _run_id(job)
    if run_id is not None:
        client = mlflow_client(job.tracker["uri"])
        close_if_running(client, client.get_run(run_id), status, reason)


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _raise_diverged(err: BaseException) -> None:
    """A worker's TrainingDiverged comes back wrapped by Ray Train: raise it as itself."""
    from dloral.train.recipe import TrainingDiverged

    failures = getattr(err, "worker_failures", None) or {}
    for failure in failures.values():
        if isinstance(failure, TrainingDiverged) or "TrainingDiverged" in str(failure):
            raise TrainingDiverged(_first_line(failure)) from err
