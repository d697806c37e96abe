"""The sweep driver stopped with Ctrl-C, then `--resume`: finished trials are not run again."""

import json
import os
import signal
import subprocess
import sys
import time

from test_sweep import BASE

TRIALS = 3


def _cli(*args, cwd, env):
    return subprocess.Popen(
        [sys.executable, "-m", "dloral.cli", "sweep", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _children(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dloral-sweeps")
    if exp is None:
        return client, [], []
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, data_roots):
    exp = tmp_path / "exp.toml"
    text = BASE.format(root=data_roots, storage=tmp_path / "sweeps")
    text = text.replace("max_steps = 4", "max_steps = 20").replace(
        "validate_every = 2", "validate_every = 5"
    )
    exp.write_text(text + '\n[sweep.space]\n"run.seed" = [1, 2, 3]\n')
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}

    first = _cli(str(exp), "--max-concurrent", "1", cwd=tmp_path, env=env)
    deadline = time.monotonic() + 240
    finished = []
    while time.monotonic() < deadline and first.poll() is None:
        _, _, children = _children(uri)
        finished = [r for r in children if r.info.status == "FINISHED"]
        if finished:
            break
        time.sleep(0.5)
    assert finished, f"no trial finished: {first.communicate(timeout=60)[0][-3000:]}"
    first.send_signal(signal.SIGINT)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 130, out[-3000:]
    assert "--resume" in out

    client, parents, children = _children(uri)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert not [r for r in children if r.info.status == "RUNNING"]
    (sweep_dir,) = (tmp_path / "sweeps").iterdir()
    assert json.loads((sweep_dir / "sweep.json").read_text())["status"] == "interrupted"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    # Tune's view decides what is done (a trial's MLflow run ends just before its last report)
    tune_done = {t["trial_id"] for t in summary["trials"] if t["status"] == "finished"}
    assert 1 <= len(tune_done) < TRIALS
    runs = {r.data.tags["dloral.trial_id"]: r for r in children}
    done_before = {t: runs[t] for t in tune_done}
    assert {r.info.status for r in done_before.values()} == {"FINISHED"}

    second = _cli(str(exp), "--resume", cwd=tmp_path, env=env)
    out = second.communicate(timeout=300)[0]
    assert second.returncode == 0, out[-3000:]

    client, parents, children = _children(uri)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(children) == TRIALS and {r.info.status for r in children} == {"FINISHED"}
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert sorted(t["status"] for t in summary["trials"]) == ["finished"] * TRIALS
    for trial_id, before in done_before.items():  # not run again: same run, same end, no repeats
        after = next(r for r in children if r.data.tags["dloral.trial_id"] == trial_id)
        assert after.info.end_time == before.info.end_time
        steps = [m.step for m in client.get_metric_history(after.info.run_id, "val/psnr")]
        assert steps == [5, 10, 15, 20]
