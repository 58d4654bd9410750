"""Reading Arrow IPC stream-format files against the same batches in file format (issue 14, item 5).

    python benchmarks/arrow_stream.py                  # 1,000 / 2,000 / 4,000 / 8,000 record batches
    REPEAT=1 python benchmarks/arrow_stream.py 1000    # one size, one run

Each file holds N record batches of 4 short documents; the time is ``read_arrow`` reading every document
(median of REPEAT runs, default 3). A stream has no footer, so a unit used to be found by decoding every
batch before it (quadratic in N); now the messages are indexed once and a unit is one seek.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from pyarrow import ipc

from stages import ReadArrow


def write(path: Path, n: int, opener) -> None:
    batch = pa.record_batch({"text": [f"doc {i} alpha beta" for i in range(4)]})
    with opener(path, batch.schema) as writer:
        for _ in range(n):
            writer.write_batch(batch)


def seconds(path: Path) -> tuple[float, int]:
    runs, documents = [], 0
    for _ in range(int(os.environ.get("REPEAT", "3"))):
        start = time.perf_counter()
        documents = sum(1 for _ in ReadArrow(str(path)))
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), documents


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    for n in [int(x) for x in sys.argv[1:]] or [1000, 2000, 4000, 8000]:
        write(folder / f"s{n}.arrows", n, ipc.new_stream)
        write(folder / f"f{n}.arrow", n, ipc.new_file)
        (stream, documents), (file, _) = seconds(folder / f"s{n}.arrows"), seconds(folder / f"f{n}.arrow")
        print(
            f"{n:>5} batches ({documents} documents): stream {stream:.3f} s, file {file:.3f} s, "
            f"stream/file {stream / file:.1f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
