"""Each stage type's schema, defined once, by its constructor: fields, types, defaults, descriptions.

Configs are checked against it (unknown field, wrong type) before anything is built, and the README's
reference section is generated from it (``python -m pipeline reference``, in ``pipeline.cli.reference``).
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any


POSITIVE = "positive"  # a range rule, written in a field's hint
Positive = Annotated[int, POSITIVE]  # an integer >= 1


class FieldError(ValueError, TypeError):
    """A stage argument is wrong; ``field`` names it (a config reports it as the stage's field).

    Both a ValueError and a TypeError: the checks it replaced raised one or the other.
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class MissingFileError(FileNotFoundError, FieldError):
    """A file a field names does not exist."""

    def __init__(self, field: str, message: str):
        FileNotFoundError.__init__(self, message)
        self.field = field


def check_field(name: str, hint: Any, value: Any) -> None:
    """The one check of a field's type and range, for configs and Python callers alike (``FieldError``)."""
    base, rules = _unwrap(hint)
    if POSITIVE in rules and not (check_value(base, value) and value >= 1):
        raise FieldError(name, f"{name} must be a positive integer, got {value!r}")
    if not check_value(base, value):
        raise FieldError(name, f"field `{name}` must be {type_text(base)}, got {value!r}")


def check_seed(seed: Any) -> None:
    """A seed numpy and hashlib both take: an integer from 0 to 2**63 - 1 (``FieldError`` naming ``seed``)."""
    check_field("seed", int, seed)
    if not 0 <= seed < 2**63:
        raise FieldError("seed", f"seed must be from 0 to 2**63 - 1, got {seed!r}")


def one_of(name: str, value: Any, choices: tuple) -> None:
    """Refuse a value outside ``choices`` (``FieldError`` naming the field)."""
    if value not in choices:
        raise FieldError(name, f"{name} must be one of {choices}, got {value!r}")


def check_arguments(cls: type, arguments: dict[str, Any]) -> None:
    """Check the arguments a stage is built with against the range rules of its fields (``Positive``)."""
    for name, field in fields(cls).items():
        if name in arguments and _unwrap(field.hint)[1]:
            check_field(name, field.hint, arguments[name])


def _unwrap(hint: Any) -> tuple[Any, tuple]:
    """A hint's type and its rules (``Annotated[int, POSITIVE]`` -> ``(int, (POSITIVE,))``)."""
    if typing.get_origin(hint) is Annotated:
        return typing.get_args(hint)[0], hint.__metadata__
    return hint, ()


def type_text(hint: Any) -> str:
    hint = _unwrap(hint)[0]
    if hint is inspect.Parameter.empty:
        return "any"
    return re.sub(r"\btyping\.", "", str(hint) if not isinstance(hint, type) else hint.__name__)



def item_kinds(consumes: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The item kinds a stage takes, from its ``consumes`` (one kind, several, or None for a reader)."""
    return () if consumes is None else (consumes,) if isinstance(consumes, str) else tuple(consumes)


@dataclass
class Field:
    name: str
    hint: Any  # a typing object, or inspect.Parameter.empty
    default: Any
    description: str

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def type_text(self) -> str:
        return type_text(self.hint)


@functools.lru_cache(maxsize=None)
def fields(cls: type) -> dict[str, Field]:
    """The fields a config may give a stage type (its constructor's arguments, less ``source``)."""
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    hints = typing.get_type_hints(init, include_extras=True)
    docs = _arg_docs(cls.__doc__ or "")
    out = {}
    for name, param in inspect.signature(init).parameters.items():
        if name in ("self", "source", "sources"):
            continue
        out[name] = Field(name, hints.get(name, inspect.Parameter.empty), param.default, docs.get(name, ""))
    return out


def takes(cls: type) -> str:
    """``none`` (a reader), ``one`` (``input``) or ``many`` (``inputs``)."""
    params = inspect.signature(getattr(cls.__init__, "__wrapped__", cls.__init__)).parameters
    return "many" if "sources" in params else "one" if "source" in params else "none"


def _arg_docs(doc: str) -> dict[str, str]:
    """Descriptions from a Google-style ``Args:`` section (``a, b: text`` describes both)."""
    out: dict[str, str] = {}
    lines = inspect.cleandoc(doc).splitlines()
    if "Args:" not in [line.strip() for line in lines]:
        return out
    names: list[str] = []
    for line in lines[[line.strip() for line in lines].index("Args:") + 1 :]:
        if not line.strip():
            break
        match = re.match(r"^    ([\w, ]+):\s*(.*)$", line)
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            for name in names:
                out[name] = match.group(2)
        elif names:
            for name in names:
                out[name] += " " + line.strip()
    return out


def check_value(hint: Any, value: Any) -> bool:
    """Whether ``value`` (from a YAML/TOML/JSON config) fits the type ``hint``."""
    hint = _unwrap(hint)[0]
    if hint is inspect.Parameter.empty or hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(check_value(arg, value) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        return (
            isinstance(value, (list, tuple)) and all(check_value(args[0], v) for v in value)
            if args
            else isinstance(value, (list, tuple))
        )
    if origin is dict or hint is dict:
        args = typing.get_args(hint)
        return isinstance(value, dict) and (
            not args or all(check_value(args[0], k) and check_value(args[1], v) for k, v in value.items())
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True
