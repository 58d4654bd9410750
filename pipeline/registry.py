"""Stage types by name, and the checks a config's stage entry must pass before anything runs."""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any

STAGES: dict[str, type] = {}


class ConfigError(ValueError):
    """A pipeline description is wrong; the message names the stage and the field."""

    def __init__(self, message: str, stage: str | None = None, field: str | None = None):
        super().__init__(f"stage `{stage}`: {message}" if stage else message)
        self.stage, self.field = stage, field


def register(type_name: str):
    """Class decorator: make a stage class available to configs as ``type: <type_name>``.

    Each instance also records the arguments it was built with (``params``, without ``source``):
    what ``inspect`` shows and what a saved state is checked against.
    """

    def decorate(cls: type) -> type:
        cls.type_name = type_name
        STAGES[type_name] = cls
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            self.params = {k: v for k, v in bound.arguments.items() if k not in ("self", "source")}
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return decorate


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean `{close[0]}`?" if close else ""


def stage_class(type_name: Any, stage: str) -> type:
    if not isinstance(type_name, str) or type_name not in STAGES:
        raise ConfigError(
            f"unknown type `{type_name}`{did_you_mean(str(type_name), STAGES)} (known: {', '.join(sorted(STAGES))})",
            stage,
            "type",
        )
    return STAGES[type_name]


def parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The fields a config may give a stage type: its constructor's arguments, less ``source``."""
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return params


def check_fields(cls: type, fields: dict[str, Any], stage: str) -> None:
    """Raise ``ConfigError`` for an unknown field or a missing required one."""
    params = parameters(cls)
    allowed = [p for p in params if p != "source"]
    for field in fields:
        if field not in allowed:
            raise ConfigError(f"unknown field `{field}` for type `{cls.type_name}`{did_you_mean(field, allowed)}", stage, field)
    for name in allowed:
        if params[name].default is inspect.Parameter.empty and name not in fields:
            raise ConfigError(f"missing required field `{name}` for type `{cls.type_name}`", stage, name)
