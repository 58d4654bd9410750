"""The book's chapter 2 results, exactly: token counts, the first batch, embeddings, the drop-in loader."""

from __future__ import annotations

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline
from pipeline import Pipeline
from stages.embed import InputEmbedding
from stages.encoding import load_encoding
from tests.book import book_dataloader_v1

FIRST_INPUTS = [[40, 367, 2885, 1464], [1807, 3619, 402, 271], [10899, 2138, 257, 7026]]


def test_verdict_encodes_to_5145_tokens(verdict_text):
    assert len(load_encoding("gpt2").encode(verdict_text)) == 5145


def test_verdict_stream_has_5145_tokens(in_root, backend):
    with open("examples/verdict.yaml") as f:
        config = yaml.safe_load(f)
    config["stages"]["encode"]["backend"] = backend
    pipe = Pipeline.from_config(config, output="encode")
    ids = torch.cat([torch.from_numpy(doc["ids"]) for doc in pipe])
    assert len(ids) == 5145
    assert ids[:4].tolist() == FIRST_INPUTS[0]


def _first_batch(config):
    return next(iter(Pipeline.from_config(config)))


def test_verdict_first_batch_from_file_and_dict(in_root):
    with open("examples/verdict.yaml") as f:
        as_dict = yaml.safe_load(f)
    for config in ("examples/verdict.yaml", as_dict):
        batch = _first_batch(config)
        assert batch["inputs"].dtype == torch.int64
        assert batch["inputs"].shape == (8, 4)
        assert batch["inputs"][:3].tolist() == FIRST_INPUTS
        # targets are the inputs shifted by one token (stride == max_length: the next window's first token)
        assert batch["targets"][:, :3].tolist() == batch["inputs"][:, 1:].tolist()
        assert batch["targets"][:2, 3].tolist() == [1807, 10899]
        assert batch["embeddings"].shape == (8, 4, 256)


def test_embeddings_are_token_plus_position(in_root):
    pipe = Pipeline.from_config("examples/verdict.yaml")
    batch = next(iter(pipe))
    emb = pipe.embedding
    expected = emb.tok_emb(batch["inputs"]) + emb.pos_emb(torch.arange(4))
    torch.testing.assert_close(batch["embeddings"], expected, rtol=0, atol=0)
    # the same token id at two positions gets different input embeddings
    ids = batch["inputs"]
    b0, p0, b1, p1 = _same_id_at_two_positions(ids)
    assert torch.equal(emb.tok_emb.weight[ids[b0, p0]], emb.tok_emb.weight[ids[b1, p1]])
    assert not torch.allclose(batch["embeddings"][b0, p0], batch["embeddings"][b1, p1])


def _same_id_at_two_positions(ids):
    seen = {}
    for b in range(ids.shape[0]):
        for p in range(ids.shape[1]):
            key = int(ids[b, p])
            if key in seen and seen[key][1] != p:
                return (*seen[key], b, p)
            seen.setdefault(key, (b, p))
    raise AssertionError("the first batch has no token id at two different positions")


def test_gradients_reach_both_tables(in_root):
    pipe = Pipeline.from_config("examples/verdict.yaml")
    batch = next(iter(pipe))
    batch["embeddings"].pow(2).mean().backward()
    emb = pipe.embedding
    assert emb.tok_emb.weight.grad is not None and emb.tok_emb.weight.grad.abs().sum() > 0
    assert emb.pos_emb.weight.grad is not None and emb.pos_emb.weight.grad.abs().sum() > 0
    # only the rows of the ids in the batch receive gradient
    touched = emb.tok_emb.weight.grad.abs().sum(dim=1).nonzero().flatten()
    assert set(touched.tolist()) == set(batch["inputs"].flatten().tolist())


def test_seed_123_gives_the_books_tables():
    torch.manual_seed(123)
    token_embedding_layer = torch.nn.Embedding(50257, 256)
    pos_embedding_layer = torch.nn.Embedding(4, 256)
    ours = InputEmbedding(50257, 256, 4, "learned", seed=123)
    assert torch.equal(ours.tok_emb.weight, token_embedding_layer.weight)
    assert torch.equal(ours.pos_emb.weight, pos_embedding_layer.weight)


def _assert_same_batches(ours, book):
    ours, book = list(ours), list(book)
    assert len(ours) == len(book)
    for (x, y), (bx, by) in zip(ours, book):
        assert torch.equal(x, bx) and torch.equal(y, by)


def test_drop_in_equals_the_book_on_verdict(verdict_text):
    for batch_size, max_length, stride in [(8, 4, 4), (4, 256, 128), (2, 16, 1), (3, 8, 20), (5, 7, 3)]:
        for drop_last in (True, False):
            kwargs = dict(
                batch_size=batch_size, max_length=max_length, stride=stride, shuffle=False, drop_last=drop_last
            )
            _assert_same_batches(
                pipeline.create_dataloader_v1(verdict_text, **kwargs), book_dataloader_v1(verdict_text, **kwargs)
            )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(st.characters(codec="utf-8"), max_size=400)
    | st.lists(
        st.sampled_from(["the", " cat", " sat", "\n", "  ", ".", "<|endoftext|>", "é", "42", "'s"]), max_size=120
    ).map("".join),
    max_length=st.integers(1, 12),
    stride=st.integers(1, 15),
    batch_size=st.integers(1, 6),
    drop_last=st.booleans(),
)
def test_drop_in_equals_the_book_property(text, max_length, stride, batch_size, drop_last):
    kwargs = dict(batch_size=batch_size, max_length=max_length, stride=stride, shuffle=False, drop_last=drop_last)
    _assert_same_batches(pipeline.create_dataloader_v1(text, **kwargs), book_dataloader_v1(text, **kwargs))


def test_drop_in_shuffle_is_a_seeded_permutation(verdict_text):
    kwargs = dict(batch_size=4, max_length=8, stride=8, drop_last=False)
    plain = {
        tuple(row)
        for x, _ in pipeline.create_dataloader_v1(verdict_text, shuffle=False, **kwargs)
        for row in x.tolist()
    }
    first = [x for x, _ in pipeline.create_dataloader_v1(verdict_text, shuffle=True, seed=1, **kwargs)]
    again = [x for x, _ in pipeline.create_dataloader_v1(verdict_text, shuffle=True, seed=1, **kwargs)]
    other = [x for x, _ in pipeline.create_dataloader_v1(verdict_text, shuffle=True, seed=2, **kwargs)]
    shuffled = [tuple(row) for x in first for row in x.tolist()]
    assert sorted(shuffled) == sorted(plain) and len(shuffled) == len(plain)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_drop_in_is_a_dataloader_like_the_books(verdict_text):
    kwargs = dict(batch_size=3, max_length=16, stride=8, drop_last=False)
    ours, book = pipeline.create_dataloader_v1(verdict_text, **kwargs), book_dataloader_v1(verdict_text, **kwargs)
    assert isinstance(ours, torch.utils.data.DataLoader)
    assert len(ours) == len(book) and len(ours.dataset) == len(book.dataset) and ours.batch_size == 3
    for i in (0, 7, -1):
        assert all(torch.equal(a, b) for a, b in zip(ours.dataset[i], book.dataset[i]))
    one = torch.utils.data.DataLoader(torch.utils.data.Subset(ours.dataset, range(1)), batch_size=1)
    assert [x.tolist() for x, _ in one] == [[book.dataset[0][0].tolist()]]


def test_drop_in_windows_are_views_of_one_token_array(verdict_text):
    dataset = pipeline.create_dataloader_v1(verdict_text, max_length=256, stride=1).dataset
    storage = dataset.ids.untyped_storage().data_ptr()
    assert len(dataset) == 5145 - 256  # every window, each a view: memory O(tokens)
    assert all(dataset[i][j].untyped_storage().data_ptr() == storage for i in (0, 100, -1) for j in (0, 1))


def test_drop_in_shuffles_as_the_book_under_the_same_global_seed(verdict_text):
    for batch_size, max_length, stride, drop_last in [(8, 4, 4, True), (4, 16, 7, False), (1, 256, 256, True)]:
        kwargs = dict(batch_size=batch_size, max_length=max_length, stride=stride, shuffle=True, drop_last=drop_last)
        ours, book = pipeline.create_dataloader_v1(verdict_text, **kwargs), book_dataloader_v1(verdict_text, **kwargs)
        for epoch_seed in (123, 7):
            torch.manual_seed(epoch_seed)
            ours_batches = list(ours)
            torch.manual_seed(epoch_seed)
            _assert_same_batches(ours_batches, book)
