"""The pipeline's own document fields, and which of a record's own fields a reader may carry beside them."""

from __future__ import annotations

import warnings
from collections.abc import Collection

from pipeline.schema import FieldError

# The fields the stages give documents and read from them. A user's column of the same name would be taken
# for one (a column `ids` replacing the tokens, `offset` and `end` joining separate documents), so readers
# that carry a record's fields leave such a field out (warned, by name) or refuse it when it is asked for.
FIELDS = ("text", "source", "offset", "end", "shard", "record", "ids", "mix", "split", "windowed")
KNOWN_KEY_SETS = 256  # distinct key sets whose choice a reader remembers (JSON records may vary their keys)


class Carried:
    """Which of a record's fields (Arrow columns, JSON keys) a reader carries into its documents.

    Args:
        wanted: the names asked for (``setting`` in the stage's config); one named like a pipeline field is
            refused. None: all of a record's fields but those named like a pipeline field, each left out
            with a warning naming it (once).
        setting: the stage's setting that names them (``columns``, ``fields``).
        kind: what a record's field is called in the warning (``column``, ``field``).
    """

    def __init__(self, wanted: list[str] | None, setting: str, kind: str):
        clashes = [n for n in wanted or () if n in FIELDS]
        if clashes:
            raise FieldError(
                setting,
                f"{kind} `{clashes[0]}` has the name of a pipeline field ({', '.join(FIELDS)}) and would be taken "
                "for it; rename it in the corpus",
            )
        self.wanted, self.kind, self._warned = wanted, kind, set()
        self._known: dict[tuple, list[str]] = {}  # by (names available, text): records mostly repeat their keys

    def names(self, available: Collection[str], text: str | None = None) -> list[str]:
        """The names to carry of a record's ``available`` ones (``text``, the text's own, is never carried).
        The list given is shared: read it, do not change it."""
        if self.wanted is not None:
            return self.wanted
        key = (tuple(available), text)
        found = self._known.get(key)
        if found is None:
            found = self._choose(available, text)
            if len(self._known) < KNOWN_KEY_SETS:
                self._known[key] = found
        return found

    def _choose(self, available: Collection[str], text: str | None) -> list[str]:
        carried = [n for n in available if n not in FIELDS and n != text]
        if len(carried) + (text in available) < len(available):  # some clash: warn about the new ones
            left_out = sorted({n for n in available if n in FIELDS and n != text} - self._warned)
            if left_out:
                self._warned.update(left_out)
                warnings.warn(
                    f"{self.kind}s {left_out} are named like fields of the pipeline's own ({', '.join(FIELDS)}) "
                    "and are not carried, or they would be taken for them; rename them in the corpus to keep them",
                    stacklevel=4,
                )
        return carried
