"""Output writing of `dloral-exp upscale`: what caps its frames/s however fast the model runs.

    uv run python benchmarks/frame_io.py                     # bigbuckbunny, 1280x720, 16 frames
    uv run python benchmarks/frame_io.py --frames-dir DIR --count 32

Writes the same real frames as PNG three ways, into a temporary folder, and times each:
- `sequential-level6`: write_png one after the other at PIL's default zlib level 6 (what
  `upscale` did before the writer threads);
- `sequential-level1`: the same at level 1 (the default of `upscale --png-compression`);
- `writer-level1`: `FrameWriter` (what `upscale` uses: WRITERS threads, level 1), the frames
  handed over as fast as it takes them.
Each row has seconds per frame, the frames/s that alone allows, and the bytes written. The pixels
are the same at every level (checked). Record (command, versions, commit) -> benchmarks/results/.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dloral.atomic import atomic_write_json
from dloral.data.frames import FrameWriter, open_frames, packaged_clip, write_png
from dloral.provenance import bench_command, cpu_environment
from dloral.upscale import WRITERS

RESULTS = Path(__file__).parent / "results"


def _timed(name: str, frames, folder: Path, write) -> dict:
    folder.mkdir()
    t0 = time.perf_counter()
    write(frames, folder)
    seconds = (time.perf_counter() - t0) / len(frames)
    files = sorted(folder.glob("*.png"))
    assert len(files) == len(frames), f"{name}: wrote {len(files)} of {len(frames)} frames"
    return {
        "way": name,
        "seconds_per_frame": round(seconds, 4),
        "frames_per_second_cap": round(1 / seconds, 1),
        "mib_per_frame": round(sum(f.stat().st_size for f in files) / len(files) / 2**20, 3),
    }


def sequential(level: int):
    def write(frames, folder: Path) -> None:
        for i, frame in enumerate(frames):
            write_png(frame, folder / f"{i:05d}.png", compress_level=level)

    return write


def threaded(frames, folder: Path) -> None:
    writer = FrameWriter(WRITERS, compress_level=1)
    for i, frame in enumerate(frames):
        writer.write(frame, folder / f"{i:05d}.png")
    writer.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--frames-dir", default=None, help="PNG frames (default: bigbuckbunny.mp4)")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS / "frame-io-cpu.json"))
    args = p.parse_args(argv)
    source = open_frames(args.frames_dir or packaged_clip("bigbuckbunny.mp4"))
    frames = [f for _, f in zip(range(args.count), (f for _, f in source.frames()), strict=False)]
    with tempfile.TemporaryDirectory(prefix="dloral-frame-io-") as tmp:
        rows = [
            _timed("sequential-level6", frames, Path(tmp, "l6"), sequential(6)),
            _timed("sequential-level1", frames, Path(tmp, "l1"), sequential(1)),
            _timed("writer-level1", frames, Path(tmp, "w1"), threaded),
        ]
        for folder in ("l1", "w1"):  # lossless at every level: the same pixels
            for a, b in zip(
                sorted(Path(tmp, "l6").glob("*.png")),
                sorted(Path(tmp, folder).glob("*.png")),
                strict=True,
            ):
                assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), b.name
    h, w = frames[0].shape[-2:]
    record = {
        "benchmark": "frame_io",
        "command": bench_command("frame_io.py", argv),
        "input": f"{source.path}, first {len(frames)} frames, {w}x{h}",
        "writers": WRITERS,
        "rows": rows,
        "same_pixels_at_every_level": True,
        "environment": cpu_environment(),
    }
    atomic_write_json(Path(args.out), record)
    for row in rows:
        print(
            f"{row['way']:>18}: {row['seconds_per_frame']:.4f} s/frame "
            f"(<= {row['frames_per_second_cap']} frames/s), {row['mib_per_frame']} MiB/frame"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
