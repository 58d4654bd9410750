"""``sliding_window`` and ``batch`` against the book's windows, and save/restore of every stage."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdata.nodes import IterableWrapper, Loader

from pipeline import Pipeline
from stages.batch import Batch
from stages.bpe_encode import BpeEncode
from stages.encoding import load_encoding
from stages.read_text import ReadText
from stages.sliding_window import SlidingWindow
from tests.book import book_windows
from tests.resume import assert_same, check_resume

ENC = load_encoding("gpt2")


def token_arrays(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50257, size=n, dtype=np.int32) for n in lengths]


def random_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([0, 0, 1, 1, 2, 3, 5, 8, 13, 40, 100]) for _ in range(n)]


def id_items(arrays: list[np.ndarray]) -> IterableWrapper:
    return IterableWrapper([{"ids": a} for a in arrays])


def windows_of(node) -> list[tuple[list[int], list[int]]]:
    """(input, target) pairs from a window stage's blocks."""
    return [(row[:-1].tolist(), row[1:].tolist()) for block in Loader(node) for row in block]


# --- sliding_window -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "max_length,stride", [(1, 1), (2, 1), (4, 4), (4, 2), (4, 5), (4, 6), (4, 13), (7, 3), (3, 40)]
)
@pytest.mark.parametrize("block_windows", [1, 3, 1024])
def test_windows_over_many_documents_equal_the_books(max_length, stride, block_windows):
    arrays = token_arrays(random_lengths(80))
    stream = np.concatenate(arrays).tolist()
    node = SlidingWindow(id_items(arrays), max_length=max_length, stride=stride, block_windows=block_windows)
    blocks = list(Loader(node))
    assert all(b.ndim == 2 and b.shape[1] == max_length + 1 and 1 <= len(b) <= block_windows for b in blocks)
    assert all(b.dtype == np.int32 for b in blocks)
    expected = book_windows(stream, max_length, stride)
    again = SlidingWindow(id_items(arrays), max_length=max_length, stride=stride, block_windows=block_windows)
    assert windows_of(again) == expected
    assert node.stats["windows"] == len(expected)


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), max_size=25),
    max_length=st.integers(1, 10),
    stride=st.integers(1, 25),
    block_windows=st.integers(1, 6),
)
def test_windows_property(lengths, max_length, stride, block_windows):
    arrays = token_arrays(lengths, seed=len(lengths))
    stream = np.concatenate(arrays).tolist() if arrays else []
    node = SlidingWindow(id_items(arrays), max_length=max_length, stride=stride, block_windows=block_windows)
    assert windows_of(node) == book_windows(stream, max_length, stride)


def test_windows_over_encoded_documents_equal_the_joined_text():
    docs = ["The cat sat.", "", "On the mat, naïvely. " * 5, "<|endoftext|> is plain text here", "end"]
    items = IterableWrapper([{"text": d, "source": f"doc{i}"} for i, d in enumerate(docs)])
    node = SlidingWindow(BpeEncode(items, allowed_special="all", batch_bytes=8), max_length=4, stride=3)
    # the stream is the documents joined by <|endoftext|>, encoded with it allowed (DESIGN)
    stream = ENC.encode("<|endoftext|>".join(docs), allowed_special={"<|endoftext|>"})
    assert windows_of(node) == book_windows(stream, 4, 3)


@pytest.mark.parametrize("lengths", [[], [0], [0, 0], [3], [1, 0, 2], [4]])
def test_fewer_tokens_than_a_window(lengths):
    node = SlidingWindow(id_items(token_arrays(lengths)), max_length=4, stride=1)
    assert list(Loader(node)) == []
    assert node.stats["tail tokens"] == sum(lengths)


@pytest.mark.parametrize("n_tokens,max_length,stride", [(10, 4, 1), (5145, 4, 4), (9, 2, 5), (10, 4, 4)])
def test_tail_tokens_are_the_tokens_after_the_last_window(n_tokens, max_length, stride):
    node = SlidingWindow(id_items([np.arange(n_tokens, dtype=np.int32)]), max_length=max_length, stride=stride)
    list(Loader(node))
    last_start = book_windows(list(range(n_tokens)), max_length, stride)[-1][0][0]
    assert node.stats["tail tokens"] == n_tokens - (last_start + max_length + 1)


@pytest.mark.parametrize("field", ["max_length", "stride", "block_windows"])
@pytest.mark.parametrize("value", [0, -1, 2.5, "4", True, None])
def test_window_arguments(field, value):
    kwargs = {"max_length": 4, "stride": 4, field: value}
    with pytest.raises(ValueError) as info:
        SlidingWindow(id_items([]), **kwargs)
    assert field in str(info.value) and repr(value) in str(info.value)


# --- batch --------------------------------------------------------------------------------------


def counting_windows(n_tokens: int, max_length: int = 3, stride: int = 2, block_windows: int = 5) -> SlidingWindow:
    """Windows over 0, 1, 2, ...: every window is different, so an order says where each came from."""
    arrays = [np.arange(a, b, dtype=np.int32) for a, b in itertools.pairwise([0, 1, 1, 7, 20, 21, n_tokens])]
    return SlidingWindow(id_items(arrays), max_length=max_length, stride=stride, block_windows=block_windows)


def rows(batches) -> list[tuple[int, ...]]:
    return [tuple(row) for b in batches for row in torch.cat([b["inputs"], b["targets"][:, -1:]], dim=1).tolist()]


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 100])
@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_are_the_windows_in_order(batch_size, drop_last):
    stream = list(range(61))
    expected = book_windows(stream, 3, 2)  # 29 windows
    node = Batch(counting_windows(61), batch_size, drop_last=drop_last)
    batches = list(Loader(node))
    n_full, rest = divmod(len(expected), batch_size)
    sizes = [batch_size] * n_full + ([rest] if rest and not drop_last else [])
    assert [len(b["inputs"]) for b in batches] == sizes
    for b in batches:
        assert set(b) == {"inputs", "targets"}
        assert b["inputs"].dtype == b["targets"].dtype == torch.int64
        assert b["inputs"].shape == b["targets"].shape == (len(b["inputs"]), 3)
    got = [(x, y) for b in batches for x, y in zip(b["inputs"].tolist(), b["targets"].tolist())]
    assert got == expected[: sum(sizes)]
    assert node.stats["windows dropped (drop_last)"] == (rest if drop_last else 0)


def shuffled(seed: int, batch_size: int = 4, shuffle_windows: int = 8192, epochs: int = 1, drop_last: bool = False):
    node = Batch(
        counting_windows(301), batch_size, shuffle=True, seed=seed, shuffle_windows=shuffle_windows, drop_last=drop_last
    )
    loader = Loader(node)
    return [rows(loader) for _ in range(epochs)]


def test_shuffle_is_a_seeded_permutation():
    plain = rows(Loader(Batch(counting_windows(301), 4, drop_last=False)))
    assert len(plain) == 149
    first, second = shuffled(seed=1, epochs=2)
    assert sorted(first) == sorted(plain) and first != plain
    assert shuffled(seed=1) == [first]  # same seed, same order
    assert shuffled(seed=2)[0] != first  # other seed, other order
    assert sorted(second) == sorted(plain) and second != first  # the next epoch is another order
    pipe = Pipeline(Batch(counting_windows(301), 4, shuffle=True, seed=1, drop_last=False))
    assert [rows(pipe), rows(pipe)] == [first, second]  # a Pipeline iterated twice: the same two epochs


def test_shuffle_stays_inside_groups():
    plain = rows(Loader(Batch(counting_windows(301), 4, drop_last=False)))
    (order,) = shuffled(seed=5, batch_size=4, shuffle_windows=10)  # groups of 12 (10 rounded up to 4s)
    assert order != plain
    for start in range(0, len(plain), 12):
        assert sorted(order[start : start + 12]) == sorted(plain[start : start + 12])
    assert any(order[s : s + 12] != plain[s : s + 12] for s in range(0, len(plain), 12))


def test_shuffle_drop_last_drops_only_the_end():
    plain = rows(Loader(Batch(counting_windows(301), 4, drop_last=False)))
    (order,) = shuffled(seed=5, batch_size=4, shuffle_windows=10, drop_last=True)
    assert len(order) == len(plain) // 4 * 4
    assert sorted(order[:144]) == sorted(plain[:144])  # whole groups kept


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": -2}, {"batch_size": 2.0}, {"shuffle_windows": 0}])
def test_batch_arguments(kwargs):
    with pytest.raises(ValueError):
        Batch(counting_windows(30), **{"batch_size": 2, **kwargs})


# --- save and restore ---------------------------------------------------------------------------

WORDS = ["the", " cat", " sat", " on", " mat", ".", "\n", "  ", "42", " naïve", " 中文", "'s", " 😀", "\n\n"]


@pytest.fixture
def text_files(tmp_path):
    rng = random.Random(7)
    paths = []
    for i, n_words in enumerate([300, 0, 40, 500, 1]):
        path = tmp_path / f"part{i}.txt"
        path.write_text("".join(rng.choices(WORDS, k=n_words)), encoding="utf-8")
        paths.append(str(path))
    return paths


def test_resume_read_text(text_files):
    reference = check_resume(lambda: ReadText(text_files, chunk_bytes=64))
    assert len(reference) > 20


def test_resume_read_text_shuffled_small_shards(text_files):
    check_resume(lambda: ReadText(text_files, chunk_bytes=32, shard_bytes=200, shuffle=True, seed=4))


def test_resume_bpe_encode(text_files):
    reference = check_resume(lambda: BpeEncode(ReadText(text_files, chunk_bytes=64), batch_bytes=40, num_threads=2))
    expected = ENC.encode_ordinary(open(text_files[0], encoding="utf-8").read())
    assert [int(t) for t in reference[0]["ids"]] == expected[: len(reference[0]["ids"])]


def test_resume_bpe_encode_over_documents():
    texts = [("word " * (i % 7)) + "<|endoftext|>" * (i % 5 == 0) for i in range(60)]
    docs = [{"text": t, "source": "s", "record": i} for i, t in enumerate(texts)]
    check_resume(lambda: BpeEncode(IterableWrapper(docs), batch_bytes=16))


@pytest.mark.parametrize(
    "max_length,stride,block_windows", [(4, 4, 1024), (4, 1, 16), (8, 3, 5), (3, 11, 2), (5, 6, 1)]
)
def test_resume_sliding_window(text_files, max_length, stride, block_windows):
    def make():
        encoded = BpeEncode(ReadText(text_files, chunk_bytes=64), batch_bytes=40)
        return SlidingWindow(encoded, max_length=max_length, stride=stride, block_windows=block_windows)

    check_resume(make)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_batch(text_files, shuffle, drop_last):
    def make():
        encoded = BpeEncode(ReadText(text_files, chunk_bytes=64), batch_bytes=40)
        windows = SlidingWindow(encoded, max_length=6, stride=5, block_windows=7)
        return Batch(windows, 3, drop_last=drop_last, shuffle=shuffle, seed=11, shuffle_windows=10)

    reference = check_resume(make)
    assert len(reference) > 20


def test_resume_verdict_pipeline_with_embed(in_root):
    def make():
        return Pipeline.from_config("examples/verdict.yaml").root

    reference = check_resume(make, project=lambda batch: {k: batch[k] for k in ("inputs", "targets")})
    assert len(reference) == 160


def test_resume_with_torchdata_nodes_in_between():
    from torchdata.nodes import Prefetcher

    arrays = token_arrays(random_lengths(40, seed=3), seed=3)

    def make():
        windows = SlidingWindow(id_items(arrays), max_length=3, stride=2, block_windows=4)
        return Batch(Prefetcher(windows, prefetch_factor=2), 3, shuffle=True, seed=2, shuffle_windows=5)

    check_resume(make)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 25), min_size=1, max_size=12),
    max_length=st.integers(1, 6),
    stride=st.integers(1, 9),
    batch_size=st.integers(1, 4),
    shuffle=st.booleans(),
    data=st.data(),
)
def test_resume_equals_uninterrupted_property(lengths, max_length, stride, batch_size, shuffle, data):
    arrays = token_arrays(lengths, seed=sum(lengths))

    def make():
        windows = SlidingWindow(id_items(arrays), max_length=max_length, stride=stride, block_windows=3)
        return Batch(windows, batch_size, drop_last=False, shuffle=shuffle, seed=3, shuffle_windows=5)

    reference = list(Loader(make()))
    k = data.draw(st.integers(0, len(reference)))
    loader = Loader(make())
    iterator = iter(loader)
    for _ in range(k):
        next(iterator)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = Loader(make(), restart_on_stop_iteration=False)
    resumed.load_state_dict(state)
    assert_same(list(resumed), reference[k:])


def test_the_first_block_does_not_wait_for_block_windows_and_blocks_grow_to_it():
    """A stream's first block comes with the first item's tokens (a quick first batch), the wait doubles
    from one window to ``block_windows``; a state from before ``want`` was saved restores full blocks."""
    arrays = [np.arange(i * 10, i * 10 + 10, dtype=np.int32) for i in range(200)]  # 10 tokens: 2 windows each
    node = SlidingWindow(id_items(arrays), max_length=3, stride=4, block_windows=16)
    sizes = [len(block) for block in Loader(node)]
    assert sizes[:6] == [2, 3, 5, 10, 16, 16] and max(sizes) == 16  # all the windows held once 1, 2, 4, 8... are
    assert windows_of(SlidingWindow(id_items(arrays), max_length=3, stride=4, block_windows=16)) == [
        (list(range(i, i + 3)), list(range(i + 1, i + 4))) for i in range(0, 2000 - 3, 4)
    ]
    node = SlidingWindow(id_items(arrays), max_length=3, stride=4, block_windows=16)
    node.reset(None)
    next(node)
    state = {k: v for k, v in node.state_dict().items() if k != "want"}
    again = SlidingWindow(id_items(arrays), max_length=3, stride=4, block_windows=16)
    again.reset(state)
    assert len(next(again)) == 16
