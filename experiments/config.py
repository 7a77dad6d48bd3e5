"""YAML configs validated into typed dataclasses before any compute.

Each experiment declares a (nested) frozen dataclass. :func:`from_dict` checks every key,
type and range and fails with one line naming the file, the key, what was given and what is
allowed. Ranges and choices are declared on fields::

    lr: float = field(default=0.1, metadata=bounds(gt=0))
    name: Literal["digits", "mnist1d"] = "digits"

A config file may define ``presets: {tiny: {dotted.key: value, ...}}``; ``--preset tiny``
(or ``--tiny``) applies one, and ``--set dotted.key=value`` overrides single values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem, reported as ``FILE: KEY: what was given; what is allowed``."""


def bounds(*, ge=None, gt=None, le=None, lt=None) -> dict:
    """Field metadata declaring a numeric range."""
    return {"ge": ge, "gt": gt, "le": le, "lt": lt}


def _range_text(meta) -> str:
    parts = [
        f"{op} {meta[k]}"
        for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if meta.get(k) is not None
    ]
    return " and ".join(parts)


def _in_range(value, meta) -> bool:
    return not (
        (meta.get("ge") is not None and value < meta["ge"])
        or (meta.get("gt") is not None and value <= meta["gt"])
        or (meta.get("le") is not None and value > meta["le"])
        or (meta.get("lt") is not None and value >= meta["lt"])
    )


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp)]}"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, where: str, source: str):
    """``value`` as type ``tp``, or a ConfigError."""

    def fail():
        raise ConfigError(f"{source}: {where}: expected {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            fail()
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, where, source)
            except ConfigError:
                continue
        fail()
    if tp is type(None):
        if value is not None:
            fail()
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail()
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(item, v, f"{where}[{i}]", source) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return from_dict(tp, value, source, prefix=f"{where}.")
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def from_dict(cls, data: dict, source: str = "<config>", prefix: str = ""):
    """Builds dataclass ``cls`` from a mapping, validating keys, types and ranges."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {data!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: {prefix}{unknown[0]}: unknown key; allowed keys here: {sorted(fields)}"
        )
    values = {}
    for name, f in fields.items():
        where = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: {where}: required key is missing")
            continue
        value = _convert(hints[name], data[name], where, source)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not _in_range(value, f.metadata):
                raise ConfigError(
                    f"{source}: {where}: expected a value {_range_text(f.metadata)}"
                    f", got {data[name]!r}"
                )
        values[name] = value
    try:
        return cls(**values)  # cross-field checks live in the dataclass's __post_init__
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def to_dict(config) -> dict:
    """The plain-data form of a config (for writing the resolved config)."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def set_dotted(data: dict, key: str, value: Any, source: str) -> None:
    """``data[a][b][c] = value`` for ``key = "a.b.c"`` (creating mappings as needed)."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {key}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set: expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level: expected a mapping, got {data!r}")
    return data


def resolve(data: dict, source: str, preset: str | None = None, overrides=()) -> dict:
    """Applies a preset and ``--set`` overrides to raw config data (a copy)."""
    import copy

    data = copy.deepcopy(data)
    presets = data.pop("presets", {}) or {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(
                f"{source}: presets: no preset {preset!r}; defined: {sorted(presets)}"
            )
        for key, value in presets[preset].items():
            set_dotted(data, key, value, source)
    for key, value in overrides:
        set_dotted(data, key, value, f"{source} (--set)")
    return data
