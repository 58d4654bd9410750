"""The token stream of many documents: ``<|endoftext|>`` between them, not inside one.

A tokens item (what ``bpe_encode`` and ``word_encode`` give) is a dict with ``ids`` (numpy ``int32``)
and ``starts`` (numpy ``int64``): the offsets in ``ids`` where a document's own tokens begin (after
its separator). An item per document carries the document's other fields but ``text``; a block
(``bpe_encode(blocks=True)``) holds many documents and only ``ids`` and ``starts``. Read both with
``document_ids``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from stages.text_rows import TextRows

_NO_START = np.zeros(0, dtype=np.int64)
_STARTS = (np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64))  # shared by items, so read-only
for _starts in (_NO_START, *_STARTS):
    _starts.flags.writeable = False


def document_ids(item: dict) -> tuple[np.ndarray, np.ndarray]:
    """A tokens item's ids (``int32``) and the offsets in them where documents start (``int64``).

    Every document of the stream starts at exactly one offset of one item; an item that continues
    the previous one's document (the next piece of a file) has no start at 0.
    """
    if "starts" not in item:
        keys = sorted(item)
        raise ValueError(f"a tokens item needs `starts` (where its documents begin), as bpe_encode gives; got {keys}")
    return item["ids"], item["starts"]


def document_text(stage, doc: Any) -> str:
    """The ``text`` of a document dict, or the stage's error naming what came instead (an encoder's input)."""
    text = doc.get("text") if isinstance(doc, dict) else None
    if not isinstance(text, str):
        raise stage.error(
            f"expected a document dict with a `text` string, got {type(text).__name__}",
            doc.get("source") if isinstance(doc, dict) else None,
            doc.get("record") if isinstance(doc, dict) else None,
        )
    return text


def split_joined(joined: np.ndarray, eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids of texts encoded joined by ``<|endoftext|>`` (none holding it): all of them without the
    separators (``int32``), and how many are each text's (``int64``), found without an array per text."""
    at = np.flatnonzero(joined == eot_id)
    lengths = np.diff(np.concatenate([[-1], at, [len(joined)]])) - 1
    return np.delete(joined, at).astype(np.int32, copy=False), lengths


def concatenated(pieces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Texts' ids (``int32``) in ``split_joined``'s form: all of them, and how many are each text's."""
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int32)).astype(np.int32, copy=False), lengths


def separated(ids: np.ndarray, lengths: np.ndarray, eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts' ids in ``split_joined``'s form with ``eot_id`` put before each text's: (ids, lengths + 1).
    numpy lets go of the GIL for most of it: an encode thread does it, beside the pipeline's thread."""
    lengths = lengths + 1
    out = np.empty(len(ids) + len(lengths), dtype=np.int32)
    heads = np.cumsum(lengths) - lengths
    keep = np.ones(len(out), dtype=bool)
    keep[heads] = False
    out[heads] = eot_id
    out[keep] = ids
    return out, lengths


def mix_tokens(stats: Counter) -> dict[str, float]:
    """An encoder's metrics: ``<input>/tokens`` and ``<input>/token_share`` for each input of a mix upstream."""
    counts = {key[len("tokens_from_") :]: n for key, n in stats.items() if key.startswith("tokens_from_")}
    total = sum(counts.values())
    out = {f"{name}/tokens": n for name, n in counts.items()}
    out.update({f"{name}/token_share": n / total for name, n in counts.items()})
    return out


def whole(docs: list[dict]) -> bool:
    """Whether the documents are whole ones (records), not pieces of files: each starts a document."""
    return isinstance(docs, TextRows) or not any("offset" in doc or "windowed" in doc for doc in docs)


class Separators:
    """Puts the end-of-text id before each item that starts a new document.

    An item continues the previous one when it is the next piece of the same file (same ``source``,
    its ``offset`` the previous ``end``); any other item after the first starts with the separator.
    A piece continued after a reshard (``windowed``: how many of its own tokens were windowed before
    the seam, see ``pipeline.reshard``) loses those tokens and its separator, windowed before them.
    The state (``previous``: source and end of the last item) is two JSON values.
    """

    def __init__(self, eot_id: int, enabled: bool = True):
        self.eot_id, self.enabled = eot_id, enabled
        self._separator = np.array([eot_id], dtype=np.int32)
        self.previous: list | None = None

    def _start(self, doc: dict) -> tuple[bool, bool]:
        """Whether ``doc`` starts a document, and whether a separator goes before it."""
        if "windowed" in doc:  # the rest of a piece begun before a reshard: its document began there
            self.previous = [doc.get("source"), doc.get("end", -1)]
            return doc["windowed"] == 0, False
        if self.previous is None:  # the stream's first item: a piece from inside a file continues a document
            continues = bool(doc.get("offset"))  # read elsewhere (another worker or rank)
        else:
            continues = [doc.get("source"), doc.get("offset")] == self.previous
        separated = self.enabled and self.previous is not None and not continues
        self.previous = [doc.get("source"), doc.get("end", -1)]
        return not continues, separated

    def item(self, doc: dict, ids: np.ndarray, stats: Counter) -> dict[str, Any]:
        """The encode stage's output for ``doc`` and its ``ids``, counting documents and tokens."""
        starts, separated = self._start(doc)
        ids = ids[doc.get("windowed", 0) :]
        if separated:
            ids = np.concatenate([self._separator, ids])
        stats["documents"] += starts
        stats["tokens"] += len(ids)
        if "mix" in doc:  # drawn by a mix stage: tokens per input, for metrics
            stats[f"tokens_from_{doc['mix']}"] += len(ids)
        return {
            "ids": ids,
            "starts": _STARTS[separated] if starts else _NO_START,
            **{k: v for k, v in doc.items() if k != "text"},
        }

    def block(
        self,
        docs: list[dict],
        ids: np.ndarray,
        lengths: np.ndarray,
        stats: Counter,
        rows: bool = False,
        heads: bool = False,
    ) -> dict[str, Any]:
        """One item for many documents, whose ids are ``ids`` one after another (``lengths`` each, as
        ``split_joined`` gives them): their ids with separators between, and where each starts; with
        ``rows``, also ``rows`` (where the ids ``item`` would give for each document begin, its separator
        first, and where the last ends: ``len(docs) + 1`` offsets) and ``sources`` (each document's
        ``source``), so that ``prepare`` writes a row per document without a dict each. With ``heads`` (only
        for whole documents, see ``whole``, and separators on) ``ids`` has the separator before each document
        already, as ``separated`` gives them."""
        if not heads and not whole(docs):  # pieces of files: ask each
            flags = np.array([self._start(doc) for doc in docs], dtype=bool).reshape(-1, 2)  # (starts, separated)
            begins, separated = flags[:, 0], flags[:, 1]
        else:  # whole documents (records): each starts one, after a separator but at the stream's start
            begins, separated = np.ones(len(docs), dtype=bool), np.full(len(docs), self.enabled)
            separated[0] &= self._start(docs[0])[1]
            self.previous = [docs[-1].get("source"), docs[-1].get("end", -1)]
        if heads:  # a separator before every document already: the stream's first loses it
            if not separated[0]:
                ids, lengths = ids[1:], lengths.copy()
                lengths[0] -= 1
            return self._finish(docs, ids, lengths, begins, separated, stats, rows)
        if any("windowed" in doc for doc in docs):  # pieces continued after a reshard lose their windowed tokens
            ends = np.cumsum(lengths).tolist()
            pieces = [ids[end - n + doc.get("windowed", 0) : end] for doc, n, end in zip(docs, lengths.tolist(), ends)]
            ids, lengths = concatenated(pieces)
        joined = np.insert(ids, (np.cumsum(lengths) - lengths)[separated], self.eot_id)  # before those documents
        return self._finish(docs, joined, lengths + separated, begins, separated, stats, rows)

    def _finish(self, docs, joined, lengths, begins, separated, stats: Counter, rows: bool) -> dict[str, Any]:
        """``block``'s item from the documents' ids with their separators (``lengths`` each)."""
        starts = (np.cumsum(lengths) - lengths + separated)[begins]  # after each document's separator
        if not isinstance(docs, TextRows) and any("mix" in doc for doc in docs):  # drawn by a mix: tokens per input
            for doc, n in zip(docs, lengths.tolist()):
                if "mix" in doc:
                    stats[f"tokens_from_{doc['mix']}"] += n
        stats["documents"] += len(starts)
        stats["tokens"] += len(joined)
        if not rows:
            return {"ids": joined, "starts": starts}
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        sources = docs.sources() if isinstance(docs, TextRows) else [doc.get("source") for doc in docs]
        return {"ids": joined, "starts": starts, "rows": offsets, "sources": sources}
