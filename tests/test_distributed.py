"""Data-parallel training on Ray Train: CPU, gloo, the tiny profile, real bikes frames.

The heart: 2 workers x batch 1 x accumulation 1 take exactly the steps of one process (today's
single-process path) with batch 1 x accumulation 2. Each worker draws its share of the step's
samples and seeds each micro-batch by its place in the step, so both runs compute the same two
gradients g0, g1 on the same inputs; DDP's mean g0/2 + g1/2 is what accumulation sums in one
process (halving is exact in floating point and a sum of two numbers does not depend on their
order), so Adam sees bitwise-equal gradients. With one torch thread in every process (the ops
then run in the same order), the parameters after K steps are compared bitwise (torch.equal),
the tolerance this argument allows: none.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dloral.sweep.distributed import ClusterTooSmall, check_cluster
from dloral.sweep.runner import start_ray
from dloral.sweep.train_driver import train_on_workers
from dloral.train.config import load_config
from dloral.train.recipe import train
from dloral.train.tracking import MlflowTracker


def _cfg(roots: Path, workers: int, accum: int, steps: int):
    sets = {
        "data.train_root": f'"{roots / "train"}"',
        "data.val_root": f'"{roots / "val"}"',
        "data.val_clips": 1,
        "data.val_frames": 2,
        "data.sampler.crop": 32,
        "optim.lr": 1e-3,
        "optim.grad_accum": accum,
        "run.workers": workers,
        "run.max_steps": steps,
        "run.checkpoint_every": 2,
        "run.validate_every": 2,
        "run.log_every": 1,
        # periodic, period 2: steps 1-2 and 5-6 consistency, 3-4 detail (a switch inside K)
        "schedule.kind": '"periodic"',
        "schedule.alternation_period": 2,
        "schedule.transition_steps": 0,
        "loss.lpips": '"optional"',
    }
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def _state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:06d}" / "dloral.safetensors")


def _assert_same_parameters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def _runs(uri: str, experiment: str = "dloral-train"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def ray_local():
    import ray

    start_ray(None)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_roots):
    """Today's path: one process, batch 1 x accumulation 2, 6 steps (checkpoints 4 and 6 kept),
    one torch thread as each worker has; its MLflow losses for comparison."""
    root = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tracker = MlflowTracker("one", uri=f"sqlite:///{root}/mlflow.db")
        train(_cfg(data_roots, 1, 2, 6), root / "run", tracker=tracker)
    finally:
        torch.set_num_threads(threads)
    return root / "run", tracker


def test_two_workers_step_exactly_as_one_process_accumulating_two(
    ray_local, one_process, data_roots, tmp_path, monkeypatch
):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = train_on_workers(_cfg(data_roots, 2, 1, 4), tmp_path / "two")

    assert result.status == "finished" and result.step == 4
    single, single_tracker = one_process
    _assert_same_parameters(_state(tmp_path / "two", 4), _state(single, 4))

    client, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FINISHED"]  # one run, rank 0's, not one per worker
    run = runs[0]
    assert run.info.run_id == result.mlflow_run_id
    tags = run.data.tags
    assert (tags["dloral.workers"], tags["dloral.effective_batch"]) == ("2", "2")
    assert tags["dloral.backend"] == "gloo" and run.data.params["run.workers"] == "2"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "lr")) == [1, 2, 3, 4]
    # the logged losses are the mean over both workers: what the one process logged
    for name in ("train/consistency/l2", "train/detail/l2"):
        two = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        one = single_tracker.client.get_metric_history(single_tracker.run_id, name)
        assert two == pytest.approx({m.step: m.value for m in one if m.step <= 4}, rel=1e-6)
    record = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (record["workers"], record["effective_batch"], record["backend"]) == (2, 2, "gloo")


def _registered(storage: Path, name: str) -> bool:
    """Ray Train has registered the checkpoint `name` (it would restart a group from it)."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    latest = snapshot.get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name", "") >= name


def _train_workers_of_this_process():
    """The Ray Train worker processes of the Ray this test process started (not any other)."""
    import psutil

    me = os.getpid()
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")
        and any(parent.pid == me for parent in p.parents())
    ]


def test_a_killed_worker_restarts_the_group_from_its_checkpoint_and_ends_equal(
    ray_local, one_process, data_roots, tmp_path, monkeypatch
):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_dir = tmp_path / "killed"
    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 600
        while not _registered(run_dir / "ray", "step-000002") and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _train_workers_of_this_process()
        if workers:
            victim = max(workers, key=lambda p: p.pid)
            os.kill(victim.pid, signal.SIGKILL)  # no clean-up of any kind runs
            killed.append(victim.pid)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    result = train_on_workers(_cfg(data_roots, 2, 1, 6), run_dir, max_failures=1)
    killer.join(timeout=5)

    assert killed, "no Ray Train worker was found to kill"
    assert result.status == "finished" and result.step == 6
    single, _ = one_process
    _assert_same_parameters(_state(run_dir, 6), _state(single, 6))
    client, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FINISHED"]  # the restarted rank 0 continued it
    tags = runs[0].data.tags
    assert tags["dloral.attempts"] == "2"
    assert tags["dloral.restored_from_step"] in ("2", "4")  # a checkpoint, not from scratch
    lr = client.get_metric_history(runs[0].info.run_id, "lr")
    assert sorted(m.step for m in lr) == [1, 2, 3, 4, 5, 6]  # repeated steps logged once


def test_the_cluster_must_hold_every_worker(ray_local):
    import ray

    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(ClusterTooSmall, match=f"needs {cpus + 1:g} CPUs .* has {cpus:g}"):
        check_cluster(int(cpus) + 1, 1, 0)
    with pytest.raises(ClusterTooSmall, match="needs 2 GPUs"):
        check_cluster(2, 1, 1)


def test_workers_outside_a_process_group_are_refused(data_roots, tmp_path):
    with pytest.raises(ValueError, match=r"run.workers = 2, but this process is one of 1"):
        train(_cfg(data_roots, 2, 1, 2), tmp_path / "r")
    assert not (tmp_path / "r" / "config.toml").exists()


def test_a_runs_worker_folders_are_removed_and_no_other_runs(tmp_path, monkeypatch):
    """A worker stopped by Ray (SIGTERM to the driver after a checkpoint, seen here) can end
    before its own clean-up: the driver removes its run's workers' temporary folders, named by
    the run's tag, and leaves another run's (it may still be training beside it)."""
    import tempfile

    from dloral.sweep.distributed import _rank_prefix, remove_rank_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ours = [tempfile.mkdtemp(prefix=_rank_prefix(r, "5e7dad28945d")) for r in (0, 1, 12)]
    theirs = [
        tempfile.mkdtemp(prefix=_rank_prefix(0, tag))
        for tag in ("5e7dad28945", "x", "a-5e7dad28945d")  # a sweep named `a-<ours>`
    ]
    odd = [tempfile.mkdtemp(prefix=_rank_prefix(r, "ab[1]-2026")) for r in (0, 1)]  # a glob
    (Path(ours[0]) / "run" / "checkpoints").mkdir(parents=True)
    remove_rank_scratch("5e7dad28945d")
    assert not any(Path(p).exists() for p in ours)
    remove_rank_scratch("ab[1]-2026")  # its name is no pattern
    assert not any(Path(p).exists() for p in odd)
    assert all(Path(p).is_dir() for p in theirs)
    remove_rank_scratch("")  # no tag (a job made before tags): nothing is guessed at
    assert all(Path(p).is_dir() for p in theirs)
