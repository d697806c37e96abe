"""Sweep benchmark: Ray overhead and ASHA vs grid (fifo) on one experiment.

    uv run python benchmarks/sweep.py                      # the default experiment, both schedulers
    uv run python benchmarks/sweep.py --schedulers asha --set run.max_steps=100

For each scheduler the experiment runs as `dloral-exp sweep` would (local Ray, MLflow in a
temporary SQLite file so the user's mlflow.db is untouched, evaluation of the best per arm).
Recorded per run:
- wall_s: the sweep's wall time from the driver (Ray start, trials, evaluation, MLflow);
- trial_s: summed time inside the trainables (Tune's time_total_s: imports, model build, data,
  training, validation, checkpoint reports);
- ideal_wall_s = trial_s / concurrency, and overhead = wall_s - ideal_wall_s (what Ray, the
  driver and the evaluation add on top of perfectly packed trials);
- eval_s: the time spent scoring the best trial of each arm (inside overhead_s);
- steps: optimizer steps trained over all trials (the compute), and the best trial and metric;
- arm_comparisons: each pair of arms, beyond or within the spread of its seeds (summary.json's).
Results go to benchmarks/results/sweep-<experiment>-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from latency import environment, write_result  # noqa: E402

from dloral.provenance import bench_command  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def run(experiment: str, scheduler: str, sets: list[str], workdir: Path) -> dict:
    from dloral.sweep.runner import run_sweep
    from dloral.sweep.spec import load_experiment

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    exp = load_experiment(
        experiment,
        [*sets, f"sweep.scheduler={scheduler}", f"sweep.storage={workdir / 'sweeps'}"],
    )
    cpus = os.cpu_count() or 1
    concurrency = min(exp.trial_count(), max(1, int(cpus // exp.sweep.resources.cpu)))
    if exp.sweep.max_concurrent:
        concurrency = min(concurrency, exp.sweep.max_concurrent)
    t0 = time.perf_counter()
    result = run_sweep(exp)
    wall = time.perf_counter() - t0
    trial_s = sum(t.train_time_s for t in result.trials)
    eval_s = sum(
        b["eval"].get("s_per_frame", 0.0) * b["eval"].get("frames", 0) for b in result.best
    )
    metric, sign = exp.sweep.metric, 1 if exp.sweep.mode == "max" else -1
    done = [t for t in result.trials if metric in t.metrics and t.status == "finished"]
    best = max(done, key=lambda t: sign * t.metrics[metric]) if done else None
    return {
        "scheduler": scheduler,
        "trials": len(result.trials),
        "statuses": {
            s: sum(t.status == s for t in result.trials) for s in ("finished", "stopped", "failed")
        },
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "trial_s": round(trial_s, 2),
        "ideal_wall_s": round(trial_s / concurrency, 2),
        "overhead_s": round(wall - trial_s / concurrency, 2),
        "eval_s": round(eval_s, 2),  # scoring the best per arm (part of overhead_s)
        "overhead_without_eval_s": round(wall - trial_s / concurrency - eval_s, 2),
        "steps": sum(t.step for t in result.trials),
        "metric": metric,
        "best_trial": best.trial_id if best else None,
        "best_values": best.values if best else None,
        "best_metric": best.metrics[metric] if best else None,
        "per_trial": [
            {
                "trial": t.trial_id,
                "values": t.values,
                "status": t.status,
                "step": t.step,
                "seconds": round(t.train_time_s, 2),
                metric: t.metrics.get(metric),
            }
            for t in result.trials
        ],
        "best_per_arm": [
            {"arm": b["arm"], "trial": b["trial"].trial_id, "eval": b["eval"]} for b in result.best
        ],
        "arm_comparisons": list(result.comparisons),  # each pair of arms vs its seed spread
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experiment", default="default")
    p.add_argument("--schedulers", default="asha,fifo")
    p.add_argument("--set", dest="sets", action="append", default=[], help="override a key")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    runs = []
    for scheduler in args.schedulers.split(","):
        with tempfile.TemporaryDirectory(prefix="dloral-sweep-bench-") as tmp:
            runs.append(run(args.experiment, scheduler, args.sets, Path(tmp)))
            print(runs[-1]["scheduler"], {k: v for k, v in runs[-1].items() if k.endswith("_s")})
    record = {
        "benchmark": "sweep",
        "experiment": args.experiment,
        "overrides": args.sets,
        "command": bench_command("sweep.py", argv),
        "environment": environment(torch.device("cpu")),  # versions include ray
        "runs": runs,
    }
    if len(runs) == 2:
        a, g = runs
        record["asha_vs_grid"] = {
            "steps_ratio": round(a["steps"] / max(g["steps"], 1), 3),
            "wall_ratio": round(a["wall_s"] / max(g["wall_s"], 1e-9), 3),
            "same_best": a["best_values"] == g["best_values"],
            "best_metric": {a["scheduler"]: a["best_metric"], g["scheduler"]: g["best_metric"]},
        }
    out = Path(args.out) if args.out else RESULTS / f"sweep-{args.experiment}-cpu.json"
    write_result(record, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
