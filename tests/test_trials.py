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


def _seeded(trial_id: str, variant: str, seed: int, psnr: float, status="finished") -> TrialRow:
    row = _row(trial_id, status, psnr)
    row.values = {"model.cfr.variant": variant, "run.seed": seed}
    return row


def test_arm_pairs_are_judged_against_the_spread_of_their_seeds():
    from dloral.sweep.runner import arm_comparisons
    from dloral.sweep.spec import load_experiment
    from dloral.trials import BEYOND, UNDECIDED, WITHIN

    exp = load_experiment("default", ['sweep.space.model.cfr.variant=["full", "no_gate", "off"]'])
    assert exp.arms == ["model.cfr.variant"]
    rows = [
        _seeded("a1", "full", 1, 24.0),
        _seeded("a2", "full", 2, 24.4),  # range 0.4, mean 24.2
        _seeded("b1", "off", 1, 23.5),
        _seeded("b2", "off", 2, 23.7),  # range 0.2, mean 23.6: 0.6 apart > 0.4: beyond
        _seeded("c1", "no_gate", 1, 24.1),
        _seeded("c2", "no_gate", 2, 23.3),  # range 0.8: vs full 0.5 apart < 0.8: within
        _seeded("c3", "no_gate", 3, 30.0, status="stopped"),  # not run to the end: left out
    ]
    got = {(c["a"], c["b"]): c for c in arm_comparisons(rows, exp)}
    assert list(got) == [
        ("variant=full", "variant=no_gate"),
        ("variant=full", "variant=off"),
        ("variant=no_gate", "variant=off"),
    ]
    full_off = got[("variant=full", "variant=off")]
    assert full_off["verdict"] == BEYOND and full_off["seeds_a"] == full_off["seeds_b"] == 2
    assert full_off["diff"] == pytest.approx(0.6) and full_off["spread"] == pytest.approx(0.4)
    full_ng = got[("variant=full", "variant=no_gate")]
    assert full_ng["verdict"] == WITHIN and full_ng["spread"] == pytest.approx(0.8)
    assert full_ng["seeds_b"] == 2  # the stopped trial is not a seed of its arm's spread
    # one seed has no spread: the pair is undecided, not "beyond"
    one = arm_comparisons(rows[:3], exp)
    assert [c["verdict"] for c in one] == [UNDECIDED] and one[0]["spread"] is None
    # the comparisons travel in summary.json, with the rule that made them
    summary = SweepSummary("/s", "finished", 1.0, rows, [], list(got.values()))
    data = json.loads(json.dumps(summary.to_dict()))
    assert "max(range(A), range(B))" in data["noise_rule"]
    assert SweepSummary.from_dict(data, "summary.json").comparisons == list(got.values())


def test_the_sweep_table_says_which_differences_are_beyond_seed_noise(capsys, monkeypatch):
    from dloral import cli
    from dloral.cli import _print_comparisons
    from dloral.trials import compare_arms

    monkeypatch.setattr(cli.console, "width", 160)
    _print_comparisons(
        compare_arms({"variant=full": [24.0, 24.4], "variant=off": [23.5, 23.7]}, "val/psnr")
        + compare_arms({"variant=a": [1.0, 2.0], "variant=b": [1.5, 1.6]}, "val/psnr")
    )
    out = " ".join(capsys.readouterr().err.split())
    assert "beyond seed noise" in out and "within seed noise" in out
    assert "+0.6000" in out and "rule: arms A and B" in out


def test_the_sweep_report_shows_each_pair_of_arms_with_its_verdict(tmp_path):
    from dloral.report import build, sources
    from dloral.sweep.runner import arm_comparisons
    from dloral.sweep.spec import load_experiment

    exp = load_experiment("default")
    rows = [
        _seeded("a1", "full", 1, 24.0),
        _seeded("a2", "full", 2, 24.4),
        _seeded("b1", "off", 1, 23.5),
        _seeded("b2", "off", 2, 23.7),
    ]
    summary = SweepSummary(str(tmp_path / "s"), "finished", 9.0, rows, [], [])
    summary.comparisons = arm_comparisons(rows, exp)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "summary.json").write_text(json.dumps(summary.to_dict()))

    sweep = sources.load_sweep(tmp_path / "s", history=False)
    md = build.build_report(tmp_path / "report", sweeps=[sweep]).markdown.read_text()
    section = md[md.index("## Arm vs arm") :]
    row = next(line for line in section.splitlines() if line.startswith("| variant=full |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == [
        "variant=full",
        "variant=off",
        "24.2000 (2)",
        "23.6000 (2)",
        "+0.6000",
        "0.4000",
        "beyond seed noise",
    ]
    assert "max(range(A), range(B))" in section  # the rule that made the verdict


def test_an_arm_asha_stopped_entirely_is_not_compared_and_shows_no_nan(capsys, monkeypatch):
    """Values are compared at the end only; an arm with no trial that ran to the end has no
    mean. Its comparison says so (it printed `nan (0)` and wrote NaN, which is not JSON)."""
    from dloral import cli
    from dloral.sweep.runner import arm_comparisons
    from dloral.sweep.spec import load_experiment
    from dloral.trials import NOT_COMPARED

    exp = load_experiment("default")
    rows = [
        _seeded("a1", "full", 1, 24.0),
        _seeded("a2", "full", 2, 24.4),
        _seeded("b1", "off", 1, 23.5, status="stopped"),
        _seeded("b2", "off", 2, 23.7, status="stopped"),
    ]
    (c,) = arm_comparisons(rows, exp)
    assert (c["mean_a"], c["seeds_a"], c["mean_b"], c["seeds_b"]) == (
        pytest.approx(24.2),
        2,
        None,
        0,
    )
    assert c["diff"] is None and c["spread"] is None and c["verdict"] == NOT_COMPARED
    summary = SweepSummary("/s", "finished", 1.0, rows, [], [c])
    text = json.dumps(summary.to_dict(), allow_nan=False)  # strict JSON
    assert SweepSummary.from_dict(json.loads(text), "summary.json").comparisons == [c]
    monkeypatch.setattr(cli.console, "width", 200)
    cli._print_comparisons([c])
    out = " ".join(capsys.readouterr().err.split())
    assert "24.2000 (2)" in out and "- (0)" in out and "nan" not in out.lower()
    assert "no trial that ran to the end" in out


def test_a_sweep_from_before_driver_runs_were_recorded_keeps_its_time_and_trials(tmp_path):
    """Resumed, a sweep.json without `invocations` gets one entry for the runs before them
    (the old summary's wall time, the status they left); the report says so and counts the
    resumes it knows. A driver run that got no trials from Tune (it failed or stopped first)
    keeps the trials summary.json had, so a later --resume knows they ran."""
    from dloral.report.build import _invocation_text, _sweep_command
    from dloral.sweep.runner import SweepResult, _begin_invocation, _finish_records

    folder = tmp_path / "old-20250101-000000"
    folder.mkdir()
    rows = [_row("a", "finished", 24.0), _row("b", "unfinished", 23.0)]
    old = SweepSummary(str(folder), "interrupted", 1000.0, rows, [], [])
    (folder / "summary.json").write_text(json.dumps(old.to_dict()))
    spec = SweepSpec.from_dict(
        {**_spec_dict(folder), "status": "interrupted"}, "sweep.json"
    )  # as written before invocations existed: no such key
    _begin_invocation(spec, True)
    earlier, this = spec.invocations
    assert earlier == {"recorded": False, "wall_s": 1000.0, "ended": "interrupted"}
    assert this["resume"] is True and "ended" not in this
    result = SweepResult(str(folder), "failed")  # e.g. Tune had no state to resume
    _finish_records(spec, result, t_start=0.0)
    summary = json.loads((folder / "summary.json").read_text())
    assert [t["trial_id"] for t in summary["trials"]] == ["a", "b"]
    assert summary["status"] == "failed" and summary["wall_s"] > 1000.0
    assert _sweep_command(spec).startswith("(earlier runs not recorded) `")
    assert ", then resumed" not in _sweep_command(spec)
    assert "the last of them took 1000 s and left the sweep interrupted" in _invocation_text(
        earlier
    )
    spec.invocations.append({"command_line": "dloral-exp sweep x --resume", "resume": True})
    assert _sweep_command(spec).endswith(", then resumed once with `--resume`")
    assert "no end recorded (the driver was killed, or is still running)" in _invocation_text(
        spec.invocations[-1]
    )


def _spec_dict(folder) -> dict:
    """A sweep.json's fields as dloral wrote them before it recorded driver runs."""
    return {
        "path": "experiments/default.toml",
        "sweep": {"metric": "val/psnr"},
        "base": {},
        "keys": ["run.seed"],
        "dims": [["run.seed", "grid", [1, 2]]],
        "sweep_id": folder.name,
        "sweep_dir": str(folder),
        "threads": 1,
        "metric": "val/psnr",
        "mlflow_experiment": "dloral-sweeps",
        "tracking_uri": None,
        "created": "2025-01-01T00:00:00",
        "status": "running",
    }
