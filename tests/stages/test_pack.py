"""``pack``: rows that start at documents, positions that restart, every token once; exact resume everywhere."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdata.nodes import IterableWrapper, Loader

from pipeline import Pipeline
from stages.batch import IGNORE_INDEX, Batch
from stages.bpe_encode import BpeEncode
from stages.pack import Pack
from stages.read_text import ReadText
from tests.corpora import write_arrow_corpus
from tests.resume import check_resume
from tests.pipeline.test_resume import _restore_in_new_process, _take

EOT = 50256


def units_and_items(lengths: list[int], continues: list[bool]) -> tuple[list[list[int]], list[dict]]:
    """Items as ``bpe_encode`` gives them, over tokens that are all different (a counter), and the
    documents or pieces the packer must see: ``<|endoftext|>`` starts each document (the stream's
    first item has none: the packer adds it); an item that continues the previous one is a piece."""
    units, items, counter = [], [], 0
    for i, (n, cont) in enumerate(zip(lengths, continues)):
        body = list(range(counter, counter + n))
        counter += n
        piece = cont and i > 0
        ids = body if piece or i == 0 else [EOT] + body
        starts = [] if piece else [0] if i == 0 else [1]  # where the document's own tokens begin
        items.append({"ids": np.array(ids, dtype=np.int32), "starts": np.array(starts, dtype=np.int64)})
        unit = body if piece else [EOT] + body
        if unit:
            units.append(unit)
    return units, items


def segments(blocks) -> list[tuple[int, list[int]]]:
    """(row number, tokens) of every document or piece in the packed rows, in order; padding left out."""
    out = []
    for r, row in enumerate(row for block in blocks for row in block):
        tokens, positions = row[0].tolist(), row[1].tolist()
        for i, (token, position) in enumerate(zip(tokens, positions)):
            if position == 0:
                out.append((r, []))
            if position >= 0:
                out[-1][1].append(token)
    return out


def where_from(units: list[list[int]], segment: list[int]) -> tuple[int, int] | None:
    """(unit, offset) of a segment, found by its first token other than <|endoftext|> (tokens are unique)."""
    firsts = {token: (u, k) for u, unit in enumerate(units) for k, token in enumerate(unit) if token != EOT}
    probe = next((t for t in segment if t != EOT), None)
    if probe is None:
        return None
    u, k = firsts[probe]
    return u, k - segment.index(probe)


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=30),
    data=st.data(),
    max_length=st.integers(1, 20),
    policy=st.sampled_from(["best_fit", "greedy"]),
    remainder=st.sampled_from(["drop", "keep"]),
    buffer=st.integers(1, 8),
    block_rows=st.integers(1, 4),
)
def test_pack_properties(lengths, data, max_length, policy, remainder, buffer, block_rows):
    continues = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    units, items = units_and_items(lengths, continues)
    node = Pack(IterableWrapper(items), max_length, policy, remainder, buffer, block_rows, bos=EOT)
    blocks = list(Loader(node))
    rows = [row for block in blocks for row in block]
    assert all(b.dtype == np.int32 and b.shape[1:] == (2, max_length + 1) and 1 <= len(b) <= block_rows for b in blocks)
    for r, row in enumerate(rows):
        positions = row[1]
        assert positions[0] == 0  # every row starts at a document or piece
        real = positions >= 0
        if not real.all():  # padding: only at the end of the stream's last row
            assert r == len(rows) - 1 and not real[int(real.sum()) :].any()
        p = positions[real]
        assert ((p[1:] == 0) | (p[1:] == p[:-1] + 1)).all()  # restart at 0, else count up by one

    found = segments(blocks)
    total = sum(map(len, units))
    packed = sum(len(s) for _, s in found)
    assert node.stats["tokens_packed"] == packed
    assert node.stats["padding_tokens"] == len(rows) * (max_length + 1) - packed
    placed: dict[int, list[tuple[int, int]]] = {}
    alone = 0  # segments of just <|endoftext|>: a document with no tokens, or one cropped to its first token
    for _, segment in found:
        origin = where_from(units, segment)
        if origin is None:
            assert segment == [EOT]
            alone += 1
            continue
        u, k = origin
        assert units[u][k : k + len(segment)] == segment  # positions restart exactly at document starts
        placed.setdefault(u, []).append((k, k + len(segment)))
    heads = sum(spans[0][0] == 1 for spans in placed.values())  # whose <|endoftext|> was a segment alone
    empty = sum(unit == [EOT] for unit in units)
    assert alone == (empty + heads if remainder == "keep" else len(units) - len(placed))
    if remainder == "keep":  # every document's tokens exactly once, in order
        assert packed == total and node.stats["tokens_cropped"] == 0
        for u, spans in placed.items():
            starts = [a for a, _ in spans]
            assert starts == [starts[0]] + [b for _, b in spans[:-1]] and starts[0] in (0, 1)
            assert spans[-1][1] == len(units[u])
    else:  # each document once, cropped to what fits; the rest counted
        assert len(found) == len(units) and all(len(spans) == 1 and spans[0][0] == 0 for spans in placed.values())
        assert node.stats["tokens_cropped"] == total - packed
    if policy == "best_fit" and remainder == "drop" and not any(continues[1:]):
        assert all(row[0][0] == EOT for row in rows)  # every row starts with a document's first token
    if policy == "greedy":
        order = [u for u in placed for _ in placed[u]]
        assert order == sorted(order)  # arrival order


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=25),
    max_length=st.integers(1, 12),
    batch_size=st.integers(1, 5),
    remainder=st.sampled_from(["drop", "keep"]),
)
def test_packed_batches_position_ids_and_cu_seqlens(lengths, max_length, batch_size, remainder):
    items = units_and_items(lengths, [False] * len(lengths))[1]
    pack = Pack(IterableWrapper(items), max_length, remainder=remainder, buffer=4, block_rows=3, bos=EOT)
    rows = np.concatenate(list(Loader(pack)))
    for i, batch in enumerate(Loader(Batch(Pack(IterableWrapper(items), max_length, remainder=remainder, buffer=4,
                                                    block_rows=3, bos=EOT), batch_size, drop_last=False))):
        expected = rows[i * batch_size : (i + 1) * batch_size]
        b, t = len(expected), max_length
        pad = expected[:, 1] < 0
        assert set(batch) == {"inputs", "targets", "position_ids", "cu_seqlens"}
        assert batch["position_ids"].dtype == torch.int64 and batch["cu_seqlens"].dtype == torch.int32
        assert batch["inputs"].tolist() == expected[:, 0, :-1].tolist()
        assert batch["targets"].tolist() == np.where(pad[:, 1:], IGNORE_INDEX, expected[:, 0, 1:]).tolist()
        position_ids = batch["position_ids"].numpy()
        assert (position_ids[~pad[:, :-1]] == expected[:, 1, :-1][~pad[:, :-1]]).all()
        cu = batch["cu_seqlens"].numpy()
        n = len(np.flatnonzero(position_ids.reshape(-1) == 0))
        assert len(cu) & (len(cu) - 1) == 0 and len(cu) > n  # a power of two, B*T repeated after the starts
        assert (cu[n:] == b * t).all() and (np.diff(cu) >= 0).all()
        lengths_of = np.diff(cu[: n + 1])  # cu_seqlens agrees with position_ids: each sequence counts 0..len-1
        assert position_ids.reshape(-1).tolist() == [p for length in lengths_of for p in range(length)]


def test_the_first_document_of_a_stream_gets_its_separator_and_a_piece_from_inside_a_file_does_not():
    first = Pack(IterableWrapper([{"ids": np.arange(3, dtype=np.int32), "starts": np.array([0]), "offset": 0}]), 3,
                 bos=EOT)
    assert next(iter(Loader(first)))[0, 0].tolist() == [EOT, 0, 1, 2]
    inside = Pack(IterableWrapper([{"ids": np.arange(4, dtype=np.int32), "starts": np.array([], dtype=np.int64),
                                         "offset": 100}]), 3, bos=EOT)
    assert next(iter(Loader(inside)))[0, 0].tolist() == [0, 1, 2, 3]


def test_best_fit_fills_rows_better_than_greedy():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(4, 1, 3000).astype(int), 2000).tolist()
    shares = {}
    for policy in ("best_fit", "greedy"):
        node = Pack(IterableWrapper(units_and_items(lengths, [False] * len(lengths))[1]), 255, policy, bos=EOT)
        list(Loader(node))
        shares[policy] = node.stats["tokens_cropped"] / (node.stats["tokens_cropped"] + node.stats["tokens_packed"])
    assert shares["best_fit"] < shares["greedy"]


@pytest.mark.parametrize("kwargs", [{"max_length": 0}, {"buffer": 0}, {"block_rows": 2.0}, {"policy": "best"},
                                    {"remainder": "pad"}, {"bos": None}, {"bos": -1}])
def test_pack_arguments(kwargs):
    with pytest.raises(ValueError) as info:
        Pack(IterableWrapper([]), **{"max_length": 4, "bos": EOT, **kwargs})
    assert next(iter(kwargs)) in str(info.value)


def test_bos_comes_from_the_encoder_upstream(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert Pack(BpeEncode(ReadText([str(tmp_path / "a.txt")])), 4).bos == EOT


# --- save and restore ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy,remainder,buffer,block_rows", [("best_fit", "drop", 3, 2), ("best_fit", "keep", 5, 1),
                                                                ("greedy", "keep", 1, 3), ("greedy", "drop", 1, 1),
                                                                ("best_fit", "keep", 1, 4)])
def test_resume_pack(policy, remainder, buffer, block_rows):
    rng = np.random.default_rng(1)
    lengths = rng.lognormal(1.5, 1.2, 60).astype(int).tolist()
    items = units_and_items(lengths, (rng.random(60) < 0.2).tolist())[1]
    reference = check_resume(lambda: Pack(IterableWrapper(items), 7, policy, remainder, buffer, block_rows, bos=EOT))
    assert len(reference) > 10


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_pack_from_text_through_batch(tmp_path, shuffle):
    rng = np.random.default_rng(2)
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.txt"))
        (tmp_path / f"{i}.txt").write_text(" ".join(f"w{k}" for k in range(int(rng.integers(5, 400)))))

    def make():
        encoded = BpeEncode(ReadText(paths, chunk_bytes=64), batch_bytes=40)
        packed = Pack(encoded, 9, remainder="keep", buffer=4, block_rows=3)
        return Batch(packed, 3, drop_last=False, shuffle=shuffle, seed=5, shuffle_windows=7)

    assert len(check_resume(make)) > 10


def _pack_config(corpus, remainder: str, shuffle: bool, drop_last: bool) -> dict:
    return {
        "stages": {
            "read": {"type": "read_arrow", "paths": [str(corpus)], "shuffle": shuffle, "seed": 5},
            "encode": {"type": "bpe_encode", "input": "read"},
            "pack": {"type": "pack", "input": "encode", "max_length": 7, "remainder": remainder, "buffer": 5,
                     "block_rows": 2},
            "batch": {"type": "batch", "input": "pack", "batch_size": 2, "shuffle": shuffle, "shuffle_windows": 12,
                      "drop_last": drop_last},
        }
    }


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 3])
def test_every_token_once_over_ranks_and_workers(tmp_path, num_workers, world_size):
    write_arrow_corpus(tmp_path / "corpus", batches_per_file=(3, 2, 4), rows_per_batch=(5, 9, 2))
    config = _pack_config(tmp_path / "corpus", "keep", shuffle=True, drop_last=False)
    tokens, documents = Counter(), 0
    for rank in range(world_size):
        pipe = Pipeline.from_config(config, rank=rank, world_size=world_size, num_workers=num_workers)
        for batch in pipe:  # a row's tokens: its first input, then the targets (IGNORE_INDEX on padding)
            tokens.update(batch["inputs"][:, 0].tolist())
            tokens.update(t for t in batch["targets"].reshape(-1).tolist() if t != IGNORE_INDEX)
        documents += pipe.stages["encode"].stats["documents"]
    plain = Pipeline.from_config(config, output="encode", rank=0, world_size=1)
    expected = Counter(int(t) for item in plain for t in item["ids"])
    eots = tokens.pop(EOT)
    assert eots == documents and expected.pop(EOT) == documents - 1  # every document starts with <|endoftext|>
    assert +tokens == +expected


@pytest.mark.parametrize("num_workers,world_size,shuffle", [(0, 1, True), (2, 2, True), (2, 1, False)])
def test_pack_resume_in_a_new_process_equals_the_uninterrupted_run(
    restorer, tmp_path, num_workers, world_size, shuffle
):
    write_arrow_corpus(tmp_path / "corpus", batches_per_file=(3, 2, 4), rows_per_batch=(5, 9, 2))
    config = _pack_config(tmp_path / "corpus", "drop", shuffle, drop_last=True)
    loader = {"rank": world_size - 1, "world_size": world_size, "num_workers": num_workers}
    pipe = Pipeline.from_config(config, **loader)
    epochs = [[b["inputs"].numpy() for b in pipe] for _ in range(2)]
    first = len(epochs[0])
    assert first > 6
    resume = []
    for k in (3, first - 1, first + 2):
        pipe = Pipeline.from_config(config, **loader)
        head = _take(iter(pipe), min(k, first)) + (_take(iter(pipe), k - first) if k > first else [])
        assert all(np.array_equal(a, b) for a, b in zip(head, epochs[0] + epochs[1]))
        resume.append((json.loads(json.dumps(pipe.state_dict())), (first - k if k < first else 0) + 5))
    rests = _restore_in_new_process(restorer, tmp_path, config, loader, resume)
    for (state, count), rest, k in zip(resume, rests, (3, first - 1, first + 2)):
        expected = (epochs[0][k:] + epochs[1])[:count] if k < first else epochs[1][k - first : k - first + count]
        assert len(rest) == count and all(np.array_equal(a, b) for a, b in zip(rest, expected)), f"stopped after {k}"


def test_configs_check_what_pack_and_batch_take(tmp_path):
    from pipeline.registry import ConfigError

    stages = {"read": {"type": "read_text", "paths": [str(tmp_path / "a.txt")]}}
    with pytest.raises(ConfigError, match="takes tokens, but its input `read` gives documents"):
        Pipeline.from_config({"stages": {**stages, "pack": {"type": "pack", "input": "read", "max_length": 4}}})
    with pytest.raises(ConfigError, match="takes windows or packed, but its input `read` gives documents"):
        Pipeline.from_config({"stages": {**stages, "batch": {"type": "batch", "input": "read", "batch_size": 2}}})


@pytest.mark.parametrize("policy,buffer", [("greedy", 1), ("best_fit", 2), ("best_fit", 6)])
def test_whole_rows_at_once_equal_row_by_row(monkeypatch, policy, buffer):
    rng = np.random.default_rng(3)
    items = units_and_items(rng.lognormal(2.5, 1.2, 80).astype(int).tolist(), (rng.random(80) < 0.1).tolist())[1]
    fast = Pack(IterableWrapper(items), 5, policy, "keep", buffer, block_rows=4, bos=EOT)
    expected = [b.copy() for b in Loader(fast)]
    monkeypatch.setattr(Pack, "_whole_rows", lambda self, out: 0)
    slow = Pack(IterableWrapper(items), 5, policy, "keep", buffer, block_rows=1, bos=EOT)
    assert np.array_equal(np.concatenate(expected), np.concatenate(list(Loader(slow))))
    assert fast.stats == Counter({**slow.stats, "items": fast.stats["items"], "seconds": fast.stats["seconds"]})


def test_embed_refuses_packed_rows_longer_than_its_position_table():
    from pipeline.registry import ConfigError
    from stages.embed import Embed

    def embed(max_length: int) -> Embed:
        rows = Pack(BpeEncode(IterableWrapper([{"text": "A few words."}])), max_length)
        return Embed(Batch(rows, 2), vocab_size=50257, d_model=8, context_length=4, device="cpu")

    with pytest.raises(ConfigError) as info:
        Pipeline(embed(8))
    assert (info.value.stage, info.value.field) == ("embed", "context_length") and "`pack`" in str(info.value)
    assert Pipeline(embed(4)).embedding is not None


# --- documents read through stages.separators.document_ids ----------------------------------------

DOCS = ["<|endoftext|>begins with the separator's text", "", "plain words here", "ends with it<|endoftext|>",
        "a longer one " * 9, "x", "", "<|endoftext|>", "last words"]


def _flat_rows(eot: bool, blocks: bool) -> tuple[list[int], list[int]]:
    """Greedy ``keep`` rows over DOCS (allowed ``<|endoftext|>``): their tokens in order, and where positions are 0."""
    encode = BpeEncode(IterableWrapper([{"text": t} for t in DOCS]), eot=eot, allowed_special="all",
                       batch_bytes=40, blocks=blocks)
    rows = [row for block in Loader(Pack(encode, 9, "greedy", "keep", block_rows=3)) for row in block]
    tokens = [t for row in rows for t, p in zip(*row.tolist()) if p >= 0]
    heads = [i for i, p in enumerate(p for row in rows for p in row[1].tolist() if p >= 0) if p == 0]
    return tokens, heads


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("eot", [True, False])
def test_each_document_starts_with_one_bos_whatever_eot_literal_text_or_blocks(eot, blocks):
    encoding = BpeEncode(IterableWrapper([]), backend="tiktoken").encoding  # the oracle: one document at a time
    units = [[EOT] + encoding.encode(t, allowed_special="all") for t in DOCS]
    tokens, heads = _flat_rows(eot, blocks)
    assert tokens == [t for unit in units for t in unit]
    bos_at = np.cumsum([0] + [len(u) for u in units[:-1]]).tolist()
    assert set(bos_at) <= set(heads)  # each document's bos is at position 0


def test_blocks_give_the_same_rows_as_per_document_items():
    for eot in (True, False):
        assert _flat_rows(eot, blocks=True) == _flat_rows(eot, blocks=False)


def test_a_first_piece_from_inside_a_file_is_no_document_start():
    def starts(offset: int) -> list[int]:
        doc = {"text": "words", "source": "a.txt", "offset": offset, "end": offset + 5}
        return next(iter(Loader(BpeEncode(IterableWrapper([doc])))))["starts"].tolist()

    assert starts(0) == [0] and starts(64) == []  # another worker or rank read the document's start
