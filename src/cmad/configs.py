"""Typed, frozen configs built from plain mappings (YAML / JSON) and checked at the door.

`build(cls, data, where)` turns a mapping into the frozen dataclass `cls`, recursing into
nested dataclass fields: an unknown key, a value of the wrong type or a value the dataclass
rejects raises `ConfigError` naming `where` (the file) and the dotted key. Nested values are
merged over the field's default instance, so `align: {epochs: 3}` keeps the other defaults.
Nothing downstream re-validates or receives a raw dict.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from cmad.errors import ConfigError

T = TypeVar("T")

# The working resolution (pixels, square) when neither a config nor `--size` sets one; kept
# here, with no torch behind it, so that the CLI's help can show it. 288 was chosen on the
# tuning seeds 0 and 1 against 224, 256 and 320 (RESULTS.md, round 7): mean I-AUROC /
# AUPRO@30% 0.870 / 0.875 at 224, 0.894 / 0.903 at 288, 0.903 / 0.911 at 320, in the same
# order on Eyecandies CandyCane. 320 costs 27% more per sample than 288, and its fit of a
# real-size category (250 samples) took 65 s against 45 s at 288 (same bank fractions).
DEFAULT_SIZE = 288
# the largest working resolution accepted: a 1024 px square is 11x the default's pixels
# (a fit's feature maps alone grow with it); past it a size is more likely a typo
MAX_SIZE = 1024


def size_problem(size: Any, max_size: int | None = MAX_SIZE) -> str | None:
    """What is wrong with a working resolution (None: nothing): a multiple of 8 from 32 to
    `max_size` (None: no upper limit, for models saved before it existed)."""
    if isinstance(size, bool) or not isinstance(size, int) or size % 8 or size < 32 \
            or (max_size is not None and size > max_size):
        top = f"from 32 to {max_size}" if max_size is not None else "and at least 32"
        return f"must be a multiple of 8 {top}, got {size}"
    return None


def _prefix(where: str | None, key: str) -> str:
    loc = key if key else "config"
    return f"{where}: {loc}" if where else loc


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, where: str | None, default: Any) -> Any:
    """`value` checked against the annotation `tp` (and converted: lists -> tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _convert(value, opt, key, where, default)
            except ConfigError as exc:
                errors.append(exc)
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{_prefix(where, key)} must be {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_prefix(where, key)} must be a mapping of options, got {value!r}")
        base = default if isinstance(default, tp) else None
        return build(tp, value, where, prefix=key, base=base)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"{_prefix(where, key)} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", where, None) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{_prefix(where, key)} must have {len(args)} items, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]", where, None) for i, (v, a) in
                     enumerate(zip(value, args)))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        args = typing.get_args(tp) or (str, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_prefix(where, key)} must be a mapping, got {value!r}")
        return {_convert(k, args[0], key, where, None): _convert(v, args[1], f"{key}.{k}", where, None)
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_prefix(where, key)} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_prefix(where, key)} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{_prefix(where, key)} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_prefix(where, key)} must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{_prefix(where, key)} must be {_type_name(tp)}, got {value!r}")
    return value


def build(cls: type[T], data: Mapping[str, Any], where: str | None = None, prefix: str = "",
          base: T | None = None) -> T:
    """The frozen dataclass `cls` from `data`, merged over `base` (default: cls's defaults)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_prefix(where, prefix)} must be a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in flds:
            raise ConfigError(f"{_prefix(where, key)}: unknown option; known: {sorted(flds)}")
        if base is not None:
            default = getattr(base, k)
        elif flds[k].default is not dataclasses.MISSING:
            default = flds[k].default
        elif flds[k].default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = flds[k].default_factory()  # type: ignore[misc]
        else:
            default = None
        values[k] = _convert(v, hints[k], key, where, default)
    try:
        if base is not None:
            return dataclasses.replace(base, **values)  # type: ignore[type-var]
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{_prefix(where, prefix)}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{_prefix(where, prefix)}: {exc}") from None


def to_plain(obj: Any) -> Any:
    """A dataclass (nested) as JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two plain mappings (`over` wins; nested mappings merge)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out
