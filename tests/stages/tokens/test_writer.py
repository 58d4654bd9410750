"""``ShardWriter``: rows handed over in blocks are cut into record batches and shards as if added one by one."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.tokens.format import PrepareError
from stages.tokens.writer import ShardWriter, strings


def expected_shards(rows: list[tuple[list[int], str | None]], shard_tokens: int, batch_tokens: int) -> list[list]:
    """The rule, row by row: a batch ends after the row that brings it to ``batch_tokens``, a shard after the
    row that brings it to ``shard_tokens``; a shard's last batch is written when it closes (maybe empty)."""
    shards, batch, written, opened = [], [], 0, False
    for row in rows:
        if not opened:  # a shard opens at its first row
            shards.append([])
            opened = True
        batch.append(row)
        held = sum(len(ids) for ids, _ in batch)
        if written + held >= shard_tokens:
            shards[-1].append(batch)
            batch, written, opened = [], 0, False
        elif held >= batch_tokens:
            shards[-1].append(batch)
            batch, written = [], written + held
    if opened:
        shards[-1].append(batch)  # close() writes what is held, even nothing
    return shards


def write(folder, rows, cuts, shard_tokens, batch_tokens) -> list[dict]:
    writer = ShardWriter(str(folder), np.dtype(np.uint16), 1000, shard_tokens, batch_tokens)
    bounds = [0, *sorted(cuts), len(rows)]
    for a, b in zip(bounds, bounds[1:]):
        block = rows[a:b]
        if not block:
            continue
        ids = np.array([t for r, _ in block for t in r], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum([len(r) for r, _ in block])]).astype(np.int64)
        writer.add(ids, (offsets, [s for _, s in block]))
    return writer.close()


def batches(path) -> list[list]:
    with pa.memory_map(str(path)) as f:
        reader = ipc.open_file(f)
        return [[(r["ids"], r["source"]) for r in reader.get_batch(b).to_pylist()]
                for b in range(reader.num_record_batches)]


row = st.tuples(st.lists(st.integers(0, 999), max_size=12), st.sampled_from(["a.arrow", "b/é.txt", None]))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(row, max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       shard_tokens=st.integers(1, 60), batch_tokens=st.integers(1, 25))
def test_blocks_are_cut_as_rows_added_one_by_one(tmp_path_factory, rows, cuts, shard_tokens, batch_tokens):
    blocks, single = tmp_path_factory.mktemp("blocks"), tmp_path_factory.mktemp("single")
    cuts = [c for c in cuts if c <= len(rows)]
    shards = write(blocks, rows, cuts, shard_tokens, batch_tokens)
    assert shards == write(single, rows, range(len(rows)), shard_tokens, batch_tokens)
    expected = expected_shards(rows, shard_tokens, batch_tokens)
    assert [batches(blocks / s["file"]) for s in shards] == expected
    for shard in shards:
        assert (blocks / shard["file"]).read_bytes() == (single / shard["file"]).read_bytes()
    assert [s["rows"] for s in shards] == [sum(map(len, s)) for s in expected]


def test_an_id_outside_the_vocabulary_is_refused(tmp_path):
    writer = ShardWriter(str(tmp_path), np.dtype(np.uint16), 1000, batch_tokens=2)
    with pytest.raises(PrepareError, match="token id 1000 outside the vocabulary of 1000"):
        writer.add(np.array([5, 1000], dtype=np.int32), (np.array([0, 1, 2]), ["a", "a"]))


def test_strings_are_pyarrows_array():
    for values in (["a", "bé", None, ""], [], [None], ["x"] * 9):
        built, oracle = strings(values), pa.array(values, pa.string())
        built.validate(full=True)
        assert built.equals(oracle) and built.null_count == oracle.null_count
