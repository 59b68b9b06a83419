"""The error every wrong setting raises, in a module of its own so that any layer (the
config sections, the backend registry, the tasks) can raise it without importing the
config loader. `qpo_ray.config` re-exports it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A profile or override names an unknown key or carries a bad value; the message
    starts with the dotted key (or the file) it is about."""
