"""``word_encode``: the book's ``SimpleTokenizerV2`` on the pipeline; one vocabulary for files, ranks and workers."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torchdata.nodes import IterableWrapper, Loader

from pipeline import ConfigError, Pipeline, StageError
from stages.read_text import ReadText
from stages.word_encode import WordEncode, WordTokenizer
from tests.resume import check_resume

# --- the book's code, written plainly: the oracle -----------------------------------------------


def book_vocab(raw_text):
    preprocessed = re.split(r'([,.:;?_!"()\']|--|\s)', raw_text)
    preprocessed = [item.strip() for item in preprocessed if item.strip()]
    all_tokens = sorted(list(set(preprocessed)))
    all_tokens.extend(["<|endoftext|>", "<|unk|>"])
    return {token: integer for integer, token in enumerate(all_tokens)}


class SimpleTokenizerV2:
    def __init__(self, vocab):
        self.str_to_int = vocab
        self.int_to_str = {i: s for s, i in vocab.items()}

    def encode(self, text):
        preprocessed = re.split(r'([,.:;?_!"()\']|--|\s)', text)
        preprocessed = [item.strip() for item in preprocessed if item.strip()]
        preprocessed = [item if item in self.str_to_int else "<|unk|>" for item in preprocessed]
        ids = [self.str_to_int[s] for s in preprocessed]
        return ids

    def decode(self, ids):
        text = " ".join([self.int_to_str[i] for i in ids])
        text = re.sub(r'\s+([,.?!"()\'])', r"\1", text)
        return text


EOT_ID = 1130  # after the verdict's 1,130 words
PASSAGE = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'


@pytest.fixture
def book(verdict_text) -> SimpleTokenizerV2:
    return SimpleTokenizerV2(book_vocab(verdict_text))


def flat(items) -> list[int]:
    return [int(t) for item in items for t in item["ids"]]


# --- the tokenizer ------------------------------------------------------------------------------


def test_the_verdict_has_1130_words_plus_two_specials(verdict_text, verdict_path, book):
    assert len(book.str_to_int) == 1132
    stage = WordEncode(ReadText([str(verdict_path)]))
    assert stage.vocab_size == 1132
    assert stage.tokenizer.vocab == book.str_to_int
    assert stage.tokenizer.tokens[-2:] == ["<|endoftext|>", "<|unk|>"] and stage.eot_id == EOT_ID


def test_an_unknown_word_is_unk(verdict_path, book):
    tokenizer = WordEncode(ReadText([str(verdict_path)])).tokenizer
    text = "Hello, do you like tea?"
    assert "Hello" not in book.str_to_int
    assert tokenizer.encode(text) == book.encode(text)
    assert tokenizer.encode(text)[0] == tokenizer.unk_id == 1131
    assert tokenizer.decode(tokenizer.encode(text)) == "<|unk|>, do you like tea?" == book.decode(book.encode(text))


def test_the_books_two_texts_joined_by_endoftext(verdict_text, book):
    tokenizer = WordTokenizer(list(book.str_to_int))
    text = " <|endoftext|> ".join(("Hello, do you like tea?", "In the sunlit terraces of the palace."))
    assert tokenizer.encode(text) == book.encode(text)
    assert EOT_ID in tokenizer.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == book.decode(book.encode(text))
    decoded = "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
    assert tokenizer.decode(tokenizer.encode(text)) == decoded


def test_decode_of_encode_on_a_passage_of_the_verdict(verdict_text, book):
    assert PASSAGE in verdict_text
    tokenizer = WordTokenizer(list(book.str_to_int))
    ids = tokenizer.encode(PASSAGE)
    assert ids == book.encode(PASSAGE) and tokenizer.unk_id not in ids
    decoded = '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    assert tokenizer.decode(ids) == book.decode(ids) == decoded


def test_save_and_load(tmp_path, book):
    tokenizer = WordTokenizer(list(book.str_to_int))
    path = tmp_path / "vocab.json"
    tokenizer.save(path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"tokens": list(book.str_to_int)}
    assert WordTokenizer.load(path).vocab == book.str_to_int
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]


BAD_FILES = ["not json", '["a"]', '{"tokens": ["a", "<|unk|>"]}', '{"tokens": ["a", "a", "<|endoftext|>", "<|unk|>"]}']


@pytest.mark.parametrize("content", BAD_FILES)
def test_load_a_bad_file_names_it(tmp_path, content):
    path = tmp_path / "vocab.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json"):
        WordTokenizer.load(path)


# --- the stage ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 300])
def test_the_stream_of_the_verdict_is_the_books_encode(verdict_text, verdict_path, book, chunk_bytes):
    items = list(Loader(WordEncode(ReadText([str(verdict_path)], chunk_bytes=chunk_bytes))))
    pieces = list(Loader(ReadText([str(verdict_path)], chunk_bytes=chunk_bytes)))
    assert len(items) == len(pieces) and len(pieces) == (1 if chunk_bytes > len(verdict_text) else len(pieces)) > 0
    assert chunk_bytes > len(verdict_text) or len(pieces) > 50  # one file in pieces: no <|endoftext|> between them
    assert flat(items) == book.encode(verdict_text)
    assert all(item["ids"].dtype == np.int32 and "text" not in item for item in items)


def paragraphs(text: str) -> list[dict]:
    docs = [{"text": t, "source": "verdict", "record": i} for i, t in enumerate(text.split("\n\n")[:40])]
    docs.insert(3, {"text": "", "source": "verdict", "record": "empty"})
    return docs


@pytest.mark.parametrize("eot", [True, False])
def test_documents_are_joined_by_endoftext(verdict_text, eot):
    docs = paragraphs(verdict_text)
    texts = [d["text"] for d in docs]
    book = SimpleTokenizerV2(book_vocab("\n".join(texts)))
    stage = WordEncode(IterableWrapper(docs), eot=eot)
    assert stage.tokenizer.vocab == book.str_to_int
    items = list(Loader(stage))
    assert len(items) == len(docs) and [item["record"] for item in items] == [d["record"] for d in docs]
    assert flat(items) == book.encode((" <|endoftext|> " if eot else " ").join(texts))
    assert stage.stats["documents"] == len(docs)


def test_unknown_words_are_counted(tmp_path):
    path = tmp_path / "vocab.json"
    WordTokenizer.from_words(["you", "do", "tea", "like"]).save(path)  # do like tea you <|endoftext|> <|unk|>
    stage = WordEncode(IterableWrapper([{"text": "Hello, do you like tea?", "source": "s"}]), vocab=str(path))
    assert flat(Loader(stage)) == [5, 5, 0, 3, 1, 2, 5]
    assert stage.stats["unknown words"] == 3


def test_a_vocab_file_is_written_then_loaded_without_reading(tmp_path, verdict_path, book):
    path = tmp_path / "vocab.json"
    WordEncode(ReadText([str(verdict_path)]), vocab=str(path))
    assert WordTokenizer.load(path).vocab == book.str_to_int
    other = tmp_path / "other.txt"
    other.write_text("Hello, do you like tea?", encoding="utf-8")
    second = WordEncode(ReadText([str(other)]), vocab=str(path), build=False)  # the file, not this corpus
    assert second.tokenizer.vocab == book.str_to_int
    assert flat(Loader(second)) == book.encode("Hello, do you like tea?")


def test_a_document_without_text_names_the_stage():
    with pytest.raises(StageError, match="word_encode.*f.txt"):
        WordEncode(IterableWrapper([{"text": "fine", "source": "ok"}, {"source": "f.txt", "record": 7}]))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"vocab": 5}, "vocab"),
        ({"build": "yes"}, "build"),
        ({"eot": None}, "eot"),
        ({"vocab": "MISSING", "build": False}, "vocab"),
        ({"vocab": "no/such/folder/vocab.json"}, "vocab"),
    ],
)
def test_bad_arguments_name_the_field(tmp_path, monkeypatch, kwargs, field):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=field):
        WordEncode(IterableWrapper([{"text": "a b", "source": "s"}]), **kwargs)


# --- the same ids across shards, ranks, workers and runs ----------------------------------------


def pieces_text(raw: bytes, item: dict) -> str:
    return raw[item["offset"] : item["end"]].decode("utf-8")


def assert_ids_are_their_pieces(items, raw, book):
    """Each item holds its own piece of the file, under the book's vocabulary (an <|endoftext|> may lead)."""
    assert items
    for item in items:
        expected = book.encode(pieces_text(raw, item))
        assert item["ids"].tolist() in (expected, [EOT_ID] + expected)


def test_two_ranks_on_different_shards_share_the_vocabulary(tmp_path, verdict_path, book):
    raw = verdict_path.read_bytes()
    path = str(tmp_path / "vocab.json")
    readers = [ReadText([str(verdict_path)], shard_bytes=2000, rank=rank, world_size=2) for rank in (0, 1)]
    nodes = [WordEncode(reader, vocab=path) for reader in readers]  # rank 0 builds and saves, rank 1 loads
    items = [list(Loader(node)) for node in nodes]
    offsets = [{item["offset"] for item in rank_items} for rank_items in items]
    assert offsets[0] and offsets[1] and not offsets[0] & offsets[1]  # different shards
    assert sum(len(pieces_text(raw, item).encode()) for rank_items in items for item in rank_items) == len(raw)
    for node, rank_items in zip(nodes, items):
        assert node.tokenizer.vocab == book.str_to_int
        assert_ids_are_their_pieces(rank_items, raw, book)
        for item in rank_items:
            ids = [i for i in item["ids"].tolist() if i != EOT_ID]
            assert node.tokenizer.decode(ids) == book.decode(book.encode(pieces_text(raw, item)))


def test_a_rank_that_builds_reads_the_whole_corpus_and_keeps_its_shards(verdict_path, book):
    reader = ReadText([str(verdict_path)], shard_bytes=2000, rank=1, world_size=2, shuffle=True, seed=3)
    alone = list(Loader(ReadText([str(verdict_path)], shard_bytes=2000, rank=1, world_size=2, shuffle=True, seed=3)))
    node = WordEncode(reader)
    assert node.tokenizer.vocab == book.str_to_int  # not only rank 1's words
    assert (reader.rank, reader.world_size) == (1, 2)
    items = list(Loader(node))
    assert [(i["offset"], i["end"]) for i in items] == [(d["offset"], d["end"]) for d in alone]  # epoch 0's order


def test_workers_use_the_vocabulary_of_the_main_process(tmp_path, verdict_path, book):
    raw = verdict_path.read_bytes()
    path = tmp_path / "vocab.json"
    pipe = Pipeline(WordEncode(ReadText([str(verdict_path)], shard_bytes=2000), vocab=str(path)), num_workers=2)
    items = list(pipe)
    assert sum(len(pieces_text(raw, item).encode()) for item in items) == len(raw)
    assert_ids_are_their_pieces(items, raw, WordTokenizer.load(path))
    assert_ids_are_their_pieces(items, raw, book)


def test_a_config_with_windows_batches_and_embed(tmp_path, verdict_path, verdict_text, book):
    vocab = tmp_path / "vocab.json"
    config = {
        "stages": {
            "read": {"type": "read_text", "paths": [str(verdict_path)]},
            "encode": {"type": "word_encode", "input": "read", "vocab": str(vocab)},
            "window": {"type": "sliding_window", "input": "encode", "max_length": 4, "stride": 4},
            "batch": {"type": "batch", "input": "window", "batch_size": 8},
            "embed": {"type": "embed", "input": "batch", "vocab_size": 1132, "d_model": 16, "context_length": 4,
                      "device": "cpu", "seed": 1},
        }
    }
    ids = book.encode(verdict_text)
    for run in range(2):  # the first run builds the file, the second loads it
        pipe = Pipeline.from_config(config)
        assert pipe.stages["encode"].vocab_size == 1132 and vocab.exists()
        batches = list(pipe)
        assert len(batches) == (len(ids) - 1) // 4 // 8
        first = batches[0]
        assert first["inputs"].tolist() == [ids[i : i + 4] for i in range(0, 32, 4)]
        assert first["targets"].tolist() == [ids[i + 1 : i + 5] for i in range(0, 32, 4)]
        assert first["embeddings"].shape == (8, 4, 16)
        torch.testing.assert_close(first["embeddings"], pipe.embedding(first["inputs"]), rtol=0, atol=0)
        assert flat(Pipeline.from_config(config, output="encode")) == ids


def test_a_config_with_a_missing_vocab_and_no_build(tmp_path, verdict_path):
    config = {
        "stages": {
            "read": {"type": "read_text", "paths": [str(verdict_path)]},
            "encode": {"type": "word_encode", "input": "read", "vocab": str(tmp_path / "none.json"), "build": False},
        }
    }
    with pytest.raises(ConfigError, match="encode.*vocab"):
        Pipeline.from_config(config)


def test_resume(tmp_path, verdict_path):
    vocab = str(tmp_path / "vocab.json")
    reference = check_resume(
        lambda: WordEncode(ReadText([str(verdict_path)], chunk_bytes=500), vocab=vocab), stop_after=[0, 1, 7, 20]
    )
    assert len(reference) > 30


def test_resume_with_another_vocabulary_names_the_field(tmp_path, verdict_path):
    node = WordEncode(ReadText([str(verdict_path)], chunk_bytes=500))
    loader = Loader(node)
    next(iter(loader))
    state = loader.state_dict()
    small = tmp_path / "small.json"
    WordTokenizer.from_words(["a"]).save(small)
    other = Loader(WordEncode(ReadText([str(verdict_path)], chunk_bytes=500), vocab=str(small)))
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="vocab_size"):
        next(iter(other))
