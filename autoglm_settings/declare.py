"""Declaring settings: `setting()` and `section()` fields, and the walk that finds them.

A setting's name is its field name, prefixed by the names of the sections above it
(`policy_soft_enter`), unless the field says `name=`. Its flag is `--` + name with
dashes, its environment variable the process's prefix + NAME; a boolean also has
`--no-name` and PREFIX + NO_NAME. A section declared `named=False` adds no prefix.
A secret can be `env_only` (no flag, so it never shows in `ps`); a renamed variable
keeps working under its `deprecated_env` names, the current name winning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field
from typing import Any, get_type_hints

SETTING = "autoglm_settings.setting"
SECTION = "autoglm_settings.section"


@dataclass(frozen=True)
class Unit:
    """How a setting is written where it is not in its field's unit (MiB for bytes)."""

    label: str
    parse: Callable[[str], Any]
    show: Callable[[Any], str]


MIB = Unit("MiB", lambda text: int(float(text) * 1024 * 1024),
           lambda value: f"{value / (1024 * 1024):g}")


@dataclass(frozen=True)
class Meta:
    help: str
    name: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    unit: Unit | None = None
    shown: str | None = None  # the default as documented, where the value alone says too little
    env_only: bool = False
    deprecated_env: tuple[str, ...] = ()  # whole environment names, read when NAME is unset


def setting(default: Any = MISSING, *, help: str, default_factory: Any = MISSING,
            name: str | None = None, aliases: tuple[str, ...] = (),
            choices: tuple[str, ...] | None = None, unit: Unit | None = None,
            shown: str | None = None, env_only: bool = False,
            deprecated_env: tuple[str, ...] = ()) -> Any:
    """A dataclass field that is a setting: reachable by flag and environment, documented."""
    meta = Meta(help, name, aliases, choices, unit, shown, env_only, deprecated_env)
    return field(default=default, default_factory=default_factory, metadata={SETTING: meta})


def section(factory: Callable[[], Any], *, named: bool = True) -> Any:
    """A nested dataclass of settings; `named=False` leaves its names unprefixed."""
    return field(default_factory=factory, metadata={SECTION: named})


@dataclass(frozen=True)
class Setting:
    path: tuple[str, ...]  # field names from the root dataclass
    label: str  # the dotted path without unnamed sections: what messages and files say
    name: str
    kind: Any
    default: Any
    meta: Meta

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> tuple[str, ...]:
        return () if self.meta.env_only else (*self.meta.aliases, self.flag)

    def env(self, prefix: str) -> str:
        return prefix + self.name.upper()

    @property
    def shown_default(self) -> str:
        if self.meta.shown is not None:
            return self.meta.shown
        value = self.default
        if value is None or value == ():
            return ""
        if self.kind is bool:
            return "on" if value else "off"
        if self.meta.unit is not None:
            return self.meta.unit.show(value)
        if isinstance(value, tuple):
            return ",".join(value)
        return str(value)


class SettingError(ValueError):
    """A value does not fit its setting, or a name matches no setting."""


def check_choices(instance: Any, section: str = "",
                  error: type[Exception] = SettingError) -> None:
    """For a dataclass's `__post_init__`: each setting with choices holds one of them."""
    for f in dataclasses.fields(instance):
        meta = f.metadata.get(SETTING)
        value = getattr(instance, f.name)
        if meta is not None and meta.choices and value not in meta.choices:
            key = f"{section}.{f.name}" if section else f.name
            raise error(f"{key} must be one of {meta.choices}, got {value!r}")


def settings(cls: type) -> list[Setting]:
    """Every setting of `cls`, depth first, in declaration order."""
    return list(_walk(cls, (), (), ""))


def _walk(cls: type, path: tuple[str, ...], labels: tuple[str, ...],
          prefix: str) -> Iterator[Setting]:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if SECTION in f.metadata or (dataclasses.is_dataclass(hints[f.name])
                                     and SETTING not in f.metadata):
            named = f.metadata.get(SECTION, True)
            yield from _walk(hints[f.name], (*path, f.name),
                             (*labels, f.name) if named else labels,
                             f"{prefix}{f.name}_" if named else prefix)
        elif SETTING in f.metadata:
            meta: Meta = f.metadata[SETTING]
            yield Setting((*path, f.name), ".".join((*labels, f.name)),
                          meta.name or prefix + f.name, hints[f.name],
                          f.default_factory() if f.default is MISSING else f.default, meta)
