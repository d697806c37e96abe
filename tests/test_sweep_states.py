"""Who ends a sweep trial's MLflow run, and with which status: the driver, from Tune's record.

No Ray here: the trial's tracker as the trainable makes it, and the driver's clean-up
(`_close_all`), on a SQLite MLflow store, in the orders a stop can bring them.
"""

from dataclasses import replace

import pytest
from test_sweep import BASE

from dloral.sweep.distributed import WorkerJob, _tracker
from dloral.sweep.runner import Tracking, _close_all
from dloral.sweep.spec import load_experiment
from dloral.sweep.trial import trial_config, trial_tracker
from dloral.trials import SweepSpec, TrialRow

TRIAL = "t0000_00000"


@pytest.fixture
def trial(tmp_path):
    """A one-trial sweep's parent run, and the trial's tracker started on its run folder."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "exp.toml"
    text = BASE.format(root=tmp_path / "data", storage=tmp_path / "sweeps")
    path.write_text(text + '\n[sweep.space]\n"run.seed" = [1]\n')
    exp = load_experiment(path)
    tracking = Tracking(uri, exp.sweep.mlflow_experiment)
    parent = tracking.start_parent(exp, exp.train_config({}), "s", str(tmp_path / "sweeps"))
    spec = SweepSpec(
        path=str(path),
        sweep={},
        base={},
        keys=["run.seed"],
        dims=[],
        sweep_id="s",
        sweep_dir=str(tmp_path / "sweeps"),
        threads=1,
        metric="val/psnr",
        mlflow_experiment=exp.sweep.mlflow_experiment,
        tracking_uri=uri,
        created="",
        status="running",
        parent_run_id=parent,
    )
    cfg = trial_config(exp, TRIAL, {"run.seed": 1}, spec)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(cfg.to_toml_str())

    def start(step: int):
        tracker = trial_tracker(spec, exp, cfg, TRIAL, step)
        tracker.start(cfg, run_dir, resume=step > 0, info={})
        return tracker

    return tracking, parent, start


@pytest.mark.parametrize("trial_ends_first", [True, False], ids=["trial-first", "driver-first"])
def test_a_trial_ending_after_the_driver_stopped_is_killed_then_finished_on_resume(
    trial, trial_ends_first
):
    """Ctrl-C to the driver alone: Tune's graceful stop lets a trial run on for seconds, and it
    can reach its end there, its last result never recorded: summary.json says unfinished, and
    --resume runs it again from its last recorded checkpoint. Its MLflow run says the same,
    KILLED, whether the trial ends before or after the driver closes the runs (it said
    FINISHED); the resume continues that run, which ends FINISHED once Tune has the end."""
    tracking, parent, start = trial
    tracker = start(0)
    row = TrialRow(TRIAL, {"run.seed": 1}, "unfinished", 8, {}, None, tracker.run_id)
    if trial_ends_first:
        tracker.finish("FINISHED")  # the recipe's end, in Tune's graceful window
        _close_all(tracking, parent, [row])
    else:
        _close_all(tracking, parent, [row])
        tracker.finish("FINISHED")
    run = tracking.client.get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert "--resume" in run.data.tags["dloral.status_reason"]

    again = start(8)  # --resume: Tune restarts the trial from its step-8 checkpoint
    assert again.run_id == tracker.run_id
    run = tracking.client.get_run(again.run_id)
    assert run.info.status == "RUNNING" and "dloral.status_reason" not in run.data.tags
    assert run.data.tags["dloral.restored_from_step"] == "8"  # steps after 8 run again: said
    again.finish("FINISHED")
    assert tracking.client.get_run(again.run_id).info.status == "RUNNING"  # the driver's to end
    _close_all(tracking, parent, [replace(row, status="finished", step=12)])
    run = tracking.client.get_run(again.run_id)
    assert run.info.status == "FINISHED" and "dloral.status_reason" not in run.data.tags


def test_only_a_sweep_trials_workers_leave_finished_to_the_driver(tmp_path):
    """A sweep trial of several workers (reports at validations) leaves FINISHED to the driver
    too; `train --workers` (reports at checkpoints) ends its own run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {"experiment": "e", "uri": uri, "key": {"dloral.trial_id": TRIAL}}
    job = {"config": {}, "run_dir": str(tmp_path), "tracker": spec}
    assert _tracker(WorkerJob(**job, reports="validation"), 0).driver_ends is True
    assert _tracker(WorkerJob(**job, reports="checkpoint"), 0).driver_ends is False


def test_a_sweep_trial_still_ends_its_own_run_failed(trial):
    """FINISHED and KILLED wait for the driver: a failure's reason is the trial's to give."""
    tracking, _, start = trial
    tracker = start(0)
    # a stop's reason from the recipe would name the trial's scratch folder as --resume's
    tracker.finish("KILLED", "stopped by SIGINT; resume with --resume /tmp/dloral-trials/s.t")
    run = tracking.client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING" and "dloral.status_reason" not in run.data.tags
    tracker.finish("FAILED", "RuntimeError: boom")
    run = tracking.client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags["dloral.status_reason"].endswith("boom")


def test_the_drivers_end_stands_against_a_late_failure_and_an_earlier_attempts(trial):
    """A trial process still alive after the driver ended its run (Tune waits seconds for it)
    fails: the driver's KILLED stands. A trial whose attempt failed and that Tune retries on
    --resume (summary.json: unfinished) is KILLED, not left FAILED."""
    tracking, parent, start = trial
    tracker = start(0)
    row = TrialRow(TRIAL, {"run.seed": 1}, "unfinished", 8, {}, None, tracker.run_id)
    _close_all(tracking, parent, [row])
    tracker.finish("FAILED", "RuntimeError: stopped by Ray")
    run = tracking.client.get_run(tracker.run_id)
    assert run.info.status == "KILLED" and "--resume" in run.data.tags["dloral.status_reason"]

    again = start(8)  # the resume's attempt fails; Tune will retry it
    again.finish("FAILED", "RuntimeError: boom")
    assert tracking.client.get_run(again.run_id).info.status == "FAILED"
    _close_all(tracking, parent, [row])  # the driver stopped before the retry ran
    run = tracking.client.get_run(again.run_id)
    assert run.info.status == "KILLED" and "--resume" in run.data.tags["dloral.status_reason"]
