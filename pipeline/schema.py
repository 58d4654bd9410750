"""Each stage type's schema, defined once, by its constructor: fields, types, defaults, descriptions.

Configs are checked against it (unknown field, wrong type) before anything is built, and the README's
reference section is generated from it (``python -m pipeline reference``).
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any


ITEMS = {
    "documents": "dicts: `text`, `source`, and where it came from (`offset`, `end` in a text file; "
    "`shard`, `record` and the other columns in Arrow/Parquet)",
    "tokens": "dicts: `ids` (numpy int32 [n]) and the document's other fields",
    "windows": "numpy int32 blocks [n, max_length + 1]: input `row[:-1]`, target `row[1:]`",
    "packed": "numpy int32 blocks [n, 2, max_length + 1]: the rows' tokens `[:, 0]` and each token's position "
    "in its document `[:, 1]` (-1 on padding)",
    "batches": "dicts: `inputs`, `targets` (torch int64 [B, T]); from packed rows also `position_ids` (int64 [B, T]) "
    "and `cu_seqlens` (int32); after `embed` also `embeddings` [B, T, D]",
}


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
        if self.hint is inspect.Parameter.empty:
            return "any"
        return re.sub(r"\btyping\.", "", str(self.hint) if not isinstance(self.hint, type) else self.hint.__name__)


def fields(cls: type) -> dict[str, Field]:
    """The fields a config may give a stage type (its constructor's arguments, less ``source``)."""
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    hints = typing.get_type_hints(init)
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


def reference_markdown(stages: dict[str, type]) -> str:
    """The README's stage reference, one table per stage type."""
    parts = []
    for name in sorted(stages):
        cls = stages[name]
        summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        inputs = {"none": "none (reads files)", "one": "`input`: one stage", "many": "`inputs`: several stages"}[
            takes(cls)
        ]
        parts.append(
            f"### `{name}`\n\n{summary}\n\n"
            f"- input: {inputs}; takes: {' or '.join(item_kinds(getattr(cls, 'consumes', None))) or '-'}\n"
            f"- gives: {cls.produces}\n\n"
            "| field | type | default | description |\n| --- | --- | --- | --- |"
        )
        for f in fields(cls).values():
            default = "required" if f.required else f"`{f.default!r}`"
            cells = [f"`{f.name}`", f"`{f.type_text()}`", default, f.description]
            parts[-1] += "\n| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
    kinds = "\n".join(f"- **{kind}**: {text}" for kind, text in ITEMS.items())
    return f"Items on the edges:\n\n{kinds}\n\n" + "\n\n".join(parts) + "\n"
