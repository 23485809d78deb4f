"""Building a settings dataclass from its sources: a file's mapping, the environment and
the command line, each a nested mapping by field path, merged with the later winning.

Values are checked against their field's type here (strings as a user writes them,
units included); what they mean is checked by the dataclasses' own `__post_init__`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_type_hints

from autoglm_settings.declare import Setting, SettingError, settings

TRUE = ("1", "true", "yes", "on")
FALSE = ("", "0", "false", "no", "off")


def coerce(setting: Setting, value: Any) -> Any:
    """`value` (a string as written, or a typed value from a file or a flag) as the
    setting's field type."""
    unit = setting.meta.unit
    if unit is not None and isinstance(value, str) and value.strip():
        try:
            value = unit.parse(value)
        except ValueError:
            raise SettingError(
                f"{setting.label} must be a number of {unit.label}, got {value!r}") from None
    return _coerce(setting.label, value, setting.kind)


def _coerce(key: str, value: Any, kind: Any) -> Any:
    optional = _optional_of(kind)
    if optional is not None:
        return None if value is None or value == "" else _coerce(key, value, optional)
    if kind is bool:
        return _boolean(key, value)
    if kind is int:
        return _integer(key, value)
    if kind is float:
        return _number(key, value)
    if kind is str:
        if isinstance(value, str):
            return value
        raise SettingError(f"{key} must be a string, got {value!r}")
    if kind is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise SettingError(f"{key} must be a path, got {value!r}")
    if kind == tuple[str, ...]:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
            return tuple(part.strip() for item in value for part in item.split(",")
                         if part.strip())
        raise SettingError(f"{key} must be a list of strings, got {value!r}")
    raise TypeError(f"unsupported setting type {kind} for {key}")


def _optional_of(kind: Any) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return None


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise SettingError(f"{key} must be a boolean, got {value!r}")


def _integer(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            pass
    raise SettingError(f"{key} must be an integer, got {value!r}")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SettingError(f"{key} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise SettingError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SettingError(f"{key} must be finite, got {value!r}")
    return number


def _nest(pairs: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, value in pairs:
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return nested


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """The nested mappings laid over each other, the later winning key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = value
    return merged


def from_environment(cls: type, environ: Mapping[str, str], prefix: str, *,
                     strict: bool = False, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings of `cls` found in `environ`, as strings nested by field path. With
    `strict`, every other variable under `prefix` (but those in `ignore`) is an error.
    A deprecated name is read only where the setting's current name is unset."""
    known: dict[str, tuple[Setting, bool]] = {}
    for s in settings(cls):
        known[s.env(prefix)] = (s, False)
        if s.kind is bool:
            known[prefix + "NO_" + s.name.upper()] = (s, True)
    deprecated = deprecated_names(cls, prefix)
    pairs, seen = [], {}
    for name, value in environ.items():
        if name not in known:
            if (strict and name.startswith(prefix) and name not in ignore
                    and name not in deprecated):
                raise SettingError(f"unknown environment variable {name}")
            continue
        s, negated = known[name]
        if s.path in seen:
            raise SettingError(f"{seen[s.path]} and {name} both set {s.label}")
        seen[s.path] = name
        pairs.append((s.path, not coerce(s, value) if negated else value))
    for s in settings(cls):
        old = next((name for name in s.meta.deprecated_env if name in environ), None)
        if old is not None and s.path not in seen:
            pairs.append((s.path, environ[old]))
    return _nest(pairs)


def deprecated_names(cls: type, prefix: str) -> dict[str, str]:
    """Each deprecated environment name of `cls`'s settings -> the name to use instead."""
    return {old: s.env(prefix) for s in settings(cls) for old in s.meta.deprecated_env}


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    """One option per setting of `cls` (aliases first) but the `env_only`, its help naming
    the environment variable and the default. An option not given leaves no attribute
    (see `from_flags`)."""
    for s in settings(cls):
        if not s.flags:
            continue
        extra = f"{prefix}{s.name.upper()}"
        shown = s.shown_default
        note = f"[{extra}" + (f"; default {shown}]" if shown else "]")
        options: dict[str, Any] = {
            "dest": ".".join(s.path), "default": argparse.SUPPRESS,
            "help": f"{s.meta.help} {note}".replace("%", "%%"),
        }
        if s.kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = _flag_type(s)
            options["choices"] = s.meta.choices
            if not s.meta.choices:
                options["metavar"] = s.meta.unit.label if s.meta.unit else _metavar(s.kind)
        if s.kind == tuple[str, ...]:
            options["action"] = "append"
            options["type"] = str
        parser.add_argument(*s.flags, **options)


def _metavar(kind: Any) -> str:
    kind = _optional_of(kind) or kind
    return {int: "N", float: "NUM", Path: "PATH"}.get(kind, "TEXT")


def _flag_type(s: Setting):
    def convert(text: str) -> Any:
        try:
            return coerce(s, text)
        except SettingError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = s.name
    return convert


def from_flags(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The settings of `cls` given on the command line, nested by field path."""
    given = vars(namespace)
    return _nest([(s.path, given[".".join(s.path)]) for s in settings(cls)
                  if ".".join(s.path) in given])


def load(cls: type, prefix: str, namespace: argparse.Namespace,
         environ: Mapping[str, str]) -> Any:
    """`cls` from its defaults, the environment and the flags given (the later winning),
    validated: a process's whole configuration without a file."""
    return build(cls, merge(from_environment(cls, environ, prefix), from_flags(cls, namespace)))


def build(cls: type, raw: Mapping[str, Any]) -> Any:
    """`cls` from a nested mapping by field path; the dataclasses validate themselves.
    A key that names no field is an error (a file's typo must not pass unseen)."""
    return _build(cls, raw, (), {s.path: s for s in settings(cls)})


def _build(cls: type, raw: Any, path: tuple[str, ...], index: dict) -> Any:
    where = f"[{'.'.join(path)}]" if path else "the top level"
    if not isinstance(raw, Mapping):
        raise SettingError(f"{where} must be a table, got {raw!r}")
    hints = get_type_hints(cls)
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise SettingError(f"unknown config key(s) in {where}: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        here = (*path, name)
        if here in index:
            values[name] = coerce(index[here], value)
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], value, here, index)
        else:
            raise SettingError(f"{'.'.join(here)} is not a setting")
    return cls(**values)
