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
    `audio_from` (a video), or say why not (`audio_why_not`, or: it has none)."""
    import av

    check_video_path(path)
    if not frames:
        raise EncodeError(f"{path}: no frames to encode")
    with Image.open(frames[0]) as first:
        width, height = first.size
    pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    rate = Fraction(fps).limit_denominator(1001)
    audio = audio_why_not or "none: the input has no audio"

    def write(tmp: str) -> None:
        nonlocal audio
        source = av.open(str(audio_from)) if audio_from is not None else None
        try:
            audio_in = list(source.streams.audio) if source is not None else []
            with av.open(tmp, "w", format=_format(path)) as out:
                stream = out.add_stream(CODEC, rate=rate)
                stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
                stream.options = {"crf": str(crf), "preset": "medium"}
                if pix_fmt == "yuv444p":
                    stream.profile = "High 4:4:4 Predictive"
                copies = {s.index: out.add_stream_from_template(s) for s in audio_in}
                for i, frame_path in enumerate(frames):
                    image = _read_rgb(frame_path, (width, height), i)
                    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                    out.mux(stream.encode(frame))
                out.mux(stream.encode())
                for packet in source.demux(*audio_in) if copies else ():
                    if packet.dts is None:  # the demuxer's flush packets
                        continue
                    packet.stream = copies[packet.stream.index]
                    out.mux(packet)
                if copies:
                    names = ", ".join(s.codec_context.name for s in audio_in)
                    audio = f"copied from {audio_from.name} ({names}, not re-encoded)"
        except av.error.FFmpegError as err:
            raise EncodeError(f"{path}: encoding failed ({err})") from err
        finally:
            if source is not None:
                source.close()

    atomic_write(path, write)
    return Encoded(path, len(frames), float(rate), crf, pix_fmt, audio)


def audio_streams(path: Path) -> int:
    """How many audio streams the video at `path` has (0 where it cannot be read)."""
    import av

    try:
        with av.open(str(path)) as container:
            return len(container.streams.audio)
    except av.error.FFmpegError:
        return 0


def _format(path: Path) -> str:
    return {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov"}[path.suffix.lower()]


def _read_rgb(path: Path, size: tuple[int, int], index: int) -> np.ndarray:
    with Image.open(path) as image:
        if image.size != size:
            raise EncodeError(
                f"{path}: frame {index} is {image.size[0]}x{image.size[1]}, the video's "
                f"{size[0]}x{size[1]}"
            )
        return np.asarray(image.convert("RGB"))
