"""Plain mappings <-> typed dataclasses: ``to_dict``, ``from_dict`` (unknown keys are errors naming the key), deep
``merge`` and dotted ``--set a.b=c`` overrides."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from .errors import LtddError


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def material(obj):
    """A configuration as key material: ``to_dict`` without the fields that are at their default value, so that a
    new configuration field (added with a default that keeps the old behaviour) does not make every recorded cell
    stale. Lists keep every element (each reduced the same way)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                out[f.name] = material(value)
                continue
            if to_dict(value) != to_dict(default):
                out[f.name] = material(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [material(v) for v in obj]
    if isinstance(obj, dict):
        return {k: material(v) for k, v in obj.items()}
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if tp is type(None) or (args and type(None) in args) or tp is Any:
            return None
        raise LtddError(f"config {where}: null is not allowed")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except LtddError as e:
                errors.append(str(e))
        raise LtddError(errors[0] if errors else f"config {where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LtddError(f"config {where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise LtddError(f"config {where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise LtddError(f"config {where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise LtddError(f"config {where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise LtddError(f"config {where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LtddError(f"config {where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            return str(value)
        return value
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) mapping; unknown keys are an error naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        key = sorted(unknown)[0]
        raise LtddError(f"unknown config key '{(where + '.') if where else ''}{key}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(hints[k], v, f"{where}.{k}" if where else k)
    return cls(**kwargs)


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into ``base``. A mapping with integer keys updates list elements, so
    ``distill.phases.0.syn_steps=5`` changes one phase."""
    out = dict(base)
    for k, v in update.items():
        cur = out.get(k)
        if isinstance(v, dict) and isinstance(cur, dict):
            out[k] = merge(cur, v)
        elif isinstance(v, dict) and isinstance(cur, list) and v and all(str(i).isdigit() for i in v):
            items = list(cur)
            for i, sub in v.items():
                i = int(i)
                if i >= len(items):
                    raise LtddError(f"override index {k}.{i} is out of range (length {len(items)})")
                items[i] = merge(items[i], sub) if isinstance(sub, dict) and isinstance(items[i], dict) else sub
            out[k] = items
        else:
            out[k] = v
    return out


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict:
    """``["a.b=1", "c=[1,2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}``; values are YAML scalars/lists."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise LtddError(f"override '{pair}' is not of the form key=value")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise LtddError(f"override '{pair}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LtddError(f"override '{pair}' conflicts with another override")
        node[parts[-1]] = value
    return out


def apply_overrides(cfg: Any, pairs: list[str] | tuple[str, ...]) -> Any:
    if not pairs:
        return cfg
    return from_dict(type(cfg), merge(to_dict(cfg), parse_overrides(pairs)))
