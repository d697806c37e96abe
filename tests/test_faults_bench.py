"""`dloral-exp bench` stopped by a real signal, as a scheduler (SIGTERM) or Ctrl-C (SIGINT) stops
it: the process exits 143 / 130, run.json says `interrupted` and why, the MLflow run is KILLED,
aggregate.csv covers only the clips every method finished, and the same command run again
finishes from the cache.

Each bench is a real `python -m dloral.cli bench` process on a small udm10-layout set of real
bikes frames (bicubic and a folder of peer outputs: no model to build), signalled once its first
clip is on disk.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_udm_set
from typer.testing import CliRunner

from dloral.bench.registry import resolve
from dloral.cli import app

REPO = Path(__file__).resolve().parents[1]
# 8 clips of 3 real 64x64 frames: (top, left) crops of bikes.mp4 (640x272)
CLIPS = {f"clip{i}": (20 + 25 * (i % 4), 40 + 70 * i) for i in range(8)}
METHODS = ("bicubic", "blur")
METRICS = ("psnr", "ewarp")  # as the suite names them; results name ewarp's protocol
START_S = 240  # imports and start-up of a bench process on a loaded 2-core machine, at most
STOP_S = 120


@pytest.fixture(scope="module")
def suite(tmp_path_factory, bikes_path) -> Path:
    root = write_udm_set(tmp_path_factory.mktemp("udm"), bikes_path, CLIPS, 3, blur=3)
    path = root / "suite.toml"
    path.write_text(
        f"""
[suite]
name = "faults"

[[datasets]]
name = "mini"
kind = "udm10"
root = "{root}"
lq = "BIx4"
scale = 4

[methods]
names = ["bicubic", "folder:blur={root / "peers" / "blur"}"]

[metrics]
names = {json.dumps(list(METRICS))}

[options]
flow = "dis"
"""
    )
    return path


def _sigint_default() -> None:
    # a shell starts background jobs with SIGINT ignored; a person's Ctrl-C reaches a foreground
    # process, which Python gives its KeyboardInterrupt handler: start the bench like that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def bench(suite: Path, out: Path, tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """Start `dloral-exp bench` as its own process; its output goes to a log file."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log = tmp_path / f"bench-{len(list(tmp_path.glob('bench-*.log')))}.log"
    cmd = [sys.executable, "-m", "dloral.cli", "bench", str(suite), "--out", str(out), *args]
    with log.open("w") as sink:
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,  # MLflow's local artifact store lands here
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=_sigint_default,
        )
    return proc, log


def stop_after_first_clip(proc: subprocess.Popen, out: Path, log: Path, signum: int) -> int:
    """Send `signum` once results.parquet (written after each complete clip) exists; the exit
    code. Fails, with the bench's output, if it ends or stalls first."""
    deadline = time.monotonic() + START_S
    while not (out / "results.parquet").is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"bench ended or stalled before its first clip:\n{log.read_text()}")
        time.sleep(0.02)
    proc.send_signal(signum)
    try:
        return proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"bench did not stop within {STOP_S} s of the signal:\n{log.read_text()}")


def check_interrupted(out: Path, log: Path, signame: str) -> dict:
    """run.json, results.parquet and aggregate.csv of an interrupted run agree: the first
    clips_done clips, each scored by every method, and nothing of the clip that was stopped."""
    text = log.read_text()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "interrupted", text
    done, total = run["clips_done"], run["clips_total"]
    assert total == len(CLIPS) and 1 <= done < total, text
    assert run["reason"] == f"interrupted by {signame} after {done} of {total} clips"
    assert f"interrupted ({signame})" in text
    df = pd.read_parquet(out / "results.parquet")
    scored = df[df["kind"] != "latency"]
    complete = list(CLIPS)[:done]
    assert scored.groupby("method")["clip"].apply(set).to_dict() == {
        m: set(complete) for m in METHODS
    }
    agg = pd.read_csv(out / "aggregate.csv")
    quality = agg[agg["metric"].isin([resolve(m) for m in METRICS])]
    assert len(quality) == len(METHODS) * len(METRICS)
    assert quality["clips"].eq(done).all(), agg
    assert agg["clips"].eq(done).all(), agg  # bicubic's latency rows too
    for row in quality.itertuples():
        rows = scored[(scored["method"] == row.method) & (scored["metric"] == row.metric)]
        assert row.value == pytest.approx(rows.groupby("clip")["value"].mean().mean())
    return run


def test_sigterm_stops_bench_truthfully_and_rerun_finishes_from_cache(suite, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    proc, log = bench(suite, out, tmp_path)
    assert stop_after_first_clip(proc, out, log, signal.SIGTERM) == 143, log.read_text()
    run = check_interrupted(out, log, "SIGTERM")
    done = run["clips_done"]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dloral-bench")
    (mlflow_run,) = client.search_runs([exp.experiment_id])
    assert mlflow_run.info.status == "KILLED"
    assert mlflow_run.data.tags["dloral.status_reason"] == run["reason"]
    agg = pd.read_csv(out / "aggregate.csv")
    psnr = agg.query("method == 'bicubic' and metric == 'psnr'")["value"].item()
    assert mlflow_run.data.metrics["mini/bicubic/psnr"] == pytest.approx(psnr)

    # the same command again (in this process: a second start-up would double the test's time)
    again = CliRunner().invoke(app, ["bench", str(suite), "--out", str(out), "--no-tracking"])
    assert again.exit_code == 0, again.output
    run = json.loads((out / "run.json").read_text())
    assert (run["status"], run["clips_done"], run["reason"]) == ("finished", len(CLIPS), "")
    evaluations = run["metric_evaluations"]
    per_clip = len(METHODS) * len(METRICS)
    assert evaluations["computed"] + evaluations["cached"] == per_clip * len(CLIPS)
    assert evaluations["cached"] >= per_clip * done  # the finished clips were not recomputed
    agg = pd.read_csv(out / "aggregate.csv")
    assert agg["clips"].eq(len(CLIPS)).all(), agg
    scored = pd.read_parquet(out / "results.parquet").query("kind != 'latency'")
    assert set(scored["clip"]) == set(CLIPS)


def test_sigint_stops_bench_with_130_and_the_same_true_state(suite, tmp_path):
    out = tmp_path / "out"
    proc, log = bench(suite, out, tmp_path, "--no-tracking")
    assert stop_after_first_clip(proc, out, log, signal.SIGINT) == 130, log.read_text()
    check_interrupted(out, log, "SIGINT")
