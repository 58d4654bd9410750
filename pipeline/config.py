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
        if path.endswith(".toml"):  # TOML itself refuses duplicate keys
            import tomllib

            loaded = tomllib.loads(raw.decode())
        elif path.endswith(".json"):
            loaded = json.loads(raw, object_pairs_hook=_unique_pairs)
        else:
            import yaml

            _refuse_duplicate_keys(yaml.compose(raw, Loader=yaml.SafeLoader))
            loaded = yaml.safe_load(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", e.stage, e.field) from None
    except Exception as e:  # each parser has its own error type; all mean the same to the user
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping with a `stages` key, got {type(loaded).__name__}")
    return loaded


def _duplicate(key: str, path: list[str], where: str = "") -> ConfigError:
    """A key given twice: the last would win in silence. The error names the stage when it is in one."""
    stage = path[1] if len(path) > 1 and path[0] == "stages" else None
    inside = f" in `{'.'.join(path)}`" if path and not stage else ""
    return ConfigError(f"duplicate key `{key}`{inside}{where}; give each key once", stage, key)


def _refuse_duplicate_keys(node, path: list[str] | None = None) -> None:
    """Walk a composed YAML document; refuse a mapping that gives a key twice."""
    import yaml

    path = path or []
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                raise _duplicate(name, path, f" (line {key.start_mark.line + 1})")
            seen.add(name)
            _refuse_duplicate_keys(value, path + [name])
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path + [str(i)])


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if repeated is not None:
        raise ConfigError(f"duplicate key `{repeated}`; give each key once", field=repeated)
    return dict(pairs)


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
        try:
            stages[stage][field] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {override!r}: the value is not YAML ({e.problem or e})", stage, field) from None
    return config
