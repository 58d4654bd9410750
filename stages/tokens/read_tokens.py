"""``read_tokens``: windows straight from the token shards ``prepare`` wrote, through memory maps."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from stages.tokens.format import check_cache, load_manifest
from pipeline.registry import register
from pipeline.schema import FieldError, Positive
from pipeline.shard import Reader, check_restored
from pipeline.stage import Stage
from stages.sliding_window import input_tokens

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's finalizer


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class WindowPermutation:
    """A seeded permutation of ``range(n)`` computed index by index, in O(1) memory.

    A balanced Feistel network over the smallest even number of bits that covers ``n`` (a bijection
    of ``[0, 2**bits)``), walked until it lands below ``n`` ("cycle walking", fewer than 4 steps on
    average): a bijection of ``range(n)``. So any worker can read the ``k``-th window of the shuffled
    order without materializing an order of all windows (100 M windows would be 800 MB).
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.default_rng([seed, epoch]).integers(0, 2**64, size=self.ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # the multiplications wrap modulo 2**64 on purpose
            x = self._feistel(np.asarray(index, dtype=np.uint64))
            out = x >= self.n
            while out.any():
                x[out] = self._feistel(x[out])
                out = x >= self.n
        return x.astype(np.int64)


class TokenStream:
    """All shards of a cache as one token stream: memory maps, and where each record batch's tokens lie.

    Each shard file is mapped once and viewed whole as a numpy array of the token dtype; a record
    batch's ``ids`` values are a contiguous run of it (Arrow IPC buffers are 8-byte aligned), found by
    address. Windows inside one run are gathered with one fancy index; the rare window that crosses
    a run (or file) boundary is pieced together.
    """

    def __init__(self, folder: str, manifest: dict[str, Any]):
        dtype = np.dtype(manifest["dtype"])
        self.files, starts, lengths, bases, owners = [], [], [], [], []
        total = 0
        for f, shard in enumerate(manifest["shards"]):
            path = os.path.join(folder, shard["file"])
            whole = pa.memory_map(path, "r").read_buffer()
            self.files.append(np.frombuffer(whole, dtype=dtype, count=whole.size // dtype.itemsize))
            reader = ipc.open_file(whole)
            for b in range(reader.num_record_batches):
                column = reader.get_batch(b).column(0)
                first, last = column.offsets[0].as_py(), column.offsets[-1].as_py()
                values = column.values
                if column.type.value_type != pa.from_numpy_dtype(dtype) or values.null_count:
                    raise ValueError(f"path {folder!r}: shard {shard['file']}: ids are {column.type}, "
                                     f"expected list<{dtype}> without nulls")
                at = values.buffers()[1].address + (values.offset + first) * dtype.itemsize - whole.address
                if last == first:
                    continue
                if at % dtype.itemsize or not 0 <= at // dtype.itemsize <= len(self.files[-1]) - (last - first):
                    raise ValueError(
                        f"path {folder!r}: shard {shard['file']}: ids are not stored uncompressed in the file"
                    )
                starts.append(total), lengths.append(last - first), bases.append(at // dtype.itemsize), owners.append(f)
                total += last - first
        if total != manifest["counts"]["tokens"]:
            raise ValueError(
                f"path {folder!r}: the shards hold {total:,} tokens, the manifest says {manifest['counts']['tokens']:,}"
            )
        self.n_tokens = total
        # per run of tokens (a record batch's values): where it starts in the stream, its length,
        # where it lies in its file's array, and which file
        self.starts, self.lengths, self.bases, self.owners = (
            np.array(a, dtype=np.int64) for a in (starts, lengths, bases, owners)
        )

    def gather(self, starts: np.ndarray, span: int) -> np.ndarray:
        """Windows ``tokens[s : s + span]`` for each start ``s``, as int32 ``[len(starts), span]``."""
        out = np.empty((len(starts), span), dtype=np.int32)
        run = np.searchsorted(self.starts, starts, side="right") - 1
        local = starts - self.starts[run]
        inside = local + span <= self.lengths[run]
        at = self.bases[run] + local
        owner = self.owners[run]
        offsets = np.arange(span)
        for f in np.unique(owner[inside]):  # one file, mostly
            rows = np.flatnonzero(inside & (owner == f))
            out[rows] = self.files[f][at[rows, None] + offsets]
        for row in np.flatnonzero(~inside):
            out[row] = self._piece(int(run[row]), int(local[row]), span)
        return out

    def _piece(self, run: int, local: int, span: int) -> np.ndarray:
        pieces = []
        while span > 0:
            take = min(span, int(self.lengths[run]) - local)
            base = int(self.bases[run]) + local
            pieces.append(self.files[self.owners[run]][base : base + take])
            span, run, local = span - take, run + 1, 0
        return np.concatenate(pieces)


@register("read_tokens")
class ReadTokens(Reader, Stage[np.ndarray]):
    """Windows from a token cache made by ``python -m pipeline prepare``, memory-mapped.

    The shards are one token stream, the very one the streaming reader and encoder give, and windows
    start at ``i in range(0, N - max_length, stride)`` over it, exactly as ``sliding_window`` cuts
    them (a window may cross a shard file). With ``shuffle``, the windows come in a seeded permutation
    of all of them, another each epoch (not a buffer: any window of the order is computed directly).
    Global worker ``g`` of ``G`` (``pipeline.shard``) takes windows ``g, g + G, ...`` of the order. The
    state is ``{epoch, position}``. At construction the manifest, the shards' sizes and the source
    files' sizes are checked (a source's sha256 only when its mtime moved): a stale or damaged cache is
    refused. Items are int32 blocks ``[n, max_length + 1]``, as from ``sliding_window``.

    Args:
        path: the cache folder (``prepare --out``).
        max_length: tokens in each input (and target).
        stride: tokens between the starts of consecutive windows (may exceed ``max_length``).
        shuffle, seed: a seeded permutation of all windows, another each epoch.
        encoding: the encoding the cache must have been made with (default: any).
        block_windows: most windows in one block.
        rank, world_size: this process's place among the ranks (default: torch.distributed, else
            the ``RANK`` / ``WORLD_SIZE`` environment, else 0 of 1).
    """

    in_workers = True  # worth running in DataLoader worker processes
    produces = "windows"

    def __init__(
        self,
        path: str,
        max_length: Positive,
        stride: Positive,
        shuffle: bool = False,
        seed: int = 0,
        encoding: str | None = None,
        block_windows: Positive = 1024,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        path = os.fspath(path)
        try:
            self.manifest = load_manifest(path)
            check_cache(path, self.manifest)
        except ValueError as e:
            raise FieldError("path", str(e)) from None
        made_with = self.manifest["encoding"]["name"]
        if encoding is not None and encoding != made_with:
            raise FieldError(
                "encoding",
                f"path {path!r}: the cache was prepared with encoding `{made_with}`, this stage asks for `{encoding}`; "
                "prepare it again with that encoding (prepare --overwrite) or drop `encoding`",
            )
        self.path, self.max_length, self.stride, self.block_windows = path, max_length, stride, block_windows
        self.vocab_size = self.manifest["encoding"]["n_vocab"]  # checked against an embed's table
        self.files = [os.path.join(path, s["file"]) for s in self.manifest["shards"]]  # in the pipeline's fingerprint
        self.n_windows = len(range(0, self.manifest["counts"]["tokens"] - max_length, stride))
        self.init_shards(rank, world_size, shuffle, seed)
        self._stream: TokenStream | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stream"] = None  # memory maps are not pickled: each process maps the files itself
        return state

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        if self._stream is None:
            self._stream = TokenStream(self.path, self.manifest)
        if initial_state is None:
            self._epoch, self._position = self._epoch + 1, 0
        else:
            self._epoch, self._position = initial_state["epoch"], initial_state["position"]
        self._g, self._G = self.slot()
        self._count = len(range(self._g, self.n_windows, self._G))  # this worker's windows
        if initial_state is not None:
            check_restored(self, "position", self._position, self._count)
        self._order = (
            WindowPermutation(self.n_windows, self.seed, self._epoch) if self.shuffle and self.n_windows else None
        )

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position}

    def next(self) -> np.ndarray:
        n = min(self.block_windows, self._count - self._position)
        if n <= 0:
            raise StopIteration
        index = self._g + self._G * (self._position + np.arange(n, dtype=np.int64))
        if self._order is not None:
            index = self._order(index)
        block = self._stream.gather(index * self.stride, self.max_length + 1)
        self._position += n
        self.stats["windows"] += n
        return block

    def tokens_in(self, item: np.ndarray) -> int:
        return input_tokens(item)
