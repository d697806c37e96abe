"""Methods the benchmark scores: bicubic, DLoRAL (a checkpoint or the tiny model) and `folder`
(precomputed outputs of any peer method). Each turns one clip's LQ frames into output frames
(T, 3, sH, sW) float in [0, 1]; the harness runs each method once per clip.

Latency (bicubic and dloral, which the harness runs itself): one warm-up pass over the first two
frames of the first timed clip (kernels, allocator), then `latency_repeats` (>= 3) passes over
the whole clip, each timed end to end with CUDA synchronised; seconds per frame = median pass
time / T, and the fastest and slowest pass are kept as the spread. A clip past the suite's
`latency_clips` (when set) gets one untimed pass and no latency rows. The last pass's frames are
the output (the pipeline is seeded, so passes agree). Peak memory, per method on its own: its
model's tensors plus the peak increase in memory in use during its timed passes
(dloral.bench.memory: the CUDA allocator's peak, reset per method; on CPU the RSS), never the
process's high-water mark.

Untrained weights: a method says in `describe()["untrained"]` why its weights are untrained
(a random-init backbone; no trained checkpoint), or None; reports mark such methods from it.

First frame: DLoRAL with `first_frame = "skip"` (the reference's test script) has no output for
a clip's frame 0, and a folder of peer outputs may lack it likewise (the reference's layout);
a method's output says which frames it covers (`MethodOutput.names`) and its first-frame policy,
and the harness scores only those frames.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from dloral.bench.memory import PeakMemory, tensor_bytes
from dloral.bench.suite import TINY, parse_method
from dloral.data.frames import FrameError, natural_key, open_frames, read_image, to_uint8
from dloral.devices import resolve_device, resolve_dtype, synchronize
from dloral.provenance import versions
from dloral.resize import resize_frames

log = logging.getLogger(__name__)

WARMUP_FRAMES = 2


class MethodError(ValueError):
    """A method cannot produce a clip; the message names the method, the clip and the frame."""


@dataclass(frozen=True)
class ClipJob:
    """What a method gets for one clip: frames decoded once by the harness and shared."""

    dataset: str
    clip: str
    names: tuple[str, ...]  # the frames scored (the first `frames` of the clip)
    all_names: tuple[str, ...]  # every frame of the clip (GT names, else LQ names)
    lq: torch.Tensor | None  # (T, 3, h, w) in [0, 1]
    scale: int
    out_size: tuple[int, int] | None  # (H, W) the output must have: the GT's, else LQ * scale
    timed: bool = True  # False: one untimed pass (latency measured on other clips)


@dataclass
class MethodOutput:
    frames: torch.Tensor  # (T', 3, sH, sW) float32 in [0, 1], CPU
    seconds_per_frame: float | None = None  # None: not measured (folder methods)
    seconds_range: tuple[float, float] | None = None  # fastest and slowest pass, s per frame
    peak_mem_gib: float | None = None
    memory_kind: str = ""  # what peak_mem_gib measures
    names: tuple[str, ...] | None = None  # the clip frames `frames` are; None: all job.names
    first_frame: str = "self"  # "skip": the method wrote no output for the clip's frame 0


class Method(Protocol):
    name: str  # the label in results
    measures_latency: bool

    def describe(self) -> dict: ...

    def run(self, job: ClipJob) -> MethodOutput: ...


def output_hash(frames: torch.Tensor) -> str:
    """sha256 over the shape and the uint8 frames (what a PNG of the output would hold)."""
    digest = hashlib.sha256(str(tuple(frames.shape)).encode())
    for frame in frames:
        digest.update(to_uint8(frame).tobytes())
    return digest.hexdigest()


class _Timed:
    """Warm-up once, then median-timed passes; subclasses define `_pass(lq, scale)`."""

    measures_latency = True
    device = torch.device("cpu")
    repeats = 3

    def __init__(self) -> None:
        self._warm = False

    first_frame = "self"

    def _pass(self, names: tuple[str, ...], lq: torch.Tensor, scale: int) -> torch.Tensor:
        """Output frames for `names`; with first_frame `skip`, for names[1:]."""
        raise NotImplementedError

    def resident_bytes(self) -> int:
        """Bytes of this method's own model tensors on its device (0: it has no model)."""
        return 0

    def run(self, job: ClipJob) -> MethodOutput:
        names, lq, scale = job.names, job.lq, job.scale
        if lq is None:
            raise MethodError(
                f"{self.name}: {job.dataset} clip {job.clip!r} has no LQ frames to upscale"
            )
        if not job.timed:  # the output only
            return self._output(job, self._pass(names, lq, scale), None, None, "")
        if not self._warm:
            self._pass(names[:WARMUP_FRAMES], lq[:WARMUP_FRAMES], scale)
            synchronize(self.device)
            self._warm = True
        seconds, out = [], None
        with PeakMemory(self.device) as memory:
            for _ in range(self.repeats):
                out = None  # the last pass's output, freed: one pass's memory is measured
                start = time.perf_counter()
                out = self._pass(names, lq, scale)
                synchronize(self.device)
                seconds.append(time.perf_counter() - start)
        peak = None
        if memory.peak_bytes is not None:
            peak = (memory.peak_bytes + self.resident_bytes()) / 2**30
        kind = f"this method's model tensors + {memory.kind}"
        return self._output(job, out, seconds, peak, kind)

    def _output(self, job, out, seconds, peak, kind) -> MethodOutput:
        """The frames on the host, checked against the clip (count and size); the latency over
        `seconds` (none: untimed)."""
        names, scale = job.names, job.scale
        frames = out.float().cpu().clamp(0, 1)
        covered = names[1:] if self.first_frame == "skip" else names
        if len(frames) != len(covered):
            raise MethodError(
                f"{self.name}: {job.dataset} clip {job.clip!r}: {len(frames)} output frames for "
                f"{len(covered)} expected (first frame {self.first_frame})"
            )
        if job.out_size is not None and tuple(frames.shape[-2:]) != tuple(job.out_size):
            raise MethodError(
                f"{self.name}: {job.dataset} clip {job.clip!r}: output {tuple(frames.shape[-2:])} "
                f"differs from the GT size {tuple(job.out_size)} (scale {scale})"
            )
        if not seconds:
            return MethodOutput(frames, names=covered, first_frame=self.first_frame)
        n = max(len(covered), 1)
        return MethodOutput(
            frames,
            statistics.median(seconds) / n,
            (min(seconds) / n, max(seconds) / n),
            peak,
            kind,
            covered,
            self.first_frame,
        )


class Bicubic(_Timed):
    """PIL bicubic x scale (dloral.resize), the upsampling DLoRAL itself starts from."""

    def __init__(self, repeats: int = 3) -> None:
        super().__init__()
        self.name, self.repeats = "bicubic", repeats

    def describe(self) -> dict:
        return {"kind": "bicubic", "implementation": "dloral.resize PIL bicubic (a=-0.5)"}

    def _pass(self, names: tuple[str, ...], lq: torch.Tensor, scale: int) -> torch.Tensor:
        h, w = lq.shape[-2:]
        return resize_frames(lq, (h * scale, w * scale))


def mlflow_checkpoint(ref: str, dst: str | os.PathLike | None = None) -> Path:
    """The checkpoint a training run or sweep trial logged to MLflow ($MLFLOW_TRACKING_URI):
    `ref` is a run id or a Tune trial id (tag dloral.trial_id); downloaded to `dst`."""
    from dloral.tracking import TRIAL_TAG, mlflow_client, tracking_uri

    client = mlflow_client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = (
        client.search_runs(experiments, filter_string=f"attributes.run_id = '{ref}'", max_results=1)
        if re.fullmatch(r"[0-9a-f]{32}", ref)
        else []
    )
    runs = runs or client.search_runs(
        experiments, filter_string=f"tags.`{TRIAL_TAG}` = '{ref}'", max_results=1
    )
    if not runs:
        raise MethodError(
            f"mlflow:{ref}: no MLflow run or sweep trial with that id at {tracking_uri()} "
            "($MLFLOW_TRACKING_URI)"
        )
    run = runs[0]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    if "checkpoint" not in names:
        raise MethodError(
            f"mlflow:{ref}: run {run.info.run_id} logged no checkpoint artifact (a trial stopped "
            "early by ASHA keeps its checkpoints only in the sweep storage, "
            "<storage>/<sweep>/<trial id>/checkpoint_*: pass that folder instead)"
        )
    folder = Path(dst or tempfile.mkdtemp(prefix="dloral-mlflow-ckpt-"))
    return Path(client.download_artifacts(run.info.run_id, "checkpoint", str(folder)))


class DLoRALMethod(_Timed):
    """DLoRAL from a checkpoint folder, the official model.pkl, `tiny` (the tiny profile as
    training starts it: trained VAE, identity one step) or `tiny-random` (every weight random,
    the code path only); LoRAs merged, set up as `dloral-exp upscale` does (dtype auto; colour
    fix, first frame, size to 8 and previous frame from the suite's [options])."""

    def __init__(
        self,
        label: str,
        source: str,
        device: str = "auto",
        repeats: int = 3,
        seed: int = 0,
        process_size: int = 512,
        batch_size: int = 4,
        first_frame: str = "self",
        size_to_8: str = "pad",
        previous: str = "carry",
        color_fix: str = "adain",
    ) -> None:
        super().__init__()
        self.name, self.source, self.repeats = label, source, repeats
        self.first_frame, self.size_to_8, self.previous = first_frame, size_to_8, previous
        self.color_fix = color_fix
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(self.device)
        self.seed, self.process_size, self.batch_size = seed, process_size, batch_size
        self._model = None
        self._upscalers: dict[int, object] = {}
        self._waited_on_host: list[str] = []  # "dataset/clip" where its VAE tiles waited there
        self._checkpoint: Path | None = None  # the checkpoint loaded (an mlflow: one downloaded)
        self._checkpoint_sha256: str | None = None

    def _tiny_config(self):
        from dloral.model.dloral import DLoRALConfig

        init = "random" if self.source == "tiny-random" else "pretrained"
        return DLoRALConfig(profile="tiny", seed=self.seed, tiny_init=init)

    def missing_weights(self) -> list:
        """The weight files this method's model needs and this machine lacks, found without
        building it (an `mlflow:` checkpoint is checked when it is downloaded and loaded)."""
        from dloral.model.checkpoint import CheckpointError, checkpoint_config
        from dloral.model.requirements import missing_weights

        if self.source in TINY:
            return missing_weights(self._tiny_config())
        path = Path(self.source)
        if self.source.startswith("mlflow:") or not path.exists():
            return []  # _load names what is wrong
        try:
            cfg = checkpoint_config(path)
        except CheckpointError:
            return []  # _load reports it with the keys
        return missing_weights(cfg, spynet_from_checkpoint=True)

    def _load(self):
        if self._model is None:
            from dloral.model.dloral import DLoRAL

            if self.source in TINY:
                model = DLoRAL(self._tiny_config())
            else:
                from dloral.model.checkpoint import (
                    CheckpointError,
                    find_checkpoint,
                    load_checkpoint,
                )

                if self.source.startswith("mlflow:"):
                    path = mlflow_checkpoint(self.source[len("mlflow:") :])
                else:
                    path = Path(self.source)
                if not path.exists():
                    raise MethodError(f"{self.name}: checkpoint {path} does not exist")
                try:  # a training run: its latest checkpoint, named once for the whole run
                    path = find_checkpoint(path)
                    model, report = load_checkpoint(path, strict=False)
                except CheckpointError as err:
                    raise MethodError(f"{self.name}: {err}") from err
                self._checkpoint = path
                if not report.clean:
                    log.warning("%s: checkpoint %s", self.name, report.summary())
            model.merge_lora()
            self._model = model
        return self._model

    def _upscaler(self, scale: int):
        from dloral.model.pipeline import UpscaleOptions, VideoUpscaler

        if scale not in self._upscalers:
            opts = UpscaleOptions(
                scale=scale,
                batch_size=self.batch_size,
                process_size=self.process_size,
                seed=self.seed,
                first_frame=self.first_frame,
                size_to_8=self.size_to_8,
                previous=self.previous,
                color_fix=self.color_fix,
            )
            self._upscalers[scale] = VideoUpscaler(self._load(), self.device, self.dtype, opts)
        return self._upscalers[scale]

    def untrained(self) -> str | None:
        """Why this method's weights are untrained (reports mark it), or None."""
        model = self._load()
        if model.weights == "random-init":
            return "random-init backbone"
        if self.source in TINY:
            return "no trained checkpoint (LoRAs and CFR as initialised)"
        return None

    def resident_bytes(self) -> int:
        return tensor_bytes(self._model, self.device)

    def run(self, job: ClipJob) -> MethodOutput:
        output = super().run(job)
        tiles = self._upscaler(job.scale).vae_tiles
        if tiles is not None and tiles.wait_on == "host":  # chosen for this clip's frame size
            self._waited_on_host.append(f"{job.dataset}/{job.clip}")
        return output

    def describe(self) -> dict:
        from dloral.model.vae_tiles import VAETiles

        model = self._load()
        return {
            "kind": "dloral",
            "source": self.source,
            "checkpoint": str(self._checkpoint) if self._checkpoint else None,
            "untrained": self.untrained(),
            "weights": model.weights,
            "spynet": model.spynet_weights,  # "random-init" or where SPyNet's weights came from
            "model": model.describe(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "options": {
                "process_size": self.process_size,
                "batch_size": self.batch_size,
                "seed": self.seed,
                "color_fix": self.color_fix,
                "lora": "merged",
                "first_frame": self.first_frame,
                "size_to_8": self.size_to_8,
                "previous": self.previous,
                "vae_tiling": VAETiles().describe(),
                # where its tiles wait: the device, or the host where a clip would not fit
                # (the same frames; the clips where it was the host are listed below)
                "vae_tiles_wait": "auto",
            },
            **(
                {"vae_tiles_waited_on_host": list(self._waited_on_host)}
                if self._waited_on_host
                else {}
            ),
        }

    def output_facts(self, job: ClipJob) -> dict:
        """What this method's output of `job` depends on (dloral.bench.outputs keys it): the
        description (model, weights' hashes, dtype, device, options), the checkpoint's sha256,
        the pipeline's code and the packages it runs on, the LQ frames, the scale and the
        frames' names."""
        facts = {
            k: v
            for k, v in self.describe().items()
            if k not in ("untrained", "checkpoint", "vae_tiles_waited_on_host")
        }  # the checkpoint by its sha256 below, not by where it lies; where tiles waited
        # changes no frame
        if self._checkpoint is not None and self._checkpoint_sha256 is None:
            from dloral.model.checkpoint import weights_sha256

            self._checkpoint_sha256 = weights_sha256(self._checkpoint)
        facts["checkpoint_sha256"] = self._checkpoint_sha256
        facts["code_sha256"] = pipeline_code_sha256()
        facts["versions"] = {k: v for k, v in versions().items() if k in OUTPUT_PACKAGES}
        facts["lq_sha256"] = output_hash(job.lq) if job.lq is not None else None
        facts.update(scale=job.scale, names=list(job.names), out_size=job.out_size)
        return facts

    def _pass(self, names: tuple[str, ...], lq: torch.Tensor, scale: int) -> torch.Tensor:
        from dloral.model.memory import check_upscaler

        upscaler = self._upscaler(scale)
        suite_option = {"batch_size": "batch_size = {} in the suite's [options]"}
        check_upscaler(upscaler, tuple(lq.shape[-2:]), self.batch_size, suite_option)
        return torch.stack([f for _, f in upscaler.upscale(zip(names, lq, strict=True))])


OUTPUT_PACKAGES = ("torch", "diffusers", "peft", "transformers")


@functools.cache
def pipeline_code_sha256() -> str:
    """sha256 of the source that turns LQ frames into DLoRAL's output (dloral/model, resize,
    devices): an edited checkout makes other outputs under the same version number."""
    root = Path(__file__).resolve().parent.parent
    files = sorted((root / "model").glob("*.py")) + [root / "resize.py", root / "devices.py"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def check_weights(methods: list) -> None:
    """One MethodError naming every weight file the DLoRAL methods need and this machine lacks,
    before any model is built."""
    models = [method for method in methods if isinstance(method, DLoRALMethod)]
    if not models:  # bicubic and folders need no weights (and no model imports, which are slow)
        return
    from dloral.model.requirements import MissingWeights, require_weights

    missing = [m for method in models for m in method.missing_weights()]
    try:
        require_weights(missing)
    except MissingWeights as err:
        raise MethodError(str(err)) from err


REFERENCE_NAME = re.compile(r"frame_(\d{4,})")  # the reference's test script: frame_%04d.png


class FolderMethod:
    """Precomputed outputs: <path>/<clip>/ (or <path>/<dataset>/<clip>/) frames matched by
    stem to the clip's GT frame names (LQ names on sets without GT), or, in a folder none of
    whose files has such a name, named as the reference's test script names them:
    frame_<clip frame index, %04d>.png (yjsunnn/DLoRAL src/test_DLoRAL.py)."""

    measures_latency = False

    def __init__(self, label: str, path: str) -> None:
        self.name, self.path = label, Path(path).expanduser()
        self.naming: set[str] = set()  # how the clips' files were matched (run.json)

    def describe(self) -> dict:
        out = {"kind": "folder", "path": str(self.path)}
        if self.naming:
            out["frame_names"] = sorted(self.naming)
        return out

    @staticmethod
    def _by_reference_index(found: tuple[str, ...], all_names: tuple[str, ...]) -> dict | None:
        """{GT stem: file} when every file is frame_<index>.png of an index of the clip."""
        indices = {}
        for name in found:
            match = REFERENCE_NAME.fullmatch(Path(name).stem)
            if match is None or int(match.group(1)) >= len(all_names):
                return None
            indices[Path(all_names[int(match.group(1))]).stem] = name
        return indices if len(indices) == len(found) else None

    def _clip_dir(self, dataset: str, clip: str) -> Path:
        for folder in (self.path / dataset / clip, self.path / clip):
            if folder.is_dir():
                return folder
        raise MethodError(
            f"{self.name}: no outputs for {dataset} clip {clip!r}: neither "
            f"{self.path / clip} nor {self.path / dataset / clip} is a folder"
        )

    def frames_for(
        self, dataset: str, clip: str, names: tuple[str, ...], all_names: tuple[str, ...]
    ) -> list[Path]:
        """Paths of the output frames for the scored `names`, the first len(names) of a clip's
        `all_names` (a suite's `frames` limit scores the first N), matched by position to
        `all_names`. The folder holds every frame of the clip, or exactly the scored ones (as a
        run with the same limit kept them), either of them possibly without the clip's first
        frame (the reference writes no output for frame 0): then `names[1:]`. Anything else
        (a missing frame, frames past the scored ones in part, a file that is no frame of the
        clip) is an error naming them: a folder shifted by a frame is not scored."""
        folder = self._clip_dir(dataset, clip)
        try:
            found = open_frames(folder).names
        except FrameError as err:
            raise MethodError(f"{self.name}: {dataset} clip {clip!r}: {err}") from err
        by_stem = {Path(n).stem: n for n in found}
        in_clip = [Path(n).stem for n in all_names]
        wanted = in_clip[: len(names)]
        naming = "the clip's frame names"
        if found and not set(by_stem) & set(in_clip):
            indexed = self._by_reference_index(found, all_names)
            if indexed is not None:
                by_stem, naming = indexed, "frame_%04d.png by clip frame index (the reference's)"
        extra = sorted(set(by_stem) - set(in_clip), key=natural_key)
        present = {s for s in in_clip if s in by_stem}
        layouts = {"every frame of the clip": set(in_clip), "the scored frames": set(wanted)}
        for layout in layouts.values():
            if extra:
                break
            if present == layout:
                self.naming.add(naming)
                return [folder / by_stem[s] for s in wanted]
            if len(wanted) > 1 and present == layout - {in_clip[0]}:  # first frame skipped
                self.naming.add(naming)
                return [folder / by_stem[s] for s in wanted[1:]]
        missing = [s for s in wanted if s not in by_stem]
        if not missing and not extra:  # the scored frames there, the frames past them in part
            missing = [s for s in in_clip if s not in by_stem]
        scored = "" if len(names) == len(all_names) else f"{len(names)} scored of "
        raise MethodError(
            f"{self.name}: {dataset} clip {clip!r} in {folder}: "
            + (f"missing frame(s) {', '.join(missing[:5])}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"extra frame(s) {', '.join(extra[:5])}" if extra else "")
            + f" ({len(found)} files for {scored}{len(all_names)} clip frames; a folder holds "
            + " or ".join(layouts)
            + ", possibly without the first)"
        )

    def run(self, job: ClipJob) -> MethodOutput:
        dataset, clip, size = job.dataset, job.clip, job.out_size
        frames = []
        paths = self.frames_for(dataset, clip, job.names, job.all_names)
        skipped = len(paths) < len(job.names)
        for path in paths:
            try:
                frame = read_image(path)
            except FrameError as err:
                raise MethodError(f"{self.name}: {dataset} clip {clip!r}: {err}") from err
            if size is not None and tuple(frame.shape[-2:]) != tuple(size):
                raise MethodError(
                    f"{self.name}: {dataset} clip {clip!r} frame {path.name}: size "
                    f"{frame.shape[-1]}x{frame.shape[-2]} differs from the expected "
                    f"{size[1]}x{size[0]} ({path})"
                )
            frames.append(frame)
        if not frames:
            raise MethodError(
                f"{self.name}: {dataset} clip {clip!r}: no output frames among the "
                f"{len(job.names)} scored (the folder lacks the first frame)"
            )
        names = job.names[1:] if skipped else job.names
        return MethodOutput(
            torch.stack(frames), names=names, first_frame="skip" if skipped else "self"
        )


def check_folders(methods: list, clips: list[tuple[str, str, tuple, tuple]]) -> None:
    """One MethodError naming every clip a folder method lacks complete outputs for (a missing
    folder, missing or extra frames, mixed sizes), before anything is scored. `clips` holds
    (dataset, clip, names scored, all frame names) of every clip the run will score."""
    problems = []
    for method in methods:
        if not isinstance(method, FolderMethod):
            continue
        for dataset, clip, names, all_names in clips:
            try:
                method.frames_for(dataset, clip, names, all_names)
            except MethodError as err:
                problems.append(str(err))
    if problems:
        raise MethodError(
            f"folder method outputs do not match the clips ({len(problems)} problem(s), "
            "nothing scored):\n" + "\n".join(problems)
        )


def build_method(spec: str, *, device: str = "auto", options=None) -> Method | FolderMethod:
    """A method from its suite spec; `options` is the suite's Options (repeats, seed, ...)."""
    kind, label, arg = parse_method(spec)
    repeats = options.latency_repeats if options else 3
    if kind == "bicubic":
        return Bicubic(repeats)
    if kind == "folder":
        return FolderMethod(label, arg)
    return DLoRALMethod(
        label,
        arg,
        device=device,
        repeats=repeats,
        seed=options.seed if options else 0,
        process_size=options.process_size if options else 512,
        batch_size=options.batch_size if options else 4,
        first_frame=options.first_frame if options else "self",
        size_to_8=options.size_to_8 if options else "pad",
        previous=options.previous if options else "carry",
        color_fix=options.color_fix if options else "adain",
    )
