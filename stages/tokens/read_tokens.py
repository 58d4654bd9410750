"""``read_tokens``: windows straight from the token shards ``prepare`` wrote, memory-mapped or by ranged requests."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from stages.tokens.format import check_cache, id_runs, load_manifest
from stages.tokens.objects import FILE_BITS, ObjectError, ObjectShards, request_spans
from pipeline.registry import register
from pipeline.schema import FieldError, Positive
from pipeline.seam import RemainingWindows, seam_windows
from pipeline.shard import FINISHED, Reader, check_restored
from pipeline.stage import Stage
from pipeline.storage import is_remote, local_path
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
    """All shards of a cache as one token stream, and where each record batch's tokens lie.

    A local shard file is mapped once and viewed whole as a numpy array of the token dtype; a record
    batch's ``ids`` values are a contiguous run of it (``format.id_runs``). Windows inside one run are
    gathered with one fancy index; the rare window that crosses a run (or file) boundary is pieced
    together. Shards in object storage are read by ranged requests at the runs the manifest lists
    (``ids_at``): windows near each other in one file share a request (the bytes between two runs, a record
    batch's header, read with them), requests run on threads.
    """

    def __init__(self, folder: str, manifest: dict[str, Any], versions: list[list]):
        dtype = np.dtype(manifest["dtype"])
        shards = manifest["shards"]
        self.files, self.objects = [], None
        if is_remote(folder):
            uris = [os.path.join(folder, shard["file"]) for shard in shards]
            self.objects = ObjectShards(uris, versions, dtype)
            runs = [shard["ids_at"] for shard in shards]
        else:
            runs = []
            for shard in shards:
                whole = pa.memory_map(os.path.join(folder, shard["file"]), "r").read_buffer()
                self.files.append(np.frombuffer(whole, dtype=dtype, count=whole.size // dtype.itemsize))
                runs.append(id_runs(whole, dtype, f"path {folder!r}: shard {shard['file']}"))
        starts, lengths, bases, owners = [], [], [], []
        total = 0
        for f, file_runs in enumerate(runs):
            for at, count in file_runs:
                starts.append(total), lengths.append(count), bases.append(at // dtype.itemsize), owners.append(f)
                total += count
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
        if self.objects is not None:
            return self._gather_ranged(starts, span)
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

    def _gather_ranged(self, starts: np.ndarray, span: int) -> np.ndarray:
        runs = np.searchsorted(self.starts, np.stack([starts, starts + span - 1]), side="right") - 1
        inside, crossing = np.flatnonzero(runs[0] == runs[1]), np.flatnonzero(runs[0] != runs[1])
        # the places each request is for: a window inside a run, one interval; one that goes on into the next
        # run, one interval in each file it reaches (places known token by token)
        first = self._places(starts[inside])
        places = self._places(starts[crossing, None] + np.arange(span)).ravel()
        new = np.ones(places.size, dtype=bool)  # where an interval starts among ``places``
        new[1:] = places[1:] >> FILE_BITS != places[:-1] >> FILE_BITS
        new[::span] = True
        cuts = np.flatnonzero(new)
        lo = np.concatenate([first, places[cuts]])
        hi = np.concatenate([first + span - 1, places[np.append(cuts[1:], places.size)[: cuts.size] - 1]])
        order = np.argsort(lo, kind="stable")
        spans, reader = request_spans(lo[order].tolist(), hi[order].tolist())
        which = np.empty(len(lo), dtype=np.int64)  # the span that reads each interval
        which[order] = reader
        spans = np.array(spans, dtype=np.int64)
        mask = (1 << FILE_BITS) - 1
        chunks = self.objects.map(
            lambda low, high: self.objects.read(low >> FILE_BITS, low & mask, high - low + 1), *spans.T.tolist()
        )
        tokens = np.concatenate(chunks)
        at = np.cumsum([0] + [len(chunk) for chunk in chunks[:-1]]) - spans[:, 0]  # a place's index in tokens, less it
        out = np.empty((len(starts), span), dtype=np.int32)
        out[inside] = np.lib.stride_tricks.sliding_window_view(tokens, span)[at[which[: len(inside)]] + first]
        out[crossing] = tokens[at[which[len(inside) :]][np.cumsum(new) - 1] + places].reshape(-1, span)
        return out

    def _places(self, positions: np.ndarray) -> np.ndarray:
        """Where stream ``positions`` lie: ``file << FILE_BITS | index`` in the file's tokens (in file order)."""
        run = np.searchsorted(self.starts, positions, side="right") - 1
        return (self.owners[run] << FILE_BITS) | (self.bases[run] + positions - self.starts[run])

    def _piece(self, run: int, local: int, span: int) -> np.ndarray:
        """Tokens ``local : local + span`` from the start of ``run``, on across runs and files."""
        pieces = []
        while span > 0:
            take = min(span, int(self.lengths[run]) - local)
            base, owner = int(self.bases[run]) + local, int(self.owners[run])
            pieces.append(self.files[owner][base : base + take])
            span, run, local = span - take, run + 1, 0
        return np.concatenate(pieces)


@register("read_tokens")
class ReadTokens(Reader, Stage[np.ndarray]):
    """Windows from a token cache made by ``python -m pipeline prepare``: a local folder (memory-mapped) or a URI.

    The shards are one token stream, the very one the streaming reader and encoder give, and windows
    start at ``i in range(0, N - max_length, stride)`` over it, exactly as ``sliding_window`` cuts
    them (a window may cross a shard file). With ``shuffle``, the windows come in a seeded permutation
    of all of them, another each epoch (not a buffer: any window of the order is computed directly).
    Global worker ``g`` of ``G`` (``pipeline.shard``) takes windows ``g, g + G, ...`` of the order. The
    state is ``{epoch, position}``. Restored on another topology (``pipeline.reshard``), the windows old
    workers had not reached are dealt out in the order's sequence: each next window is the one after
    the saved positions, by any topology. At construction the manifest, the shards' sizes and the source
    files' sizes are checked (a source's sha256 only when its mtime moved): a stale or damaged cache is
    refused. Items are int32 blocks ``[n, max_length + 1]``, as from ``sliding_window``. A cache in
    object storage (``s3://bucket/cache``, ``gs://...``: ``pipeline.storage``) is read by ranged requests
    of the tokens each block of windows needs, never a whole object; a shard object replaced since the
    pipeline was built is refused by name.

    Args:
        path: the cache folder (``prepare --out``), or its URI (``s3://``, ``gs://``, ``file://``).
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
        path = path.rstrip("/") if is_remote(path) else local_path(path)
        try:
            self.manifest = load_manifest(path)
            self.versions = check_cache(path, self.manifest)  # the shards' [size(, mtime)], checked again on reading
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
            self._stream = TokenStream(self.path, self.manifest, self.versions)
        if initial_state is None:
            self._epoch, self._position = self._epoch + 1, 0
        else:
            self._epoch, self._position = initial_state["epoch"], initial_state["position"]
        seam = self._seam(initial_state)
        self._g, self._G = self.slot()
        self._first, self._share = 0, self._G  # windows g - first, + share, ... of those to deal out
        self._numbers = self._dealt(seam) if seam is not None else None
        total = self.n_windows if self._numbers is None else self._numbers.total
        self._count = len(range(self._g - self._first, total, self._share))  # this worker's windows
        if initial_state is not None:
            check_restored(self, "position", self._position, self._count)
        self._order = (
            WindowPermutation(self.n_windows, self.seed, self._epoch) if self.shuffle and self.n_windows else None
        )

    def _dealt(self, seam: dict) -> RemainingWindows:
        """The windows left at ``seam`` among the workers of this worker's group (sets the share)."""
        group = next(group for group in seam["groups"] if group["among"][0] <= self._g < sum(group["among"]))
        self._first, self._share = group["among"]
        try:
            return seam_windows(self.n_windows, seam, group)
        except ValueError as e:
            raise ValueError(f"stage '{self.name}': {e}") from None

    def skip(self, n: int) -> None:
        """Pass the next ``n`` windows (see ``sliding_window``'s ``skip``)."""
        if self._position + n > self._count:
            raise ValueError(f"stage '{self.name}': cannot skip {n} windows, {self._count - self._position} are left")
        self._position += n

    def frontier(self, state: dict[str, Any] | None, finished: bool = False) -> int:
        return FINISHED if finished else 0 if state is None else state["position"]

    def get_state(self) -> dict[str, Any]:
        state = {"epoch": self._epoch, "position": self._position}
        return {**state, "seams": self._seams} if self._seams else state

    def next(self) -> np.ndarray:
        n = min(self.block_windows, self._count - self._position)
        if n <= 0:
            raise StopIteration
        index = self._g - self._first + self._share * (self._position + np.arange(n, dtype=np.int64))
        if self._numbers is not None:
            index = self._numbers(index)
        if self._order is not None:
            index = self._order(index)
        try:
            block = self._stream.gather(index * self.stride, self.max_length + 1)
        except ObjectError as e:
            raise self.error(e.why, e.uri) from None
        self._position += n
        self.stats["windows"] += n
        return block

    def tokens_in(self, item: np.ndarray) -> int:
        return input_tokens(item)
