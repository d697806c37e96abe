"""The outputs of the models the harness runs, kept so that nothing computed is run again.

A DLoRAL method's output of a clip is written to
`<out_dir>/outputs/<method>/<dataset>/<clip>/<frame>.png` (8-bit PNG, what `output_hash`
hashes, so nothing the metrics or the cache see is lost; names as they are, but for '/') with
`output.json`: the key of what made it (the method's description, its checkpoint's sha256, the
pipeline's source and the packages it ran on, the LQ frames' hash, scale, frame names), the
output's hash and the latency measured when it was computed, with its number of timed passes. A
later run into the same out_dir (a resumed bench, another metric, a report) takes the frames
from there when the key matches, the frames' hash checks and, for a clip it times, the kept
latency came from as many timed passes, instead of running the model again (and its timed
passes: the latency rows are those of the run that computed it; run.json lists the reused
outputs). `force` computes everything again. The folders are laid out for
`folder:<label>=<path>`, so a kept output can also be scored as a folder method, or handed to
other tools.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from dloral.atomic import atomic_write_json
from dloral.bench.methods import ClipJob, MethodOutput, output_hash
from dloral.data.frames import FrameError, output_name, read_image, write_png

RECORD = "output.json"


def output_key(facts: dict[str, Any]) -> str:
    """sha256 of what made an output (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def _safe(name: str) -> str:
    """A name as a folder name: as it is, but for '/' (and NUL) and leading dots."""
    return re.sub(r"[/\x00]", "_", name).lstrip(".") or "_"


class OutputStore:
    def __init__(self, root: Path):
        self.root = root

    def folder(self, method: str, job: ClipJob) -> Path:
        return self.root / _safe(method) / _safe(job.dataset) / _safe(job.clip)

    def get(
        self, method: str, job: ClipJob, key: str, timed: int = 0
    ) -> tuple[MethodOutput, str] | None:
        """The kept output for `key` and its hash; None where there is none, it was made
        otherwise, a frame is missing or changed, or `timed` (the timed passes this run wants)
        differs from the passes it was timed with (then it is computed again and replaced)."""
        folder = self.folder(method, job)
        try:
            record = json.loads((folder / RECORD).read_text())
        except (OSError, ValueError):
            return None
        if record.get("key") != key:
            return None
        if timed and record.get("timed_passes") != timed:  # timed otherwise, or not at all
            return None
        names = tuple(record["names"])
        try:
            frames = torch.stack([read_image(folder / output_name(n)) for n in names])
        except (FrameError, OSError, RuntimeError):
            return None
        digest = output_hash(frames)
        if digest != record["output_hash"]:
            return None
        seconds_range = record.get("seconds_range")
        output = MethodOutput(
            frames,
            record.get("seconds_per_frame"),
            tuple(seconds_range) if seconds_range else None,
            record.get("peak_mem_gib"),
            record.get("memory_kind", ""),
            names,
            record.get("first_frame", "self"),
        )
        return output, digest

    def put(
        self, method: str, job: ClipJob, key: str, output: MethodOutput, digest: str, timed: int
    ) -> Path:
        """Write the frames, then the record (last: a record always has its frames); `timed`:
        the timed passes its latency is the median of (0: not timed)."""
        folder = self.folder(method, job)
        (folder / RECORD).unlink(missing_ok=True)
        names = output.names if output.names is not None else job.names
        files = {output_name(n) for n in names}
        for stale in folder.glob("*.png"):  # an earlier output's frames this one lacks
            if stale.name not in files:
                stale.unlink()
        for name, frame in zip(names, output.frames, strict=True):
            write_png(frame, folder / output_name(name), compress_level=1)
        atomic_write_json(
            folder / RECORD,
            {
                "key": key,
                "output_hash": digest,
                "method": method,
                "dataset": job.dataset,
                "clip": job.clip,
                "names": list(names),
                "first_frame": output.first_frame,
                "seconds_per_frame": output.seconds_per_frame,
                "seconds_range": list(output.seconds_range) if output.seconds_range else None,
                "peak_mem_gib": output.peak_mem_gib,
                "memory_kind": output.memory_kind,
                "timed_passes": timed if output.seconds_per_frame is not None else 0,
            },
        )
        return folder
