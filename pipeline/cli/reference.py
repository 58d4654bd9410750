"""``reference``: the stage reference (Markdown), generated from each stage type's schema, as in the README."""

from __future__ import annotations

import inspect

from pipeline.registry import load_stage_types
from pipeline.schema import fields, item_kinds, takes
from stages.item_kinds import ITEMS


def add_parser(commands) -> None:
    p = commands.add_parser("reference", help="print the stage reference (Markdown), as in the README")
    p.set_defaults(handler=lambda args: print(reference()) or 0)


def reference() -> str:
    return reference_markdown(load_stage_types())


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


START, END = "<!-- reference:start -->", "<!-- reference:end -->"


def write_reference(readme: str = "README.md") -> None:
    """Replace the README's section between the reference markers with ``reference()``."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    with open(readme, "w", encoding="utf-8") as f:
        f.write(f"{head}{START}\n{reference()}{END}{tail}")
