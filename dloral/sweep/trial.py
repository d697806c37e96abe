"""The Tune trainable: one trial = one run of the training recipe, nothing more.

It builds the trial's config, continues from Tune's checkpoint when the trial is retried, and
reports the validation metrics with the checkpoint saved at that step. MLflow logging is the
recipe's own tracker, nested under the sweep's parent run and tagged with the trial id, so a
retried trial continues the same MLflow run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from dloral.tracking import SWEEP_TAG, TRIAL_TAG
from dloral.trials import SweepSpec


def trial_run_name(trial_id: str, values: dict[str, Any]) -> str:
    """Readable MLflow run name: the trial id and its searched values by their last key part."""
    parts = []
    for key, value in values.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key.rsplit('.', 1)[-1]}={text}")
    return f"{trial_id} " + ",".join(parts)


def find_trial_run(client, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow run of a trial (made by an earlier attempt), if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
        ),
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def run_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """Tune function trainable. `config`: the trial's searched values by dotted key; `spec`:
    what the driver resolved (experiment, tracking URI, parent run, threads)."""
    import torch
    from ray import tune

    from dloral.sweep.spec import experiment_from_spec
    from dloral.train.recipe import install_checkpoint, train
    from dloral.train.tracking import MlflowTracker

    exp = experiment_from_spec(spec)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    values = {k: config[k] for k in spec.keys}
    cfg = exp.train_config(values)
    cfg.run.name = trial_run_name(trial_id, values)
    cfg.run.mlflow_experiment = exp.sweep.mlflow_experiment
    torch.set_num_threads(max(1, int(spec.threads)))

    # scratch on this node (checkpoints are copied to the sweep storage when reported)
    run_dir = Path(context.get_trial_dir()) / "run"
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = install_checkpoint(folder, run_dir)

    tracker = None
    if spec.tracking_uri:
        from dloral.tracking import mlflow_client

        client = mlflow_client(spec.tracking_uri)
        earlier = find_trial_run(client, spec.experiment_id, spec.parent_run_id, trial_id)
        tracker = MlflowTracker(
            exp.sweep.mlflow_experiment,
            spec.tracking_uri,
            parent_run_id=spec.parent_run_id,
            tags={
                SWEEP_TAG: spec.sweep_id,
                "dloral.family": exp.sweep.family,
                TRIAL_TAG: trial_id,
                "dloral.stage_schedule": _schedule_tag(cfg),
                **({"dloral.restored_from_step": str(start)} if start else {}),
            },
            run_id=earlier,
        )
        if earlier is not None:
            client.set_tag(earlier, "dloral.restored_from_step", str(start))
            client.set_tag(earlier, "dloral.attempts", str(_attempts(client, earlier) + 1))

    chaos = exp.sweep.chaos
    t0 = time.perf_counter()

    last: list = []

    def to_tune(step: int, metrics: dict[str, float], saved: Path | None) -> None:
        payload = {f"val/{k}": float(v) for k, v in metrics.items()}
        payload |= {"step": step, "train_time_s": time.perf_counter() - t0}
        if tracker is not None:
            payload["mlflow_run_id"] = tracker.run_id
        ckpt = tune.Checkpoint.from_directory(str(saved)) if saved is not None else None
        # When Tune stops the trial (ASHA), this raises SystemExit in here; the driver then
        # ends the trial's MLflow run.
        tune.report(payload, checkpoint=ckpt)

    def report(step: int, metrics: dict[str, float], saved: Path | None) -> None:
        if step == cfg.run.max_steps:  # reported after the recipe has closed its run
            last[:] = [step, metrics, saved]
            return
        to_tune(step, metrics, saved)
        if chaos.crash_once_at_step and step == chaos.crash_once_at_step and start < step:
            raise RuntimeError(f"chaos drill: trial {trial_id} crashes once at step {step}")
        if chaos.kill_once_at_step and step == chaos.kill_once_at_step and start < step:
            os._exit(17)  # as if the process were killed: no clean-up runs

    train(cfg, run_dir, resume=start > 0, tracker=tracker, on_validation=report)
    if last:
        to_tune(*last)


def _attempts(client, run_id: str) -> int:
    return int(client.get_run(run_id).data.tags.get("dloral.attempts", "1"))


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
