"""``split``: send each document to one branch (``train``, ``validation``, ...) by a stable hash."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from pipeline.registry import register
from pipeline.schema import FieldError, check_seed
from pipeline.stage import PassThrough


def bucket(key: str, seed: int) -> float:
    """A number in [0, 1) that depends only on ``key`` and ``seed``."""
    digest = hashlib.blake2b(
        key.encode("utf-8", "surrogatepass"), digest_size=8, person=seed.to_bytes(8, "little", signed=True)
    )
    return int.from_bytes(digest.digest(), "little") / 2**64


@register("split")
class Split(PassThrough[dict]):
    """Tags each document with the branch it belongs to, chosen by a hash of the document.

    Branches are read as ``<stage>.<branch>`` (``split.train``, ``split.validation``): each yields its
    documents only. A document always lands on the same side, whatever the order, workers or ranks.
    The hash is of the field ``key``; by default the text, or the file for pieces of a text file
    (``read_text``), so a file is never cut between branches.

    Args:
        fractions: branch name -> fraction of documents (they must add up to 1).
        key: the document field (or fields) hashed (default: ``source`` for text-file pieces, else ``text``).
        seed: seed of the hash.
    """

    in_workers = True
    consumes = "documents"
    produces = "documents"  # each with `split`: its branch

    def __init__(self, source, fractions: dict[str, float], key: str | list[str] | None = None, seed: int = 0):
        super().__init__()
        if not fractions or any(  # `not 0 <= f <= 1`: nan too
            isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1 for f in fractions.values()
        ):
            raise FieldError("fractions",
                             f"fractions must map branch names to non-negative numbers up to 1, got {fractions!r}")
        check_seed(seed)
        if abs(sum(fractions.values()) - 1) > 1e-9:
            raise FieldError("fractions", f"fractions must add up to 1, got {sum(fractions.values())} ({fractions!r})")
        self.source = source
        self.branches = list(fractions)
        self.stats.labels.update({f"to_{branch}": f"to {branch}" for branch in self.branches})
        self.edges = np.cumsum(list(fractions.values()))
        self.keys = [key] if isinstance(key, str) else key
        self.seed = seed

    @classmethod
    def branch_names(cls, spec) -> list[str]:
        fractions = spec.get("fractions")
        return list(fractions) if isinstance(fractions, Mapping) else []

    def branch(self, name: str) -> Branch:
        return Branch(self, name)

    def next(self) -> dict:
        doc = next(self.source)
        keys = self.keys or ["source" if "offset" in doc else "text"]
        missing = [k for k in keys if k not in doc]
        if missing:
            raise self.error(
                f"documents have no field `{missing[0]}` to hash (fields: {', '.join(doc)})", doc.get("source")
            )
        value = bucket("\x1f".join(str(doc[k]) for k in keys), self.seed)
        branch = self.branches[min(int(np.searchsorted(self.edges, value, side="right")), len(self.branches) - 1)]
        self.stats[f"to_{branch}"] += 1
        return {**doc, "split": branch}


class Branch(PassThrough[dict]):
    """The documents of one branch of a ``split`` (built for inputs named ``<split>.<branch>``).

    Its source is a ``split``, or any stream of documents it tagged (``bench`` replays them from memory).
    """

    type_name = "branch"
    in_workers = True
    consumes = produces = "documents"

    def __init__(self, source: Split, branch: str):
        super().__init__()
        if isinstance(source, Split) and branch not in source.branches:
            raise ValueError(f"split `{source.name}` has no branch `{branch}` (branches: {', '.join(source.branches)})")
        self.source, self.branch = source, branch
        self.name = f"{getattr(source, 'name', 'split')}.{branch}"
        self.params = {"branch": branch}

    def next(self) -> dict:
        while True:
            doc = next(self.source)
            if doc["split"] == self.branch:
                return doc
