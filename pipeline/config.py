"""Reading pipeline configs (YAML, TOML, JSON or a dict) and applying ``--set stage.field=value``."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from typing import Any

from pipeline.registry import ConfigError, did_you_mean


def load_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A pipeline description as a dict: ``{stages: {name: {type, input | inputs, ...}}, output?}``."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = os.fspath(config)
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            import tomllib

            loaded = tomllib.loads(raw.decode())
        elif path.endswith(".json"):
            loaded = json.loads(raw)
        else:
            import yaml

            loaded = yaml.safe_load(raw)
    except Exception as e:  # each parser has its own error type; all mean the same to the user
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping with a `stages` key, got {type(loaded).__name__}")
    return loaded


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``stage.field=value`` settings (the value read as YAML: ``4``, ``true``, ``[a, b]``)."""
    import yaml

    config = copy.deepcopy(config)
    for override in overrides:
        target, sep, value = override.partition("=")
        stage, dot, field = target.partition(".")
        if not sep or not dot or not stage or not field:
            raise ConfigError(f"--set {override!r}: expected stage.field=value")
        stages = config.get("stages", {})
        if stage not in stages:
            raise ConfigError(f"--set {override!r}: no stage `{stage}`{did_you_mean(stage, stages)}", stage)
        stages[stage][field] = yaml.safe_load(value)
    return config
