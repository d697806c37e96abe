"""The sweep's typed record: what the runner writes is what the report reads back."""

import json

import pytest

from dloral.trials import ArmBest, RecordError, SweepSpec, SweepSummary, TrialRow


def _row(trial_id: str, status: str, psnr: float) -> TrialRow:
    return TrialRow(
        trial_id=trial_id,
        values={"model.cfr.variant": "full", "run.seed": 1},
        status=status,
        step=4,
        metrics={"val/psnr": psnr, "val/ssim": 0.5},
        checkpoint=f"/sweeps/s/{trial_id}/checkpoint_000001",
        mlflow_run_id="a" * 32,
        train_time_s=3.5,
    )


def test_summary_round_trips_through_json_and_tables_one_row_per_trial():
    rows = [_row("t1", "finished", 21.0), _row("t2", "stopped", 20.5)]
    summary = SweepSummary(
        "/sweeps/s",
        "finished",
        12.0,
        rows,
        [ArmBest(arm="variant=full", rank=1, trial=rows[0], eval={"psnr": 22.0})],
    )
    text = json.dumps(summary.to_dict())
    back = SweepSummary.from_dict(json.loads(text), "summary.json")
    assert back == summary
    table = back.table()
    assert list(table["trial_id"]) == ["t1", "t2"]
    assert list(table["val/psnr"]) == [21.0, 20.5]
    assert list(table["model.cfr.variant"]) == ["full", "full"]
    assert list(table["status"]) == ["finished", "stopped"]


def test_spec_keeps_mlflow_ids_only_when_tracking():
    spec = SweepSpec(
        path="experiments/default.toml",
        sweep={"metric": "val/psnr"},
        base={},
        keys=["run.seed"],
        dims=[["run.seed", "grid", [1, 2]]],
        sweep_id="default-1",
        sweep_dir="/sweeps/default-1",
        threads=1,
        metric="val/psnr",
        mlflow_experiment="dloral-sweeps",
        tracking_uri=None,
        created="2026-11-29T21:00:00",
        status="running",
    )
    assert "parent_run_id" not in spec.to_dict()
    spec.parent_run_id = "b" * 32
    assert SweepSpec.from_dict(spec.to_dict(), "sweep.json") == spec


def test_bad_records_name_the_file_and_the_trial():
    with pytest.raises(RecordError, match="summary.json: no 'trials' list"):
        SweepSummary.from_dict({"status": "finished"}, "summary.json")
    with pytest.raises(RecordError, match="summary.json: trial 1 has no trial_id"):
        SweepSummary.from_dict({"trials": [{"trial_id": "t1"}, {"status": "x"}]}, "summary.json")
    with pytest.raises(RecordError, match="sweep.json: .*'sweep_id'"):
        SweepSpec.from_dict({"path": "x"}, "sweep.json")
