"""Data-parallel training on Ray Train: one run of the recipe on `run.workers` processes.

    driver: `dloral-exp train --workers N` (dloral.sweep.train_driver) or one sweep trial
            (run_trial_on_workers, Tune's trainable when run.workers > 1)
      -> TorchTrainer: N Ray Train workers with [sweep.resources] each, in one placement group;
         Ray Train starts their torch.distributed process group (gloo on CPU, nccl on GPU)
      -> every worker (run_worker): the recipe's train(), which gives each rank its share of the
         samples and averages gradients with DDP; rank 0 validates, logs the run's one MLflow
         run and writes the run folder; every rank reports to Ray Train at each checkpoint
         (train) or validation (trial), rank 0 with the checkpoint, which Ray copies to storage
      <- a worker that dies or raises makes Ray Train restart the whole group from the last
         reported checkpoint (FailureConfig); the restarted rank 0 continues the same MLflow run

The recipe knows torch.distributed, not Ray; this module is the only place that starts Train
workers. The run folder (rank 0's) must be on a file system every node reaches when the group
spans several machines, as the sweep's storage must be.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dloral.trials import SweepSpec


class ClusterTooSmall(ValueError):
    """The Ray cluster cannot hold the run's workers; the message says what it has."""


@dataclass
class WorkerJob:
    """What every Train worker of one run is given (plain values: it travels to the workers)."""

    config: dict[str, Any]  # the TrainConfig, as a dict
    run_dir: str  # rank 0's run folder (absolute)
    resume: bool = False  # continue the run folder's latest checkpoint (when Ray has none)
    threads: int = 1  # torch threads per worker
    cwd: str | None = None  # the driver's working folder, for relative paths in the config
    # MLflow: {"experiment", "uri", "key" (tags that find the run again), "tags", "parent"}
    tracker: dict[str, Any] | None = None
    # "checkpoint": report at every checkpoint (train); "validation": a sweep trial's reports
    reports: str = "checkpoint"
    trial_id: str = ""
    chaos: dict[str, int] = field(default_factory=dict)  # a sweep's [sweep.chaos] drills
    # run_dir is a sweep trial's scratch (dloral.sweep.trial.trial_scratch): rank 0 empties it
    # before each attempt (Ray's checkpoint is what it continues from) and removes it at the end
    scratch: bool = False
    # names this run's workers' temporary folders (remove_rank_scratch): the training run's
    # own token, or a sweep's id
    scratch_tag: str = ""


# ----- on every worker ------------------------------------------------------------------------
def run_worker(job_dict: dict[str, Any]) -> None:
    """One Ray Train worker: restore the checkpoint Ray hands over (a restarted group) or the
    run folder's (--resume), then the recipe, reporting to Ray Train on every rank."""
    import ray.train
    import torch

    from dloral.train.config import TrainConfig

    job = WorkerJob(**job_dict)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if job.cwd and Path(job.cwd).is_dir():
        os.chdir(job.cwd)  # Ray starts workers in its own folder
    torch.set_num_threads(max(1, job.threads))
    cfg = TrainConfig.from_dict(job.config)
    with tempfile.TemporaryDirectory(prefix=_rank_prefix(rank, job.scratch_tag)) as scratch:
        # rank 0 writes the run folder; the others only read their checkpoint, from scratch
        run_dir = Path(job.run_dir) if rank == 0 else Path(scratch) / "run"
        if job.scratch and rank == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
        try:
            _run(job, cfg, rank, world, run_dir)
        finally:  # a sweep trial's scratch: what it reported is in the run's storage
            if job.scratch and rank == 0:
                shutil.rmtree(run_dir, ignore_errors=True)


def _rank_prefix(rank: int | str, tag: str) -> str:
    return f"dloral-rank{rank}-{tag}-" if tag else f"dloral-rank{rank}-"


def remove_rank_scratch(tag: str) -> None:
    """The temporary folders of a run's workers on this machine, once they are gone (the
    driver, after its local Ray is shut down): a worker stopped by Ray (Ctrl-C, SIGTERM) can
    end before its own clean-up runs."""
    if not tag:
        return
    # exactly this tag: rank digits, then mkdtemp's suffix (no "-"), so that a sweep named
    # `my-default` is not taken for `default`
    name = re.compile(re.escape(_rank_prefix(0, tag)).replace("rank0", r"rank\d+") + r"[^-]+")
    for folder in Path(tempfile.gettempdir()).glob(_rank_prefix("*", glob.escape(tag)) + "*"):
        if name.fullmatch(folder.name):
            shutil.rmtree(folder, ignore_errors=True)


def _run(job: WorkerJob, cfg, rank: int, world: int, run_dir: Path) -> None:
    """The recipe on this worker, from the checkpoint `_restore` installs."""
    from dloral.train.recipe import train

    start = _restore(job, rank, run_dir)
    tracker = _tracker(job, start) if rank == 0 else None
    if job.reports == "validation":
        from dloral.sweep.spec import ChaosConfig
        from dloral.sweep.trial import TrialReports

        last_rank = rank == world - 1  # the drills stop one worker, not rank 0
        reports = TrialReports(
            _send, cfg, ChaosConfig(**job.chaos), start, job.trial_id, tracker, drills=last_rank
        )
        train(cfg, run_dir, resume=start > 0, tracker=tracker, on_validation=reports)
        reports.flush()
    else:

        def at_checkpoint(step: int, saved: Path | None) -> None:
            _send({"step": step}, saved)

        train(cfg, run_dir, resume=start > 0, tracker=tracker, on_checkpoint=at_checkpoint)


def _restore(job: WorkerJob, rank: int, run_dir: Path) -> int:
    """The step this worker starts at, its checkpoint installed in `run_dir`: the last one
    reported to Ray Train (the group restarted), else with `resume` the run folder's latest.
    A group restarted before its first report starts over: rank 0 drops the checkpoints the
    failed attempt wrote but never reported (a first attempt has none: the driver checked)."""
    import ray.train

    from dloral.train.recipe import checkpoint_step, install_checkpoint, latest_checkpoint

    reported = ray.train.get_checkpoint()
    if reported is not None:
        with reported.as_directory() as folder:
            return install_checkpoint(folder, run_dir)
    if not job.resume:
        if rank == 0:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return 0
    folder = latest_checkpoint(Path(job.run_dir))
    if folder is None:
        raise FileNotFoundError(f"{job.run_dir}: no checkpoint to resume from")
    return install_checkpoint(folder, run_dir) if rank else checkpoint_step(folder)


def _tracker(job: WorkerJob, start: int):
    """Rank 0's MLflow tracker: the run an earlier attempt of this run made, continued, or a
    new one."""
    spec = job.tracker
    if spec is None:
        return None
    from dloral.train.tracking import continued_tracker

    return continued_tracker(
        spec["experiment"],
        spec["uri"],
        key=spec["key"],
        tags=spec.get("tags"),
        parent_run_id=spec.get("parent"),
        restored_from=start,
        driver_ends=job.reports == "validation",  # a sweep trial's: the driver ends it
    )


def _send(payload: dict[str, Any], saved: Path | None) -> None:
    """ray.train.report from every rank (it is a barrier); rank 0 hands over the checkpoint,
    which Ray copies to the run's storage and gives back to a restarted group."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(saved)) if saved is not None else None
    ray.train.report(
        payload,
        checkpoint=checkpoint,
        checkpoint_dir_name=saved.name if saved is not None else None,
        delete_local_checkpoint_after_upload=False,  # the run folder keeps its checkpoints
    )


# ----- the driver -------------------------------------------------------------------------
def trainer(
    job: WorkerJob,
    workers: int,
    *,
    cpu: float,
    gpu: float,
    storage: str,
    name: str,
    max_failures: int,
    keep: int,
    callbacks: list | None = None,
):
    """A TorchTrainer of `workers` workers running `job`, each with `cpu` CPUs and `gpu` GPUs;
    Ray Train picks the process group's backend (nccl with GPUs, else gloo)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    return TorchTrainer(
        run_worker,
        train_loop_config=asdict(job),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpu > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
            callbacks=callbacks,
        ),
    )


def check_cluster(workers: int, cpu: float, gpu: float) -> None:
    """Fail at once, not after a wait for resources that never come: the cluster must hold
    `workers` x (cpu, gpu)."""
    import ray

    have = ray.cluster_resources()
    for kind, each in (("CPU", cpu), ("GPU", gpu)):
        need = workers * each
        if need > have.get(kind, 0) + 1e-9:
            raise ClusterTooSmall(
                f"run.workers = {workers} needs {need:g} {kind}s ({each:g} per worker); the Ray "
                f"cluster has {have.get(kind, 0):g}"
            )


# ----- a sweep trial of several workers ------------------------------------------------------
def run_trial_on_workers(config: dict[str, Any], spec: SweepSpec) -> None:
    """Tune function trainable of the trials when run.workers > 1: it starts the trial's Ray
    Train run and waits for it. The workers report to Tune through TuneReportCallback (rank
    0's metrics, the checkpoint's path); a retried trial continues the same Train run, from
    its last checkpoint in the sweep storage."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dloral.sweep.spec import experiment_from_spec
    from dloral.sweep.trial import trial_config, trial_scratch, trial_tags

    exp = experiment_from_spec(spec)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    cfg = trial_config(exp, trial_id, config, spec)
    tracker = None
    if spec.tracking_uri:
        from dloral.tracking import PARENT_TAG, TRIAL_TAG

        tracker = {
            "experiment": exp.sweep.mlflow_experiment,
            "uri": spec.tracking_uri,
            "key": {PARENT_TAG: spec.parent_run_id, TRIAL_TAG: trial_id},
            "tags": trial_tags(spec, exp, cfg),
            "parent": spec.parent_run_id,
        }
    job = WorkerJob(
        config=cfg.to_dict(),
        run_dir=str(trial_scratch(spec.sweep_id, trial_id)),  # on rank 0's node
        scratch=True,
        scratch_tag=spec.sweep_id,
        threads=max(1, int(spec.threads)),
        tracker=tracker,
        reports="validation",
        trial_id=trial_id,
        chaos=asdict(exp.sweep.chaos),
    )
    s = exp.sweep
    trainer(
        job,
        cfg.run.workers,
        cpu=s.resources.cpu,
        gpu=s.resources.gpu,
        storage=f"{spec.sweep_dir.rstrip('/')}/{trial_id}",  # a folder or a URI
        name="train",
        max_failures=s.max_failures,
        keep=s.keep_checkpoints,
        callbacks=[TuneReportCallback()],
    ).fit()
