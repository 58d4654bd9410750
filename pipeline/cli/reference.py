"""``reference``: the stage reference (Markdown), generated from each stage type's schema, as in the README."""

from __future__ import annotations

import stages  # noqa: F401  (registers the stage types)
from pipeline.registry import STAGES
from pipeline.schema import reference_markdown


def add_parser(commands) -> None:
    p = commands.add_parser("reference", help="print the stage reference (Markdown), as in the README")
    p.set_defaults(handler=lambda args: print(reference()) or 0)


def reference() -> str:
    return reference_markdown(STAGES)


START, END = "<!-- reference:start -->", "<!-- reference:end -->"


def write_reference(readme: str = "README.md") -> None:
    """Replace the README's section between the reference markers with ``reference()``."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    with open(readme, "w", encoding="utf-8") as f:
        f.write(f"{head}{START}\n{reference()}{END}{tail}")
