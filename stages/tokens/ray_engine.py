"""The Ray engine of ``prepare``: the same rows as the local engine, read and encoded by a Ray Data job."""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from torchdata.nodes import IterableWrapper

from pipeline.graph import Pipeline
from pipeline.shard import ShardedSource, assign_units
from pipeline.stage import RunContext
from stages.separators import Separators
from stages.tokens.format import PrepareError
from stages.tokens.writer import id_lists


def rows(pipe: Pipeline, encode, dtype: np.dtype, counts: dict[str, int]) -> Iterator[tuple[np.ndarray, tuple]]:
    """The local engine's rows from a Ray Data job: a read task per shard unit of the config's own reader
    (in the order a single local reader takes them), then ``map_batches`` encoding with the config's
    own encode stage without separators, order preserved; the separators are then put in here, over the
    whole stream, by the encode stage's own rule (``Separators``)."""
    ray = import_ray()
    reader = encode.source
    if not isinstance(reader, ShardedSource) or not hasattr(encode, "eot_id"):
        raise PrepareError(
            f"--engine ray runs a reader feeding a bpe_encode stage directly; `{encode.name}` reads from "
            f"`{getattr(reader, 'name', reader)}`: use --engine local for this graph"
        )
    if not ray.is_initialized():
        ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)  # RAY_ADDRESS joins a cluster
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per dataset execution on stdout
    order = assign_units(len(reader.units), 0, 1, reader.shuffle, reader.seed, 0, reader.name)  # one reader's order
    ds = ray.data.read_datasource(_unit_source(ray.put(reader), order), override_num_blocks=max(len(order), 1))
    params = {**encode.params, "eot": False, "blocks": False}
    ds = ds.map_batches(
        _encode_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"stage": type(encode), "params": params, "dtype": dtype.str, "n_vocab": encode.vocab_size},
    )
    separators, stats = Separators(encode.eot_id, encode.eot), Counter()
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if not table.num_rows:  # a unit without documents
            continue
        ids = table.column("ids").combine_chunks()
        offsets, values = ids.offsets.to_numpy(), ids.flatten().to_numpy()
        offsets = offsets - offsets[0]  # flatten() starts at the first row's values
        sources, starts, ends = (table.column(n).to_pylist() for n in ("source", "offset", "end"))
        docs = [{"source": s, "offset": o, "end": e} for s, o, e in zip(sources, starts, ends)]
        block = separators.block(docs, values, np.diff(offsets), stats, rows=True)
        yield block["ids"], (block["rows"], block["sources"])
    counts["documents"] = int(stats["documents"])


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise PrepareError("--engine ray needs Ray: pip install '.[ray]'") from None
    return ray


def _unit_source(reader_ref, order: list[int]):
    """A Ray Data source: one read task per shard unit of the config's reader, in ``order``."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class UnitSource(Datasource):
        def estimate_inmemory_data_size(self) -> None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(functools.partial(_read_unit, reader_ref, unit), meta) for unit in order]

    return UnitSource()


def _read_unit(reader_ref, unit: int, table_bytes: int = 32 << 20) -> Iterator[pa.Table]:
    """Documents of one shard unit, read by the config's own reader (in a Ray task), as tables."""
    import ray

    reader = ray.get(reader_ref)  # a fresh copy in this task
    reader.units = [reader.units[unit]]
    reader.shuffle = False
    reader.set_context(RunContext(rank=0, world_size=1))
    reader.reset()
    columns: dict[str, list] = {"text": [], "source": [], "offset": [], "end": []}
    size, yielded = 0, False
    for doc in reader:
        # what BpeEncode compares to tell a continued piece: [source, offset] against [source, end]
        columns["text"].append(doc["text"])
        columns["source"].append(doc.get("source"))
        columns["offset"].append(doc.get("offset"))
        columns["end"].append(doc.get("end", -1))
        size += len(doc["text"])
        if size >= table_bytes:
            yield _documents_table(columns)
            columns, size, yielded = {k: [] for k in columns}, 0, True
    if columns["text"] or not yielded:
        yield _documents_table(columns)


def _documents_table(columns: dict[str, list]) -> pa.Table:
    try:
        return pa.table(
            {
                "text": pa.array(columns["text"], pa.large_string()),
                "source": pa.array(columns["source"], pa.string()),
                "offset": pa.array(columns["offset"], pa.int64()),
                "end": pa.array(columns["end"], pa.int64()),
            }
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise PrepareError(
            f"--engine ray: a document's source, offset or end is not a string / integer ({e}); use --engine local"
        ) from None


_ENCODERS: dict[str, Any] = {}  # per Ray worker process: the encode stage, built once


def _encode_batch(table: pa.Table, stage: type, params: dict[str, Any], dtype: str, n_vocab: int) -> pa.Table:
    """Token ids of a batch of documents (no separators), encoded by the config's encode stage."""
    key = f"{stage.__module__}.{stage.__qualname__}:{json.dumps(params, sort_keys=True, default=str)}"
    if key not in _ENCODERS:
        _ENCODERS[key] = stage(IterableWrapper([]), **params)
    node = _ENCODERS[key]
    names = ("text", "source", "offset", "end")
    node.source = IterableWrapper([dict(zip(names, row)) for row in zip(*(table.column(n).to_pylist() for n in names))])
    node.reset()
    ids = []
    while True:
        try:
            ids.append(next(node)["ids"])
        except StopIteration:
            break
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in ids], out=offsets[1:])
    return pa.table(
        {
            "ids": id_lists(np.concatenate(ids) if ids else np.empty(0, dtype), offsets, np.dtype(dtype), n_vocab),
            "source": table.column("source"),
            "offset": table.column("offset"),
            "end": table.column("end"),
        }
    )
