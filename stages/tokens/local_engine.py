"""The local engine of ``prepare``: the rows (ids, source) of the config's token stream, in this process."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from pipeline.graph import Pipeline


def rows(pipe: Pipeline, encode, dtype: np.dtype, counts: dict[str, int]) -> Iterator[tuple[np.ndarray, str | None]]:
    """Each item of ``pipe`` (whose output is the encode stage ``encode``) as a row, in stream order."""
    for item in pipe:
        yield item["ids"], item.get("source")
    counts["documents"] = int(encode.stats["documents"])
