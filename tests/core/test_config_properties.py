"""Property tests of the config parser: whatever a user types as an override or writes in a YAML file, the result
is either a ConfigError (one line at the CLI) or a config whose every field holds its declared type, is finite and
within its declared bounds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanfit.core.config import BaseConfig, option, parse_overrides
from leanfit.core.errors import ConfigError


@dataclass
class Inner(BaseConfig):
    width: int = option(8, help="a positive width", ge=1)
    rate: float = option(0.5, help="a rate in (0, 1]", gt=0, le=1)


@dataclass
class Outer(BaseConfig):
    steps: int = option(10, help="steps", ge=0)
    lr: float = option(1e-3, help="a positive learning rate", gt=0)
    scale: float = option(1.0, help="any finite scale")
    flag: bool = option(False, help="a switch")
    name: str = option("a", help="a name")
    mode: Literal["fast", "slow"] = option("fast", help="a mode")
    sizes: list[int] = option(default_factory=lambda: [1, 2], help="sizes", ge=1)
    inner: Inner = option(default_factory=Inner, help="nested")
    note: str | None = option(None, help="optional text")
    plain: list[float] = field(default_factory=list, metadata={"help": "declared without option()"})


def _holds_its_contract(cfg: Outer) -> None:
    assert isinstance(cfg.steps, int) and not isinstance(cfg.steps, bool) and cfg.steps >= 0
    assert isinstance(cfg.lr, float) and math.isfinite(cfg.lr) and cfg.lr > 0
    assert isinstance(cfg.scale, float) and math.isfinite(cfg.scale)
    assert isinstance(cfg.flag, bool) and isinstance(cfg.name, str) and cfg.mode in ("fast", "slow")
    assert all(isinstance(s, int) and s >= 1 for s in cfg.sizes)
    assert isinstance(cfg.inner.width, int) and cfg.inner.width >= 1
    assert math.isfinite(cfg.inner.rate) and 0 < cfg.inner.rate <= 1
    assert all(math.isfinite(v) for v in cfg.plain)


KEYS = ["steps", "lr", "scale", "flag", "name", "mode", "sizes", "inner.width", "inner.rate", "note", "plain",
        "unknown", "inner.unknown", "inner"]
TEXT = st.one_of(
    st.sampled_from([".nan", ".inf", "-.inf", "1e999", "-1e999", "nan", "inf", "0", "-0", "1", "-1", "2.5", "1e-3",
                     "true", "[]", "[1, 2]", "[0]", "[.nan]", "{}", "{a: 1}", "null", "", "~", "'3'", "0x10", "1_000",
                     "fast", "slow", "[1, .inf]", "!!binary aGk=", "&a [*a]", "[", "{"]),
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), TEXT), max_size=4))
def test_any_overrides_give_a_config_error_or_a_valid_config(pairs: list[tuple[str, str]]) -> None:
    try:
        cfg = Outer.from_dict(parse_overrides([f"{k}={v}" for k, v in pairs]))
    except ConfigError as exc:
        text = str(exc)
        assert "\n" not in text.strip() and text, text
        return
    _holds_its_contract(cfg)


VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["width", "rate", "x"]),
                                                                         inner, max_size=2)),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in fields(Outer)] + ["bogus"]), VALUES, max_size=4))
def test_any_yaml_mapping_gives_a_config_error_or_a_valid_config(values: dict[str, object]) -> None:
    try:
        cfg = Outer.from_dict(values)
    except ConfigError:
        return
    _holds_its_contract(cfg)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"lr": math.nan}, ConfigError, "lr=nan is invalid: expected a finite number"),
        ({"lr": 0.0}, ConfigError, "lr=0.0 is invalid: expected a value > 0"),
        ({"steps": 2.5}, TypeError, "steps=2.5 is invalid: expected an integer"),
        ({"steps": True}, TypeError, "steps=True is invalid: expected an integer"),
        ({"lr": "0.5"}, TypeError, "lr='0.5' is invalid: expected a number"),
        ({"mode": "medium"}, ConfigError, "mode='medium' is invalid: expected one of 'fast', 'slow'"),
        ({"sizes": [1, 0]}, ConfigError, "sizes=[1, 0] is invalid: expected a value >= 1"),
    ],
    ids=["nan", "bound", "float-for-int", "bool-for-int", "str-for-float", "literal", "list-item"],
)
def test_direct_construction_checks_the_fields(kwargs: dict[str, object], error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        Outer(**kwargs)  # type: ignore[arg-type]


def test_the_dotted_key_is_named_for_a_nested_field() -> None:
    with pytest.raises(ConfigError, match=r"^inner\.rate=nan is invalid"):
        Outer.from_dict(parse_overrides(["inner.rate=.nan"]))


def test_an_int_is_accepted_for_a_float_field() -> None:
    assert Outer(lr=1).lr == 1  # type: ignore[comparison-overlap]
