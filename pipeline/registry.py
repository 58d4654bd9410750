"""Stage types by name: the one place that loads them (the packages in ``PROVIDERS``, by name, on first use).

The engine never imports a stage: a stage module registers its class with ``@register`` when it is
imported, and a lookup of an unknown type imports the providers first.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from typing import Any

from pipeline.schema import check_arguments

STAGES: dict[str, type] = {}
PROVIDERS: list[str] = ["stages"]  # packages whose import registers stage types (and public helpers)


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
            check_arguments(cls, self.params)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return decorate


def load_stage_types() -> dict[str, type]:
    """Import every provider package (registering its stage types); return ``STAGES``."""
    for name in PROVIDERS:
        importlib.import_module(name)
    return STAGES


def provided(name: str) -> Any:
    """A public name of a provider package (``create_dataloader_v1``), for ``pipeline``'s namespace."""
    load_stage_types()
    for package in PROVIDERS:
        module = importlib.import_module(package)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1)
    return f"; did you mean `{close[0]}`?" if close else ""


def stage_class(type_name, stage: str) -> type:
    """The class registered as ``type_name`` (the providers loaded first when it is not known yet)."""
    if not isinstance(type_name, str) or type_name not in STAGES:
        load_stage_types()
    if not isinstance(type_name, str) or type_name not in STAGES:
        known = ", ".join(sorted(STAGES))
        raise ConfigError(f"unknown type `{type_name}`{did_you_mean(str(type_name), STAGES)} (known: {known})",
                          stage, "type")
    return STAGES[type_name]
