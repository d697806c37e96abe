"""The one config layer: typed tables, dotted-key errors, overrides in TOML syntax, TOML out."""

from dataclasses import dataclass, field

import pytest

from dloral.config import (
    build,
    find_named_toml,
    parse_override,
    read_toml,
    set_key,
    to_plain,
    to_toml,
)


@dataclass
class Inner:
    size: int = 3
    ratio: float = 0.5
    label: str | None = None


@dataclass
class Outer:
    name: str
    pair: tuple[float, float] = (0.0, 1.0)
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_build_converts_nested_tables_and_numbers():
    cfg = build(Outer, {"name": "a", "pair": [1, 2], "inner": {"ratio": 2, "label": "none"}})
    assert cfg == Outer("a", (1.0, 2.0), [], Inner(3, 2.0, None))
    assert isinstance(cfg.pair, tuple) and isinstance(cfg.inner.ratio, float)


@pytest.mark.parametrize(
    "data, error, named",
    [
        ({"name": "a", "bogus": 1}, KeyError, r"unknown key\(s\) top\.bogus; valid under top"),
        ({"name": "a", "inner": {"sise": 1}}, KeyError, r"top\.inner\.sise; valid under"),
        ({}, KeyError, r"missing key\(s\) top\.name"),
        ({"name": 5}, ValueError, r"top\.name must be str; got int 5"),
        ({"name": "a", "inner": {"size": True}}, ValueError, r"top\.inner\.size must be int"),
        ({"name": "a", "pair": [1]}, ValueError, r"top\.pair must have 2 items"),
        ({"name": "a", "tags": ["x", 1]}, ValueError, r"top\.tags\[1\] must be str"),
        ({"name": "a", "inner": 3}, ValueError, r"top\.inner must be a table"),
    ],
)
def test_build_errors_name_the_dotted_key(data, error, named):
    with pytest.raises(error, match=named):
        build(Outer, data, "top")


def test_set_key_parses_override_text_by_field_type():
    data: dict = {}
    for item in ("inner.size=7", "inner.label=123", "tags=['a', 'b']", "name=x y"):
        set_key(data, *parse_override(item), Outer, parse=True)
    assert data == {"inner": {"size": 7, "label": "123"}, "tags": ["a", "b"], "name": "x y"}
    with pytest.raises(KeyError, match=r"unknown key top\.inner\.sise; valid under top\.inner"):
        set_key(data, "inner.sise", 1, Outer, where="top")
    with pytest.raises(KeyError, match=r"top\.name is a value, not a table"):
        set_key(data, "name.x", 1, Outer, where="top")
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("inner.size")


def test_toml_round_trip(tmp_path):
    cfg = Outer('q"uote\\ \t', (0.5, 2.0), ["x"], Inner(4, 1.0, None))
    path = tmp_path / "c.toml"
    path.write_text(to_toml(to_plain(cfg)), encoding="utf-8")
    assert build(Outer, read_toml(path)) == cfg
    path.write_text("[a\n")
    with pytest.raises(ValueError, match="c.toml: invalid TOML"):
        read_toml(path)


def test_find_named_toml(tmp_path):
    (tmp_path / "one.toml").write_text("")
    assert find_named_toml("one", tmp_path) == tmp_path / "one.toml"
    assert find_named_toml(tmp_path / "one.toml", tmp_path) == tmp_path / "one.toml"
    assert find_named_toml("two", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="two.toml"):
        find_named_toml(tmp_path / "two.toml", tmp_path)
