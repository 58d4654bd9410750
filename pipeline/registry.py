"""Stage types by name."""

from __future__ import annotations

import difflib
import functools
import inspect

STAGES: dict[str, type] = {}


class ConfigError(ValueError):
    """A pipeline description is wrong; the message names the stage and the field."""

    def __init__(self, message: str, stage: str | None = None, field: str | None = None):
        super().__init__(f"stage `{stage}`: {message}" if stage else message)
        self.stage, self.field = stage, field


def register(type_name: str):
    """Class decorator: make a stage class available to configs as ``type: <type_name>``.

    Each instance also records the arguments it was built with (``params``, without its inputs):
    what ``inspect`` shows, what ``bench`` rebuilds a stage from, and what a saved state is checked
    against.
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
            self.params = {k: v for k, v in bound.arguments.items() if k not in ("self", "source", "sources")}
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return decorate


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1)
    return f"; did you mean `{close[0]}`?" if close else ""


def stage_class(type_name, stage: str) -> type:
    if not isinstance(type_name, str) or type_name not in STAGES:
        known = ", ".join(sorted(STAGES))
        raise ConfigError(
            f"unknown type `{type_name}`{did_you_mean(str(type_name), STAGES)} (known: {known})", stage, "type"
        )
    return STAGES[type_name]
