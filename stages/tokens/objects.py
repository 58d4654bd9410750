"""Token shards in object storage, read by ranged requests: the tokens windows need, never a whole object."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline.storage import open_input, version

READ_TOKENS = 1 << 20  # most tokens one request reads for several windows (2 MB at uint16)
GAP_TOKENS = 1 << 15  # windows this close (in one file) share a request: fewer requests, a few KB more read
FILE_BITS = 40  # a token's place: its file's number above this many bits, its index in the file's tokens below
THREADS = 8  # requests in flight at once: an object store answers each in ~10-100 ms, mostly waiting


class ObjectError(OSError):
    """A shard object could not be read, or is not the one the manifest describes."""

    def __init__(self, uri: str, why: str):
        super().__init__(f"{uri}: {why}")
        self.uri, self.why = uri, why


class ObjectShards:
    """The shard objects of a cache: ``read(f, start, count)`` gives tokens ``start : start + count`` of
    shard ``f`` (in tokens from the object's first byte) by one ranged request.

    Each object is opened once per process and checked on opening: its ``storage.version`` (size and
    modification time) must be the one seen when the pipeline was built, and the ids' type in its Arrow
    footer the manifest's; an object replaced since is refused rather than read at the old offsets.
    ``map`` runs reads on a few threads (pyarrow releases the GIL).
    """

    def __init__(self, uris: list[str], versions: list[list], dtype: np.dtype):
        self.uris, self.versions, self.dtype = uris, versions, dtype
        self._pid = None

    def _files(self) -> dict[int, pa.NativeFile]:
        if self._pid != os.getpid():  # a forked worker opens its own (connections and threads are not shared)
            self._pid, self._open, self._lock = os.getpid(), {}, threading.Lock()
            self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="read_tokens")
        return self._open

    def _file(self, f: int) -> pa.NativeFile:
        files = self._files()
        with self._lock:
            if f not in files:
                files[f] = self._checked(f)
            return files[f]

    def _checked(self, f: int) -> pa.NativeFile:
        uri, expected = self.uris[f], pa.list_(pa.from_numpy_dtype(self.dtype))
        try:
            now = version(uri)
            if now != self.versions[f]:
                raise ObjectError(
                    uri,
                    f"changed since the pipeline was built ([size, mtime_ns] {self.versions[f]} "
                    f"-> {now}); build it again (prepare the cache again if it was replaced)",
                )
            handle = open_input(uri)
            found = ipc.open_file(handle).schema.field(0).type  # the footer only: two small ranged reads
        except ObjectError:
            raise
        except (OSError, pa.ArrowInvalid) as e:
            raise ObjectError(uri, f"cannot read ({e})") from None
        if found != expected:
            raise ObjectError(uri, f"ids are {found}, the manifest says {expected}")
        return handle

    def read(self, f: int, start: int, count: int) -> np.ndarray:
        handle, size = self._file(f), self.dtype.itemsize
        try:
            data = handle.read_at(count * size, start * size)
        except OSError as e:  # after the store's own retries
            raise ObjectError(self.uris[f], f"cannot read ({e})") from None
        if len(data) != count * size:
            raise ObjectError(self.uris[f], f"{len(data)} bytes at byte {start * size:,}, expected {count * size}")
        return np.frombuffer(data, self.dtype)

    def map(self, fn, *iterables) -> list:
        self._files()
        return list(self._pool.map(fn, *iterables))


def request_spans(first: list[int], last: list[int]) -> tuple[list[list[int]], list[int]]:
    """The spans ``[first, last]`` of token places that requests read, from intervals sorted by ``first``, and
    the span that reads each interval: an interval joins the span before it when it starts at most
    ``GAP_TOKENS`` after that span's end and the span stays within ``READ_TOKENS``. Places are
    ``file << FILE_BITS | index``: a span never crosses files."""
    spans: list[list[int]] = []
    reader = []
    for lo, hi in zip(first, last):
        if spans and lo - spans[-1][1] <= GAP_TOKENS and hi - spans[-1][0] < READ_TOKENS:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
        reader.append(len(spans) - 1)
    return spans, reader
