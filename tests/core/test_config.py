"""Config dataclasses: type conversion of YAML and command-line values, unknown keys, precedence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from leanfit.core.config import BaseConfig, coerce, config_help, flat_values, load_yaml, option, parse_overrides
from leanfit.core.errors import ConfigError


@dataclass
class Inner(BaseConfig):
    width: int = option(8, help="inner width")
    rate: float = option(0.5, help="inner rate")


@dataclass
class Outer(BaseConfig):
    name: str = option("a", help="a name")
    steps: int = option(10, help="steps")
    flag: bool = option(False, help="a flag")
    mode: Literal["fast", "slow"] = option("fast", help="mode")
    sizes: list[int] = option(default_factory=lambda: [1, 2], help="sizes")
    limit: int | None = option(None, help="optional limit")
    inner: Inner = option(default_factory=Inner, help="nested")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} is invalid: expected a positive integer")


@pytest.mark.parametrize(
    ("text", "tp", "expected"),
    [
        ("3", int, 3),
        ("3", float, 3.0),
        ("1e-3", float, 1e-3),
        ("true", bool, True),
        ("no", bool, False),
        ("fast", Literal["fast", "slow"], "fast"),
        ("[4, 5]", list[int], [4, 5]),
        ("null", int | None, None),
        ("7", int | None, 7),
        ("123", str, "123"),
    ],
    ids=["int", "int-as-float", "sci-float", "bool-true", "bool-no", "literal", "list", "optional-none",
         "optional-int", "str-digits"],
)
def test_coerce_converts_command_line_strings(text, tp, expected):
    value = coerce(text, tp, "key")
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "tp", "fragment"),
    [
        ("2e2", int, "expected an integer"),
        ("abc", float, "expected a number"),
        ("maybe", bool, "expected true or false"),
        ("medium", Literal["fast", "slow"], "expected one of 'fast', 'slow'"),
        ("5", list[int], "expected a list"),
        ("[1, x]", list[int], "key[1]='x'"),
    ],
    ids=["float-for-int", "word-for-float", "word-for-bool", "bad-literal", "scalar-for-list", "bad-list-item"],
)
def test_coerce_rejects_with_parameter_value_and_expectation(text, tp, fragment):
    with pytest.raises(ConfigError) as err:
        coerce(text, tp, "key")
    assert fragment in str(err.value)
    assert "key" in str(err.value)


def test_from_dict_builds_nested_config_from_overrides():
    cfg = Outer.from_dict(parse_overrides(["steps=20", "inner.width=16", "mode=slow", "sizes=[3]"]))
    assert (cfg.steps, cfg.inner.width, cfg.inner.rate, cfg.mode, cfg.sizes) == (20, 16, 0.5, "slow", [3])
    assert Outer.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("values", "bad", "listed"),
    [({"stepz": 1}, "'stepz'", "steps"), ({"inner": {"widht": 1}}, "inner.'widht'", "inner.width")],
    ids=["top-level", "nested"],
)
def test_unknown_keys_are_errors_listing_valid_keys(values, bad, listed):
    with pytest.raises(ConfigError) as err:
        Outer.from_dict(values)
    msg = str(err.value)
    assert "unknown config key" in msg
    assert bad.split(".")[-1] in msg
    assert listed in msg


def test_post_init_validation_becomes_config_error():
    with pytest.raises(ConfigError, match=r"steps=0 is invalid"):
        Outer.from_dict({"steps": 0})


@dataclass
class Parent(BaseConfig):
    inner: Inner = option(default_factory=lambda: Inner(width=32), help="nested, with a non-class default width")


def test_partial_nested_override_keeps_the_parents_factory_defaults():
    cfg = Parent.from_dict(parse_overrides(["inner.rate=0.1"]))
    assert (cfg.inner.width, cfg.inner.rate) == (32, 0.1)  # not Inner's own width 8
    assert Parent.from_dict({}).inner.width == 32
    assert Parent.from_dict({"inner": {"width": 4}}).inner == Inner(width=4)


def test_updated_merges_nested_values():
    cfg = Outer().updated({"inner": {"rate": 0.25}})
    assert (cfg.inner.width, cfg.inner.rate) == (8, 0.25)


@pytest.mark.parametrize("item", ["steps", "=3", ""], ids=["no-equals", "no-key", "empty"])
def test_parse_overrides_rejects_malformed_items(item):
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides([item])


def test_load_yaml_uses_safe_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "no such file"), ("- 1\n- 2\n", "must hold a mapping"), ("a: [1,\n", "not valid YAML (line")],
    ids=["missing", "list", "syntax"],
)
def test_load_yaml_errors_name_the_file(tmp_path, content, fragment):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert fragment in str(err.value)
    assert "c.yaml" in str(err.value)


def test_config_help_lists_nested_keys_with_help():
    rows = {key: (tp, default, text) for key, tp, default, text in config_help(Outer)}
    assert rows["inner.width"] == ("int", "8", "inner width")
    assert rows["mode"][0] == "'fast' | 'slow'"
    assert rows["sizes"][1] == "[1, 2]"
    assert len(rows) == 8


@pytest.mark.parametrize(
    ("key", "expected"),
    [("sizes", "list[int]"), ("limit", "int | None"), ("mode", "'fast' | 'slow'"), ("inner.rate", "float")],
    ids=["list-with-element-type", "optional", "literal", "nested-scalar"],
)
def test_config_help_names_types_as_annotated(key, expected):
    assert {k: tp for k, tp, _, _ in config_help(Outer)}[key] == expected


def test_flat_values_has_the_keys_of_config_help_with_the_configs_values():
    config = Outer.from_dict({"sizes": [3], "inner": {"width": 2}})
    values = flat_values(config)
    assert list(values) == [key for key, *_ in config_help(Outer)]
    assert values["sizes"] == [3] and values["inner.width"] == 2 and values["inner.rate"] == 0.5
