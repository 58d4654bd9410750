"""Writing token shards: rows of (ids, source), in stream order, into Arrow IPC files."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from stages.tokens.format import BATCH_TOKENS, SHARD_NAME, SHARD_TOKENS, PrepareError, file_sha256, id_runs


def id_lists(values: np.ndarray, offsets: np.ndarray, dtype: np.dtype, n_vocab: int) -> pa.ListArray:
    """One Arrow list of ``dtype`` per row, row ``i`` being ``values[offsets[i] : offsets[i + 1]]``, each id
    checked to lie in ``range(n_vocab)`` (both engines build their rows with it)."""
    values = values[offsets[0] : offsets[-1]]
    if len(values) and (values.min() < 0 or values.max() >= n_vocab):
        raise PrepareError(f"token id {int(values.max())} outside the vocabulary of {n_vocab}")
    offsets = (offsets - offsets[0]).astype(np.int32)
    values = _numbers(values.astype(dtype, copy=False))
    return pa.ListArray.from_arrays(_numbers(offsets), values)


def strings(values: list[str | None]) -> pa.StringArray:
    """``pa.array(values, pa.string())``, the same array, built from buffers."""
    data = [b"" if v is None else v.encode() for v in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int32)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    valid = np.array([v is not None for v in values], dtype=bool)
    nulls = len(values) - int(valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(b"".join(data)), bitmap, nulls)


def _numbers(values: np.ndarray) -> pa.Array:
    # pa.array would do, but its first call imports pandas (~0.3 s) to ask whether values are a pandas object
    data = pa.py_buffer(np.ascontiguousarray(values))
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, data])


class ShardWriter:
    """Rows (token ids, source) in stream order into ``tokens-NNNNN.arrow`` files in ``folder``.

    A record batch is written each ``batch_tokens`` tokens (so memory stays flat) and a shard is
    closed once it holds ``shard_tokens`` tokens; rows are never split. The bytes depend only on the
    rows, however they are handed over, so both engines write identical files.
    """

    def __init__(self, folder: str, dtype: np.dtype, n_vocab: int, shard_tokens: int = SHARD_TOKENS,
                 batch_tokens: int = BATCH_TOKENS, on_shard: Callable[[dict[str, Any]], None] | None = None):
        self.folder, self.dtype, self.n_vocab = folder, np.dtype(dtype), n_vocab
        self.on_shard = on_shard  # told each shard once it is complete on disk
        self.shard_tokens, self.batch_tokens = shard_tokens, batch_tokens
        self.schema = pa.schema([("ids", pa.list_(pa.from_numpy_dtype(self.dtype))), ("source", pa.string())])
        self.shards: list[dict[str, Any]] = []
        self.rows = self.tokens = 0
        self._ids: list[np.ndarray] = []  # pieces of the rows held, their offsets in _ends (from 0, one per row)
        self._ends: list[np.ndarray] = []
        self._sources: list[str | None] = []
        self._held = 0  # tokens in _ids
        self._writer = None

    def add(self, ids: np.ndarray, rows: tuple[np.ndarray, list[str | None]]) -> None:
        """Rows whose ids are joined in ``ids``: ``rows`` gives where each begins in ``ids`` (and where the
        last ends: one offset more than rows) and each one's source."""
        offsets, sources = rows
        first = 0
        while first < len(sources):
            if self._writer is None:
                name = SHARD_NAME.format(len(self.shards))
                self._sink = pa.OSFile(os.path.join(self.folder, name), "wb")
                self._writer = ipc.new_file(self._sink, self.schema)
                self.shards.append({"file": name, "rows": 0, "tokens": 0})
            room = self.shard_tokens - self.shards[-1]["tokens"]
            # the first row after which the held tokens reach a batch (or close the shard), as if added one by one
            goal = offsets[first] + min(room, self.batch_tokens) - self._held
            last = min(first + int(np.searchsorted(offsets[first + 1 :], goal)), len(sources) - 1)
            self._ids.append(ids[offsets[first] : offsets[last + 1]])
            self._ends.append(offsets[first + 1 : last + 2] - offsets[first] + self._held)
            self._sources += sources[first : last + 1]
            self._held += int(offsets[last + 1] - offsets[first])
            first = last + 1
            if self._held >= room:
                self._close_shard()
            elif self._held >= self.batch_tokens:
                self._write_batch()

    def close(self) -> list[dict[str, Any]]:
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def _write_batch(self) -> None:
        values = np.concatenate(self._ids) if self._ids else np.empty(0, self.dtype)
        offsets = np.concatenate([np.zeros(1, np.int64), *self._ends])
        ids = id_lists(values, offsets, self.dtype, self.n_vocab)
        self._writer.write_batch(pa.record_batch([ids, strings(self._sources)], schema=self.schema))
        rows, tokens = len(ids), len(values)
        shard = self.shards[-1]
        shard["rows"] += rows
        shard["tokens"] += tokens
        self.rows, self.tokens = self.rows + rows, self.tokens + tokens
        self._ids, self._ends, self._sources, self._held = [], [], [], 0

    def _close_shard(self) -> None:
        self._write_batch()
        self._writer.close()
        self._sink.close()
        self._writer = None
        shard = self.shards[-1]
        path = os.path.join(self.folder, shard["file"])
        _fsync(path)
        with pa.memory_map(path) as f:  # where its tokens lie: read_tokens reads them by ranged requests from there
            ids_at = id_runs(f.read_buffer(), self.dtype, path)
        shard.update(bytes=os.path.getsize(path), sha256=file_sha256(path), ids_at=ids_at)
        if self.on_shard is not None:
            self.on_shard(shard)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
