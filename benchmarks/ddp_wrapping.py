"""How to wrap the alternating stages in DDP: measured on 2 CPU processes (gloo, tiny profile).

    uv run python benchmarks/ddp_wrapping.py --steps 12 --repeats 2

The recipe trains C-LoRA + CFR in consistency stages and D-LoRA in detail stages. Three ways to
put that under DistributedDataParallel, each timed over `--steps` forward+backward+all-reduce
steps of the detail stage (after 2 warm-up steps), on the real model and training samples:

  one wrapper, no find_unused   built once over every parameter either stage trains: the frozen
                                stage's parameters get no gradient, DDP's reduction never
                                finishes (an error at the next step) - recorded, not timed
  one wrapper, find_unused      the recipe's choice: built once, unused parameters found by a
                                graph walk each step, both adapters' buckets all-reduced
  rebuilt per stage             built at each switch over that stage's parameters only: half
                                the all-reduce, no graph walk (find_unused still needed for the
                                no_gate / off CFR variants, which leave CFR layers unused)

Results go to benchmarks/results/ddp-wrapping-tiny-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

warnings.filterwarnings("ignore", message=".*kernels-community.*")

sys.path.insert(0, str(Path(__file__).parent))
from latency import environment, write_result  # noqa: E402

from dloral.provenance import bench_command  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = ("one wrapper, no find_unused", "one wrapper, find_unused", "rebuilt per stage")


def _rank(rank: int, world: int, port: int, mode: str, steps: int, out: str) -> None:
    """One process of the group, timing `mode` (each mode in fresh processes: a DDP wrapper
    changes the parameters' gradient hooks for the life of the process)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dloral.data.embedded import prepare_embedded
    from dloral.model.dloral import DLoRAL
    from dloral.train import recipe
    from dloral.train.config import load_config
    from dloral.train.schedule import plan

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(None, ["data.sampler.crop=32", "loss.lpips='optional'"]).resolved()
    prepare_embedded(cfg.data.train_path().parent)
    model = DLoRAL(cfg.model)
    trainable = recipe._all_trainable(model)
    data = recipe._training_set(cfg, world)
    ctx = {"device": torch.device("cpu"), "lpips": None, "csd": None, "temporal": "warped"}
    ctx["prompts"] = recipe.TrainingPrompts(cfg.loss, model.encode_prompt, ctx["device"])
    with torch.no_grad():
        ctx["neg"] = model.encode_prompt([cfg.loss.neg_prompt])
    p = plan(cfg.schedule.alternation_period + 1, cfg.schedule, cfg.loss.weights)  # detail
    if mode == "rebuilt per stage":
        model.set_stage("detail")
        ctx["forward"] = DDP(model, forward_sync_buffers=False)
    else:
        for q in trainable:
            q.requires_grad_(True)
        find = mode == "one wrapper, find_unused"
        ctx["forward"] = DDP(model, forward_sync_buffers=False, find_unused_parameters=find)
        model.set_stage("detail")
    times: list[float] = []
    try:
        for i in range(steps + 2):
            batch = torch.utils.data.default_collate([data[i * world + rank]])
            gen = torch.Generator().manual_seed(i)
            t0 = time.perf_counter()
            recipe.step_losses(model, batch, p, ctx, gen)["total"].backward()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        timed = sorted(times[2:])
        result = {"median_s_per_step": round(timed[len(timed) // 2], 4), "steps": steps}
    except RuntimeError as err:
        result = {"error": str(err).splitlines()[0][:300], "at_step": len(times) + 1}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    runs: dict[str, list] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # modes interleaved: the machine's load drifts
            for mode in MODES:
                out = str(Path(tmp) / "result.json")
                mp.spawn(_rank, args=(2, _free_port(), mode, args.steps, out), nprocs=2)
                runs[mode].append(json.loads(Path(out).read_text()))
    record = {
        "benchmark": "ddp_wrapping",
        "command": bench_command("ddp_wrapping.py", argv),
        "profile": "tiny",
        "setting": "2 processes x 1 torch thread, gloo, crop 32, 3 frames, detail stage",
        "load_average_1_5_15": list(os.getloadavg()),
        "environment": environment(torch.device("cpu")),
        "runs": runs,
    }
    out = RESULTS / "ddp-wrapping-tiny-cpu.json"
    write_result(record, out)
    print(json.dumps(runs, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
