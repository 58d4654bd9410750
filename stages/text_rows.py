"""Whole documents handed to an encoder as Arrow text arrays: no Python string or dict per document."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


class TextRows(Sequence):
    """Rows of record batches read in one go (``ReadArrow.read_rows``): each piece is a run of one shard
    unit's rows, its texts an Arrow string array (no nulls, valid UTF-8).

    An encoder reads ``arrays``; as a sequence it gives each row as a document dict
    (``text``, ``source``, ``shard``, ``record``), made when asked, for the rare reader of one (the
    stream's first document, an error message).
    """

    def __init__(self, pieces: list[tuple[str, int, int, pa.Array]]):
        self.pieces = pieces  # (source, shard, first row, texts)
        self.arrays = [texts for *_, texts in pieces]
        self._starts = np.cumsum([0] + [len(texts) for texts in self.arrays])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        source, shard, first, texts = self.pieces[k]
        row = i - int(self._starts[k])
        return {"text": texts[row].as_py(), "source": source, "shard": shard, "record": first + row}

    def sources(self) -> list[str]:
        """Each row's ``source``."""
        return [source for source, _, _, texts in self.pieces for _ in range(len(texts))]

    def texts(self) -> list[str]:
        """Each row's text as a Python string."""
        return [text for texts in self.arrays for text in texts.to_pylist()]


def offsets(texts: pa.Array) -> np.ndarray:
    """Where each text of a string or large_string array begins in its data buffer, and where the last ends."""
    dtype = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    return np.frombuffer(texts.buffers()[1], dtype=dtype)[texts.offset : texts.offset + len(texts) + 1]


def text_bytes(texts: pa.Array) -> int:
    """UTF-8 bytes of a string array's texts."""
    ends = offsets(texts)
    return int(ends[-1] - ends[0])


def text_data(texts: pa.Array) -> bytes:
    """A string array's texts one after another, as UTF-8 (a copy: a byte search of it is ~6x faster than
    Arrow's ``match_substring``)."""
    ends, data = offsets(texts), texts.buffers()[2]
    return memoryview(data)[int(ends[0]) : int(ends[-1])].tobytes() if data is not None else b""


def awkward_strings(texts: pa.Array):
    """An awkward array of strings over a string array's own buffers (int64 offsets, as gigatoken's
    ``encode_batch`` takes them; only the offsets are copied)."""
    import awkward as ak

    ends = offsets(texts).astype(np.int64)
    data = texts.buffers()[2]
    chars = np.frombuffer(data, dtype=np.uint8)[ends[0] : ends[-1]] if data is not None else np.zeros(0, np.uint8)
    content = ak.contents.NumpyArray(chars, parameters={"__array__": "char"})
    return ak.Array(ak.contents.ListOffsetArray(ak.index.Index64(ends - ends[0]), content,
                                                parameters={"__array__": "string"}))
