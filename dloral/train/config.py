"""One typed training config, loaded from TOML with `a.b.c=value` overrides.

Tables: [model] (DLoRALConfig, with [model.cfr], [model.consistency], [model.detail]),
[data] (+ [data.sampler]), [schedule], [loss] (+ [loss.weights]), [optim], [run].
Unknown keys are a KeyError naming the dotted key; values are type-checked against the
dataclass fields (an int is accepted where a float is declared). TOML has no null: an optional
field is set to None with the string "none" (so a string field cannot hold the literal "none").
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dloral.data.embedded import default_dir
from dloral.data.readers import KINDS
from dloral.data.sampler import SamplerConfig
from dloral.model.dloral import DLoRALConfig, _build_dataclass
from dloral.train.schedule import LossWeightsConfig, ScheduleConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "default.toml"
NONE = "none"  # how None is written in TOML and in overrides

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


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {allowed}; got {value!r}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"{key} must be >= {low}; got {value}")


@dataclass
class DataConfig:
    train_kind: str = "youhq"
    train_root: str | None = None  # None: <embedded dir>/embedded-train
    val_kind: str = "udm10"
    val_root: str | None = None  # None: <embedded dir>/embedded-udm10
    val_lq: str | None = "BIx4"  # LQ folder for udm10/spmcs/vid4; None for other kinds
    val_clips: int = 2
    val_frames: int = 6
    workers: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self):
        _choice("data.train_kind", self.train_kind, KINDS)
        _choice("data.val_kind", self.val_kind, KINDS)
        if self.val_lq is not None and self.val_kind not in LQ_KINDS:
            raise ValueError(
                f"data.val_lq applies only to val_kind in {LQ_KINDS}; set it to {NONE!r} "
                f"for {self.val_kind!r}"
            )
        _at_least("data.val_clips", self.val_clips, 0)
        _at_least("data.val_frames", self.val_frames, 1)
        _at_least("data.workers", self.workers, 0)

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
        _at_least("optim.batch_size", self.batch_size, 1)
        _choice("optim.mixed_precision", self.mixed_precision, PRECISIONS)


@dataclass
class LossConfig:
    weights: LossWeightsConfig = field(default_factory=LossWeightsConfig)
    cfg_csd: float = 7.5  # classifier-free guidance scale of the CSD teacher
    min_dm_step_ratio: float = 0.02  # CSD timestep range, as fractions of the 1000 steps
    max_dm_step_ratio: float = 0.5
    pos_prompt: str = ""
    neg_prompt: str = REFERENCE_NEG_PROMPT
    lpips: str = "required"  # optional: without VGG weights the LPIPS terms are dropped
    temporal: str = "warped"  # or reference_flow: the reference's gradient-free Farneback L1

    def __post_init__(self):
        _at_least("loss.cfg_csd", self.cfg_csd, 0)
        if not 0 <= self.min_dm_step_ratio < self.max_dm_step_ratio <= 1:
            raise ValueError(
                "need 0 <= loss.min_dm_step_ratio < loss.max_dm_step_ratio <= 1; got "
                f"{self.min_dm_step_ratio}, {self.max_dm_step_ratio}"
            )
        _choice("loss.lpips", self.lpips, LPIPS_MODES)
        _choice("loss.temporal", self.temporal, TEMPORAL_LOSSES)


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

    def __post_init__(self):
        for name in (
            "max_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "validate_every",
            "log_every",
            "sample_every",
        ):
            _at_least(f"run.{name}", getattr(self, name), 1)


SECTIONS: dict[str, type] = {
    "model": DLoRALConfig,
    "data": DataConfig,
    "schedule": ScheduleConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}


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
        _check_keys(data, SECTIONS, "")
        kwargs = {}
        for name, value in data.items():
            section = SECTIONS[name]
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be a table; got {value!r}")
            kwargs[name] = _build_dataclass(section, _coerce_fields(section, value, name), name)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists/scalars (None kept)."""
        return _plain(dataclasses.asdict(self))

    def to_toml_str(self) -> str:
        """The whole config as TOML, every field written; load_config reads it back."""
        return _to_toml(self.to_dict()).lstrip("\n")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a TOML config (None: experiments/default.toml), apply "a.b.c=value" overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from e
    data.pop("sweep", None)  # the search space of `dloral-exp sweep`, not a training key
    for item in overrides:
        apply_override(data, item)
    return TrainConfig.from_dict(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set one "a.b.c=value" in the raw config dict; value in TOML syntax, else a plain string."""
    key, sep, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key:
        raise ValueError(f"override must look like section.key=value; got {item!r}")
    set_key(data, key, text, parse=True)


def set_key(data: dict[str, Any], key: str, value: Any, parse: bool = False) -> None:
    """Set dotted `key` in the raw config dict (KeyError naming the valid keys if it does not
    exist); `parse`: value is override text. Types are checked later by TrainConfig.from_dict."""
    text = value
    parts = key.split(".")
    fields: dict[str, Any] | None = SECTIONS
    node = data
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if fields is None:
            raise KeyError(f"unknown key {key}: {where} is a value, not a table")
        if part not in fields:
            level = f"under {where}" if where else "at the top level"
            valid = ", ".join(sorted(fields))
            raise KeyError(f"unknown key {'.'.join(parts[: depth + 1])}; valid {level}: {valid}")
        hint = fields[part]
        if depth == len(parts) - 1:
            break
        fields = _dataclass_hints(hint)
        if fields is None:
            continue  # a scalar field: the next part is the unknown key
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parts[: depth + 1])} is not a table")
        node = child
    node[parts[-1]] = _parse_value(text, hint) if parse else value


# ----- typing ------------------------------------------------------------------------------


def _dataclass_hints(tp: Any) -> dict[str, Any] | None:
    """Field name -> resolved type of a dataclass type (SECTIONS for the top level)."""
    if isinstance(tp, dict):
        return tp
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return {f.name: hints[f.name] for f in dataclasses.fields(tp)}
    return None


def _check_keys(data: dict[str, Any], known: dict[str, Any], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = where + "." if where else ""
        raise KeyError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid {'under ' + where if where else 'at the top level'}: {', '.join(sorted(known))}"
        )


def _coerce_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Check and convert the values of a table against dataclass `cls`'s field types."""
    hints = _dataclass_hints(cls)
    _check_keys(data, hints, where)
    return {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _coerce(value: Any, tp: Any, key: str, nullable: bool = False) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or value == NONE):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, nullable=type(None) in args)
            except ValueError as e:
                errors.append(str(e))
        if len(errors) > 1:
            raise ValueError(f"{key}: {value!r} fits no type of {tp}")
        raise ValueError(errors[0])
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a table; got {value!r}")
        return _coerce_fields(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key} must be a list{_or_none(nullable)}; got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{key} must have {len(args)} items; got {list(value)}")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    else:  # Any or a type this loader does not check
        return value
    raise ValueError(
        f"{key} must be {_type_name(tp)}{_or_none(nullable)}; got {type(value).__name__} {value!r}"
    )


def _or_none(nullable: bool) -> str:
    return f' or "{NONE}"' if nullable else ""


def _is_str_field(tp: Any) -> bool:
    return tp is str or (
        typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)
    )


def _parse_value(text: str, tp: Any) -> Any:
    """An override's value: TOML syntax, else the text itself (always the text for str fields)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if _is_str_field(tp) and not isinstance(value, str):
        return text  # run.name=123 means the string "123"
    return value


# ----- writing -----------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if value is None:
        return _toml_str(NONE)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # repr always has "." or "e", so it reads back as a float
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Scalars of a table first, then its sub-tables (a TOML requirement)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    text = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{k}" if prefix else k
            text += f"\n[{name}]\n" + _to_toml(v, name)
    return text
