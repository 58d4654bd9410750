"""Exactly once: every document read once per epoch over all ranks and workers; none twice, none lost."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest

from pipeline import Pipeline
from pipeline.shard import assign_units, resolve_rank
from tests.corpora import write_arrow_corpus, write_text_corpus

GRID = [(w, n) for w in (1, 2, 3) for n in (0, 1, 2, 4)]


def _read_all(config: dict, world_size: int, num_workers: int) -> list[dict]:
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # idle workers warn; tested below
        for rank in range(world_size):
            pipe = Pipeline.from_config(
                config, output="read", rank=rank, world_size=world_size, num_workers=num_workers
            )
            docs += list(pipe)
    return docs


@pytest.mark.parametrize("world_size,num_workers", GRID)
def test_arrow_documents_exactly_once(tmp_path, world_size, num_workers):
    ids = write_arrow_corpus(tmp_path / "corpus")
    config = {"stages": {"read": {"type": "read_arrow", "paths": [str(tmp_path / "corpus" / "*.arrow")]}}}
    seen = Counter(doc["id"] for doc in _read_all(config, world_size, num_workers))
    assert sorted(seen) == sorted(ids)
    assert max(seen.values()) == 1


@pytest.mark.parametrize("world_size,num_workers", GRID)
def test_text_bytes_exactly_once(tmp_path, world_size, num_workers):
    files = write_text_corpus(tmp_path / "corpus")
    # 100-byte shard units: the larger files split into many byte ranges over the workers
    config = {
        "stages": {
            "read": {"type": "read_text", "paths": [str(tmp_path / "corpus")], "shard_bytes": 100, "chunk_bytes": 64}
        }
    }
    pieces = _read_all(config, world_size, num_workers)
    by_file: dict[str, list[dict]] = {}
    for piece in pieces:
        by_file.setdefault(piece["source"], []).append(piece)
    for path, text in files.items():
        got = sorted(by_file.get(path, []), key=lambda p: p["offset"])
        ends = [0] + [p["end"] for p in got]
        assert [p["offset"] for p in got] == ends[:-1], f"{path}: gaps or overlaps between pieces"
        assert "".join(p["text"] for p in got) == text


def test_shuffle_changes_unit_order_per_epoch_and_keeps_the_set():
    orders = [assign_units(50, 0, 1, True, seed=7, epoch=e, name="r") for e in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(50))
    assert orders[0] != orders[1]
    assert assign_units(50, 0, 1, True, seed=7, epoch=0, name="r") == orders[0]
    assert assign_units(50, 0, 1, False, seed=7, epoch=0, name="r") == list(range(50))


def test_shuffled_epochs_each_read_everything_once(tmp_path):
    ids = write_arrow_corpus(tmp_path / "corpus")
    config = {
        "stages": {"read": {"type": "read_arrow", "paths": [str(tmp_path / "corpus")], "shuffle": True, "seed": 3}}
    }
    pipe = Pipeline.from_config(config, output="read", num_workers=2)
    epochs = [[d["id"] for d in pipe] for _ in range(2)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(ids)
    assert epochs[0] != epochs[1]


def test_more_workers_than_units_warns_and_idle_workers_end(tmp_path):
    ids = write_arrow_corpus(tmp_path / "corpus", batches_per_file=(1,), rows_per_batch=(3,))
    config = {"stages": {"read": {"type": "read_arrow", "paths": [str(tmp_path / "corpus")]}}}
    with pytest.warns(UserWarning, match="1 shard unit"):
        docs = list(Pipeline.from_config(config, output="read", num_workers=0, world_size=2, rank=0))
    assert [d["id"] for d in docs] == ids


def test_rank_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (2, 4)
    assert resolve_rank(0, 1) == (0, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="rank"):
        resolve_rank()


def test_windows_over_workers_cover_each_workers_stream(tmp_path):
    """Batches from 2 workers hold exactly the windows of each worker's own token stream."""
    write_arrow_corpus(tmp_path / "corpus")
    base = {
        "read": {"type": "read_arrow", "paths": [str(tmp_path / "corpus")]},
        "encode": {"type": "bpe_encode", "input": "read"},
        "window": {"type": "sliding_window", "input": "encode", "max_length": 8, "stride": 8},
        "batch": {"type": "batch", "input": "window", "batch_size": 4, "drop_last": False},
    }
    tokens = sum(len(d["ids"]) for d in Pipeline.from_config({"stages": base}, output="encode"))
    batched = sum(b["inputs"].numel() for b in Pipeline.from_config({"stages": base}, num_workers=2))
    # each of the 2 streams loses a tail of at most max_length tokens (+1 for the target) and gains
    # one <|endoftext|> less than the single stream
    assert tokens - 2 * 9 <= batched <= tokens
