"""Where a number came from: package versions, the machine, and the git state of this checkout.

Benchmarks, sweeps, reports and `dloral-exp doctor` record these same facts.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

PACKAGES = (
    "dloral",
    "torch",
    "torchvision",
    "diffusers",
    "peft",
    "transformers",
    "ray",
    "mlflow",
    "pyiqa",
    "opencv-python-headless",
    "pandas",
    "numpy",
    "lpips",
)


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    try:  # the OpenCV build that computes DIS flow; absent on a bare benchmark node
        import cv2

        out["cv2"] = cv2.__version__
    except ImportError:
        out["cv2"] = "not installed"
    return out


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor's model name ("AMD EPYC 9654 96-Core Processor"): Linux's /proc/cpuinfo
    (`model name`, or `Model`/`Hardware` on ARM), where platform.processor() says nothing on
    Linux; elsewhere platform.processor(), else the architecture."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:  # one block per core: the first core's value of each field
                key, _, value = line.partition(":")
                if value.strip():
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    for key in ("model name", "Model", "Hardware"):
        if fields.get(key):
            return fields[key]
    return platform.processor() or platform.machine() or "unknown"


def cpu_capability() -> str:
    """The vector instructions torch's CPU kernels were dispatched to (AVX512, AVX2, DEFAULT,
    ...; $ATEN_CPU_CAPABILITY lowers it): kernels of another capability sum in another order,
    so CPU results, trained weights included, can differ between machines in the last bits."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # an older torch
        return "unknown"


def device() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_name(),
        "cpu_capability": cpu_capability(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def cpu_environment() -> dict[str, Any]:
    """Where a CPU benchmark ran, for its record: cores, processor, Python, the packages'
    versions and the checkout's commit."""
    return {
        "cpu_count": os.cpu_count(),
        "machine": cpu_name(),
        "cpu_capability": cpu_capability(),
        "python": platform.python_version(),
        "versions": versions(),
        **git_state(),
    }


def git_state() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it (numbers from
    uncommitted code say so); "unknown" outside a git checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=here
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown"}
    return {"git_commit": commit, "git_dirty": dirty}


BENCH_VIA_ENV = "DLORAL_BENCH_VIA"  # the command that runs a benchmark as one of its parts


def bench_command(script: str, argv: list[str] | None = None) -> str:
    """A benchmark script's command for its record: `uv run python benchmarks/<script> ARGS`
    (its arguments as given, or as typed), and the command that ran it as a part
    (`$DLORAL_BENCH_VIA`: bench_gpu.py, the GPU bundle's run.sh), which is what reproduces it
    there."""
    args = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["uv", "run", "python", f"benchmarks/{script}", *args])
    via = os.environ.get(BENCH_VIA_ENV)
    return f"{command} (a part of `{via}`)" if via else command


def command_line(argv: list[str] | None = None, orig_argv: list[str] | None = None) -> str:
    """The command as the user typed it, shell-quoted: a console script found on PATH by its
    name (`dloral-exp bench embedded`, not the venv's full path), a module run as
    `python -m dloral.cli ...`, else the script's path as given."""
    argv = list(sys.argv if argv is None else argv)
    orig = list(getattr(sys, "orig_argv", argv) if orig_argv is None else orig_argv)
    if not argv:
        return shlex.join(orig)
    script, args = argv[0], argv[1:]
    cut = len(orig) - len(args)
    if {"-m", "-c"} & set(orig[1:cut]) and orig[cut:] == args:  # python -m module args
        return shlex.join(orig)
    name = os.path.basename(script)
    found = shutil.which(name) if name else None
    if found and os.path.realpath(found) == os.path.realpath(script):
        script = name
    return shlex.join([script, *args])
