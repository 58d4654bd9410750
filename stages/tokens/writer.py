"""Writing token shards: rows of (ids, source), in stream order, into Arrow IPC files."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from stages.tokens.format import BATCH_TOKENS, SHARD_NAME, SHARD_TOKENS, PrepareError, file_sha256, id_runs


def id_lists(ids: list[np.ndarray], dtype: np.dtype, n_vocab: int) -> pa.ListArray:
    """One Arrow list of ``dtype`` per array of ids, each id checked to lie in ``range(n_vocab)``
    (both engines build their rows with it)."""
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    values = np.concatenate(ids) if ids else np.empty(0, dtype)
    if len(values) and (values.min() < 0 or values.max() >= n_vocab):
        raise PrepareError(f"token id {int(values.max())} outside the vocabulary of {n_vocab}")
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(dtype, copy=False)))


class ShardWriter:
    """Rows (token ids, source) in stream order into ``tokens-NNNNN.arrow`` files in ``folder``.

    A record batch is written each ``batch_tokens`` tokens (so memory stays flat) and a shard is
    closed once it holds ``shard_tokens`` tokens; rows are never split. The bytes depend only on the
    rows, so both engines write identical files.
    """

    def __init__(self, folder: str, dtype: np.dtype, n_vocab: int, shard_tokens: int = SHARD_TOKENS,
                 batch_tokens: int = BATCH_TOKENS, on_shard: Callable[[dict[str, Any]], None] | None = None):
        self.folder, self.dtype, self.n_vocab = folder, np.dtype(dtype), n_vocab
        self.on_shard = on_shard  # told each shard once it is complete on disk
        self.shard_tokens, self.batch_tokens = shard_tokens, batch_tokens
        self.schema = pa.schema([("ids", pa.list_(pa.from_numpy_dtype(self.dtype))), ("source", pa.string())])
        self.shards: list[dict[str, Any]] = []
        self.rows = self.tokens = 0
        self._ids: list[np.ndarray] = []
        self._sources: list[str | None] = []
        self._held = 0  # tokens in _ids
        self._writer = None

    def add(self, ids: np.ndarray, source: str | None) -> None:
        self._ids.append(ids)
        self._sources.append(source)
        self._held += len(ids)
        if self._writer is None:
            name = SHARD_NAME.format(len(self.shards))
            self._sink = pa.OSFile(os.path.join(self.folder, name), "wb")
            self._writer = ipc.new_file(self._sink, self.schema)
            self.shards.append({"file": name, "rows": 0, "tokens": 0})
        if self.shards[-1]["tokens"] + self._held >= self.shard_tokens:
            self._close_shard()
        elif self._held >= self.batch_tokens:
            self._write_batch()

    def close(self) -> list[dict[str, Any]]:
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def _write_batch(self) -> None:
        ids = id_lists(self._ids, self.dtype, self.n_vocab)
        self._writer.write_batch(pa.record_batch([ids, pa.array(self._sources, pa.string())], schema=self.schema))
        rows, tokens = len(ids), len(ids.values)
        shard = self.shards[-1]
        shard["rows"] += rows
        shard["tokens"] += tokens
        self.rows, self.tokens = self.rows + rows, self.tokens + tokens
        self._ids, self._sources, self._held = [], [], 0

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
