"""Typed configuration: frozen dataclasses loaded from YAML, with `a.b=c` overrides.

A config file may name a `base:` file (relative to itself) that it extends; a
profile (e.g. `configs/profiles/cpu.yaml`) is merged on top, then `--set`
overrides. Unknown keys and wrong types are errors that name the key.

`schema` holds the dataclasses, `loading` the YAML, overrides and checks; callers use
`from flowers import config as C` and find both here.
"""
from __future__ import annotations

from flowers.config.loading import (build, validate, deep_merge, PROJECT_ROOT, find_config, read_yaml, parse_override, set_dotted,
    apply_overrides, GRID_KEY, profile_grid_changes, profile_path, load_config, to_dict, to_flat_dict,
    dump_yaml, replace)
from flowers.config.schema import (ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig, DistillConfig, Config, CHOICES,
    STUDY_LEVELS, STUDY_STAGES, ResourcesConfig, StudyConfig, SearchConfig, ScoreConfig, ServeAppConfig,
    ServeConfig)

__all__ = ['CHOICES', 'Config', 'ConfigError', 'DataConfig', 'DistillConfig', 'GRID_KEY', 'ModelConfig', 'OptimConfig', 'PROJECT_ROOT', 'ResourcesConfig', 'STUDY_LEVELS', 'STUDY_STAGES', 'ScoreConfig', 'SearchConfig', 'ServeAppConfig', 'ServeConfig', 'StudyConfig', 'TrainConfig', 'apply_overrides', 'build', 'deep_merge', 'dump_yaml', 'find_config', 'load_config', 'parse_override', 'profile_grid_changes', 'profile_path', 'read_yaml', 'replace', 'set_dotted', 'to_dict', 'to_flat_dict', 'validate']
