"""``read_tokens``: the streaming path's windows from token shards; shuffle, shards, resume, refusals."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdata.nodes import Loader

from pipeline import ConfigError, Pipeline
from stages.tokens.prepare import MANIFEST, prepare
from stages.batch import Batch
from stages.tokens import ReadTokens, WindowPermutation
from tests.corpora import write_arrow_corpus, write_text_corpus
from tests.resume import assert_same, check_resume

PAIRS = [(1, 1), (4, 4), (8, 3), (16, 40), (64, 32), (256, 128)]  # (max_length, stride), stride > max_length included


def text_config(folder) -> dict:
    # small pieces and shard units: items continue each other inside files, documents join by <|endoftext|>
    return {"stages": {
        "read": {"type": "read_text", "paths": [str(folder)], "chunk_bytes": 300, "shard_bytes": 2000},
        "encode": {"type": "bpe_encode", "input": "read", "batch_bytes": 500},
    }}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text corpus and its cache, in shards of ~300 tokens and record batches of ~100: windows cross both."""
    root = tmp_path_factory.mktemp("tokens")
    write_text_corpus(root / "corpus")
    config = text_config(root / "corpus")
    manifest = prepare(config, root / "cache", shard_tokens=300, batch_tokens=100)
    assert len(manifest["shards"]) > 10
    return {"config": config, "cache": str(root / "cache"), "manifest": manifest, "root": root}


def streamed(config: dict, max_length: int, stride: int) -> np.ndarray:
    """All windows of the streaming path: the same config with a sliding_window stage."""
    stages = dict(
        config["stages"],
        window={"type": "sliding_window", "input": "encode", "max_length": max_length, "stride": stride},
    )
    blocks = list(Pipeline.from_config({"stages": stages}))
    return np.concatenate(blocks) if blocks else np.empty((0, max_length + 1), np.int32)


def rows(blocks) -> np.ndarray:
    blocks = [np.array(b) for b in blocks]
    return np.concatenate(blocks) if blocks else np.empty((0, 0), np.int32)


def multiset(windows: np.ndarray) -> Counter:
    return Counter(row.tobytes() for row in windows)


# --- the same windows as streaming ----------------------------------------------------------------


@pytest.mark.parametrize("max_length,stride", PAIRS)
def test_windows_equal_the_streaming_windows(corpus, max_length, stride):
    expected = streamed(corpus["config"], max_length, stride)
    assert len(expected) > 0
    node = ReadTokens(corpus["cache"], max_length=max_length, stride=stride, block_windows=7)
    blocks = list(Loader(node))
    assert all(b.dtype == np.int32 and b.ndim == 2 and b.shape[1] == max_length + 1 and len(b) <= 7 for b in blocks)
    assert_same(rows(blocks), expected)
    assert node.stats["windows"] == len(expected)


def test_windows_from_arrow_documents(tmp_path):
    write_arrow_corpus(tmp_path / "corpus")
    config = {
        "stages": {
            "read": {"type": "read_arrow", "paths": [str(tmp_path / "corpus")]},
            "encode": {"type": "bpe_encode", "input": "read"},
        }
    }
    prepare(config, tmp_path / "cache", shard_tokens=50, batch_tokens=20)
    for max_length, stride in [(4, 4), (8, 3), (5, 13)]:
        got = rows(Loader(ReadTokens(str(tmp_path / "cache"), max_length, stride)))
        assert_same(got, streamed(config, max_length, stride))


def test_a_config_with_read_tokens_and_batch(corpus):
    config = {
        "stages": {
            "tokens": {
                "type": "read_tokens",
                "path": corpus["cache"],
                "max_length": 8,
                "stride": 4,
                "encoding": "gpt2",
            },
            "batch": {"type": "batch", "input": "tokens", "batch_size": 4},
            "embed": {"type": "embed", "input": "batch", "vocab_size": 50257, "d_model": 8, "context_length": 8},
        }
    }
    batches = list(Pipeline.from_config(config))
    expected = streamed(corpus["config"], 8, 4)
    inputs = np.concatenate([b["inputs"].numpy() for b in batches])
    assert np.array_equal(inputs, expected[: len(inputs), :-1]) and len(expected) - len(inputs) < 4
    small = dict(config["stages"], embed=dict(config["stages"]["embed"], vocab_size=1000))
    with pytest.raises(ConfigError, match="vocab_size 1000 is smaller than the 50257"):
        Pipeline.from_config({"stages": small})


def test_no_windows_when_the_stream_is_shorter_than_a_window(corpus):
    tokens = corpus["manifest"]["counts"]["tokens"]
    assert list(Loader(ReadTokens(corpus["cache"], max_length=tokens, stride=1))) == []
    assert len(rows(Loader(ReadTokens(corpus["cache"], max_length=tokens - 1, stride=5)))) == 1


# --- shuffle ----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**32), epoch=st.integers(0, 100))
def test_window_permutation_is_a_bijection(n, seed, epoch):
    order = WindowPermutation(n, seed, epoch)(np.arange(n))
    assert order.dtype == np.int64
    assert np.array_equal(np.sort(order), np.arange(n))


def test_window_permutation_is_seeded_and_differs_per_epoch_and_seed():
    n = 10_000
    first = WindowPermutation(n, 3, 0)(np.arange(n))
    assert np.array_equal(first, WindowPermutation(n, 3, 0)(np.arange(n)))
    assert not np.array_equal(first, WindowPermutation(n, 3, 1)(np.arange(n)))
    assert not np.array_equal(first, WindowPermutation(n, 4, 0)(np.arange(n)))
    # any slice of the order is computed alone (what a worker does)
    assert np.array_equal(WindowPermutation(n, 3, 0)(np.arange(5, n, 7)), first[5::7])
    # and it is well mixed: neighbours are not kept together
    assert abs(np.corrcoef(np.arange(n), first)[0, 1]) < 0.05


def test_shuffle_is_a_seeded_permutation_of_the_windows_another_each_epoch(corpus):
    plain = rows(Loader(ReadTokens(corpus["cache"], 8, 3)))
    loader = Loader(ReadTokens(corpus["cache"], 8, 3, shuffle=True, seed=5, block_windows=64))
    epochs = [rows(loader) for _ in range(2)]
    again = rows(Loader(ReadTokens(corpus["cache"], 8, 3, shuffle=True, seed=5, block_windows=3)))
    other_seed = rows(Loader(ReadTokens(corpus["cache"], 8, 3, shuffle=True, seed=6)))
    for shuffled in (*epochs, other_seed):
        assert multiset(shuffled) == multiset(plain)
        assert not np.array_equal(shuffled, plain)
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], other_seed)
    assert np.array_equal(epochs[0], again)  # the order depends on the seed and epoch, not the block size


# --- sharding: exactly once over ranks and workers ---------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size,num_workers", [(w, n) for w in (1, 2) for n in (0, 2)])
def test_each_window_exactly_once_over_ranks_and_workers(corpus, world_size, num_workers, shuffle):
    config = {
        "stages": {
            "tokens": {
                "type": "read_tokens",
                "path": corpus["cache"],
                "max_length": 8,
                "stride": 3,
                "shuffle": shuffle,
                "seed": 1,
                "block_windows": 50,
            }
        }
    }
    every, per_rank = [], []
    for rank in range(world_size):
        pipe = Pipeline.from_config(config, rank=rank, world_size=world_size, num_workers=num_workers)
        per_rank.append(rows(pipe))
        every.append(per_rank[-1])
    expected = streamed(corpus["config"], 8, 3)
    assert multiset(np.concatenate(every)) == multiset(expected)
    assert sum(len(r) for r in per_rank) == len(expected)
    assert max(len(r) for r in per_rank) - min(len(r) for r in per_rank) <= max(
        num_workers, 1
    )  # ranks get equal shares
    if world_size * max(num_workers, 1) == 1 and not shuffle:
        assert np.array_equal(every[0], expected)


def test_global_worker_takes_every_gth_window(corpus):
    everything = rows(Loader(ReadTokens(corpus["cache"], 8, 3)))
    for rank in range(3):
        mine = rows(Loader(ReadTokens(corpus["cache"], 8, 3, rank=rank, world_size=3)))
        assert np.array_equal(mine, everything[rank::3])


# --- resume ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_read_tokens(corpus, shuffle):
    reference = check_resume(lambda: ReadTokens(corpus["cache"], 16, 5, shuffle=shuffle, seed=2, block_windows=37))
    assert len(reference) > 20


def test_resume_read_tokens_then_batch(corpus):
    def make():
        return Batch(ReadTokens(corpus["cache"], 6, 7, shuffle=True, seed=9, block_windows=10), 4, drop_last=False)

    check_resume(make)


def test_resume_a_pipeline_with_workers(corpus):
    config = {
        "stages": {
            "tokens": {
                "type": "read_tokens",
                "path": corpus["cache"],
                "max_length": 8,
                "stride": 4,
                "shuffle": True,
                "block_windows": 16,
            },
            "batch": {"type": "batch", "input": "tokens", "batch_size": 4},
        }
    }
    reference = [b["inputs"] for b in Pipeline.from_config(config, num_workers=2)]
    pipe = Pipeline.from_config(config, num_workers=2)
    it = iter(pipe)
    head = [next(it)["inputs"] for _ in range(len(reference) // 3)]
    state = json.loads(json.dumps(pipe.state_dict()))
    resumed = Pipeline.from_config(config, num_workers=2)
    resumed.load_state_dict(state)
    rest = [b["inputs"] for _, b in zip(range(len(reference) - len(head)), resumed)]
    assert_same(head + rest, reference)


# --- refusals ----------------------------------------------------------------------------------------


@pytest.fixture
def copy_of_cache(corpus, tmp_path):
    """A fresh cache of a corpus of its own (so it may be damaged), and that corpus's folder."""
    files = write_text_corpus(tmp_path / "corpus", n_files=3)
    prepare(text_config(tmp_path / "corpus"), tmp_path / "cache", shard_tokens=100)
    return str(tmp_path / "cache"), files


def test_a_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "nowhere"):
        with pytest.raises(ValueError, match=rf"{folder}.*not a prepared token cache.*prepare"):
            ReadTokens(str(folder), 8, 4)


def test_config_errors_name_the_stage_and_field(tmp_path):
    config = {"stages": {"t": {"type": "read_tokens", "path": str(tmp_path), "max_length": 8, "stride": 4}}}
    with pytest.raises(ConfigError) as info:
        Pipeline.from_config(config)
    assert info.value.stage == "t" and info.value.field == "path" and str(tmp_path) in str(info.value)


def test_missing_or_resized_shards_are_refused(copy_of_cache):
    cache, _ = copy_of_cache
    shards = sorted(f for f in os.listdir(cache) if f.startswith("tokens-"))
    with open(os.path.join(cache, shards[1]), "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match=rf"{cache}.*{shards[1]} has .* bytes, the manifest says"):
        ReadTokens(cache, 8, 4)
    os.remove(os.path.join(cache, shards[1]))
    with pytest.raises(ValueError, match=rf"{cache}.*{shards[1]} is missing"):
        ReadTokens(cache, 8, 4)


def test_a_stale_cache_is_refused(copy_of_cache):
    cache, files = copy_of_cache
    path, text = next((p, t) for p, t in files.items() if t)
    with open(path, "a", encoding="utf-8") as f:
        f.write(" more")
    with pytest.raises(ValueError, match=rf"{cache}.*stale cache: source .*{os.path.basename(path)} is now"):
        ReadTokens(cache, 8, 4)
    # same size, other bytes (and a new mtime): found by the hash
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace("alpha", "ALPHA", 1))
    assert os.path.getsize(path) == len(text.encode())
    os.utime(path, ns=(1, 1))
    with pytest.raises(ValueError, match=rf"{cache}.*stale cache: source .* changed since .* sha256"):
        ReadTokens(cache, 8, 4)


def test_touched_but_unchanged_sources_and_absent_sources_are_accepted(copy_of_cache):
    cache, files = copy_of_cache
    paths = list(files)
    os.utime(paths[0], ns=(1, 1))  # new mtime, same bytes: hashed, equal
    os.remove(paths[1])  # a cache copied without its corpus still serves
    assert len(rows(Loader(ReadTokens(cache, 8, 4)))) > 0


def test_an_encoding_mismatch_is_refused(copy_of_cache):
    cache, _ = copy_of_cache
    with pytest.raises(ValueError, match=rf"{cache}.*prepared with encoding `gpt2`, this stage asks for `r50k_base`"):
        ReadTokens(cache, 8, 4, encoding="r50k_base")
    ReadTokens(cache, 8, 4, encoding="gpt2")


def test_a_manifest_of_another_format_is_refused(copy_of_cache):
    cache, _ = copy_of_cache
    with open(os.path.join(cache, MANIFEST), "w") as f:
        json.dump({"format": "something-else"}, f)
    with pytest.raises(ValueError, match="not a textpipe.token-shards manifest"):
        ReadTokens(cache, 8, 4)


def test_the_stage_pickles_without_its_memory_maps(corpus):
    import pickle

    node = ReadTokens(corpus["cache"], 8, 4)
    first = next(iter(Loader(node)))
    copy = pickle.loads(pickle.dumps(node))
    assert copy._stream is None and len(pickle.dumps(node)) < 50_000
    assert np.array_equal(next(iter(Loader(copy))), first)


def test_idle_ranks_without_windows_end_quietly(corpus):
    tokens = corpus["manifest"]["counts"]["tokens"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = [rows(Loader(ReadTokens(corpus["cache"], tokens - 1, 1, rank=r, world_size=2))) for r in (0, 1)]
    assert [len(g) for g in got] == [1, 0]
