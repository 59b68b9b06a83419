"""What every config section shares: the frozen-after-load rule and `require_all`.

A section is built and filled by the loader (qpo_ray.config.loader), validated once, then
frozen: a later `cfg.x.y = ...` raises, so no part can change what another part reads.
A config with other values is a new config (`Config.with_changes`), validated again."""

from __future__ import annotations

import dataclasses
from typing import Any

from qpo_ray.common.errors import ConfigError

_FROZEN = "_qpo_frozen"


class Section:
    """Base of every config dataclass: assignable until `freeze`, read-only after."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get(_FROZEN):
            raise dataclasses.FrozenInstanceError(
                f"config is frozen after load: {type(self).__name__}.{name} cannot change; "
                "build a new config (Config.with_changes) instead")
        object.__setattr__(self, name, value)


def freeze(section: Any) -> None:
    """Freeze `section` and every section inside it."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            freeze(value)
    object.__setattr__(section, _FROZEN, True)


def require_all(checks: list[tuple[bool, str]]) -> None:
    """Raise ConfigError with the message of the first failed check."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
