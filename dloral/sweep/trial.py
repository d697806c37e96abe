"""The Tune trainable: one trial = one run of the training recipe, nothing more.

It builds the trial's config, continues from Tune's checkpoint when the trial is retried, and
reports the validation metrics with the checkpoint saved at that step. MLflow logging is the
recipe's own tracker, nested under the sweep's parent run and tagged with the trial id, so a
retried trial continues the same MLflow run.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from dloral.tracking import PARENT_TAG, SWEEP_TAG, TRIAL_TAG
from dloral.trials import SweepSpec


def trial_run_name(trial_id: str, values: dict[str, Any]) -> str:
    """Readable MLflow run name: the trial id and its searched values by their last key part."""
    parts = []
    for key, value in values.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key.rsplit('.', 1)[-1]}={text}")
    return f"{trial_id} " + ",".join(parts)


def run_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """Tune function trainable. `config`: the trial's searched values by dotted key; `spec`:
    what the driver resolved (experiment, tracking URI, parent run, threads)."""
    import torch
    from ray import tune

    from dloral.sweep.spec import experiment_from_spec
    from dloral.train.recipe import install_checkpoint, train

    exp = experiment_from_spec(spec)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    cfg = trial_config(exp, trial_id, config, spec)
    torch.set_num_threads(max(1, int(spec.threads)))

    run_dir = trial_scratch(spec.sweep_id, trial_id)
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier attempt's: Tune's checkpoint counts
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = install_checkpoint(folder, run_dir)

    tracker = None
    if spec.tracking_uri:
        tracker = trial_tracker(spec, exp, cfg, trial_id, start)

    def send(payload: dict, saved: Path | None) -> None:
        ckpt = tune.Checkpoint.from_directory(str(saved)) if saved is not None else None
        # When Tune stops the trial (ASHA), this raises SystemExit in here; the driver then
        # ends the trial's MLflow run.
        tune.report(payload, checkpoint=ckpt)

    reports = TrialReports(send, cfg, exp.sweep.chaos, start, trial_id, tracker)
    try:
        train(cfg, run_dir, resume=start > 0, tracker=tracker, on_validation=reports)
        reports.flush()
    finally:  # also when the trial fails or is stopped: what it reported is in the storage
        shutil.rmtree(run_dir, ignore_errors=True)


def remove_sweep_scratch(sweep_id: str) -> None:
    """This node's scratch folders of a sweep, once its trials are gone (the driver, after a
    local Ray is shut down): a stopped trial's process can end before its own clean-up runs.
    What a resume continues from is Tune's checkpoint in the storage, never the scratch."""
    for folder in trial_scratch(sweep_id, "*").parent.glob(f"{glob.escape(sweep_id)}.*"):
        shutil.rmtree(folder, ignore_errors=True)


def trial_scratch(sweep_id: str, trial_id: str) -> Path:
    """A trial's run folder on the node it runs on, emptied for each attempt: Tune's checkpoint
    is what an attempt continues from. It lies outside Tune's trial folder, which Tune copies to
    the sweep storage: a checkpoint reaches the storage once, as the checkpoint reported with
    it, and no half-written file is caught in a copy. `$DLORAL_SCRATCH` or the system's
    temporary folder. One level, `<sweep>.<trial>`: removing it leaves no folder that a trial
    starting beside it would have to create again."""
    root = Path(os.environ.get("DLORAL_SCRATCH") or tempfile.gettempdir())
    return root / "dloral-trials" / f"{sweep_id}.{trial_id}"


def trial_config(exp, trial_id: str, config: dict[str, Any], spec: SweepSpec):
    """The training config of one trial: the experiment's with the trial's searched values, its
    MLflow run named after the trial, in the sweep's MLflow experiment."""
    values = {k: config[k] for k in spec.keys}
    cfg = exp.train_config(values)
    cfg.run.name = trial_run_name(trial_id, values)
    cfg.run.mlflow_experiment = exp.sweep.mlflow_experiment
    return cfg


def trial_tracker(spec: SweepSpec, exp, cfg, trial_id: str, start: int):
    """The trial's MLflow run, nested under the sweep's parent; an earlier attempt's is
    continued (found by parent and trial id). The trial does not end it FINISHED: the driver
    does, once Tune has recorded the trial's end (MlflowTracker.finish)."""
    from dloral.train.tracking import continued_tracker

    return continued_tracker(
        exp.sweep.mlflow_experiment,
        spec.tracking_uri,
        key={PARENT_TAG: spec.parent_run_id, TRIAL_TAG: trial_id},
        tags=trial_tags(spec, exp, cfg),
        parent_run_id=spec.parent_run_id,
        restored_from=start,
        driver_ends=True,
    )


class TrialReports:
    """The recipe's on_validation hook of a trial: each validation is sent to Tune (val metrics,
    step, training time, MLflow run id) with the checkpoint saved at that step. The last one is
    held back until the recipe has ended, its final checkpoint logged to MLflow (`flush`;
    Tune may end the trial at that report, and its driver then ends the MLflow run FINISHED),
    and the [sweep.chaos] drills fire right after their step's report (only where `drills` is
    set)."""

    def __init__(self, send, cfg, chaos, start: int, trial_id: str, tracker, drills=True):
        self.send, self.cfg, self.chaos, self.drills = send, cfg, chaos, drills
        self.start, self.trial_id, self.tracker = start, trial_id, tracker
        self.t0 = time.perf_counter()
        self.last: tuple | None = None

    def __call__(self, step: int, metrics: dict[str, float], saved: Path | None) -> None:
        if step == self.cfg.run.max_steps:  # reported after the recipe has ended
            self.last = (step, metrics, saved)
            return
        self._send(step, metrics, saved)
        chaos, start = self.chaos, self.start
        if not self.drills:
            return
        if chaos.crash_once_at_step and step == chaos.crash_once_at_step and start < step:
            raise RuntimeError(f"chaos drill: trial {self.trial_id} crashes once at step {step}")
        if chaos.kill_once_at_step and step == chaos.kill_once_at_step and start < step:
            os._exit(17)  # as if the process were killed: no clean-up runs

    def flush(self) -> None:
        if self.last is not None:
            self._send(*self.last)

    def _send(self, step: int, metrics: dict[str, float], saved: Path | None) -> None:
        payload = {f"val/{k}": float(v) for k, v in metrics.items()}
        payload |= {"step": step, "train_time_s": time.perf_counter() - self.t0}
        if self.tracker is not None:
            payload["mlflow_run_id"] = self.tracker.run_id
        self.send(payload, saved)


def trial_tags(spec: SweepSpec, exp, cfg) -> dict[str, str]:
    """The tags of a trial's MLflow run, beside its parent and trial id."""
    return {
        SWEEP_TAG: spec.sweep_id,
        "dloral.family": exp.sweep.family,
        "dloral.stage_schedule": _schedule_tag(cfg),
    }


def _schedule_tag(cfg) -> str:
    """The stage schedule in one line, e.g. 'periodic P=50 from consistency, T=10'."""
    s = cfg.schedule
    if s.kind == "periodic":
        return (
            f"periodic P={s.alternation_period} from {s.first_stage}, "
            f"transition {s.transition_steps}"
        )
    from dloral.train.schedule import switches

    return "reference " + " ".join(f"{st}@{step}" for step, st in switches(s, cfg.run.max_steps))
