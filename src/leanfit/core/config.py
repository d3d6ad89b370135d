"""Typed experiment configs: dataclasses with per-field help, YAML files and ``key=value`` overrides.

A config is a ``@dataclass`` subclass of :class:`BaseConfig` whose fields are declared with :func:`option`
(which records the help text). Values from YAML files and from the command line pass through one converter
(:func:`coerce`) driven by the field annotations, so ``steps=200`` becomes an ``int`` and ``steps=2e2`` an error.
Unknown keys are errors that list the valid ones. Nested dataclass fields are addressed with dotted keys
(``model.d_model=128``).

Every number is checked where its field is declared, however the config was built (YAML, overrides or a direct
call): a float must be finite unless its ``option`` says ``finite=False``, and ``gt``/``ge``/``lt``/``le`` bound
a field's value (each item of a list). These checks run before a subclass's ``__post_init__``, which keeps the
cross-field checks (``d_model % n_heads``).
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from leanfit.core.errors import ConfigError, UnreadableFileError, bad_value

__all__ = [
    "BaseConfig",
    "check_fields",
    "coerce",
    "config_help",
    "flat_values",
    "load_yaml",
    "merge_nested",
    "option",
    "parse_overrides",
]

C = TypeVar("C", bound="BaseConfig")
_MISSING = dataclasses.MISSING


_BOUNDS = {"gt": (">", lambda v, b: v > b), "ge": (">=", lambda v, b: v >= b),
           "lt": ("<", lambda v, b: v < b), "le": ("<=", lambda v, b: v <= b)}
# the dotted prefix of the config being built by from_dict, so a field check names "train.lr", not "lr"
_WHERE: contextvars.ContextVar[str] = contextvars.ContextVar("leanfit_config_where", default="")


def option(
    default: Any = _MISSING,
    *,
    help: str,  # noqa: A002
    default_factory: Any = _MISSING,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    finite: bool = True,
) -> Any:
    """A dataclass field with help text (shown by ``leanfit run NAME --help-config``) and value checks.

    gt/ge/lt/le: bounds of the value (of each item of a list or tuple); finite: refuse NaN and infinities (the
    default for every float)."""
    if default is not _MISSING and default_factory is not _MISSING:
        raise TypeError("option() takes default or default_factory, not both")
    if isinstance(default, list | dict | set):
        raise TypeError("use default_factory for mutable defaults")
    bounds = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    kwargs: dict[str, Any] = {"metadata": {"help": help, "bounds": bounds, "finite": finite}}
    if default is not _MISSING:
        kwargs["default"] = default
    if default_factory is not _MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def _numbers(value: Any) -> list[float]:
    """The numbers a field holds: itself, or the items of a list/tuple (bools are not numbers here)."""
    items = value if isinstance(value, list | tuple) else [value]
    return [v for v in items if isinstance(v, int | float) and not isinstance(v, bool)]


_SCALARS: dict[Any, tuple[tuple[type, ...], str]] = {
    int: ((int,), "an integer such as 100"),
    float: ((int, float), "a number such as 0.001"),
    bool: ((bool,), "True or False"),
    str: ((str,), "a string"),
}


def _check_type(key: str, value: Any, tp: Any) -> None:
    """A scalar field built directly in Python (not through :meth:`BaseConfig.from_dict`, which converts) must hold
    its annotated type: ``calib_batches=2.5`` or ``alpha="0.5"`` is a TypeError naming the key."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            return
        tp, origin, args = options[0], get_origin(options[0]), get_args(options[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(bad_value(key, value, "one of " + ", ".join(repr(a) for a in args)))
        return
    if tp not in _SCALARS:
        return
    allowed, expected = _SCALARS[tp]
    if not isinstance(value, allowed) or (tp is not bool and isinstance(value, bool)):
        raise TypeError(f"{key}={value!r} is invalid: expected {expected}, got {type(value).__name__}")


def check_fields(config: BaseConfig) -> None:
    """Apply every field's declared checks (scalar types, finite floats, bounds); raises :class:`ConfigError`
    (a TypeError for a value of the wrong type) naming the key."""
    prefix = _WHERE.get()
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name, None)
        key = f"{prefix}.{f.name}" if prefix else f.name
        _check_type(key, value, hints.get(f.name, Any))
        for v in _numbers(value):
            if f.metadata.get("finite", True) and isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(bad_value(key, value, "a finite number", _example(f)))
            for bound, limit in f.metadata.get("bounds", {}).items():
                sign, holds = _BOUNDS[bound]
                if not holds(v, limit):
                    raise ConfigError(bad_value(key, value, f"a value {sign} {limit}", _example(f)))


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except (NameError, TypeError):  # an annotation that does not resolve at run time: skip the type checks
            _HINTS[cls] = {}
    return _HINTS[cls]


def _example(f: dataclasses.Field) -> str | None:
    default = _default(f)
    return f"the default is {_plain(default)!r}" if default is not None else None


@dataclasses.dataclass
class BaseConfig:
    """Base of every leanfit config. Subclasses validate cross-field constraints in ``__post_init__``; the field
    checks declared with :func:`option` run first (a subclass's ``__post_init__`` is wrapped to do so)."""

    def __post_init__(self) -> None:
        check_fields(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_checks_fields", False):
            return

        def __post_init__(self: BaseConfig) -> None:
            check_fields(self)
            own(self)

        __post_init__._checks_fields = True  # type: ignore[attr-defined]
        __post_init__.__doc__ = own.__doc__
        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any], *, where: str = "") -> C:
        """Build a config from (possibly nested) plain values, converting types and rejecting unknown keys."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where or cls.__name__} must be a mapping of keys to values, got {values!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            prefix = f"{where}." if where else ""
            raise ConfigError(
                f"unknown config key {prefix}{unknown[0]!r} for {cls.__name__}; valid keys: "
                + ", ".join(prefix + k for k in fields)
            )
        kwargs = {}
        for name, value in values.items():
            key = f"{where}.{name}" if where else name
            default = _default(fields[name])
            if isinstance(value, Mapping) and isinstance(default, BaseConfig):
                # a partial nested mapping updates the field's default (its factory may set non-class defaults,
                # e.g. IAPTConfig(bottleneck=32)), not the nested class's own defaults
                value = merge_nested(default.to_dict(), value)
            kwargs[name] = coerce(value, hints[name], key)
        token = _WHERE.set(where)
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise ConfigError(f"{where or cls.__name__}: {exc}") from exc
        finally:
            _WHERE.reset(token)

    def to_dict(self) -> dict[str, Any]:
        """Plain (YAML/JSON-safe) nested dict of the fields."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def updated(self: C, values: Mapping[str, Any]) -> C:
        """A copy with (nested) ``values`` applied on top of this config."""
        return type(self).from_dict(merge_nested(self.to_dict(), values))


def _default(field: dataclasses.Field) -> Any:
    """The default value of a dataclass field (its factory called), or ``None`` when it has none."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _plain(value: Any) -> Any:
    if isinstance(value, BaseConfig):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def merge_nested(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings in ``update`` merge into mappings in ``base``; other values replace."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_nested(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    """``int``, ``list[int]``, ``tuple[float, ...]``, ``int | None``, ``'a' | 'b'``: an annotation as it reads."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    if origin is not None:
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, name: str) -> Any:  # noqa: C901 - a flat dispatch on annotation kinds
    """Convert ``value`` (typed YAML or a command-line string) to annotation ``tp``, or raise ConfigError."""
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(value, str) and tp is not str and not (origin is Literal and value in args):
        value = _parse_scalar(value)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{name}={value!r} is invalid: expected {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{name}={value!r} is invalid: expected one of {', '.join(repr(a) for a in args)}")
    if isinstance(tp, type) and issubclass(tp, BaseConfig):
        if isinstance(value, tp):
            return value
        return tp.from_dict(value, where=name)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(f"{name}={value!r} is invalid: expected one of {valid}") from None
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"{name}={value!r} is invalid: expected a list such as [1, 2]")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{name}={value!r} is invalid: expected {len(args)} items")
            return tuple(coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}={value!r} is invalid: expected a mapping such as {{a: 1}}")
        return dict(value)
    return _coerce_scalar(value, tp, name)


def _coerce_scalar(value: Any, tp: Any, name: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r} is invalid: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r} is invalid: expected an integer such as 100")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}={value!r} is invalid: expected a number such as 0.001")
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}={value!r} is invalid: expected a string")
    if tp is Path:
        if isinstance(value, str | os.PathLike):
            return Path(value)
        raise ConfigError(f"{name}={value!r} is invalid: expected a path")
    raise TypeError(f"config field {name} has an unsupported annotation {tp!r}")


def _parse_scalar(text: str) -> Any:
    """Interpret a command-line string as YAML (``1`` -> int, ``1e-3`` -> float, ``[1,2]`` -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string; accept it as a float
            return float(value) if any(c.isdigit() for c in value) and value.strip() == text.strip() else value
        except ValueError:
            return value
    return value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "model.d=2"]`` -> ``{"a": "1", "model": {"d": "2"}}`` (values stay strings for :func:`coerce`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is invalid: expected key=value, for example steps=100")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file with ``yaml.safe_load``; the top level must be a mapping."""
    from leanfit.core.io import read_yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config={str(path)!r} is invalid: no such file; pass the path of a YAML file")
    try:
        data = read_yaml(path)
    except UnreadableFileError as exc:
        raise ConfigError(f"--config={str(path)!r} is not valid YAML ({getattr(exc, 'detail', exc)}); fix the "
                          "file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config={str(path)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def flat_values(config: BaseConfig) -> dict[str, Any]:
    """The plain value of every key of :func:`config_help` (nested fields dotted): ``{"train.steps": 300, ...}``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, BaseConfig):
            out.update({f"{f.name}.{k}": v for k, v in flat_values(value).items()})
        else:
            out[f.name] = _plain(value)
    return out


def config_help(cls: type[BaseConfig], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows (key, type, default, help) describing every field, nested fields with dotted keys."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if isinstance(tp, type) and issubclass(tp, BaseConfig):
            rows.extend(config_help(tp, key + "."))
            continue
        if f.default is not _MISSING:
            default = repr(_plain(f.default))
        elif f.default_factory is not _MISSING:
            default = repr(_plain(f.default_factory()))
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
