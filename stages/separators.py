"""The token stream of many documents: ``<|endoftext|>`` between them, not inside one."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

# The fields the stages give documents and read from them. A user's column of the same name would be taken
# for one (a column `ids` replacing the tokens, `offset` and `end` joining separate documents), so readers
# that carry columns refuse such a column by name.
FIELDS = ("text", "source", "offset", "end", "shard", "record", "ids", "mix", "split")


class Separators:
    """Puts the end-of-text id before each item that starts a new document.

    An item continues the previous one when it is the next piece of the same file (same ``source``,
    its ``offset`` the previous ``end``); any other item after the first starts with the separator.
    The state (``previous``: source and end of the last item) is two JSON values.
    """

    def __init__(self, eot_id: int, enabled: bool = True):
        self.eot_id, self.enabled = eot_id, enabled
        self.previous: list | None = None

    def item(self, doc: dict, ids: np.ndarray, stats: Counter) -> dict[str, Any]:
        """The encode stage's output for ``doc`` and its ``ids``, counting documents and tokens."""
        continues = self.previous is not None and [doc.get("source"), doc.get("offset")] == self.previous
        if self.enabled and self.previous is not None and not continues:
            ids = np.concatenate([np.array([self.eot_id], dtype=np.int32), ids])
        self.previous = [doc.get("source"), doc.get("end", -1)]
        stats["documents"] += not continues
        stats["tokens"] += len(ids)
        return {"ids": ids, **{k: v for k, v in doc.items() if k != "text"}}
