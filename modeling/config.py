"""Typed configuration: dataclasses built from plain dicts, validated whenever they are built.

Every config class is a dataclass deriving from `Config` whose fields carry a docstring (the string
literal under the field). Its `validate()` runs in `__post_init__`, so the constructor, `from_dict`
and `dataclasses.replace` can never produce an invalid config. `from_dict` rejects unknown fields
and wrong types with a `ConfigError` naming the dotted path of the field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
import typing
from functools import cache
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the field."""


class Config:
    """Base of every config dataclass: `validate()` runs whenever an instance is built."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Value checks of this class (nested configs validated themselves when built); raise a
        `ConfigError` whose message starts with the field name."""


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from `data`, recursing into nested dataclasses, then validate it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{where}: unknown field (known fields: {', '.join(sorted(fields))})")
    values = {}
    for name, value in data.items():
        default = _default(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = merge(dataclasses.asdict(default), value)  # nested defaults survive a partial override
        values[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    try:
        return cls(**values)
    except TypeError as e:  # a required field without default is missing
        raise ConfigError(f"{path or cls.__name__}: {e}") from None
    except ConfigError as e:  # from validate(): prefix the path of this config
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if typing.get_origin(tp) is list:  # a JSON list, or "a,b,c" from a command-line override
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        raise ConfigError(f"{path}: expected a list, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{path}: unsupported field type {tp!r}")
    raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")


NOT_IN_KEY = {"cache_key": "never"}
"""Field metadata: the field does not change a step's result (how often to log, how many encoder
processes), so cache keys leave it out and changing it reuses what is stored."""
KEY_UNLESS_DEFAULT = {"cache_key": "unless_default"}
"""Field metadata: a field added after artefacts were stored; cache keys include it only when it is
not at its default, so those artefacts keep their keys."""


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain, JSON-serialisable dict of a config (what manifests record and workers rebuild from)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def key_dict(obj: Any) -> dict[str, Any]:
    """`to_dict` without the fields whose metadata keeps them out of cache keys: a step's key input."""
    out = {}
    for f in dataclasses.fields(obj):
        value, rule = getattr(obj, f.name), f.metadata.get("cache_key")
        if rule == "never" or (rule == "unless_default" and value == _default(f)):
            continue
        out[f.name] = key_dict(value) if dataclasses.is_dataclass(value) else value
    return json.loads(json.dumps(out))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base`."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ["data.shard_size=100", "data.train.limit=5"] into a nested dict of strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.field=value")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value.strip()
    return out


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (for --help output and the README)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs
