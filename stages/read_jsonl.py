"""``read_jsonl``: documents from JSON Lines files, plain or compressed, local or in object storage."""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterator

import orjson

from pipeline.registry import register
from pipeline.schema import FieldError, Positive, one_of
from pipeline.shard import ShardedSource
from pipeline.stage import Stage
from pipeline.storage import expand_paths, open_input, open_stream, size
from stages.compressed import SUFFIXES, CorruptData, decompressed, zstd_frames
from stages.fields import Carried

COMPRESSIONS = ("none", *SUFFIXES.values())
ERROR_POLICIES = ("error", "skip")
CHUNK = 4 << 20  # bytes of a plain file read at a time


def _skip(chunks: Iterator[bytes], n: int) -> Iterator[bytes]:
    """``chunks`` without their first ``n`` bytes (a compressed file resumes by reading on from its start)."""
    for chunk in chunks:
        if n < len(chunk):
            yield chunk[n:]
            yield from chunks
            return
        n -= len(chunk)
    if n:
        raise CorruptData(f"{n} bytes shorter than the position to resume from")


def _after_newline(chunks: Iterator[bytes], offset: int) -> tuple[int, Iterator[bytes]]:
    """Where the first line after the first newline at or after ``offset`` starts (``chunks`` start at
    ``offset``), and the chunks from there."""
    for chunk in chunks:
        found = chunk.find(b"\n")
        if found >= 0:
            return offset + found + 1, itertools.chain([chunk[found + 1 :]], chunks)
        offset += len(chunk)
    return offset, iter(())


def _lines(chunks: Iterator[bytes], offset: int, stop: int | None) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` for each line in ``chunks`` (which start at ``offset``) that starts before ``stop``."""
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            if stop is not None and offset >= stop:
                return
            yield offset, line
            offset += len(line) + 1
    if rest and (stop is None or offset < stop):
        yield offset, rest  # a last line without a newline


@register("read_jsonl")
class ReadJsonl(ShardedSource, Stage[dict]):
    """Reads documents from JSON Lines files, one JSON object a line, plain or compressed.

    Each item is a dict: ``text`` (the string under ``field``), ``source`` (the file), ``shard`` (the
    unit in the file), ``record`` (the line in the unit, from 0), and the object's other top-level
    fields by name, as ``read_arrow`` keeps its columns: a field named like one of the pipeline's own
    (``ids``, ``offset``, ``end``, ``source``, ...: ``stages.fields.FIELDS``) would be taken for it, so it
    is left out, with a warning naming it, or refused by name when ``fields`` lists it. Shard units are
    byte ranges of ``shard_bytes`` cut at newlines for plain files; for a compressed file, its independent
    frames where a zstd seek table lists them (the seekable format; a line belongs to the frame it starts
    in), else the whole file (a compressed stream can only be read from its start).
    Lines are parsed by ``orjson``; blank lines are counted and passed over.

    Args:
        paths: files, globs or directories (directories: files ending .jsonl, .json, .ndjson, with or
            without a compression suffix), local or URIs (``s3://``, ``gs://``, ``file://``).
        field: where the text is: a key, or a dotted path into nested objects (``meta.body``).
        fields: top-level fields to carry with each document (default: all but those named like the
            pipeline's fields; absent ones are None).
        compression: ``none``, ``gzip``, ``zstd``, ``bz2`` or ``xz``; default: by suffix (.gz, .zst, .bz2, .xz).
        on_error: ``error`` or ``skip``: a line that is not a JSON object or has no string at ``field``,
            and a truncated or corrupt compressed file, raise naming the file and line, or are counted
            in ``stats`` and passed over (the rest of a truncated file cannot be read).
        shard_bytes: size of the byte ranges of plain files that workers share out.
        rank, world_size, shuffle, seed: as in ``read_text``.
    """

    in_workers = True  # worth running in DataLoader worker processes
    produces = "documents"

    def __init__(
        self,
        paths: str | list[str],
        field: str = "text",
        fields: list[str] | None = None,
        compression: str | None = None,
        on_error: str = "error",
        shard_bytes: Positive = 64 << 20,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        one_of("on_error", on_error, ERROR_POLICIES)
        if compression is not None:
            one_of("compression", compression, COMPRESSIONS)
        if not isinstance(field, str) or not field:
            raise FieldError("field", f"field must be a non-empty string, got {field!r}")
        if fields is not None and not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
            raise FieldError("fields", f"fields must be a list of field names, got {fields!r}")
        self.carried = Carried(fields, "fields", "field")
        suffixes = tuple(s + c for s in (".jsonl", ".json", ".ndjson") for c in ("", *SUFFIXES))
        self.files = expand_paths(paths, suffixes)
        self.field, self.fields, self.on_error, self.shard_bytes = field, fields, on_error, shard_bytes
        self.compressions = [compression or SUFFIXES.get("." + f.rsplit(".", 1)[-1], "none") for f in self.files]
        self.init_shards(rank, world_size, shuffle, seed)
        self.frames = [
            self._frames(path) if kind == "zstd" else None for path, kind in zip(self.files, self.compressions)
        ]
        self.sizes = [size(path) if kind == "none" else None for path, kind in zip(self.files, self.compressions)]
        self.units = []  # [file, start, end, shard]: lines starting in [start, end) of the (decompressed) bytes
        for i, (n, kind, frames) in enumerate(zip(self.sizes, self.compressions, self.frames)):
            if frames is not None:
                self.units += [[i, a[1], b[1], k] for k, (a, b) in enumerate(itertools.pairwise(frames))]
            elif kind != "none":
                self.units.append([i, 0, -1, 0])  # end -1: to the end of the file
            else:
                self.units += [
                    [i, s, min(s + shard_bytes, n), s // shard_bytes] for s in range(0, max(n, 1), shard_bytes)
                ]
        self._lines = None

    def read(self, unit: list[int], position: list[int] | None) -> tuple[dict, list[int]] | None:
        offset, record = position or (None, 0)
        while True:
            try:
                if self._lines is None:
                    self._stream, self._lines = self._open(unit, offset)
                line_start, line = next(self._lines, (None, None))
            except CorruptData as e:
                return self._bad(
                    "truncated or corrupt file", f" ({e}); no line from here on can be read", unit, record, offset
                )
            except OSError as e:  # storage failed (after its retries), not the data
                raise self.error(f"cannot read ({e})", self.files[unit[0]]) from None
            if line is None:
                return None
            offset = line_start + len(line) + 1
            position = [offset, record + 1]
            doc = self._document(line, unit, record, line_start)
            record += 1
            if doc is not None:
                return doc, position

    def close_unit(self) -> None:
        if getattr(self, "_lines", None) is not None:
            self._lines.close()
            self._stream.close()
            self._lines = None

    def _frames(self, path: str) -> list[list[int]] | None:
        try:
            with open_input(path) as stream:
                return zstd_frames(stream)
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e})") from None

    def _chunks_from(self, index: int, offset: int):
        """The stream of file ``index`` and its (decompressed) bytes from ``offset`` on, chunk by chunk."""
        path, compression, frames = self.files[index], self.compressions[index], self.frames[index]
        if compression == "none":
            stream = open_input(path)
            if (now := stream.size()) != self.sizes[
                index
            ]:  # its byte ranges were cut for the old size: lines would be lost
                stream.close()
                raise self.error(
                    f"file changed size since the pipeline was built ({self.sizes[index]} -> {now} bytes)", path
                )
            stream.seek(offset)
            return stream, iter(lambda: stream.read(CHUNK), b"")
        if frames is None:  # read from the start
            stream = open_stream(path)
            return stream, _skip(decompressed(stream, compression), offset)
        compressed, start = frames[bisect.bisect_right([f[1] for f in frames], offset) - 1]  # the frame holding offset
        stream = open_input(path)
        stream.seek(compressed)
        return stream, _skip(decompressed(stream, compression), offset - start)

    def _open(self, unit: list[int], offset: int | None):
        """The stream of a unit and its lines from ``offset`` (a line start; default: the unit's first line)."""
        index, start, end, _ = unit
        try:
            if (
                offset is None and start > 0
            ):  # the unit's first line starts after the first newline at or after start - 1
                stream, chunks = self._chunks_from(index, start - 1)
                offset, chunks = _after_newline(chunks, start - 1)
            else:
                offset = offset or 0
                stream, chunks = self._chunks_from(index, offset)
            return stream, _lines(chunks, offset, None if end < 0 else end)
        except FileNotFoundError as e:
            raise self.error(f"cannot open: {e.strerror or e}", self.files[index]) from None

    def _document(self, line: bytes, unit: list[int], record: int, offset: int) -> dict | None:
        if not line or line.isspace():
            self.stats["blank_lines_skipped"] += 1
            return None
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            return self._bad("not JSON", f" ({e})", unit, record, offset)
        if not isinstance(obj, dict):
            return self._bad("not a JSON object", f" (a {type(obj).__name__})", unit, record, offset)
        text = obj.pop(self.field, None) if self.field in obj else self._pop_path(obj)
        if not isinstance(text, str):
            found = "missing or null" if text is None else f"a {type(text).__name__}, not a string"
            return self._bad(f"no text at `{self.field}`", f" ({found}); set `field`", unit, record, offset)
        doc = {name: obj.get(name) for name in self.carried.names(obj, self.field)}
        doc.update(text=text, source=self.files[unit[0]], shard=unit[3], record=record)
        self.stats["documents"] += 1
        return doc

    def _pop_path(self, obj: dict):
        """The value at the dotted ``field``, removed from ``obj`` (None if the path is absent)."""
        *parents, leaf = self.field.split(".")
        for key in parents:
            obj = obj.get(key) if isinstance(obj, dict) else None
        return obj.pop(leaf, None) if isinstance(obj, dict) else None

    def _bad(self, kind: str, detail: str, unit: list[int], record: int, offset: int | None) -> None:
        """Raise under ``on_error: error``, naming the file and line; count the skip under ``skip``.

        ``record`` is the line in the unit, ``offset`` its first (decompressed) byte (None: the unit's first line).
        """
        if self.on_error == "skip":
            key = "skipped_" + re.sub(r"\W+", "_", kind).strip("_").lower()  # counters have identifier keys
            self.stats.labels[key] = f"skipped: {kind}"
            self.stats[key] += 1
            return
        line = self._lines_before(unit[0], max(unit[1], 0) if offset is None else offset) + 1
        raise self.error(f"{kind}{detail}; set on_error: skip to go on", self.files[unit[0]], f"line {line}")

    def _lines_before(self, index: int, offset: int) -> int:
        """How many lines end before (decompressed) byte ``offset`` of a file (counted only on the way to an error)."""
        count, (stream, chunks) = 0, self._chunks_from(index, 0)
        with stream:
            try:
                for chunk in chunks:
                    if len(chunk) >= offset:
                        return count + chunk.count(b"\n", 0, offset)
                    count, offset = count + chunk.count(b"\n"), offset - len(chunk)
            except CorruptData:  # a truncated file: the lines before where it ends
                pass
        return count
