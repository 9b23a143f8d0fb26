"""Typed run configuration: dataclasses loaded from YAML with dotted command-line overrides.

The dataclasses in config/sections.py are the one source of truth for defaults, and
config/rules.py the one home of the rules. A YAML file sets any subset of the keys;
`section.key=value` overrides (values parsed as YAML) apply on top. Unknown keys and wrong types are
rejected with a `UserError` that names the key and where it came from.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from unet_dist.config.loading import dump_yaml, merge, nest, parse_override, to_dict
from unet_dist.config.rules import validate, validate_augment, validate_model, validate_segment
from unet_dist.config.sections import (AugmentConfig, Config, DataConfig, LaunchConfig, LoggingConfig,
                                       ModelConfig, PredictConfig, RunConfig, SegmentConfig, TrainConfig,
                                       VolumeConfig)
from unet_dist.errors import UserError

__all__ = ["AugmentConfig", "Config", "DataConfig", "LaunchConfig", "LoggingConfig", "ModelConfig",
           "PredictConfig", "RunConfig", "SegmentConfig", "TrainConfig", "VolumeConfig", "dump_yaml", "from_dict",
           "load_config", "model_config_from_dict", "parse_override", "to_dict", "validate",
           "validate_augment", "validate_model", "validate_segment"]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then the dotted overrides; every step validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserError(f"{path}: cannot read config ({exc.strerror or exc})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of sections at the top level")
        merge(cfg, data, "", str(path))
    overridden = []
    for text in overrides:
        key, value = parse_override(text)
        merge(cfg, nest(key, value), "", "command line")
        overridden.append(key)

    def source_of(key: str) -> str:
        on_command_line = any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in overridden)
        return "command line" if on_command_line or path is None else str(path)

    validate(cfg, source_of)
    return cfg


def from_dict(data: dict, source: str = "checkpoint") -> Config:
    """Rebuild a Config from `to_dict` output (e.g. the copy stored in a checkpoint); keys it lacks
    keep their defaults, and its model section is held to every model.* rule."""
    cfg = Config()
    merge(cfg, data, "", source)
    validate_model(cfg.model, source)
    return cfg


def model_config_from_dict(data: dict, source: str) -> ModelConfig:
    """A checkpoint's `model_config` (a plain dict, as `weights_only` loading needs): the defaults
    above for keys an older checkpoint lacks, then the same rules as a YAML model section."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of model keys, got {data!r}")
    model = ModelConfig()
    merge(model, data, "model.", source)
    validate_model(model, source)
    return model
