"""Benchmark suites: which datasets, methods and metrics one `dloral-exp bench` run covers.

A suite is a TOML file (see benchmarks/*.toml):

    [suite]      name, description
    [[datasets]] name, kind (a dloral.data.readers kind), root, lq, scale, clips, frames
    [methods]    names = ["bicubic", "dloral:tiny", "folder:peer=/path/to/outputs"]
    [metrics]    names = ["psnr", "ssim_y", "lpips", "ewarp", ...]
    [options]    crop_border, flow, device, latency_repeats, latency_clips, seed, process_size,
                 batch_size, first_frame, size_to_8, previous, color_fix (the last six: DLoRAL's)

`root` may hold `${ENV_VAR}` (an unset variable is an error naming it and the expected layout)
or be "embedded:<set>" (the embedded real-clip sets, prepared on first use). Relative roots are
taken from the suite file's folder. Unknown keys, metrics and methods are errors naming the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from dloral.bench.registry import METRICS, resolve
from dloral.config import build, check_keys, find_named_toml, read_toml, shipped_folder
from dloral.data.config import KINDS
from dloral.model.config import COLOR_FIXES, FIRST_FRAME, PREVIOUS, SIZE_TO_8

BENCHMARKS_DIR = shipped_folder("benchmarks")
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_SETS = ("embedded-udm10", "embedded-videolq")

FLOW_KINDS = ("auto", "raft", "dis", "farneback")
MIN_REPEATS = 3  # timed passes: s_per_frame is their median, with the fastest and slowest
TINY = ("tiny", "tiny-random")  # dloral:<source> of the tiny model (dloral.bench.methods)
METHOD_FORMS = (  # the spec forms parse_method accepts, for messages
    "bicubic",
    "dloral:<checkpoint folder | model.pkl | tiny | tiny-random | mlflow:<run or trial id>>",
    "folder:<label>=<path>",
)

LAYOUTS = {  # what a dataset root must hold, for error messages
    "udm10": "<root>/GT/<clip>/*.png and <root>/BIx4/<clip>/ (or BDx4)",
    "spmcs": "<root>/GT/<clip>/ and <root>/BIx4/<clip>/, or <root>/<clip>/truth/ + input4/",
    "vid4": "<root>/GT/{calendar,city,foliage,walk}/ and <root>/BIx4/<clip>/ (or BDx4)",
    "reds4": "<root>/train_sharp/{000,011,015,020}/ and <root>/train_sharp_bicubic/X4/<clip>/",
    "reds30": "<root>/val_sharp/<clip>/ and <root>/val_sharp_bicubic/X4/<clip>/",
    "videolq": "<root>/<clip>/*.png (LQ only, no GT)",
    "youhq": "<root>/<category>/<clip>/ frames or videos (GT only)",
    "folders": "<root>/<clip>/ LQ frames",
    "videos": "a video file or a folder of videos (LQ)",
}

_SECTIONS = {"suite", "datasets", "methods", "metrics", "options"}
_SUITE_KEYS = {"name", "description"}
_LIST_KEYS = {"names"}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SuiteError(ValueError):
    """A bad suite file or override; the message names the file and the key."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str
    root: str  # as resolved: a path, or "embedded:<set>"
    lq: str | None = None
    scale: int | None = None  # None: the dataset's GT/LQ ratio, else 4
    clips: int = 0  # first N clips; 0 = all
    frames: int = 0  # first N frames of each clip; 0 = all

    @property
    def embedded(self) -> str | None:
        """The embedded set's name when the root is "embedded:<set>"."""
        if self.root.startswith(EMBEDDED_PREFIX):
            return self.root.removeprefix(EMBEDDED_PREFIX)
        return None


@dataclass(frozen=True)
class Options:
    crop_border: int = 0  # pixels dropped on each side for PSNR/SSIM (stated in results)
    flow: str = "auto"  # flow estimator for ewarp/tof
    device: str = "auto"
    latency_repeats: int = 3  # timed passes per clip (>= 3: the median and the spread)
    # time the first N clips of each dataset (0: every clip); the others run once, untimed
    latency_clips: int = 0
    seed: int = 0
    process_size: int = 512  # dloral: the reference's minimum processing short side
    batch_size: int = 4  # dloral: frames upscaled together
    first_frame: str = "self"  # dloral: "skip" writes no output for frame 0 (the reference)
    size_to_8: str = "pad"  # dloral: "lanczos" resizes to a multiple of 8 (the reference)
    previous: str = "carry"  # dloral: "reencode" encodes the previous frame per pair (ditto)
    color_fix: str = "adain"  # dloral: adain (the reference's default), wavelet or none


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    path: Path | None
    datasets: tuple[DatasetSpec, ...]
    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    options: Options = field(default_factory=Options)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        out = asdict(self)
        out["path"] = str(self.path) if self.path else None
        return out


def _where(path: Path | None) -> str:
    return str(path) if path else "suite"


def _check_keys(at: str, table: dict, allowed: set[str]) -> None:
    try:
        check_keys(table, allowed)
    except KeyError as err:
        raise SuiteError(f"{at}: {err.args[0]}") from err


def _build(cls: type, at: str, table: dict):
    """`cls` from one suite table; an unknown or missing key, or a wrong type, names `at`."""
    try:
        return build(cls, table)
    except (KeyError, ValueError) as err:
        raise SuiteError(f"{at}: {err.args[0]}") from err


def check_metrics(names: list[str] | tuple[str, ...], where: str = "suite") -> tuple[str, ...]:
    """The names as the registry keys them: a bare temporal name ("tof") gets its default
    protocol ("tof@tecogan", dloral.bench.registry.DEFAULT_PROTOCOL)."""
    names = [resolve(m) for m in names]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise SuiteError(
            f"{where}: unknown metric(s) {', '.join(unknown)}; valid: {', '.join(METRICS)}"
        )
    if not names:
        raise SuiteError(f"{where}: no metrics given; valid: {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


def parse_method(spec: str) -> tuple[str, str, str]:
    """ "bicubic" | "dloral:<where>" | "folder:<label>=<path>" -> (kind, label, argument)."""
    if spec == "bicubic":
        return "bicubic", "bicubic", ""
    kind, sep, arg = spec.partition(":")
    if sep and kind == "dloral" and arg:
        if arg.startswith("mlflow:") and arg[len("mlflow:") :]:
            return "dloral", f"dloral-{arg[len('mlflow:') :][:12]}", arg
        return "dloral", f"dloral-{arg}" if arg in TINY else f"dloral-{Path(arg).stem}", arg
    if sep and kind == "folder":
        label, eq, path = arg.partition("=")
        if eq and label and path:
            return "folder", label, path
    raise ValueError(f"unknown method {spec!r}; valid forms: {', '.join(METHOD_FORMS)}")


def check_methods(names: list[str] | tuple[str, ...], where: str = "suite") -> tuple[str, ...]:
    if not names:
        raise SuiteError(f"{where}: no methods given; valid forms: {', '.join(METHOD_FORMS)}")
    hint = "Set it to a dloral checkpoint folder or the official model.pkl (or a peer's outputs)"
    names = [expand_env(spec, f"{where}: method", hint) for spec in names]
    labels = {}
    for spec in names:
        try:
            kind, label, _ = parse_method(spec)
        except ValueError as err:
            raise SuiteError(f"{where}: {err}") from err
        if label in labels:
            raise SuiteError(f"{where}: methods {labels[label]!r} and {spec!r} share label {label}")
        labels[label] = spec
    return tuple(names)


def expand_env(text: str, where: str, hint: str) -> str:
    """`${VAR}` replaced by its value; an unset variable -> SuiteError naming it and `hint`."""
    for var in _ENV.findall(text):
        if not os.environ.get(var):
            raise SuiteError(f"{where}: {text!r} needs ${var}, which is not set. {hint}")
    return _ENV.sub(lambda m: os.environ[m.group(1)], text)


def expand_root(root: str, kind: str, where: str, base: Path | None) -> str:
    """`${VAR}` expanded (unset -> SuiteError naming it and the layout); relative -> from base."""
    if root.startswith(EMBEDDED_PREFIX):
        name = root.removeprefix(EMBEDDED_PREFIX)
        if name not in EMBEDDED_SETS:
            raise SuiteError(f"{where}: unknown embedded set {name!r}; valid: {EMBEDDED_SETS}")
        return root
    hint = f"Set it to the {kind} dataset folder, laid out as {LAYOUTS.get(kind, kind)}"
    path = Path(expand_env(root, f"{where}: dataset root", hint)).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.exists():
        raise SuiteError(
            f"{where}: dataset root {path} (from {root!r}) does not exist; a {kind} root holds "
            f"{LAYOUTS.get(kind, kind)}"
        )
    return str(path)


def _at_least(at: str, key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise SuiteError(f"{at}: {key} must be an integer >= {minimum}, got {value!r}")


def _dataset(where: str, i: int, table: dict, base: Path | None) -> DatasetSpec:
    at = f"{where} [[datasets]] #{i + 1}"
    spec = _build(DatasetSpec, at, table)
    if spec.kind not in KINDS:
        raise SuiteError(f"{at}: unknown kind {spec.kind!r}; valid: {', '.join(KINDS)}")
    if spec.scale is not None:
        _at_least(at, "scale", spec.scale, 1)
    _at_least(at, "clips", spec.clips, 0)
    _at_least(at, "frames", spec.frames, 0)
    return replace(spec, root=expand_root(spec.root, spec.kind, f"{at} ({spec.name})", base))


def _options(where: str, table: dict) -> Options:
    at = f"{where} [options]"
    opts = _build(Options, at, table)
    for key in ("crop_border", "seed", "latency_clips"):
        _at_least(at, key, getattr(opts, key), 0)
    _at_least(at, "latency_repeats", opts.latency_repeats, MIN_REPEATS)
    for key in ("process_size", "batch_size"):
        _at_least(at, key, getattr(opts, key), 1)
    if opts.flow not in FLOW_KINDS:
        raise SuiteError(f"{where}: [options] flow={opts.flow!r}; valid: {', '.join(FLOW_KINDS)}")
    for key, valid in (
        ("first_frame", FIRST_FRAME),
        ("size_to_8", SIZE_TO_8),
        ("previous", PREVIOUS),
        ("color_fix", COLOR_FIXES),
    ):
        if getattr(opts, key) not in valid:
            raise SuiteError(
                f"{where}: [options] {key}={getattr(opts, key)!r}; valid: {', '.join(valid)}"
            )
    return opts


def parse_suite(
    data: dict, path: Path | None = None, methods: list[str] | tuple[str, ...] | None = None
) -> Suite:
    """A suite from a parsed TOML table; `path` names it in errors and anchors relative roots.
    `methods` (the command's --method) replace the suite's own, which are then neither checked
    nor expanded (a suite's `dloral:${DLORAL_CHECKPOINT}` needs no checkpoint when not run)."""
    where = _where(path)
    _check_keys(where, data, _SECTIONS)
    head = data.get("suite", {})
    _check_keys(f"{where} [suite]", head, _SUITE_KEYS)
    if "name" not in head:
        raise SuiteError(f"{where}: [suite] needs a name")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", str(head["name"])):
        raise SuiteError(f"{where}: [suite] name {head['name']!r}: use letters, digits, . _ -")
    for section in ("methods", "metrics"):
        _check_keys(f"{where} [{section}]", data.get(section, {}), _LIST_KEYS)
    base = path.parent if path else None
    datasets = tuple(_dataset(where, i, t, base) for i, t in enumerate(data.get("datasets", [])))
    if not datasets:
        raise SuiteError(f"{where}: no [[datasets]]")
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise SuiteError(f"{where}: dataset names repeat: {names}")
    return Suite(
        name=str(head["name"]),
        description=str(head.get("description", "")),
        path=path,
        datasets=datasets,
        methods=check_methods(methods, "--method")
        if methods
        else check_methods(data.get("methods", {}).get("names", []), where),
        metrics=check_metrics(data.get("metrics", {}).get("names", []), where),
        options=_options(where, data.get("options", {})),
    )


def suite_path(name_or_path: str | os.PathLike) -> Path:
    """A suite name under benchmarks/ ("embedded") or a path to a TOML file."""
    text = str(name_or_path)
    try:
        found = find_named_toml(text, BENCHMARKS_DIR)
    except FileNotFoundError as err:
        raise SuiteError(f"no such suite file: {err}") from err
    if found is not None:
        return found
    known = ", ".join(shipped_suites())
    raise SuiteError(f"unknown suite {text!r}; shipped: {known}, or a TOML path")


def shipped_suites() -> list[str]:
    """The names of the suites benchmarks/ ships."""
    return sorted(p.stem for p in BENCHMARKS_DIR.glob("*.toml"))


def load_suite(
    name_or_path: str | os.PathLike, methods: list[str] | tuple[str, ...] | None = None
) -> Suite:
    """Read and check a suite TOML (name under benchmarks/ or a path); `methods`: see
    parse_suite."""
    path = suite_path(name_or_path)
    try:
        data = read_toml(path)
    except ValueError as err:
        raise SuiteError(str(err)) from err
    return parse_suite(data, path, methods)
