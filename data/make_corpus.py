"""Make a text corpus of a requested size by remixing the paragraphs of some source files.

Example:
    python data/make_corpus.py --from ../shared/data/tinyshakespeare.txt --size 1GB --out corpus/

A document is 1..16 randomly chosen paragraphs joined by a blank line, preceded by an id line
("doc-000000042\\n"). Output is deterministic for a given seed and source list, and it is written
one batch at a time, so memory stays bounded whatever --size is.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = {"arrow": "arrow", "parquet": "parquet", "text": "txt"}  # format -> file extension
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])
MAX_PARAGRAPHS = 16
# Documents are drawn from the RNG in chunks of this many, independent of --docs-per-batch and
# --file-size, so those two options change how the corpus is laid out but not its contents.
_RNG_CHUNK = 4096
_UNITS = {
    "": 1, "B": 1,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(s: str) -> int:
    """Parse '4096', '10MB', '1.5GB', '64KiB' into bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    m = _SIZE_RE.fullmatch(s)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a size: {s!r} (expected e.g. 4096, 10MB, 1.5GB, 64KiB)")
    return int(float(m.group(1)) * _UNITS[unit])


def load_paragraphs(sources: list[str | Path]) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Split each source on blank lines; return (paragraphs, their UTF-8 sizes, source index of each, source names)."""
    paragraphs: list[str] = []
    source_of: list[int] = []
    names: list[str] = []
    for k, path in enumerate(sources):
        # Text mode turns \r\n into \n, so Windows files split on blank lines too.
        text = Path(path).read_text(encoding="utf-8")
        parts = [p.strip() for p in re.split(r"\n\s*\n", text)]
        parts = [p for p in parts if p]
        paragraphs += parts
        source_of += [k] * len(parts)
        names.append(os.path.basename(path))
    if not paragraphs:
        raise ValueError(f"no paragraphs in {[str(s) for s in sources]}")
    sizes = np.array([len(p.encode("utf-8")) for p in paragraphs], dtype=np.int64)
    return paragraphs, sizes, np.array(source_of, dtype=np.int64), names


def iter_documents(
    paragraphs: list[str], sizes: np.ndarray, source_of: np.ndarray, names: list[str], seed: int
) -> Iterator[tuple[str, str, str, int]]:
    """Yield (id, text, source, utf8_bytes_of_text) forever, deterministically from seed."""
    rng = np.random.default_rng(seed)
    n = 0
    while True:
        counts = rng.integers(1, MAX_PARAGRAPHS + 1, size=_RNG_CHUNK)
        picks = rng.integers(0, len(paragraphs), size=int(counts.sum()))
        ends = np.cumsum(counts)
        starts = ends - counts
        # Body size by arithmetic (paragraph sizes + "\n\n" separators) instead of encoding every document.
        body_bytes = np.add.reduceat(sizes[picks], starts) + 2 * (counts - 1)
        first_source = source_of[picks[starts]]
        picks_list = picks.tolist()
        for a, b, nbytes, src in zip(starts.tolist(), ends.tolist(), body_bytes.tolist(), first_source.tolist()):
            doc_id = f"doc-{n:09d}"
            text = doc_id + "\n" + "\n\n".join([paragraphs[i] for i in picks_list[a:b]])
            yield doc_id, text, names[src], len(doc_id) + 1 + nbytes
            n += 1


class _ArrowWriter:
    """Arrow IPC file: one record batch per write."""

    def __init__(self, path: Path):
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, SCHEMA)

    def write(self, ids: list[str], texts: list[str], sources: list[str]) -> None:
        self.writer.write_batch(pa.record_batch([ids, texts, sources], schema=SCHEMA))

    def close(self) -> None:
        self.writer.close()
        self.sink.close()


class _ParquetWriter:
    """Parquet file: one row group per write."""

    def __init__(self, path: Path):
        self.writer = pq.ParquetWriter(str(path), SCHEMA)

    def write(self, ids: list[str], texts: list[str], sources: list[str]) -> None:
        table = pa.table([ids, texts, sources], schema=SCHEMA)
        self.writer.write_table(table, row_group_size=len(ids))

    def close(self) -> None:
        self.writer.close()


class _TextWriter:
    """Plain text: documents separated by one blank line, file ends with a newline."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.first = True

    def write(self, ids: list[str], texts: list[str], sources: list[str]) -> None:
        lead = "" if self.first else "\n"
        self.f.write((lead + "\n\n".join(texts) + "\n").encode("utf-8"))
        self.first = False

    def close(self) -> None:
        self.f.close()


_WRITERS = {"arrow": _ArrowWriter, "parquet": _ParquetWriter, "text": _TextWriter}


def _existing_parts(out: Path) -> list[Path]:
    return sorted(p for ext in FORMATS.values() for p in out.glob(f"part-*.{ext}"))


def make_corpus(
    sources: list[str | Path],
    size: int,
    out: str | Path,
    fmt: str = "arrow",
    seed: int = 0,
    docs_per_batch: int = 1024,
    file_size: int = 256_000_000,
    overwrite: bool = False,
) -> dict:
    """Write documents into out/part-NNNNN.<ext> until their text totals at least `size` UTF-8 bytes.

    Returns {"files": [paths], "documents": int, "bytes": int, "seconds": float}. `bytes` counts
    document text only (the same for every format); text files also hold 2 separator bytes per document.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}, expected one of {sorted(FORMATS)}")
    if size <= 0 or docs_per_batch <= 0 or file_size <= 0:
        raise ValueError("size, docs_per_batch and file_size must be positive")
    t0 = time.perf_counter()
    # Read the sources first so a bad --from fails before anything is created or deleted.
    docs = iter_documents(*load_paragraphs(sources), seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    existing = _existing_parts(out)
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already has part files ({existing[0].name}, ...); pass overwrite=True / --overwrite"
        )
    # Remove every old part, not just those we will rewrite: a leftover part from a bigger earlier run
    # would otherwise be read as part of this corpus.
    for p in existing:
        p.unlink()

    per_doc_overhead = 2 if fmt == "text" else 0  # the "\n\n" between documents in text files
    ext = FORMATS[fmt]
    files: list[Path] = []
    writer = None
    tmp_path = final_path = None
    ids: list[str] = []
    texts: list[str] = []
    srcs: list[str] = []
    total = file_bytes = n_docs = 0

    def flush() -> None:
        if ids:
            writer.write(ids, texts, srcs)
            ids.clear()
            texts.clear()
            srcs.clear()

    def finish_file() -> None:
        flush()
        writer.close()
        # Written under a temporary name so an interrupted run never leaves a truncated part-*.<ext>.
        os.replace(tmp_path, final_path)
        files.append(final_path)

    while total < size:
        doc_id, text, src, nbytes = next(docs)
        cost = nbytes + per_doc_overhead
        # A new file when this document would overflow the current one (a lone oversized document still gets a file).
        if writer is not None and file_bytes > 0 and file_bytes + cost > file_size:
            finish_file()
            writer = None
        if writer is None:
            final_path = out / f"part-{len(files):05d}.{ext}"
            tmp_path = final_path.with_name(final_path.name + ".tmp")
            writer = _WRITERS[fmt](tmp_path)
            file_bytes = 0
        ids.append(doc_id)
        texts.append(text)
        srcs.append(src)
        file_bytes += cost
        total += nbytes
        n_docs += 1
        if len(ids) == docs_per_batch:
            flush()
    finish_file()
    return {"files": [str(p) for p in files], "documents": n_docs, "bytes": total, "seconds": time.perf_counter() - t0}


def _size_arg(s: str) -> int:
    try:
        return parse_size(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--from",
        dest="sources",
        action="append",
        required=True,
        metavar="FILE",
        help="source text file (repeatable); paragraphs are split on blank lines",
    )
    ap.add_argument("--size", type=_size_arg, required=True, help="total document text, e.g. 10MB, 1GB, 4096")
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    ap.add_argument("--format", dest="fmt", choices=sorted(FORMATS), default="arrow")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--docs-per-batch", type=int, default=1024, help="documents per record batch / row group")
    ap.add_argument("--file-size", type=_size_arg, default=256_000_000, help="max text per part file (default 256MB)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing part files in --out")
    args = ap.parse_args(argv)
    try:
        r = make_corpus(
            args.sources,
            args.size,
            args.out,
            fmt=args.fmt,
            seed=args.seed,
            docs_per_batch=args.docs_per_batch,
            file_size=args.file_size,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as e:
        print(f"make_corpus: error: {e}", file=sys.stderr)
        return 1
    secs = r["seconds"]
    print(
        f"{len(r['files'])} files, {r['documents']} documents, {r['bytes']} bytes, {secs:.1f} s, "
        f"{r['bytes'] / 1e6 / max(secs, 1e-9):.1f} MB/s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
