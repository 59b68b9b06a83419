"""Typed configuration: one dataclass per section (`sections`, `features`, `serve`),
assembled and read from YAML profiles (`loader`, profiles in `profiles/`); validated once
at load, then frozen (`base`)."""

from qpo_ray.common.errors import ConfigError
from qpo_ray.config.loader import (Config, config_from_dict, load_config, merge_overrides,
                                   parse_override, profile_path, section_from_dict)
from qpo_ray.config.sections import (DatasetConfig, EvaluationConfig, LoopConfig, PolicyConfig,
                                     PromptsConfig, TargetConfig, TaskConfig, TestConfig,
                                     TrackingConfig, TrainingConfig)
from qpo_ray.config.serve import ServeConfig

__all__ = ["Config", "ConfigError", "config_from_dict", "load_config", "merge_overrides",
           "parse_override", "profile_path", "section_from_dict", "DatasetConfig",
           "EvaluationConfig", "LoopConfig", "PolicyConfig", "PromptsConfig", "TargetConfig",
           "TaskConfig", "TestConfig", "TrackingConfig", "TrainingConfig", "ServeConfig"]
