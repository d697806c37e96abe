"""Time from starting a `dloral-exp` command to its error message, for bad configs and options.

    uv run python benchmarks/time_to_error.py                 # every case, 3 runs each
    uv run python benchmarks/time_to_error.py --repeats 1 --out /tmp/tte.json

Each case runs `python -m dloral.cli ...` as a fresh process (this checkout first on
PYTHONPATH, in an empty temporary folder) and records the wall time until "error" first appears
on its output and until it exits; the target is under 3 s (the config is read and checked before
torch, diffusers, Ray or MLflow are imported). Results go to benchmarks/results/ and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
TARGET_S = 3.0

CASES = {  # name -> arguments of dloral-exp
    "train --set optim.lrr=1": ["train", "--set", "optim.lrr=1", "--no-tracking"],
    "train --set optim.lr=abc": ["train", "--set", "optim.lr=abc", "--no-tracking"],
    "sweep --set optim.lrr=1": ["sweep", "--set", "optim.lrr=1", "--no-tracking"],
    "sweep nonexistent_experiment": ["sweep", "nonexistent_experiment", "--no-tracking"],
    "bench nonexistent_suite": ["bench", "nonexistent_suite", "--no-tracking"],
    "bench --metrics nonsense": ["bench", "--metrics", "nonsense", "--no-tracking"],
    "upscale --tile 10": ["upscale", "--tile", "10"],
    "data prepare --out <a file>": ["data", "prepare", "--out", "a_file"],
}


def time_case(args: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Seconds to the first "error" in the output and to exit, the exit code, the message."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dloral.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first_error, lines = None, []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if first_error is None and "error" in line.lower():
            first_error = time.perf_counter() - start
    code = proc.wait()
    return {
        "to_error_s": round(first_error, 3) if first_error is not None else None,
        "to_exit_s": round(time.perf_counter() - start, 3),
        "exit_code": code,
        "message": " ".join(line.strip() for line in lines)[:300],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs per case (the median is kept)")
    p.add_argument("--out", default=str(RESULTS / "time-to-error.json"), help="result JSON")
    args = p.parse_args(argv)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "a_file").write_text("not a folder\n")
        for name, case_args in CASES.items():
            runs = [time_case(case_args, cwd, env) for _ in range(args.repeats)]
            times = [r["to_error_s"] for r in runs if r["to_error_s"] is not None]
            median = statistics.median(times) if len(times) == len(runs) else None
            cases[name] = {
                "args": case_args,
                "median_to_error_s": median,
                "max_to_error_s": max(times) if times else None,
                "under_target": median is not None and median < TARGET_S,
                "runs": runs,
            }
            print(f"{name:32s} {median if median is not None else 'no error!'} s", flush=True)
    from dloral.provenance import git_state

    record = {
        "benchmark": "time_to_error",
        "target_s": TARGET_S,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        **git_state(),
        "cases": cases,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from dloral.atomic import atomic_write_json

    atomic_write_json(out, record)
    print(json.dumps({k: v["median_to_error_s"] for k, v in cases.items()}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
