"""A sweep definition: an experiment TOML's training config plus its [sweep] table.

    [sweep]                         what to optimise, how to schedule, where results go
    [sweep.space]                   "dotted.training.key" = [grid values] | { kind = [...] }
    [sweep.asha] [sweep.resources] [sweep.evaluate] [sweep.chaos]

Search-space kinds: a plain list or { grid = [...] } is a grid (every value, every trial of the
grid repeated `num_samples` times); { choice = [...] }, { uniform = [lo, hi] },
{ loguniform = [lo, hi] }, { randint = [lo, hi] } (hi exclusive), { quniform = [lo, hi, q] } are
sampled once per sample. Every key and every value is checked against the training config before
Ray starts, so a typo fails in a second, not after the first trial.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dloral.config import (
    OverrideError,
    build,
    error_text,
    field_types,
    find_named_toml,
    parse_override,
    parse_value,
    read_toml,
    set_key,
)
from dloral.train.config import DEFAULT_CONFIG, SECTIONS, TrainConfig
from dloral.trials import METRICS, SweepSpec

EXPERIMENTS_DIR = DEFAULT_CONFIG.parent
GRID_KINDS = ("grid",)
SAMPLED_KINDS = ("choice", "uniform", "loguniform", "randint", "quniform")
SPACE_KINDS = GRID_KINDS + SAMPLED_KINDS
SCHEDULERS = ("asha", "fifo")  # fifo: every trial runs to the end (no early stopping)


class SweepError(ValueError):
    """A sweep definition that cannot run; the message names the file and key."""


@dataclass
class AshaConfig:
    grace_period: int = 100  # steps every trial runs before it can be stopped
    reduction_factor: float = 2.0  # keep 1/reduction_factor of the trials at each rung


@dataclass
class Resources:
    """What each training process reserves: per trial, or per worker when run.workers > 1."""

    cpu: float = 1.0  # also the process's torch thread count
    gpu: float = 0.0


@dataclass
class EvaluateConfig:
    # keys that define an ablation arm; None: the grid keys with 2+ values, except run.seed
    arms: list[str] | None = None
    top: int = 1  # best trials scored per arm
    clips: int = 0  # validation clips scored (0: all)
    frames: int = 12  # frames per clip


@dataclass
class ChaosConfig:
    """Fault drills: check that retries and storage work before a long sweep on a cluster."""

    crash_once_at_step: int = 0  # each trial raises once, right after reporting this step
    kill_once_at_step: int = 0  # each trial's process exits once (as if killed) at this step


@dataclass
class SweepConfig:
    name: str = ""  # "" -> the experiment's file name
    family: str = ""  # ablation family tag ("" -> name)
    description: str = ""
    metric: str = "val/psnr"
    mode: str = "max"
    scheduler: str = "asha"
    num_samples: int = 1
    max_concurrent: int = 0  # 0: as many as the cluster's resources allow
    max_failures: int = 2  # retries of a trial, each from its last checkpoint
    storage: str = "outputs/sweeps"  # local folder or a pyarrow-fs URI (s3://, gs://, ...)
    mlflow_experiment: str = "dloral-sweeps"
    keep_checkpoints: int = 2  # per trial, in the storage
    space: dict[str, Any] = field(default_factory=dict)
    asha: AshaConfig = field(default_factory=AshaConfig)
    resources: Resources = field(default_factory=Resources)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)


@dataclass
class Dimension:
    """One searched key: its kind (grid/choice/uniform/...) and values or bounds."""

    key: str
    kind: str
    args: list[Any]

    @property
    def is_grid(self) -> bool:
        return self.kind in GRID_KINDS

    def domain(self):
        from ray import tune

        a = self.args
        return {
            "grid": lambda: tune.grid_search(list(a)),
            "choice": lambda: tune.choice(list(a)),
            "uniform": lambda: tune.uniform(a[0], a[1]),
            "loguniform": lambda: tune.loguniform(a[0], a[1]),
            "randint": lambda: tune.randint(a[0], a[1]),
            "quniform": lambda: tune.quniform(a[0], a[1], a[2]),
        }[self.kind]()

    def describe(self) -> str:
        return f"{self.kind}{list(self.args)}"


@dataclass
class Experiment:
    path: Path
    sweep: SweepConfig
    base: dict[str, Any]  # the training config as a raw dict, overrides applied
    dims: list[Dimension]

    @property
    def name(self) -> str:
        return self.sweep.name

    @property
    def arms(self) -> list[str]:
        return list(self.sweep.evaluate.arms or [])

    def trial_count(self) -> int:
        """Trials the space holds: every grid combination, num_samples times."""
        count = self.sweep.num_samples
        for d in self.dims:
            count *= len(d.args) if d.is_grid else 1
        return count

    def train_config(self, values: dict[str, Any]) -> TrainConfig:
        """The training config of one trial: base + the trial's values; every validation
        also saves a checkpoint, so each report to Tune carries one."""
        data = copy.deepcopy(self.base)
        for key, value in values.items():
            set_key(data, key, value, TrainConfig)
        cfg = TrainConfig.from_dict(data)
        cfg.run.checkpoint_every = cfg.run.validate_every
        return cfg

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return {
            "path": str(self.path),
            "sweep": dataclasses.asdict(self.sweep),
            "base": self.base,
        }


def experiment_from_spec(spec: SweepSpec) -> Experiment:
    """The Experiment a driver saved in sweep.json (what trials and --resume run)."""
    sweep = build(SweepConfig, copy.deepcopy(spec.sweep), "sweep")
    dims = [Dimension(k, kind, args) for k, kind, args in spec.dims]
    return Experiment(Path(spec.path), sweep, spec.base, dims)


def available_experiments() -> list[str]:
    """Experiment names under experiments/ that define a sweep."""
    names = []
    for path in sorted(EXPERIMENTS_DIR.glob("*.toml")):
        try:
            if "sweep" in read_toml(path):
                names.append(path.stem)
        except (OSError, ValueError):
            continue
    return names


def resolve_experiment(name_or_path: str | Path | None) -> Path:
    """A TOML path, or a name under experiments/ (None: default)."""
    if name_or_path is None:
        name_or_path = "default"
    try:
        found = find_named_toml(name_or_path, EXPERIMENTS_DIR)
    except FileNotFoundError as err:
        raise SweepError(f"experiment file not found: {err}") from err
    if found is not None:
        return found
    raise SweepError(
        f"unknown experiment {str(name_or_path)!r}; available: "
        f"{', '.join(available_experiments())} (or a path to a TOML with a [sweep] table)"
    )


def load_experiment(name_or_path: str | Path | None = None, overrides=()) -> Experiment:
    """Read and check an experiment; `overrides` are "a.b=v" (training keys) or "sweep.x=v"."""
    path = resolve_experiment(name_or_path)
    try:
        data = read_toml(path)
    except ValueError as e:
        raise SweepError(str(e)) from e
    if "sweep" not in data:
        raise SweepError(
            f"{path} has no [sweep] table, so it is a training config, not a sweep "
            f"(`dloral-exp train {path}`); sweeps: {', '.join(available_experiments())}"
        )
    table = data.pop("sweep")
    if not isinstance(table, dict):
        raise SweepError(f"{path}: sweep must be a table")
    for item in overrides:
        try:
            key, text = parse_override(item)
        except ValueError as e:
            raise SweepError(str(e)) from e
        try:
            if key.startswith("sweep."):
                _set_sweep_key(table, key[len("sweep.") :], text)
            else:
                set_key(data, key, text, TrainConfig, parse=True)
        except OverrideError as e:  # names the --set item itself
            raise SweepError(str(e)) from e
        except (KeyError, ValueError) as e:
            raise SweepError(f"--set {item}: {error_text(e)}") from e
    return _check(path, data, table)


def _set_sweep_key(table: dict[str, Any], key: str, text: str) -> None:
    parts = key.split(".")
    if parts[0] == "space" and len(parts) > 1:  # the rest is one dotted training key
        searched = ".".join(parts[1:])
        values = list[_field_type(searched)]  # the space: a list of the key's values (or a table)
        table.setdefault("space", {})[searched] = parse_value(text, values, f"sweep.{key}")
    else:
        set_key(table, key, text, SweepConfig, parse=True, where="sweep")


def _check(path: Path, base: dict[str, Any], table: dict[str, Any]) -> Experiment:
    where = f"{path}: "
    try:
        sweep = build(SweepConfig, table, "sweep")
        TrainConfig.from_dict(copy.deepcopy(base))
    except (KeyError, ValueError) as e:
        raise SweepError(where + error_text(e)) from e
    sweep.name = sweep.name or path.stem
    sweep.family = sweep.family or sweep.name
    if sweep.metric not in METRICS:
        raise SweepError(f"{where}sweep.metric {sweep.metric!r}; reported: {', '.join(METRICS)}")
    if sweep.mode != METRICS[sweep.metric]:
        raise SweepError(
            f"{where}sweep.mode must be {METRICS[sweep.metric]!r} for {sweep.metric} "
            f"(got {sweep.mode!r})"
        )
    if sweep.scheduler not in SCHEDULERS:
        raise SweepError(f"{where}sweep.scheduler must be one of {SCHEDULERS}")
    for key, low in (("num_samples", 1), ("max_concurrent", 0), ("max_failures", 0)):
        if getattr(sweep, key) < low:
            raise SweepError(f"{where}sweep.{key} must be >= {low}")
    if sweep.keep_checkpoints < 1 or sweep.evaluate.top < 1:
        raise SweepError(f"{where}sweep.keep_checkpoints and sweep.evaluate.top must be >= 1")
    if sweep.resources.cpu <= 0 or sweep.resources.gpu < 0:
        raise SweepError(f"{where}sweep.resources: cpu must be > 0 and gpu >= 0")
    dims = [_dimension(where, base, k, v) for k, v in _flatten_space(sweep.space).items()]
    if not dims:
        raise SweepError(f"{where}[sweep.space] is empty: name at least one key to search")
    keys = [d.key for d in dims]
    if "run.workers" in keys:
        raise SweepError(
            f"{where}sweep.space: run.workers cannot be searched (it sets what every trial "
            "reserves); run one sweep per worker count with --set run.workers=N"
        )
    if sweep.evaluate.arms is None:  # a one-value list fixes a key for the sweep: not an arm
        sweep.evaluate.arms = [
            d.key for d in dims if d.is_grid and d.key != "run.seed" and len(d.args) > 1
        ]
    for arm in sweep.evaluate.arms:
        if arm not in keys:
            raise SweepError(
                f"{where}sweep.evaluate.arms: {arm!r} is not searched; searched: {', '.join(keys)}"
            )
    cfg = TrainConfig.from_dict(copy.deepcopy(base))
    if sweep.scheduler == "asha" and sweep.asha.grace_period < cfg.run.validate_every:
        raise SweepError(
            f"{where}sweep.asha.grace_period ({sweep.asha.grace_period}) is shorter than "
            f"run.validate_every ({cfg.run.validate_every}): trials report only at validations"
        )
    return Experiment(path, sweep, base, dims)


def _flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Quoted dotted keys and nested tables both name a training key."""
    out: dict[str, Any] = {}
    for k, v in space.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and _is_table(key):
            out.update(_flatten_space(v, f"{key}."))
        else:
            out[key] = v
    return out


def _field_type(key: str) -> Any:
    """The type of dotted training `key`; Any for a key the config does not have."""
    hints: dict[str, Any] | None = SECTIONS
    tp: Any = Any
    for part in key.split("."):
        if hints is None or part not in hints:
            return Any
        tp = hints[part]
        hints = field_types(tp)
    return tp


def _is_table(key: str) -> bool:
    """Whether dotted `key` names a table of the training config (else a value or unknown)."""
    hints: dict[str, Any] | None = SECTIONS
    for part in key.split("."):
        if hints is None or part not in hints:
            return False
        hints = field_types(hints[part])
    return hints is not None


def _dimension(where: str, base: dict[str, Any], key: str, spec: Any) -> Dimension:
    if isinstance(spec, list):
        kind, args = "grid", spec
    elif isinstance(spec, dict) and len(spec) == 1:
        kind, args = next(iter(spec.items()))
    else:
        raise SweepError(
            f"{where}sweep.space.{key}: give a list of values or one of "
            f"{{ {' | '.join(SPACE_KINDS)} = [...] }}; got {spec!r}"
        )
    if kind not in SPACE_KINDS:
        raise SweepError(f"{where}sweep.space.{key}: unknown kind {kind!r}; known: {SPACE_KINDS}")
    if not isinstance(args, list) or not args:
        raise SweepError(f"{where}sweep.space.{key}.{kind} must be a non-empty list")
    if kind in ("uniform", "loguniform", "randint", "quniform"):
        n = 3 if kind == "quniform" else 2
        if len(args) != n or not all(isinstance(a, int | float) for a in args):
            raise SweepError(f"{where}sweep.space.{key}.{kind} takes {n} numbers; got {args}")
        if not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
            raise SweepError(f"{where}sweep.space.{key}.{kind}: need 0 < lo < hi; got {args}")
        probes = [args[0], args[1] - 1 if kind == "randint" else args[1]]
        if kind in ("uniform", "loguniform", "quniform"):
            probes = [float(a) for a in probes]
    else:
        probes = args
    for value in probes:  # each value must make a valid training config
        data = copy.deepcopy(base)
        try:
            set_key(data, key, value, TrainConfig)
            TrainConfig.from_dict(data)
        except (KeyError, ValueError) as e:
            msg = error_text(e)
            raise SweepError(f"{where}sweep.space.{key} = {value!r}: {msg}") from e
    return Dimension(key, kind, list(args))
