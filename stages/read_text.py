"""``read_text``: stream text files as documents, in chunks cut only where BPE cannot tell."""

from __future__ import annotations

import codecs
import re
import threading

from pipeline import storage
from pipeline.registry import register
from pipeline.schema import FieldError, Positive, one_of
from pipeline.shard import ShardedSource
from pipeline.stage import Stage
from pipeline.storage import expand_paths, open_input

DECODE_POLICIES = ("strict", "replace", "skip")
MAX_CHUNK_BYTES = 1 << 30
_SPACE = re.compile(rb"[ \n]")

# Decode-error handlers that count what they replace or drop (per thread: encode threads decode too).
_bad = threading.local()


def _counting(replacement: str):
    def handler(error: UnicodeDecodeError):
        _bad.count += 1
        if _bad.first is None:
            _bad.first = error.start
        return replacement, error.end

    return handler


codecs.register_error("pipeline.replace", _counting("\ufffd"))
codecs.register_error("pipeline.skip", _counting(""))


def decode(raw: bytes, policy: str) -> tuple[str, int, int | None]:
    """UTF-8 text of ``raw`` under ``policy``: (text, number of bad sequences, offset of the first)."""
    try:
        return raw.decode("utf-8"), 0, None
    except UnicodeDecodeError as e:
        if policy == "strict":
            raise
        first_error = e.start
    _bad.count, _bad.first = 0, None
    text = raw.decode("utf-8", f"pipeline.{policy}")
    return text, _bad.count, first_error


def _safe_at(buf: bytes, p: int) -> bool:
    """Whether ``buf[p]`` is a space or newline right after a non-whitespace character."""
    if p < 1 or buf[p] not in b" \n":
        return False
    q = p - 1
    while q > 0 and p - q < 4 and 0x80 <= buf[q] < 0xC0:  # back to the previous character's first byte
        q -= 1
    try:
        return not buf[q:p].decode("utf-8").isspace()
    except UnicodeDecodeError:
        return False  # undecodable: not a safe neighbour


def next_cut(buf: bytes, start: int) -> int:
    """The first safe cut at or after ``start`` (see ``safe_cut``), or -1."""
    for match in _SPACE.finditer(buf, max(start, 1)):
        if _safe_at(buf, match.start()):
            return match.start()
    return -1


def safe_cut(buf: bytes, start: int = 1) -> int:
    """The last offset ``p >= start`` where ``buf`` may be cut without changing its BPE tokens, or -1.

    A cut falls just before an ASCII space or newline that follows a non-whitespace character. Every
    piece of the GPT-2 pre-tokenizer (``'s``, `` ?\\p{L}+``, `` ?\\p{N}+``, `` ?[^\\s\\p{L}\\p{N}]+``,
    ``\\s+``) holds whitespace only at its start or only whitespace, so none spans such a point, and the
    pattern looks only forward: both sides tokenize as they would in the whole text.
    """
    end = len(buf)
    while True:
        p = max(buf.rfind(b" ", start, end), buf.rfind(b"\n", start, end))
        if p < max(start, 1) or _safe_at(buf, p):
            return p if p >= max(start, 1) else -1
        end = p


@register("read_text")
class ReadText(ShardedSource, Stage[dict]):
    """Reads text files, each file one document, streamed in pieces of about ``chunk_bytes``.

    A piece ends only where BPE tokens cannot cross (see ``safe_cut``), so the tokens of the pieces
    equal those of the whole file. Shard units are byte ranges of ``shard_bytes`` (snapped forward to
    such cut points, so each byte is read once), spread over ranks and workers (``pipeline.shard``).
    Each item is a dict: ``text``, ``source`` (the file), ``offset`` and ``end`` (its bytes in the file).

    Args:
        paths: files, globs or directories, read in the order given (globs sorted), local or URIs
            (``s3://``, ``gs://``, ``file://``; see ``pipeline.storage``).
        chunk_bytes: bytes read at a time; a piece grows past it only where no cut point exists.
        errors: invalid UTF-8: ``strict`` raises naming the file and byte, ``replace`` puts U+FFFD,
            ``skip`` drops the bytes; both of the latter are counted in ``stats``.
        shard_bytes: size of the byte ranges that workers share out.
        rank, world_size: this process's place among the ranks (default: torch.distributed, else
            the ``RANK`` / ``WORLD_SIZE`` environment, else 0 of 1).
        shuffle, seed: shuffle the order of the shard units each epoch, seeded by (seed, epoch).
    """

    in_workers = True  # worth running in DataLoader worker processes
    produces = "documents"

    def __init__(
        self,
        paths: str | list[str],
        chunk_bytes: Positive = 1 << 20,
        errors: str = "strict",
        shard_bytes: Positive = 64 << 20,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        one_of("errors", errors, DECODE_POLICIES)
        if chunk_bytes > MAX_CHUNK_BYTES:  # a buffer of this size is allocated for each read
            raise FieldError("chunk_bytes", f"chunk_bytes must be at most {MAX_CHUNK_BYTES} (1 GiB), got {chunk_bytes}")
        self.files = expand_paths(paths)
        self.chunk_bytes, self.errors, self.shard_bytes = chunk_bytes, errors, shard_bytes
        self.stats.labels["invalid_utf8"] = f"invalid UTF-8 sequences ({errors})"
        self.init_shards(rank, world_size, shuffle, seed)
        self.units = []  # [file index, nominal start, nominal end]
        self.sizes = [storage.size(path) for path in self.files]
        for i, size in enumerate(self.sizes):
            self.units += [[i, start, min(start + shard_bytes, size)] for start in range(0, max(size, 1), shard_bytes)]
        self._handle = None

    def read(self, unit: list[int], position: int | None) -> tuple[dict, int] | None:
        index, start, end = unit
        path = self.files[index]
        if self._handle is None:  # a new unit (or a restored one): find where it really ends
            self._open(path)
            self._end = self._snap(end)
            if position is not None and not self._snap(start) <= position <= self._end:
                raise self.error(f"the state's position {position!r} is not a byte of this shard unit "
                                 f"({self._snap(start)} to {self._end})", path)
        if self._size == 0:
            self.stats["empty_documents_skipped"] += 1
            return None
        position = self._snap(start) if position is None else position
        if position >= self._end:
            return None
        raw = self._read_piece(path, position, self._end)
        try:
            text, bad, _ = decode(raw, self.errors)
        except UnicodeDecodeError as e:
            raise self.error(f"invalid UTF-8 ({e.reason}); set errors: replace or skip to go on", path,
                             f"byte {position + e.start}") from None
        if bad:
            self.stats["invalid_utf8"] += bad
        self.stats["bytes"] += len(raw)
        return {"text": text, "source": path, "offset": position, "end": position + len(raw)}, position + len(raw)

    def unit_bytes(self, unit: list[int]) -> int:
        return unit[2] - unit[1]

    def close_unit(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._handle.close()
            self._handle = None

    def _snap(self, offset: int) -> int:
        """The first safe cut at or after ``offset`` (0 and the file's end stay), so neighbouring units meet."""
        key = (self._path, offset)
        scanned = getattr(self, "_scanned", None)  # (file, from, cut): every offset in between snaps to cut
        if scanned is not None and scanned[0] == key[0] and scanned[1] <= offset <= scanned[2]:
            return scanned[2]
        start = offset
        while 0 < offset < self._size:
            base = max(0, offset - 4)  # the character before a cut may start up to 3 bytes earlier
            self._handle.seek(base)
            buf = self._handle.read(offset - base + self.chunk_bytes)
            found = next_cut(buf, offset - base)
            if found >= 0:
                offset = base + found
                break
            offset = base + len(buf) if buf else self._size
        offset = min(max(offset, 0), self._size)
        self._scanned = (key[0], start, offset)  # units inside one long word need not scan it again
        return offset

    def _read_piece(self, path: str, position: int, end: int) -> bytes:
        """Bytes from ``position`` up to a safe cut (or ``end``); a long word is read on, chunk by chunk."""
        handle = self._handle
        handle.seek(position)
        chunks: list[bytes] = []
        read = 0
        while True:
            chunk = handle.read(min(self.chunk_bytes, end - position - read))
            if not chunk:
                raise self.error(
                    f"file shrank while being read (expected {self._size} bytes)", path, f"byte {position + read}"
                )
            if position + read + len(chunk) >= end:
                return b"".join(chunks + [chunk])
            tail = chunks[-1][-4:] if chunks else b""  # the character before a cut may start in the previous chunk
            cut = safe_cut(tail + chunk, start=max(1, len(tail)))
            if cut > 0:
                return b"".join(chunks + [chunk[: cut - len(tail)]])
            chunks.append(chunk)  # no cut point in this chunk: search only the next one
            read += len(chunk)

    def _open(self, path: str) -> None:
        try:
            self._handle = open_input(path)
            self._size, self._path = self._handle.size(), path
        except OSError as e:
            raise self.error(f"cannot open: {e.strerror or e}", path) from None
        expected = self.sizes[self.files.index(path)]
        if self._size != expected:  # its shard units were cut for the old size: bytes would be lost or read twice
            self.close_unit()
            raise self.error(f"file changed size since the pipeline was built ({expected} -> {self._size} bytes)", path)
