"""Real sweeps on a local Ray: tiny model, real bikes frames, a few steps per trial."""

import json
import math
from pathlib import Path

import pytest

from dloral.atomic import folder_lock
from dloral.sweep.runner import evaluate_best, ray_is_own, run_sweep, start_ray
from dloral.sweep.spec import SweepError, load_experiment
from dloral.sweep.trial import trial_scratch
from dloral.trials import SweepSpec

BASE = """
[model]
profile = "tiny"
[data]
train_root = "{root}/train"
val_root = "{root}/val"
val_clips = 1
val_frames = 2
[data.sampler]
crop = 32
[schedule]
kind = "periodic"
alternation_period = 2
transition_steps = 0
[loss]
lpips = "optional"
[optim]
lr = 1e-3
grad_accum = 1
[run]
max_steps = 4
validate_every = 2
log_every = 1
[sweep]
family = "test"
scheduler = "fifo"
storage = "{storage}"
max_failures = 1
[sweep.evaluate]
frames = 2
"""


@pytest.fixture(scope="module")
def ray_local():
    import ray

    start_ray(None)
    yield
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _experiment(tmp_path, data_roots, space: str, extra: str = "", name="exp"):
    path = tmp_path / f"{name}.toml"
    text = BASE.format(root=data_roots, storage=tmp_path / "sweeps") + extra
    path.write_text(text + "\n[sweep.space]\n" + space)
    return load_experiment(path)


def _runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dloral-sweeps")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_two_trial_sweep_reports_checkpoints_and_an_mlflow_tree(
    ray_local, mlflow_uri, tmp_path, data_roots, monkeypatch
):
    import torch

    from dloral.sweep import evaluate

    exp = _experiment(tmp_path, data_roots, '"model.cfr.variant" = ["full", "off"]\n')
    shown = []
    # the Ray this process started: the best trials are scored here, not in Ray workers, and
    # the driver's torch threads are left as they were
    scored_here = []
    score = evaluate.score_checkpoint
    monkeypatch.setattr(
        evaluate, "score_checkpoint", lambda *a: scored_here.append(a[0]) or score(*a)
    )
    threads = torch.get_num_threads()
    assert ray_is_own()
    result = run_sweep(exp, on_table=lambda best, e: shown.append(best))
    assert len(scored_here) == 2 and torch.get_num_threads() == threads

    assert result.status == "finished"
    assert sorted(t.values["model.cfr.variant"] for t in result.trials) == ["full", "off"]
    for t in result.trials:
        assert t.status == "finished" and t.step == 4
        assert math.isfinite(t.metrics["val/psnr"]) and 0 < t.metrics["val/ssim"] <= 1
        assert (Path(t.checkpoint) / "dloral.safetensors").is_file()  # in the sweep storage
        # the trial trained in a scratch folder outside the storage, removed at its end: each
        # checkpoint is stored once, as the trial reported it
        assert not (Path(result.sweep_dir) / t.trial_id / "run").exists()
        assert not trial_scratch(Path(result.sweep_dir).name, t.trial_id).exists()
    stored = list(Path(result.sweep_dir).rglob("dloral.safetensors"))
    assert len(stored) >= 2 and all(p.parent.name.startswith("checkpoint_") for p in stored)
    # best per arm, scored on the validation set
    assert shown and sorted(b["arm"] for b in result.best) == ["variant=full", "variant=off"]
    for b in result.best:
        assert math.isfinite(b["eval"]["psnr"]) and b["eval"]["s_per_frame"] > 0
        assert b["eval"]["frames"] == 2
    # as Ray tasks (a cluster's driver: the trials' resources), the same scores
    monkeypatch.setattr(evaluate, "score_checkpoint", score)
    spec = SweepSpec.from_dict(
        json.loads((Path(result.sweep_dir) / "sweep.json").read_text()), "sweep.json"
    )
    remote = [{"trial": b["trial"]} for b in result.best[:1]]
    evaluate_best(remote, exp, spec, in_process=False)
    assert remote[0]["eval"]["psnr"] == pytest.approx(result.best[0]["eval"]["psnr"], abs=1e-4)
    assert remote[0]["eval"]["frames"] == 2
    summary = json.loads((Path(result.sweep_dir) / "summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["trials"]) == 2
    assert json.loads((Path(result.sweep_dir) / "sweep.json").read_text())["status"] == "finished"

    client, parents, children = _runs(mlflow_uri)
    assert [p.info.status for p in parents] == ["FINISHED"]
    parent = parents[0]
    assert parent.data.tags["dloral.family"] == "test"
    assert parent.data.tags["dloral.best_trial"] in {t.trial_id for t in result.trials}
    assert parent.data.params["space.model.cfr.variant"] == "grid['full', 'off']"
    assert any(
        k.startswith("eval/variant=") or k.startswith("eval/variant_") for k in parent.data.metrics
    )
    assert len(children) == 2
    for run in children:
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["dloral.family"] == "test"
        assert tags["dloral.stage_schedule"].startswith("periodic P=2")
        trial = next(t for t in result.trials if t.trial_id == tags["dloral.trial_id"])
        assert run.data.params["model.cfr.variant"] == trial.values["model.cfr.variant"]
        history = client.get_metric_history(run.info.run_id, "val/psnr")
        assert sorted(m.step for m in history) == [0, 2, 4]  # 0: before training
        assert trial.mlflow_run_id == run.info.run_id

    # the report of this sweep: trials, best per arm, ablation plots, curves from MLflow
    from dloral.report import build, sources

    sweep = sources.load_sweep(result.sweep_dir)
    assert sorted(sweep.trials["model.cfr.variant"]) == ["full", "off"]
    hist = sweep.history[sweep.history["metric"] == "val/psnr"]
    steps = sorted(hist.groupby("trial_id")["step"].apply(sorted).tolist())
    assert steps == [[0, 2, 4], [0, 2, 4]]  # the curves start before training
    last = hist[hist["step"] == 4].set_index("trial_id")["value"]
    for t in result.trials:
        assert last[t.trial_id] == pytest.approx(t.metrics["val/psnr"])
    made = build.build_report(tmp_path / "report", sweeps=[sweep])
    md = made.markdown.read_text()
    best = max(result.best, key=lambda b: b["eval"]["psnr"])
    row = next(line for line in md.splitlines() if line.startswith(f"| {best['arm']} |"))
    assert f"**{best['eval']['psnr']:.2f}**" in row
    assert {p.name for p in made.images} >= {
        f"{sweep.name}-model.cfr.variant-val-psnr.png",
        f"{sweep.name}-curves.png",
    }
    assert f"`{parent.info.run_id}`" in md and "| git commit |" in md
    # the same sweep read back from its MLflow parent run
    again = sources.load_sweep(parent.info.run_id)
    assert again.name == sweep.name and list(again.trials["trial_id"]) == list(
        sweep.trials["trial_id"]
    )


def test_crashed_trial_resumes_from_its_checkpoint_on_the_same_trajectory(
    ray_local, mlflow_uri, tmp_path, data_roots
):
    import torch

    from dloral.train.recipe import train

    space = '"model.cfr.variant" = ["full"]\n'
    drill = "\n[sweep.chaos]\ncrash_once_at_step = 2\n"
    exp = _experiment(tmp_path, data_roots, space, drill)
    crashed = run_sweep(exp, evaluate=False)
    # the same trial's config trained in this process, without the crash (and the trial's
    # thread count: the sums of a step depend on it)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, math.floor(exp.sweep.resources.cpu)))
    try:
        plain = train(exp.train_config({"model.cfr.variant": "full"}), tmp_path / "plain")
    finally:
        torch.set_num_threads(threads)

    (b,) = crashed.trials
    assert b.status == "finished" and b.step == 4 and plain.step == 4
    # resumed at step 2 from the reported checkpoint, it ends where the plain run ended
    assert b.metrics["val/psnr"] == pytest.approx(plain.metrics["psnr"], abs=1e-5)
    assert b.metrics["val/psnr"] != pytest.approx(plain.start_metrics["psnr"], abs=1e-5)
    client, _, children = _runs(mlflow_uri)
    run = next(r for r in children if r.data.tags["dloral.trial_id"] == b.trial_id)
    assert run.info.status == "FINISHED"  # the retry continued the same MLflow run
    assert run.data.tags["dloral.restored_from_step"] == "2"
    assert run.data.tags["dloral.attempts"] == "2"
    # step 0 (before training) once: the retry resumed from step 2, it did not start again
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr")] == [0, 2, 4]


def test_trial_failing_past_its_retries_is_marked_failed_and_the_sweep_goes_on(
    ray_local, mlflow_uri, tmp_path, data_roots
):
    space = f'"data.train_root" = ["{data_roots}/train", "{tmp_path}/missing-train"]\n'
    result = run_sweep(_experiment(tmp_path, data_roots, space), evaluate=False)

    by_root = {t.values["data.train_root"]: t for t in result.trials}
    assert by_root[f"{data_roots}/train"].status == "finished"
    failed = by_root[f"{tmp_path}/missing-train"]
    assert failed.status == "failed" and "missing-train" in failed.error
    _, parents, children = _runs(mlflow_uri)
    assert parents[0].info.status == "FINISHED"
    status = {r.data.tags["dloral.trial_id"]: r for r in children}
    assert status[failed.trial_id].info.status == "FAILED"
    assert "missing-train" in status[failed.trial_id].data.tags["dloral.status_reason"]
    assert not [r for r in children if r.info.status == "RUNNING"]


def test_a_sweep_whose_every_trial_failed_is_a_failure_not_a_success(
    ray_local, mlflow_uri, tmp_path, data_roots
):
    space = f'"data.train_root" = ["{tmp_path}/missing-a", "{tmp_path}/missing-b"]\n'
    with pytest.raises(SweepError, match=r"every trial failed \(2\); the first error: .*missing"):
        run_sweep(_experiment(tmp_path, data_roots, space), evaluate=False)
    _, parents, children = _runs(mlflow_uri)
    assert (
        parents[0].info.status == "FAILED"
        and "every trial failed" in (parents[0].data.tags["dloral.status_reason"])
    )
    assert sorted(r.info.status for r in children) == ["FAILED", "FAILED"]
    (summary,) = tmp_path.rglob("summary.json")
    record = json.loads(summary.read_text())
    assert record["status"] == "failed" and [t["status"] for t in record["trials"]] == [
        "failed",
        "failed",
    ]


def test_a_sweep_stopped_while_ray_started_resumes_by_starting_its_trials(
    ray_local, mlflow_uri, tmp_path, data_roots, monkeypatch
):
    """Stopped before Tune saved any state (Ray starting: 15-25 s of every sweep here): the
    printed --resume starts the trials in the same folder, under the same MLflow run."""
    from dloral.sweep import runner
    from dloral.sweep.runner import SweepInterrupted

    def stopped(*_, **__):
        raise KeyboardInterrupt

    exp = _experiment(tmp_path, data_roots, '"run.seed" = [1]\n')
    monkeypatch.setattr(runner, "start_ray", stopped)
    with pytest.raises(SweepInterrupted) as err:
        run_sweep(exp, evaluate=False)
    monkeypatch.undo()
    record = json.loads((Path(err.value.sweep_dir) / "summary.json").read_text())
    assert record["status"] == "interrupted" and record["trials"] == []
    # while another driver runs the sweep (holding its folder's lock) a resume is refused,
    # touching nothing
    files = {p: p.read_bytes() for p in Path(err.value.sweep_dir).glob("*.json")}
    with folder_lock(err.value.sweep_dir):
        with pytest.raises(SweepError, match="another dloral-exp sweep is running this sweep"):
            run_sweep(exp, resume=err.value.sweep_dir, evaluate=False)
    assert {p: p.read_bytes() for p in Path(err.value.sweep_dir).glob("*.json")} == files

    # a resume that fails before it starts anything (MLflow unreachable) ends its own driver
    # run, failed, and leaves the sweep as it was: interrupted, resumable
    def unreachable(*_, **__):
        raise ConnectionError("MLflow is not reachable")

    monkeypatch.setattr(runner, "reopen_run", unreachable)
    with pytest.raises(ConnectionError):
        run_sweep(exp, resume=err.value.sweep_dir, evaluate=False)
    monkeypatch.undo()
    spec = json.loads((Path(err.value.sweep_dir) / "sweep.json").read_text())
    assert spec["status"] == "interrupted" and spec["invocations"][-1]["ended"] == "failed"
    result = run_sweep(exp, resume=err.value.sweep_dir, evaluate=False)
    assert result.status == "finished" and [t.status for t in result.trials] == ["finished"]
    _, parents, children = _runs(mlflow_uri)
    assert [p.info.status for p in parents] == ["FINISHED"] and len(children) == 1
    # a finished sweep has nothing to resume (it would be evaluated and logged again)
    with pytest.raises(SweepError, match="finished; nothing to resume"):
        run_sweep(exp, resume=err.value.sweep_dir, evaluate=False)
    # sweep.json records each run of the driver (the refused ones are none): the command, its
    # code, how it ended and after how long; summary.json's wall time is theirs together
    folder = Path(err.value.sweep_dir)
    runs = json.loads((folder / "sweep.json").read_text())["invocations"]
    assert [(r["resume"], r["ended"]) for r in runs] == [
        (False, "interrupted"),
        (True, "failed"),
        (True, "finished"),
    ]
    assert all(r["command_line"] and r["git_commit"] and r["wall_s"] >= 0 for r in runs)
    assert runs[0]["wall_s"] > 0 and runs[2]["wall_s"] > 0  # the failed one: at once
    assert result.driver_runs == 3 and result.wall_s_run > runs[0]["wall_s"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["wall_s"] == pytest.approx(sum(r["wall_s"] for r in runs))
    # the parent run's copies (what `report --sweep <run id>` reads) say the same
    client, (parent,), _ = _runs(mlflow_uri)
    copied = client.download_artifacts(parent.info.run_id, "sweep.json", str(tmp_path / "dl"))
    copy = json.loads(Path(copied).read_text())
    assert copy["status"] == "finished" and copy["invocations"][-1] == runs[-1]
    # and a report of the sweep cites them (it said "command: not recorded")
    from dloral.report.build import build_report
    from dloral.report.sources import read_sweep

    report = build_report(tmp_path / "report", sweeps=[read_sweep(folder, str(folder))])
    text = report.markdown.read_text()
    assert "then resumed 2 times with `--resume`" in text and "not recorded" not in text
    assert "driver run 2" in text and "ended finished after" in text, text


def test_killed_trial_process_is_retried_from_its_checkpoint(
    ray_local, mlflow_uri, tmp_path, data_roots
):
    drill = "\n[sweep.chaos]\nkill_once_at_step = 2\n"
    space = '"model.cfr.variant" = ["off"]\n'
    result = run_sweep(_experiment(tmp_path, data_roots, space, drill), evaluate=False)

    (trial,) = result.trials
    assert trial.status == "finished" and trial.step == 4
    client, _, (run,) = _runs(mlflow_uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dloral.restored_from_step"] == "2"
    # step 0 (before training) once: the retry resumed from step 2, it did not start again
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr")] == [0, 2, 4]


def test_a_sweep_of_two_worker_trials_finishes(ray_local, mlflow_uri, tmp_path, data_roots):
    """`--set run.workers=2`: a trial is a Ray Train run of 2 DDP workers (1 CPU each), rank 0
    reporting to Tune; one MLflow run per trial, not one per worker. One trial: a second would
    run the same path again after it (2 CPUs here), minutes of CI for nothing new."""
    path = tmp_path / "exp.toml"
    path.write_text(
        BASE.format(root=data_roots, storage=tmp_path / "sweeps")
        + '\n[sweep.space]\n"run.seed" = [1]\n'
    )
    exp = load_experiment(path, ["run.workers=2"])
    result = run_sweep(exp, evaluate=False)

    assert result.status == "finished" and len(result.trials) == 1
    for t in result.trials:
        assert t.status == "finished" and t.step == 4
        assert math.isfinite(t.metrics["val/psnr"])
        assert (Path(t.checkpoint) / "dloral.safetensors").is_file()  # in the sweep storage
    _, parents, children = _runs(mlflow_uri)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(r.data.tags["dloral.trial_id"] for r in children) == sorted(
        t.trial_id for t in result.trials
    )  # one run per trial, not one per worker
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["dloral.workers"] == "2" and run.data.params["run.workers"] == "2"
