"""Typed configuration: dataclasses, dotted overrides, YAML presets, resolved-config saving.

Every configurable stage has a dataclass here. A preset is a YAML file in ``ltdd/presets`` whose keys mirror the
dataclass fields; ``--set a.b=c`` on the command line overrides any field (values are parsed as YAML, so
``--set distill.zca=false`` is a real boolean, not the string "false").
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import LtddError


@dataclass
class DataConfig:
    """Which data, which long-tailed split, which preprocessing."""

    dataset: str = "digits"  # cifar10 | cifar100 | imagefolder | digits
    root: str | None = None  # folder or archive; None for digits
    imbalance_factor: float = 10.0  # n_max / n_min, >= 1
    imbalance_ratio: float | None = None  # alias: 1 / imbalance_factor (LDAM/LTDD convention)
    max_per_class: int | None = None  # n_max; None = the largest class count available
    profile: str = "exp"  # exp | step
    seed: int = 0  # per-class selection seed
    class_order: list[int] | None = None  # class_order[0] gets n_max; default: label order
    normalize: bool = True  # per-channel mean/std of the long-tailed train set
    zca: bool = True
    zca_eps: float = 0.1
    label_kind: str = "fine"  # cifar100: fine | coarse
    image_size: int | None = None  # resize to this square size (digits default 16)
    test_per_class: int = 50  # digits only: balanced held-out test images per class
    probe_per_class: int = 0  # balanced probe split from unused train images (grouping analysis)

    def resolved_imbalance_factor(self) -> float:
        if self.imbalance_ratio is not None:
            if not (0 < self.imbalance_ratio <= 1):
                raise LtddError(f"imbalance_ratio must be in (0, 1], got {self.imbalance_ratio}")
            return 1.0 / self.imbalance_ratio
        if self.imbalance_factor is None or self.imbalance_factor < 1:
            raise LtddError(f"imbalance_factor must be >= 1, got {self.imbalance_factor}")
        return float(self.imbalance_factor)


# ----------------------------------------------------------------------------------------------------------------
# generic helpers: dict <-> dataclass, dotted overrides, atomic saving


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
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
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_yaml(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_dict(obj), indent=2) + "\n")


def load_yaml(path: str | Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise LtddError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise LtddError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return data or {}


PRESET_DIR = Path(__file__).parent / "presets"
