"""Upscaled frames on disk -> a video file to watch (H.264 by PyAV), with the input's audio.

The PNG frames stay the lossless record that metrics read; the video is made from them once
every frame is on disk, so a stopped and resumed upscale makes the same video. H.264 at CRF 18
(x264's "visually lossless" range) in 4:2:0, which every player decodes; frame sizes that 4:2:0
cannot hold (odd) are encoded 4:4:4 (High 4:4:4, fewer players). The file is written beside
its path and renamed into place, so a stopped encode leaves no half video.

Audio: the input video's audio streams are copied packet for packet (no re-encode) when the
video covers the input from its first frame to its last; otherwise they would be out of step,
and none is copied (the reason is returned).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from dloral.atomic import atomic_write

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")
CODEC = "libx264"
DEFAULT_CRF = 18
DEFAULT_FPS = 25.0  # frame folders carry no rate


class EncodeError(ValueError):
    """A video that cannot be made; the message names the file."""


@dataclass
class Encoded:
    path: Path
    frames: int
    fps: float
    crf: int
    pix_fmt: str
    audio: str  # what was done with the input's audio, in words

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "codec": CODEC,
            "crf": self.crf,
            "pix_fmt": self.pix_fmt,
            "fps": self.fps,
            "frames": self.frames,
            "audio": self.audio,
        }


def check_video_path(path: Path) -> None:
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise EncodeError(f"{path}: the video must be one of {', '.join(VIDEO_SUFFIXES)}")


def encode_frames(
    frames: Sequence[Path],
    path: Path,
    fps: float,
    crf: int = DEFAULT_CRF,
    audio_from: Path | None = None,
    audio_why_not: str = "",
) -> Encoded:
    """Encode the PNG `frames` (in order, one size) into `path` at `fps`; copy the audio of
    `audio_from` (a video), or say why not (`audio_why_not`, or: it has none). Audio the
    container cannot hold (PCM in mp4, ...) is left out, and the result says why."""
    check_video_path(path)
    if not frames:
        raise EncodeError(f"{path}: no frames to encode")
    with Image.open(frames[0]) as first:
        size = first.size
    pix_fmt = "yuv420p" if size[0] % 2 == 0 and size[1] % 2 == 0 else "yuv444p"
    rate = Fraction(fps).limit_denominator(1001)
    for stale in path.parent.glob(f".{path.stem}.*{path.suffix}"):  # a killed encode's
        stale.unlink(missing_ok=True)
    audio = audio_why_not or "none: the input has no audio"
    if audio_from is not None and audio_streams(audio_from):
        try:
            audio = _write(path, frames, size, rate, crf, pix_fmt, audio_from)
        except EncodeError:
            # FFmpeg says only "invalid argument" when a container refuses a codec (PCM in
            # mp4, ...): without the audio, a video error is raised again, else it was the audio
            _write(path, frames, size, rate, crf, pix_fmt, None)
            codecs = ", ".join(audio_codecs(audio_from))
            audio = f"not copied: {path.suffix} did not take the input's {codecs} audio as it is"
    else:
        _write(path, frames, size, rate, crf, pix_fmt, None)
    return Encoded(path, len(frames), float(rate), crf, pix_fmt, audio)


def _write(path, frames, size, rate, crf, pix_fmt, audio_from: Path | None) -> str:
    """One encode, written beside `path` and renamed into place; the audio said in words.
    Audio packets are shifted so that the input's first video frame is time 0 (as the output's
    is) and muxed as their time comes, between the video frames (not all at the end)."""
    import av

    said = "none: the input has no audio"

    def write(tmp: str) -> None:
        nonlocal said
        source = av.open(str(audio_from)) if audio_from is not None else None
        try:
            audio_in = list(source.streams.audio) if source is not None else []
            with av.open(tmp, "w", format=_format(path)) as out:
                stream = out.add_stream(CODEC, rate=rate)
                stream.width, stream.height, stream.pix_fmt = *size, pix_fmt
                stream.options = {"crf": str(crf), "preset": "medium"}
                if pix_fmt == "yuv444p":
                    stream.profile = "High 4:4:4 Predictive"
                copies = {s.index: out.add_stream_from_template(s) for s in audio_in}
                audio = _shifted_audio(source, audio_in, copies) if copies else iter(())
                upcoming = next(audio, None)
                for i, frame_path in enumerate(frames):
                    image = _read_rgb(frame_path, size, i)
                    out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
                    while upcoming is not None and upcoming[0] <= i / rate:
                        out.mux(upcoming[1])
                        upcoming = next(audio, None)
                out.mux(stream.encode())
                while upcoming is not None:
                    out.mux(upcoming[1])
                    upcoming = next(audio, None)
                if copies:
                    names = ", ".join(s.codec_context.name for s in audio_in)
                    said = f"copied from {audio_from.name} ({names}, not re-encoded)"
        except av.error.FFmpegError as err:
            raise EncodeError(f"{path}: encoding failed ({err})") from err
        finally:
            if source is not None:
                source.close()

    atomic_write(path, write)
    return said


def _shifted_audio(source, audio_in, copies):
    """(time in s, packet) of the audio streams, in file order, shifted by the input's video
    start (so audio and video stay in step when the input does not start at 0)."""
    video = source.streams.video[0] if source.streams.video else None
    start = Fraction(0)
    if video is not None and video.start_time is not None:
        start = video.start_time * video.time_base
    for packet in source.demux(*audio_in):
        if packet.size == 0:  # the demuxer's end-of-stream packets
            continue
        base = packet.time_base
        shift = round(start / base)
        if packet.pts is not None:
            packet.pts -= shift
        if packet.dts is not None:
            packet.dts -= shift
        at = (packet.pts if packet.pts is not None else packet.dts or 0) * base
        packet.stream = copies[packet.stream.index]
        yield at, packet


def audio_codecs(path: Path) -> list[str]:
    """The codecs of the audio streams of the video at `path` (none where it cannot be read)."""
    import av

    try:
        with av.open(str(path)) as container:
            return [s.codec_context.name for s in container.streams.audio]
    except av.error.FFmpegError:
        return []


def audio_streams(path: Path) -> int:
    """How many audio streams the video at `path` has (0 where it cannot be read)."""
    return len(audio_codecs(path))


def _format(path: Path) -> str:
    return {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov"}[path.suffix.lower()]


def _read_rgb(path: Path, size: tuple[int, int], index: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.size != size:
                raise EncodeError(
                    f"{path}: frame {index} is {image.size[0]}x{image.size[1]}, the video's "
                    f"{size[0]}x{size[1]}"
                )
            return np.asarray(image.convert("RGB"))
    except OSError as err:  # missing, truncated, not an image
        raise EncodeError(f"{path}: frame {index} unreadable ({err})") from err
