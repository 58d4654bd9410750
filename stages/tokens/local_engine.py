"""The local engine of ``prepare``: the rows (ids, source) of the config's token stream, in this process."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from pipeline.graph import Pipeline


def rows(pipe: Pipeline, encode, dtype: np.dtype, counts: dict[str, int]) -> Iterator[tuple[np.ndarray, tuple]]:
    """The items of ``pipe`` (whose output is the encode stage ``encode``) as rows, in stream order, a
    block of them at a time: ids joined, and ``(offsets, sources)`` (see ``ShardWriter.add``)."""
    encode.blocks = encode.block_rows = True  # one item per encode call, with the row of each document it holds
    for block in pipe:
        yield block["ids"], (block["rows"], block["sources"])
    counts["documents"] = int(encode.stats["documents"])
