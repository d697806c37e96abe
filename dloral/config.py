"""One typed config layer: dataclasses built from TOML tables, `a.b.c=value` overrides, TOML out.

Every config (training, sweep, model, benchmark suite, degradation) is a dataclass built with
`build`. Unknown keys are a KeyError naming the dotted key and the valid ones; a value of the
wrong type is a ValueError naming the dotted key (an int is accepted where a float is declared,
a list where a tuple is). TOML has no null: an optional field is set to None with the string
"none" (so a `str | None` field cannot hold the literal "none").
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
NONE = "none"  # how None is written in TOML and in overrides


# ----- reading -----------------------------------------------------------------------------


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """The table of a TOML file; invalid TOML is a ValueError naming the file."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from e


def find_named_toml(name_or_path: str | os.PathLike, folder: Path) -> Path | None:
    """An existing TOML path, or NAME -> folder/NAME.toml; None when NAME is not there.
    A path that looks like a file (.toml or existing) but is not one is FileNotFoundError."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return path
    candidate = folder / f"{name_or_path}.toml"
    return candidate if candidate.is_file() else None


def error_text(err: BaseException) -> str:
    """An error's message as written: str() of a KeyError quotes it (repr), so a message that
    ends in a quoted value would lose its closing quote to a strip."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


def shipped_folder(name: str, package: Path | None = None) -> Path:
    """A folder of TOML files the project ships beside its package (`experiments`, `benchmarks`).
    A wheel holds copies under dloral/_shipped/ (pyproject's force-include), taken where present;
    in a checkout or an editable install, the repository's own folder beside the package."""
    package = package or Path(__file__).resolve().parent
    wheel = package / "_shipped" / name
    return wheel if wheel.is_dir() else package.parent / name


# ----- typing ------------------------------------------------------------------------------


def field_types(tp: Any) -> dict[str, Any] | None:
    """Field name -> resolved type of a dataclass type; None for any other type."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return {f.name: hints[f.name] for f in dataclasses.fields(tp)}
    return None


def _dotted(where: str, key: str) -> str:
    return ".".join(part for part in (where, key) if part)


def _valid(known: Iterable[str], where: str) -> str:
    return f"valid{' under ' + where if where else ''}: {', '.join(sorted(known))}"


def check_keys(data: Mapping[str, Any], known: Iterable[str], where: str = "") -> None:
    """KeyError naming every key of table `where` that is not in `known`, and the valid ones."""
    known = set(known)
    unknown = sorted(set(data) - known)
    if unknown:
        names = ", ".join(_dotted(where, k) for k in unknown)
        raise KeyError(f"unknown key(s) {names}; {_valid(known, where)}")


def build(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """A `cls` instance from table `where`: values checked against the field types, nested
    tables built as nested dataclasses, left-out fields at their defaults (a left-out field
    without a default is a KeyError naming it)."""
    hints = field_types(cls)
    check_keys(data, hints, where)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise KeyError(f"missing key(s) {', '.join(_dotted(where, k) for k in missing)}")
    return cls(**{k: coerce(v, hints[k], _dotted(where, k)) for k, v in data.items()})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _or_none(nullable: bool) -> str:
    return f' or "{NONE}"' if nullable else ""


def coerce(value: Any, tp: Any, key: str, nullable: bool = False) -> Any:
    """`value` checked against type `tp` and converted (int -> float, list -> tuple, table ->
    dataclass, "none" -> None for optional fields); ValueError naming `key` if it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or value == NONE):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key, nullable=type(None) in args)
            except ValueError as e:
                errors.append(str(e))
        if len(errors) > 1:
            raise ValueError(f"{key}: {value!r} fits no type of {tp}")
        raise ValueError(errors[0])
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a table; got {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key} must be a list{_or_none(nullable)}; got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{key} must have {len(args)} items; got {list(value)}")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
        item = args[0] if args else Any
        out = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
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
    else:  # Any or a type this layer does not check (e.g. dict[str, Any])
        return value
    raise ValueError(
        f"{key} must be {_type_name(tp)}{_or_none(nullable)}; got {type(value).__name__} {value!r}"
    )


# ----- overrides ---------------------------------------------------------------------------


def parse_override(item: str) -> tuple[str, str]:
    """ "a.b.c=value" -> ("a.b.c", "value"); ValueError if it has no key or no "="."""
    key, sep, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key:
        raise ValueError(f"override must look like section.key=value; got {item!r}")
    return key, text


def _is_str_field(tp: Any) -> bool:
    return tp is str or (
        typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)
    )


class OverrideError(ValueError):
    """Override text that is not a TOML value; the message names the override and shows the
    TOML its key takes, with an example."""


_TOML_KINDS: dict[Any, tuple[str, str, tuple[str, str]]] = {  # for messages: what a value
    # of the type is in TOML, what a list of them is, two examples
    bool: ("true or false", "booleans", ("true", "false")),
    int: ("an integer", "integers", ("1", "2")),
    float: ("a number", "numbers", ("1e-4", "0.5")),
    str: ("a string in double quotes", "strings in double quotes", ('"a"', '"b"')),
}
_ANY_KIND = ("a TOML value", "values (strings in double quotes)", ('"a"', '"b"'))


def _is_toml(text: str) -> bool:
    try:
        tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return False
    return True


def _scalar(tp: Any) -> Any:
    """`tp` without None (int | None -> int)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return tp


def _toml_example(text: str, tp: Any) -> tuple[str, str]:
    """What a value of type `tp` is in TOML, and an example; for a list of words written without
    quotes ("[full, off]") the example is that list quoted."""
    tp = _scalar(tp)
    if typing.get_origin(tp) not in (list, tuple):
        name, _, examples = _TOML_KINDS.get(tp, _ANY_KIND)
        return name, examples[0]
    item = _scalar(next(iter(typing.get_args(tp)), Any))
    _, plural, examples = _TOML_KINDS.get(item, _ANY_KIND)
    words = [w.strip() for w in text.strip().removeprefix("[").removesuffix("]").split(",")]
    if item in (str, Any) and text.strip().startswith("[") and all(words):
        examples = [w if _is_toml(w) else _toml_str(w.strip("'\"")) for w in words]
    return f"a list of {plural}", f"[{', '.join(examples)}]"


def _not_toml(key: str, text: str, tp: Any) -> str:
    """The message for override text that is not TOML: the key, the text, what TOML the key
    takes and an example the shell passes through."""
    what, example = _toml_example(text, tp)
    given = f"{text!r} is not a TOML value" if text else 'nothing after "="'
    example = f"{key}={example}"
    if '"' in example:  # the shell would drop the double quotes
        example = f"'{example}', in single quotes so that the shell keeps the double quotes"
    elif any(ch in example for ch in " []{}"):
        example = f"'{example}'"
    return f"--set {key}={text}: {given}; {key} takes {what} (e.g. --set {example})"


def parse_value(text: str, tp: Any, key: str = "") -> Any:
    """An override's value, in TOML syntax; for str fields also the bare text (so run.name=123
    is the string "123"). For any other field, text that is not TOML is an OverrideError naming
    `key`, the text and the TOML expected."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if _is_str_field(tp):
            return text
        raise OverrideError(_not_toml(key, text, tp)) from None
    if _is_str_field(tp) and not isinstance(value, str):
        return text
    return value


def set_key(
    data: dict[str, Any],
    key: str,
    value: Any,
    root: type,
    parse: bool = False,
    where: str = "",
) -> None:
    """Set dotted `key` in raw table `where` (`data`) that builds dataclass `root`; a key `root`
    does not have is a KeyError naming the valid ones. `parse`: `value` is override text (see
    parse_value). Value types are checked later, by `build`."""
    parts = key.split(".")
    fields = field_types(root)
    node = data
    for depth, part in enumerate(parts):
        here = _dotted(where, ".".join(parts[:depth]))
        if fields is None:
            raise KeyError(f"unknown key {_dotted(where, key)}: {here} is a value, not a table")
        if part not in fields:
            raise KeyError(f"unknown key {_dotted(here, part)}; {_valid(fields, here)}")
        hint = fields[part]
        if depth == len(parts) - 1:
            break
        fields = field_types(hint)
        if fields is None:
            continue  # a scalar field: the next part is the unknown key
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{_dotted(here, part)} is not a table")
        node = child
    node[parts[-1]] = parse_value(value, hint, _dotted(where, key)) if parse else value


# ----- writing -----------------------------------------------------------------------------


def to_plain(value: Any) -> Any:
    """A dataclass instance (or dicts and lists of them) as plain dicts, lists and scalars:
    tuples become lists, None is kept."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
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


def _toml_table(data: dict[str, Any], prefix: str) -> str:
    """Scalars of a table first, then its sub-tables (a TOML requirement)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    text = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        if isinstance(v, dict):
            name = _dotted(prefix, k)
            text += f"\n[{name}]\n" + _toml_table(v, name)
    return text


def to_toml(data: dict[str, Any]) -> str:
    """Plain nested dicts (see to_plain) as TOML text that read_toml reads back; None is
    written as "none"."""
    return _toml_table(data, "").lstrip("\n")
