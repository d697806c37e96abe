"""Joining a running Ray cluster by address: a real head on loopback, with token authentication
on (as `ray start --head` turns it on when the machine holds a token), and a sweep through it."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dloral.sweep import cluster
from dloral.sweep.cluster import ClusterError, find_token, host_port, present_token

ENTRY = "import sys; from dloral.cli import entry; sys.argv[0] = 'dloral-exp'; sys.exit(entry())"
RAY = str(Path(sys.executable).with_name("ray"))

EXPERIMENT = """
[model]
profile = "tiny"
[data]
train_root = "{root}/train"
val_root = "{root}/val"
val_clips = 1
val_frames = 2
[data.sampler]
crop = 32
[loss]
lpips = "optional"
[run]
max_steps = 2
validate_every = 2
log_every = 1
[sweep]
family = "cluster-test"
scheduler = "fifo"
storage = "{storage}"
[sweep.space]
"model.cfr.variant" = ["full", "off"]
"""


def test_the_token_is_found_where_ray_reads_it_in_rays_order(tmp_path):
    home = tmp_path / "home"
    assert find_token({}, home) is None
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("")
    assert find_token({}, home) is None  # an empty file is no token
    (home / ".ray" / "auth_token").write_text("abc")
    assert find_token({}, home).source == str(home / ".ray" / "auth_token")
    other = tmp_path / "token"
    other.write_text("def")
    assert find_token({"RAY_AUTH_TOKEN_PATH": str(other)}, home).source.endswith(str(other))
    # a path that names nothing is no token, even with the default file present (Ray reads
    # only the file it is pointed at)
    assert find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, home) is None
    assert find_token({"RAY_AUTH_TOKEN": "x", "RAY_AUTH_TOKEN_PATH": str(other)}, home).source == (
        "$RAY_AUTH_TOKEN"
    )


def test_a_token_is_presented_unless_the_auth_mode_is_set_explicitly(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    env = {}
    assert present_token(env) is None and "RAY_AUTH_MODE" not in env
    env = {"RAY_AUTH_TOKEN": "x"}
    assert present_token(env) is not None and env["RAY_AUTH_MODE"] == "token"
    env = {"RAY_AUTH_TOKEN": "x", "RAY_AUTH_MODE": "disabled"}
    present_token(env)
    assert env["RAY_AUTH_MODE"] == "disabled"


def test_cluster_addresses_parse_and_a_bad_port_is_named():
    assert host_port("10.0.0.1:6390") == ("10.0.0.1", 6390)
    assert host_port("ray://head:10001") == ("head", 10001)
    assert host_port("head") == ("head", 6379)
    assert host_port("auto") is None
    with pytest.raises(ClusterError, match="'head:x6'.*not a number"):
        host_port("head:x6")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_nothing_listens_fails_in_one_line_before_any_sweep_state(tmp_path):
    port = _free_port()
    with pytest.raises(ClusterError, match=f"127.0.0.1:{port}: nothing answers there"):
        cluster.check_reachable(f"127.0.0.1:{port}")
    exp = tmp_path / "exp.toml"
    exp.write_text(EXPERIMENT.format(root=tmp_path, storage=tmp_path / "sweeps"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", ENTRY, "sweep", str(exp), "--address", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    said = out.stdout + out.stderr
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"Ray cluster at 127.0.0.1:{port}" in errors[0], said
    assert "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def _processes_under(folder: str) -> list[int]:
    """Processes whose command line names `folder` (the head's own temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if folder in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.fixture
def loopback_head(tmp_path):
    """A Ray head on 127.0.0.1 with its own port, temp dir and home (holding an auth token, so
    the head enforces token authentication); stopped by its own processes afterwards."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    temp = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["HOME"] = str(home)
    port = _free_port()
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--ray-client-server-port={_free_port()}",
            f"--temp-dir={temp}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, head.stdout.read()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not start in 120 s"
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", env, temp
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        deadline = time.monotonic() + 30
        while (left := _processes_under(temp)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        assert not _processes_under(temp), "processes of the test's Ray head outlived it"
        shutil.rmtree(temp, ignore_errors=True)


def test_a_sweep_joins_a_head_with_token_authentication_by_its_address(
    loopback_head, tmp_path, data_roots
):
    address, env, temp = loopback_head
    exp = tmp_path / "exp.toml"
    exp.write_text(EXPERIMENT.format(root=data_roots, storage=tmp_path / "sweeps"))
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = subprocess.run(
        [sys.executable, "-c", ENTRY, "sweep", str(exp), "--address", address, "--no-evaluate"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=480,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    said = out.stdout + out.stderr
    assert "2 trials (2 finished)" in said, said
    assert "InvalidAuthToken" not in said
    # the trials ran on that head's workers, not on a Ray the driver started by itself
    logs = list(Path(temp).glob("session_*/logs/worker-*"))
    assert logs, f"no worker logs under the head's temp dir {temp}"
