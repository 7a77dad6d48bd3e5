"""YAML configs validated into typed dataclasses before any compute.

Each experiment declares a (nested) frozen dataclass. :func:`from_dict` checks every key,
type and range and fails with one line naming the file, the key, what was given and what is
allowed. Ranges and choices are declared on fields::

    lr: float = field(default=0.1, metadata=bounds(gt=0))
    name: Literal["digits", "mnist1d"] = "digits"

A config file may define ``presets: {tiny: {dotted.key: value, ...}}``; ``--preset tiny``
(or ``--tiny``) applies one, and ``--set dotted.key=value`` overrides single values.

Every error names where the offending value came from: the file, the file's preset, or
``--set``. Checks inside an experiment (cross-field ``__post_init__``, sizes checked against
the loaded data in ``build``) raise ``ConfigError("dotted.key: ...")`` and :func:`locate`
adds the source. Bounds on a list field apply to each of its elements.
"""

from __future__ import annotations

import dataclasses
import re
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


def _convert(tp, value, where: str, default=None):
    """``value`` as type ``tp``, or a ConfigError (``"where: ..."``, located later). A
    section (dataclass) takes the keys it is not given from ``default`` (the enclosing
    config's default for it, e.g. an experiment's own data defaults), else from its class."""

    def fail():
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            fail()
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, where)
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
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return _from_dict(tp, value, f"{where}.", default)
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


class ConfigData(dict):
    """Raw config data (a dict) that remembers where each overridden key came from:
    ``sources`` maps a dotted key to ``"--set"``, ``"<file> (preset tiny)"``, ..."""

    sources: dict[str, str]

    def __init__(self, data=(), sources=None):
        super().__init__(data)
        self.sources = dict(sources or {})


def locate(message: str, default: str, sources: dict[str, str]) -> str:
    """``"SOURCE: message"``: the source of the first dotted key the message starts with
    (``"data.batch_size: ..."``, ``"data.val_fraction + data.test_fraction: ..."``) that was
    overridden, else ``default`` (the config file)."""
    head = message.split(": ", 1)[0]
    for key in re.findall(r"[A-Za-z_][\w.]*", head):
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in sources:
                return f"{sources['.'.join(parts[:n])]}: {message}"
    return f"{default}: {message}"


def from_dict(cls, data: dict, source: str = "<config>", prefix: str = "", sources=None):
    """Builds dataclass ``cls`` from a mapping, validating keys, types and ranges.

    Errors name the source of the offending key (``sources``, default ``data.sources`` for
    :class:`ConfigData`, else ``source``).
    """
    sources = getattr(data, "sources", {}) if sources is None else sources
    try:
        return _from_dict(cls, data, prefix)
    except ConfigError as e:
        raise ConfigError(locate(str(e), source, sources)) from e


def _from_dict(cls, data, prefix, default=None):
    """``from_dict`` without the source: errors are ``"dotted.key: ..."``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'top level'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys here: {sorted(fields)}")
    values = {}
    for name, f in fields.items():
        where = f"{prefix}{name}"
        if name not in data:
            if default is not None:
                values[name] = getattr(default, name)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key")
            continue
        own = getattr(default, name) if default is not None else f.default
        own = own if dataclasses.is_dataclass(own) and not isinstance(own, type) else None
        value = _convert(hints[name], data[name], where, own)
        items = value if isinstance(value, tuple) else (value,)
        for i, item in enumerate(items):
            if _is_number(item) and not _in_range(item, f.metadata):
                at = f"{where}[{i}]" if isinstance(value, tuple) else where
                shown = data[name][i] if isinstance(value, tuple) else data[name]
                raise ConfigError(
                    f"{at}: expected a value {_range_text(f.metadata)}, got {shown!r}"
                )
        values[name] = value
    return cls(**values)  # cross-field checks live in the dataclass's __post_init__


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where."""
    mark = getattr(e, "problem_mark", None)
    problem = " ".join((getattr(e, "problem", None) or str(e)).split())
    return (
        problem if mark is None else f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    )


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level: expected a mapping, got {data!r}")
    return data


def resolve(data: dict, source: str, preset: str | None = None, overrides=()) -> ConfigData:
    """Applies a preset and ``--set`` overrides to raw config data (a copy), recording in
    ``.sources`` which keys each one set."""
    import copy

    data = ConfigData(copy.deepcopy(data))
    presets = data.pop("presets", {}) or {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(
                f"{source}: presets: no preset {preset!r}; defined: {sorted(presets)}"
            )
        if not isinstance(presets[preset], dict):
            raise ConfigError(
                f"{source}: presets.{preset}: expected a mapping of dotted keys to values"
            )
        for key, value in presets[preset].items():
            set_dotted(data, key, value, source)
            data.sources[key] = f"{source} (preset {preset})"
    for key, value in overrides:
        set_dotted(data, key, value, "--set")
        data.sources[key] = "--set"
    return data
