"""Sweep definitions: every key and value checked before Ray starts."""

import pytest

from dloral.sweep.spec import SweepError, available_experiments, load_experiment
from dloral.train.config import load_config


def test_shipped_experiments_load_and_name_their_families():
    names = available_experiments()
    assert {"default", "alternation", "loss_weights", "cfr_variants"} <= set(names)
    for name in names:
        exp = load_experiment(name)
        assert exp.dims and exp.sweep.family
        # every grid value makes a valid training config
        grid = {d.key: d.args for d in exp.dims if d.is_grid}
        for key, values in grid.items():
            for v in values:
                cfg = exp.train_config({key: v})
                assert cfg.run.checkpoint_every == cfg.run.validate_every


def test_training_reads_an_experiment_file_without_its_sweep_table():
    cfg = load_config(None)
    assert cfg.model.profile == "tiny"  # [sweep] is skipped, not an unknown key


def test_unknown_experiment_lists_the_available_ones():
    with pytest.raises(SweepError, match="unknown experiment 'nope'.*alternation.*cfr_variants"):
        load_experiment("nope")


def test_a_training_config_without_sweep_table_is_refused(tmp_path):
    with pytest.raises(SweepError, match=r"has no \[sweep\] table"):
        load_experiment("reference")


def _write(tmp_path, text):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_unknown_space_key_names_the_valid_keys(tmp_path):
    path = _write(tmp_path, '[sweep.space]\n"model.cfr.varient" = ["full"]\n')
    with pytest.raises(SweepError, match=r"sweep.space.model.cfr.varient.*valid under model.cfr"):
        load_experiment(path)


def test_bad_space_values_are_rejected_with_the_value(tmp_path):
    path = _write(tmp_path, '[sweep.space]\n"model.cfr.variant" = ["full", "sideways"]\n')
    with pytest.raises(SweepError, match="'sideways'"):
        load_experiment(path)
    path = _write(tmp_path, '[sweep.space]\n"loss.weights.lpips" = { loguniform = [0, 2] }\n')
    with pytest.raises(SweepError, match="0 < lo < hi"):
        load_experiment(path)
    path = _write(tmp_path, '[sweep.space]\n"loss.weights.lpips" = { gaussian = [0, 2] }\n')
    with pytest.raises(SweepError, match="unknown kind 'gaussian'"):
        load_experiment(path)


def test_unknown_sweep_key_and_wrong_metric_direction(tmp_path):
    with pytest.raises(SweepError, match="unknown key.*sweep.shceduler"):
        load_experiment(
            _write(tmp_path, '[sweep]\nshceduler = "asha"\n[sweep.space]\n"run.seed"=[1]')
        )
    text = '[sweep]\nmetric = "val/temporal_change"\nmode = "max"\n[sweep.space]\n"run.seed"=[1]'
    with pytest.raises(SweepError, match="must be 'min' for val/temporal_change"):
        load_experiment(_write(tmp_path, text))


def test_overrides_reach_training_and_sweep_keys():
    exp = load_experiment(
        "default",
        [
            "optim.lr=3e-4",
            "sweep.scheduler=fifo",
            "sweep.space.run.seed=[3, 4, 5]",
            "sweep.evaluate.top=2",
        ],
    )
    assert exp.sweep.scheduler == "fifo" and exp.sweep.evaluate.top == 2
    assert exp.train_config({}).optim.lr == 3e-4
    assert {d.key: d.args for d in exp.dims}["run.seed"] == [3, 4, 5]
    assert "run.seed" not in exp.arms  # seeds spread an arm, they are not one
    with pytest.raises(SweepError, match="unknown key sweep.bogus"):
        load_experiment("default", ["sweep.bogus=1"])
    with pytest.raises(SweepError, match="unknown key optim.lrr"):
        load_experiment("default", ["optim.lrr=1"])


def test_asha_grace_period_must_cover_a_validation(tmp_path):
    text = (
        '[run]\nvalidate_every = 50\n[sweep.asha]\ngrace_period = 10\n[sweep.space]\n"run.seed"=[1]'
    )
    with pytest.raises(SweepError, match="grace_period.*validate_every"):
        load_experiment(_write(tmp_path, text))


def test_sampled_kinds_and_nested_space_tables(tmp_path):
    text = (
        "[sweep.space.loss.weights]\n"
        "lpips = { loguniform = [0.5, 4.0] }\n"
        "consistency = { uniform = [1, 20] }\n"
        "[sweep.space.schedule]\nalternation_period = { choice = [10, 20] }\n"
    )
    exp = load_experiment(_write(tmp_path, text))
    kinds = {d.key: d.kind for d in exp.dims}
    assert kinds == {
        "loss.weights.lpips": "loguniform",
        "loss.weights.consistency": "uniform",
        "schedule.alternation_period": "choice",
    }
    assert exp.arms == []  # nothing on a grid: the whole sweep is one arm


def test_sweep_missing_required_lpips_weights_fails_before_ray_starts(tmp_path, monkeypatch):
    import ray

    from dloral.sweep.runner import run_sweep

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DLORAL_VGG16_WEIGHTS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    exp = load_experiment("loss_weights", [f"sweep.storage={tmp_path / 'sweeps'}"])
    with pytest.raises(SweepError, match=r"loss.lpips = 'required'.*vgg16-397923af.pth"):
        run_sweep(exp, tracking=False)
    assert not ray.is_initialized() and not (tmp_path / "sweeps").exists()


def test_run_workers_is_set_for_the_sweep_not_searched(tmp_path):
    base = load_experiment("default", ["run.workers=2"])
    assert base.train_config({}).run.workers == 2
    path = _write(tmp_path, '[sweep]\n[sweep.space]\n"run.workers" = [1, 2]\n')
    with pytest.raises(SweepError, match="run.workers cannot be searched"):
        load_experiment(path)


def test_a_searched_run_length_is_each_trials_own_end(tmp_path):
    """`run.max_steps` as a searched key: a trial that ran its own steps finished; it was not
    'stopped early' against the base config's length (issue: reliability, item 4). Tune's
    trial events and states are given as Tune gives them; the sweeps in tests/test_sweep.py
    run the same callback and status through Ray."""
    import json
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from dloral.sweep.runner import _trial_callback, longest_run, trial_status
    from dloral.trials import SweepSpec

    path = _write(tmp_path, '[run]\nmax_steps = 6\n[sweep.space]\n"run.max_steps" = [2, 4]\n')
    exp = load_experiment(path)
    assert longest_run(exp, exp.train_config({})) == 4  # ASHA's last rung, not the base's 6
    spec = SweepSpec(
        path=str(path), sweep={}, base={}, keys=["run.max_steps"], dims=[],
        sweep_id="s", sweep_dir=str(tmp_path / "s"), threads=1, metric="val/psnr",
        mlflow_experiment="x", tracking_uri=None, created="", status="running",
    )  # fmt: skip
    events = _trial_callback(spec, exp)
    for trial_id, own, step in [("a", 2, 2), ("b", 4, 4), ("c", 4, 2)]:
        trial = SimpleNamespace(
            trial_id=trial_id, config={"run.max_steps": own}, last_result={"step": step}
        )
        events.on_trial_complete(0, [], trial)
        end = (tmp_path / "s" / trial_id / "trial_end.json").read_text()
        expect = "finished" if step == own else "stopped"
        assert json.loads(end) == {"status": expect, "step": step}
        assert trial_status(Trial.TERMINATED, step, own, end) == expect
    # a trial Tune ended because the driver was interrupted has no end record: unfinished
    assert trial_status(Trial.TERMINATED, 2, 4, None) == "unfinished"
    assert trial_status(Trial.PAUSED, 4, 4, None) == "unfinished"
    assert trial_status(Trial.ERROR, 4, 4, None) == "failed"


def test_a_local_ray_start_that_times_out_is_a_sweep_error_saying_what_to_do(monkeypatch):
    import ray

    from dloral.sweep import runner

    def slow_node(**_):  # what ray/_private/node.py raises when its node misses the 30 s
        raise Exception(
            "The current node timed out during startup. This could happen because some of the "
            "raylet failed to startup or the GCS has become overloaded."
        )

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", slow_node)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(runner.SweepError) as err:
        runner.start_ray(None)
    message = str(err.value)
    assert "timed out during startup" in message and "--resume" in message
    assert "ray start --head" in message and "--address" in message

    def broken(**_):
        raise RuntimeError("something else")

    monkeypatch.setattr(ray, "init", broken)
    with pytest.raises(RuntimeError, match="something else"):  # other failures stay as they are
        runner.start_ray(None)


def test_a_sigterm_while_ray_starts_stops_the_sweep_as_ctrl_c(monkeypatch):
    """ray.init installs a handler that turns SIGTERM into sys.exit(15) before dloral's is
    back: that is an interrupt (exit 143, KILLED, resumable), not a failure."""
    import signal

    import ray

    from dloral import signals
    from dloral.sweep import runner

    def terminated(**_):
        raise SystemExit(signal.SIGTERM)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", terminated)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(signals, "_received", [])
    with pytest.raises(KeyboardInterrupt):
        runner.start_ray(None)
    assert signals.exit_code() == 143 and signals.name() == "SIGTERM"


def test_sweeps_started_in_the_same_second_get_a_folder_each(tmp_path):
    from dloral.sweep.runner import _claim_sweep_id

    ids = [_claim_sweep_id(str(tmp_path), "default-20261201-063855") for _ in range(3)]
    assert ids == [
        "default-20261201-063855",
        "default-20261201-063855-2",
        "default-20261201-063855-3",
    ]
    assert all((tmp_path / i).is_dir() for i in ids)


def test_messages_keep_their_closing_quotes(tmp_path):
    from dloral.config import error_text

    assert error_text(KeyError("unknown key 'a.b'")) == "unknown key 'a.b'"
    assert error_text(ValueError("got str 'ten'")) == "got str 'ten'"
    path = tmp_path / "s.toml"
    path.write_text("[sweep]\n[sweep.space]\n'run.max_steps' = ['ten']\n")
    with pytest.raises(SweepError) as err:
        load_experiment(path)
    assert str(err.value).count("'") % 2 == 0, str(err.value)  # every quote closed


def test_rays_resume_hint_is_dropped_and_its_other_warnings_kept(caplog):
    """Ray Tune logs "Resume experiment with: Tuner.restore(...)" at every stop, before
    dloral's message; that call resumes no dloral sweep. Its other warnings stay."""
    import logging

    from dloral.sweep.runner import _drop_ray_resume_hints

    _drop_ray_resume_hints()
    _drop_ray_resume_hints()  # once per process, however often Ray is started
    log = logging.getLogger("ray.tune.tune")
    assert len(log.filters) == 1
    with caplog.at_level(logging.WARNING, logger="ray.tune.tune"):
        log.warning(
            "Experiment has been interrupted, but the most recent state was saved.\n"
            'Resume experiment with: Tuner.restore(path="/s", trainable=...)'
        )
        log.warning("Trials did not complete: [t_00000]")
    assert [r.getMessage() for r in caplog.records] == ["Trials did not complete: [t_00000]"]
    # "Failed to fetch metrics" for trials that never started (summary.json lists them)
    assert logging.getLogger("ray.tune.analysis.experiment_analysis").level == logging.ERROR
