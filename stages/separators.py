"""The token stream of many documents: ``<|endoftext|>`` between them, not inside one."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np


def mix_tokens(stats: Counter) -> dict[str, float]:
    """An encoder's metrics: ``<input>/tokens`` and ``<input>/token_share`` for each input of a mix upstream."""
    counts = {key[len("tokens_from_"):]: n for key, n in stats.items() if key.startswith("tokens_from_")}
    total = sum(counts.values())
    out = {f"{name}/tokens": n for name, n in counts.items()}
    out.update({f"{name}/token_share": n / total for name, n in counts.items()})
    return out


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
        if "mix" in doc:  # drawn by a mix stage: tokens per input, for metrics
            stats[f"tokens_from_{doc['mix']}"] += len(ids)
        return {"ids": ids, **{k: v for k, v in doc.items() if k != "text"}}
