"""Typed configuration: the dataclasses (here, in config_sections and config_serve) are
the source of truth.

A YAML profile (``qpo_ray/config/profiles/<name>.yaml`` or any path) only overrides the
defaults written here (a profile may start from another: ``extends: cpu-demo``), and ``--set section.key=value`` overrides the profile. Unknown
keys and values of the wrong type fail with the dotted key in the message, before any
work starts. The sections and the checks of their fields live in
``qpo_ray.config.sections`` (``serve`` in ``qpo_ray.config.serve``); this module
assembles them and reads profiles.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from qpo_ray.config.base import Section, freeze, require_all
from qpo_ray.config.features import migrate_legacy
from qpo_ray.config.sections import (DatasetConfig, EvaluationConfig, LoopConfig, PolicyConfig,
                                     PromptsConfig, TargetConfig, TaskConfig, TestConfig,
                                     TrackingConfig, TrainingConfig)
from qpo_ray.config.serve import ServeConfig
from qpo_ray.common.errors import ConfigError

PROFILES_DIR = Path(__file__).parent / "profiles"


@dataclass
class Config(Section):
    # Run directory: datasets, checkpoints, reports, the default MLflow store.
    workdir: str = "runs/qpo"
    seed: int = 0
    # Ray address; None = RAY_ADDRESS from the environment, else a local ray.init().
    ray_address: Optional[str] = None
    task: TaskConfig = field(default_factory=TaskConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    test: TestConfig = field(default_factory=TestConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_changes(self, changes: dict[str, Any]) -> "Config":
        """A new config: this one with `changes` (nested mappings, e.g. {"task":
        {"num_shots": 3}}) merged in, validated and frozen like any loaded config."""
        return config_from_dict(_merge(self.to_dict(), changes))  # copied there, not here

    def validate(self) -> None:
        """Every section's own checks, then the ones that span two sections."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        require_all([
            (0 <= self.test.rank.low_reward < self.loop.target_reward,
             "test.rank.low_reward must be in [0, loop.target_reward)"),
            (self.test.decoding != "dev" or self.task.dev_queries > 0,
             "test.decoding: 'dev' needs a dev split (task.dev_queries > 0)"),
            (self.test.split == "test" or (self.task.dev_queries > 0
                                           and self.test.decoding != "dev"),
             "test.split: 'dev' needs a dev split (task.dev_queries > 0) and a fixed "
             "test.decoding (greedy, rank or mbr): a choice made on dev is not measured on dev"),
            (self.training.summary.epochs == 0 or self.policy.query_summary.enable,
             "training.summary.epochs > 0 needs a query summary "
             "(policy.query_summary.enable: true)"),
            # An imported dataset's groups are its own (the paper's has several), so
            # group 1 there is no wide Step 0.
            (self.training.summary.queries == "all" or (
                self.training.summary.epochs > 0 and self.dataset.wide.enable
                and not self.dataset.import_path),
             "training.summary.queries: 'unseen' needs a summary phase "
             "(training.summary.epochs > 0) and a wide Step 0 built by this run to train "
             "it on (dataset.wide.enable: true, no dataset.import_path)"),
            (self.training.summary.holdout == 0 or self.training.summary.epochs > 0,
             "training.summary.holdout > 0 needs a summary phase to stop "
             "(training.summary.epochs > 0)"),
        ])

    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        return f"sqlite:///{Path(self.workdir).resolve() / 'mlflow.db'}"


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_check_type(k, key_tp, key): _check_type(v, value_tp, f"{key}.{k}")
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "5e-4" (no dot) as a string.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _apply(obj: Any, overrides: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (known: {sorted(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping, got {value!r}")
            _apply(current, value, dotted + ".")
        else:
            setattr(obj, key, _check_type(value, hints[key], dotted))


def parse_override(text: str) -> dict[str, Any]:
    """`a.b=value` -> {"a": {"b": value}}; the value is parsed as YAML (1, true, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    out: dict[str, Any] = {}
    node = out
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`data` (a config as nested mappings) with each "a.b=value" merged in, in order;
    `config_from_dict` / `load_config` then validate the result, naming a bad key."""
    for text in overrides:
        _merge(data, parse_override(text))
    return data


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def profile_path(profile: str) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = PROFILES_DIR / f"{profile}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown profile {profile!r}: neither a YAML file nor one of {known}")


def read_profile(profile: str, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A profile's mappings, with `extends: <profile>` (a shipped name, or a path relative
    to the extending file) resolved: the base's mappings, this file's merged over them.
    A cycle is refused naming the files."""
    path = profile_path(profile) if not _chain else _extended_path(profile, _chain[-1])
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in _chain + (path.resolve(),))
        raise ConfigError(f"{_chain[-1]}: extends: cycle {cycle}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of sections")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: expected a profile name or path, got {base!r}")
    return _merge(read_profile(base, _chain + (path.resolve(),)), data)


def _extended_path(base: str, child: Path) -> Path:
    relative = child.parent / base
    if relative.suffix in (".yaml", ".yml") and relative.exists():
        return relative
    try:
        return profile_path(base)
    except ConfigError as exc:
        raise ConfigError(f"{child}: extends: {exc}") from None


def load_config(
    profile: Optional[str] = None,
    overrides: Optional[list[str] | dict[str, Any]] = None,
) -> Config:
    """Defaults <- profile YAML (and those it extends) <- overrides (``["a.b=1"]`` or a
    nested dict)."""
    merged: dict[str, Any] = read_profile(profile) if profile else {}
    if isinstance(overrides, dict):
        _merge(merged, overrides)
    else:
        merge_overrides(merged, overrides or [])
    if merged.get("ray_address") is None and os.environ.get("RAY_ADDRESS"):
        merged["ray_address"] = os.environ["RAY_ADDRESS"]
    return config_from_dict(merged)


def config_from_dict(data: dict[str, Any], warn_legacy: bool = True) -> Config:
    """A validated, frozen Config from nested mappings (a profile with its overrides, or
    a run directory's config.yaml); old flat keys are moved to their new place first."""
    cfg = Config()
    _apply(cfg, migrate_legacy(copy.deepcopy(data), warn=warn_legacy))
    cfg.validate()
    freeze(cfg)
    return cfg


def section_from_dict(cls: type, data: dict[str, Any], name: str) -> Any:
    """One section (e.g. PolicyConfig saved beside a policy) from its mapping, old flat
    keys migrated; validated and frozen."""
    section = cls()
    _apply(section, migrate_legacy(copy.deepcopy(data), prefix=f"{name}.", warn=False),
           f"{name}.")
    section.validate()
    freeze(section)
    return section


__all__ = ["PROFILES_DIR", "Config", "ConfigError", "DatasetConfig", "EvaluationConfig",
           "LoopConfig", "PolicyConfig", "PromptsConfig", "ServeConfig", "TargetConfig",
           "TaskConfig", "TestConfig", "TrackingConfig", "TrainingConfig", "config_from_dict",
           "load_config", "parse_override", "profile_path", "read_profile",
           "section_from_dict"]
