"""Small corpora built in tmp_path, with documents that say who they are."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def doc_text(doc_id: str, n: int) -> str:
    return f"{doc_id} " + " ".join(WORDS[(n * 7 + k) % len(WORDS)] for k in range(5 + n % 17)) + "."


def write_arrow_corpus(
    folder: Path, batches_per_file=(3, 1, 5, 2), rows_per_batch=(4, 7, 1, 10), fmt="file"
) -> list[str]:
    """Arrow IPC (``file`` or ``stream``) or ``parquet`` files of uneven batches; returns all document ids."""
    folder.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    for f, n_batches in enumerate(batches_per_file):
        batches = []
        for b in range(n_batches):
            rows = rows_per_batch[(f + b) % len(rows_per_batch)]
            batch_ids = [f"doc-{f}-{b}-{r}" for r in range(rows)]
            ids += batch_ids
            texts = [doc_text(i, len(ids) + k) for k, i in enumerate(batch_ids)]
            batches.append(pa.record_batch({"id": batch_ids, "text": texts, "n": list(range(rows))}))
        path = folder / f"part-{f}.{'parquet' if fmt == 'parquet' else 'arrow'}"
        if fmt == "parquet":
            with pq.ParquetWriter(path, batches[0].schema) as writer:
                for batch in batches:
                    writer.write_table(pa.Table.from_batches([batch]))
        else:
            opener = ipc.new_file if fmt == "file" else ipc.new_stream
            with opener(path, batches[0].schema) as writer:
                for batch in batches:
                    writer.write_batch(batch)
    return ids


def write_text_corpus(folder: Path, n_files: int = 9) -> dict[str, str]:
    """Text files of uneven sizes (one empty); returns path -> content."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for f in range(n_files):
        text = "" if f == 3 else "\n".join(doc_text(f"file-{f}-line-{k}", k) for k in range(f * 13 + 1))
        path = folder / f"f{f:02d}.txt"
        path.write_text(text, encoding="utf-8")
        files[str(path)] = text
    return files
