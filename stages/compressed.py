"""Decompressed bytes of a compressed stream (gzip, zstd, bz2, xz), chunk by chunk, truncation detected."""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Iterator

import zstandard

SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}
RAW_READ = 8 << 20  # compressed bytes read at a time (one ranged request to an object store)
RAW_CHUNK = 1 << 18  # compressed bytes given to one decompress call: bounds its output (text: ~1-4 MB)
_DECOMPRESSORS = {
    "gzip": lambda: zlib.decompressobj(wbits=zlib.MAX_WBITS | 16),
    "zstd": lambda: zstandard.ZstdDecompressor().decompressobj(),
    "bz2": bz2.BZ2Decompressor,
    "xz": lzma.LZMADecompressor,
}
_ERRORS = (zlib.error, zstandard.ZstdError, OSError, EOFError, lzma.LZMAError)  # bz2 raises OSError


class CorruptData(ValueError):
    """The compressed bytes are truncated or corrupt (a fault of the data, unlike a failed read)."""


def decompressed(raw, compression: str) -> Iterator[bytes]:
    """The decompressed bytes of ``raw`` (a binary stream), chunk by chunk.

    Concatenated members, streams or frames (``cat a.gz b.gz``, multi-frame zstd) are read on. A read
    error of ``raw`` propagates as it is (``OSError``); data that is corrupt, or ends in the middle
    of a member or frame, raises ``CorruptData``.
    """
    decompressor, fed = _DECOMPRESSORS[compression](), False
    while read := raw.read(RAW_READ):
        for start in range(0, len(read), RAW_CHUNK):
            data = read[start : start + RAW_CHUNK]
            while data:
                try:
                    out = decompressor.decompress(data)
                except _ERRORS as e:
                    raise CorruptData(f"corrupt {compression} data: {e}") from None
                fed = True
                if out:
                    yield out
                data = b""
                if decompressor.eof:  # the next member or frame starts in what is left
                    data, decompressor, fed = decompressor.unused_data, _DECOMPRESSORS[compression](), False
    if fed:
        raise CorruptData(f"truncated {compression} data: it ends in the middle of a compressed block")


def zstd_frames(stream) -> list[list[int]] | None:
    """``[compressed, decompressed]`` offsets of each frame's start, and of the data's end, from the seek
    table of a file in zstd's seekable format (a skippable frame at the end); None without one.

    ``stream``: the file, seekable (``size()``, ``seek``, ``read``).
    """
    size = stream.size()
    tail_size = min(size, 1 << 16)  # one request: the table of up to ~8,000 frames (and more than an error body)
    stream.seek(size - tail_size)
    tail = stream.read(tail_size)
    if size < 17:
        return None
    count, descriptor, magic = struct.unpack_from("<IBI", tail, tail_size - 9)
    entry = 12 if descriptor & 0x80 else 8  # with a checksum per frame
    table_start = size - 9 - count * entry - 8
    if magic != 0x8F92EAB1 or table_start < 0:
        return None
    if table_start < size - tail_size:
        stream.seek(table_start)
        tail, tail_size = stream.read(size - table_start), size - table_start
    table = tail[table_start - (size - tail_size) :]
    skippable, length = struct.unpack_from("<II", table)
    offsets = [[0, 0]]
    for k in range(count):
        compressed, decompressed_size = struct.unpack_from("<II", table, 8 + k * entry)
        offsets.append([offsets[-1][0] + compressed, offsets[-1][1] + decompressed_size])
    if skippable != 0x184D2A5E or length != count * entry + 9 or offsets[-1][0] != table_start:
        return None  # not a seek table that fits this file: read it whole
    return offsets
