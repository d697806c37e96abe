"""One typed training config, loaded from TOML with `a.b.c=value` overrides.

Tables: [model] (DLoRALConfig, with [model.cfr], [model.consistency], [model.detail]),
[data] (+ [data.sampler]), [schedule], [loss] (+ [loss.weights]), [optim], [run].
Keys and value types are checked by dloral.config (unknown keys are a KeyError naming the dotted
key; an optional field is set to None with the string "none").
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dloral.config import (
    NONE,
    build,
    field_types,
    parse_override,
    read_toml,
    set_key,
    shipped_folder,
    to_plain,
    to_toml,
)
from dloral.data.config import (
    CROP_MODES,
    GT_ONLY_KINDS,
    KINDS,
    SamplerConfig,
    ShiftConfig,
    default_dir,
)
from dloral.model.config import DLoRALConfig
from dloral.train.schedule import LossWeightsConfig, ScheduleConfig

DEFAULT_CONFIG = shipped_folder("experiments") / "default.toml"

REFERENCE_NEG_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, "
    "CG Style, 3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, "
    "frames, watermark, signature, jpeg artifacts, deformed, lowres, over-smooth"
)
LQ_KINDS = ("udm10", "spmcs", "vid4")  # dataset kinds that take an lq folder name
LR_SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "no", "fp16", "bf16")
LPIPS_MODES = ("required", "optional")
TEMPORAL_LOSSES = ("warped", "reference_flow")
PROMPT_SOURCES = ("empty", "fixed", "tagger")
CLIP_GROUPS = ("all", "detail")
NONFINITE_CSD = ("stop", "zero")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {allowed}; got {value!r}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"{key} must be >= {low}; got {value}")


def _lq_root_kind(key: str, lq_root: str | None, kind: str) -> None:
    if lq_root is not None and kind not in GT_ONLY_KINDS:
        raise ValueError(
            f"{key} applies only to the GT-only kinds {GT_ONLY_KINDS}; {kind!r} reads its own LQ"
        )


@dataclass
class DetailDataConfig:
    """The detail stage's training set and sampling; every "none" key is the consistency
    stage's ([data], [data.sampler]). The reference: LSDIR "shift" pseudo-videos, consecutive
    frames, no resize, torchvision CenterCrop (kind "shift", frame_stride 1,
    resize_short_side 0, crop_mode "center_round")."""

    kind: str | None = None  # None: the detail stage trains on data.train_kind / train_root
    root: str | None = None  # required with kind
    lq_root: str | None = None  # pre-degraded LQ of this set; None: degraded on the fly
    frame_stride: int | None = None
    resize_short_side: int | None = None
    crop_mode: str | None = None

    def __post_init__(self):
        if self.frame_stride is not None:
            _at_least("data.detail.frame_stride", self.frame_stride, 1)
        if self.resize_short_side is not None:
            _at_least("data.detail.resize_short_side", self.resize_short_side, 0)
        if self.crop_mode is not None:
            _choice("data.detail.crop_mode", self.crop_mode, CROP_MODES)
        if self.kind is None:
            if self.root is not None or self.lq_root is not None:
                raise ValueError("data.detail.root / lq_root need data.detail.kind")
            return
        _choice("data.detail.kind", self.kind, KINDS)
        if self.root is None:
            raise ValueError("data.detail.kind needs data.detail.root (the detail-stage set)")
        _lq_root_kind("data.detail.lq_root", self.lq_root, self.kind)

    def overrides(self) -> dict[str, Any]:
        """The sampler keys this stage sets (those not None)."""
        keys = ("frame_stride", "resize_short_side", "crop_mode")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class DataConfig:
    train_kind: str = "youhq"
    train_root: str | None = None  # None: <embedded dir>/embedded-train
    # pre-degraded LQ frames of the training clips, paired by clip and frame name (lq_root/<clip>/
    # <frame stem>.*); None: LQ made on the fly by the Real-ESRGAN degradation
    lq_root: str | None = None
    val_kind: str = "udm10"
    val_root: str | None = None  # None: <embedded dir>/embedded-udm10
    val_lq: str | None = "BIx4"  # LQ folder for udm10/spmcs/vid4; None for other kinds
    val_clips: int = 2
    val_frames: int = 6
    workers: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)  # pseudo-videos of kind "shift"
    detail: DetailDataConfig = field(default_factory=DetailDataConfig)

    def __post_init__(self):
        _choice("data.train_kind", self.train_kind, KINDS)
        _choice("data.val_kind", self.val_kind, KINDS)
        if self.val_lq is not None and self.val_kind not in LQ_KINDS:
            raise ValueError(
                f"data.val_lq applies only to val_kind in {LQ_KINDS}; set it to {NONE!r} "
                f"for {self.val_kind!r}"
            )
        _lq_root_kind("data.lq_root", self.lq_root, self.train_kind)
        _at_least("data.val_clips", self.val_clips, 0)
        _at_least("data.val_frames", self.val_frames, 1)
        _at_least("data.workers", self.workers, 0)
        try:  # the detail stage's sampling is valid too
            replace(self.sampler, **self.detail.overrides())
        except ValueError as err:
            raise ValueError(f"data.detail: {err}") from err

    def train_path(self) -> Path:
        return Path(self.train_root) if self.train_root else default_dir() / "embedded-train"

    def val_path(self) -> Path:
        return Path(self.val_root) if self.val_root else default_dir() / "embedded-udm10"


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_accum: int = 2
    grad_clip: float = 1.0  # max grad norm; 0: no clipping
    clip: str = "all"  # what grad_clip bounds: every trained parameter, or the D-LoRA only
    batch_size: int = 1
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0; got {self.lr}")
        _at_least("optim.weight_decay", self.weight_decay, 0)
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be in [0, 1); got {list(self.betas)}")
        if not self.eps > 0:
            raise ValueError(f"optim.eps must be > 0; got {self.eps}")
        _choice("optim.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        _at_least("optim.grad_accum", self.grad_accum, 1)
        _at_least("optim.grad_clip", self.grad_clip, 0)
        _choice("optim.clip", self.clip, CLIP_GROUPS)
        _at_least("optim.batch_size", self.batch_size, 1)
        _choice("optim.mixed_precision", self.mixed_precision, PRECISIONS)


@dataclass
class LossConfig:
    weights: LossWeightsConfig = field(default_factory=LossWeightsConfig)
    cfg_csd: float = 7.5  # classifier-free guidance scale of the CSD teacher
    min_dm_step_ratio: float = 0.02  # CSD timestep range, as fractions of the 1000 steps
    max_dm_step_ratio: float = 0.5
    # The text condition of the generator, also CSD's positive prompt: "" (empty), pos_prompt
    # (fixed), or "{tags}, {pos_prompt}" with the tags of each sample's GT frame 1 (tagger, as
    # the reference with RAM); `tagger` is "module:factory", as `dloral-exp upscale --tagger`.
    prompt_source: str = "empty"
    tagger: str | None = None
    pos_prompt: str = ""
    neg_prompt: str = REFERENCE_NEG_PROMPT
    lpips: str = "required"  # optional: without VGG weights the LPIPS terms are dropped
    temporal: str = "warped"  # or reference_flow: the reference's gradient-free Farneback L1
    # a frame pair's non-finite CSD loss: "stop" the run (TrainingDiverged, as any non-finite
    # loss), or "zero": count it as 0 and go on, as the reference (logged as csd_zeroed)
    nonfinite_csd: str = "stop"

    def __post_init__(self):
        _at_least("loss.cfg_csd", self.cfg_csd, 0)
        if not 0 <= self.min_dm_step_ratio < self.max_dm_step_ratio <= 1:
            raise ValueError(
                "need 0 <= loss.min_dm_step_ratio < loss.max_dm_step_ratio <= 1; got "
                f"{self.min_dm_step_ratio}, {self.max_dm_step_ratio}"
            )
        _choice("loss.lpips", self.lpips, LPIPS_MODES)
        _choice("loss.temporal", self.temporal, TEMPORAL_LOSSES)
        _choice("loss.nonfinite_csd", self.nonfinite_csd, NONFINITE_CSD)
        _choice("loss.prompt_source", self.prompt_source, PROMPT_SOURCES)
        if self.prompt_source == "empty" and self.pos_prompt:
            raise ValueError(
                "loss.pos_prompt is used only with loss.prompt_source 'fixed' or 'tagger'; "
                f"prompt_source is 'empty' (set it to 'fixed' to train with {self.pos_prompt!r})"
            )
        if self.tagger is not None and not all(self.tagger.partition(":")[::2]):
            raise ValueError(f"loss.tagger must be 'module:factory'; got {self.tagger!r}")

    def tagger_problem(self) -> str | None:
        """Why the tagger this config asks for cannot be used (None: usable or not asked for).
        Checked before any model is built; the module is located, not imported."""
        if self.prompt_source != "tagger":
            return None
        if not self.tagger:
            return (
                "loss.prompt_source = 'tagger' needs loss.tagger = 'module:factory': a factory "
                "that takes the torch device and returns tag(frame (3, H, W) in [0, 1]) -> str "
                "(e.g. RAM with your weights, as `dloral-exp upscale --tagger`)"
            )
        module = self.tagger.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"loss.tagger {self.tagger!r}: module {module!r} is not importable here"
        return None


@dataclass
class RunConfig:
    name: str = "default"
    max_steps: int = 300  # optimizer steps
    seed: int = 123
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    validate_every: int = 100
    log_every: int = 10
    sample_every: int = 100
    output_dir: str = "outputs/train"
    mlflow_experiment: str = "dloral-train"
    device: str = "auto"
    # data-parallel processes per run (one GPU each on a GPU cluster); 1: one process, no Ray
    workers: int = 1

    def __post_init__(self):
        for name in (
            "workers",
            "max_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "validate_every",
            "log_every",
            "sample_every",
        ):
            _at_least(f"run.{name}", getattr(self, name), 1)
        if not re.fullmatch(r"auto|cpu(:\d+)?|cuda(:\d+)?", self.device):
            raise ValueError(f"run.device must be auto, cpu, cuda or cuda:N; got {self.device!r}")


@dataclass
class TrainConfig:
    model: DLoRALConfig = field(default_factory=DLoRALConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Typed construction; missing keys take their defaults."""
        return build(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists/scalars (None kept)."""
        return to_plain(self)

    def resolved(self) -> TrainConfig:
        """A new config with every value the recipe derives from other keys filled in: the
        training sampler's seed is run.seed (one seed drives the run) and its epoch holds every
        sample of run.max_steps (effective_batch samples per step). This is what a run saves as
        config.toml, logs and uses; resolving it again changes nothing."""
        data = self.to_dict()
        per_step = self.effective_batch
        sampler = data["data"]["sampler"]
        sampler["seed"] = self.run.seed
        sampler["samples"] = max(sampler["samples"], self.run.max_steps * per_step)
        return TrainConfig.from_dict(data)

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step: workers x batch x gradient accumulation."""
        return self.run.workers * self.optim.batch_size * self.optim.grad_accum

    def to_toml_str(self) -> str:
        """The whole config as TOML, every field written; load_config reads it back."""
        return to_toml(self.to_dict())


SECTIONS: dict[str, type] = field_types(TrainConfig)  # top-level table -> its dataclass


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a TOML config (None: experiments/default.toml), apply "a.b.c=value" overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = read_toml(path)
    data.pop("sweep", None)  # the search space of `dloral-exp sweep`, not a training key
    for item in overrides:
        apply_override(data, item)
    return TrainConfig.from_dict(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set one "a.b.c=value" in the raw config dict; value in TOML syntax, else a plain string."""
    key, text = parse_override(item)
    set_key(data, key, text, TrainConfig, parse=True)
