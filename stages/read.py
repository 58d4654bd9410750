"""``read_text``: stream text files as documents, in chunks cut only where BPE cannot tell."""

from __future__ import annotations

import codecs
import glob
import os
import threading
from typing import Any

from pipeline.registry import register
from pipeline.stage import Stage

DECODE_POLICIES = ("strict", "replace", "skip")

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
        if p < start:
            return -1
        q = p - 1
        while q > 0 and p - q < 4 and 0x80 <= buf[q] < 0xC0:  # back to the previous character's first byte
            q -= 1
        try:
            previous = buf[q:p].decode("utf-8")
        except UnicodeDecodeError:
            previous = " "  # undecodable: not a safe neighbour
        if not previous.isspace():
            return p
        end = p


def expand_paths(paths: str | list[str]) -> list[str]:
    """Files named by ``paths`` (files, globs, directories), in order; raises if one matches nothing."""
    files: list[str] = []
    for pattern in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
        pattern = os.fspath(pattern)
        if os.path.isdir(pattern):
            matches = sorted(p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True) if os.path.isfile(p))
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        else:
            matches = [pattern] if os.path.isfile(pattern) else []
        if not matches:
            raise FileNotFoundError(f"no file matches {pattern!r} (working directory {os.getcwd()})")
        files.extend(matches)
    return files


@register("read_text")
class ReadText(Stage[dict]):
    """Reads text files, each one document, streamed in chunks of about ``chunk_bytes``.

    A chunk ends only where BPE tokens cannot cross (see ``safe_cut``), so the tokens of the pieces
    equal those of the whole file. Each item is a dict: ``text``, ``source`` (the file), ``record``
    (the document's index in its file, 0 for text files), ``offset`` (the piece's first byte) and
    ``last`` (whether the piece ends its document).

    Args:
        paths: files, globs or directories, read in the order given (globs sorted).
        chunk_bytes: bytes read at a time; a chunk grows past it only where no cut point exists.
        errors: invalid UTF-8: ``strict`` raises naming the file and byte, ``replace`` puts U+FFFD,
            ``skip`` drops the bytes; both of the latter are counted in ``stats``.
    """

    def __init__(self, paths: str | list[str], chunk_bytes: int = 1 << 20, errors: str = "strict"):
        super().__init__()
        if errors not in DECODE_POLICIES:
            raise ValueError(f"errors must be one of {DECODE_POLICIES}, got {errors!r}")
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
        self.files = expand_paths(paths)
        self.chunk_bytes = chunk_bytes
        self.errors = errors
        self._handle = None

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self._close()
        state = initial_state or {"file": 0, "offset": 0}
        self._file, self._offset = state["file"], state["offset"]

    def get_state(self) -> dict[str, Any]:
        return {"file": self._file, "offset": self._offset}

    def next(self) -> dict:
        while self._file < len(self.files):
            path = self.files[self._file]
            if self._handle is None:
                self._open(path)
            size = self._size
            if self._offset >= size:
                if size == 0:
                    self.stats["empty documents skipped"] += 1
                self._close()
                self._file, self._offset = self._file + 1, 0
                continue
            raw = self._read_piece(path, size)
            offset, self._offset = self._offset, self._offset + len(raw)
            try:
                text, bad, first = decode(raw, self.errors)
            except UnicodeDecodeError as e:
                raise self.error(f"invalid UTF-8 at byte {offset + e.start} ({e.reason}); "
                                 "set errors: replace or skip to go on", path, 0) from None
            if bad:
                self.stats[f"invalid UTF-8 sequences ({self.errors})"] += bad
            self.stats["bytes"] += len(raw)
            last = self._offset >= size
            self.stats["documents"] += last
            return {"text": text, "source": path, "record": 0, "offset": offset, "last": last}
        raise StopIteration

    def _read_piece(self, path: str, size: int) -> bytes:
        """Bytes from the current offset up to a safe cut (or the end of the file)."""
        handle = self._handle
        handle.seek(self._offset)
        buf = handle.read(self.chunk_bytes)
        while self._offset + len(buf) < size:
            cut = safe_cut(buf, start=max(1, len(buf) - self.chunk_bytes))
            if cut > 0:
                return buf[:cut]
            more = handle.read(self.chunk_bytes)  # no cut point yet (a very long word): read on
            if not more:
                raise self.error(f"file shrank while being read (expected {size} bytes)", path, 0)
            buf += more
        return buf

    def _open(self, path: str) -> None:
        try:
            self._handle = open(path, "rb")
            self._size = os.fstat(self._handle.fileno()).st_size
        except OSError as e:
            raise self.error(f"cannot open: {e.strerror}", path) from None

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
