"""``word_encode``: the book's word-level tokenizer (``SimpleTokenizerV2``), its vocabulary built from the corpus."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from pipeline.registry import register
from pipeline.schema import FieldError, check_field
from pipeline.stage import RunContext, Stage
from stages.separators import Separators, document_text, mix_tokens

SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
SPACE_BEFORE_PUNCTUATION = re.compile(r'\s+([,.?!"()\'])')
EOT, UNK = "<|endoftext|>", "<|unk|>"


def split_words(text: str) -> list[str]:
    """The book's pre-tokenization: split on punctuation, ``--`` and whitespace, strip, drop the empty."""
    return [word for word in (piece.strip() for piece in SPLIT.split(text)) if word]


class WordTokenizer:
    """The book's ``SimpleTokenizerV2``: one id per word, ``<|unk|>``'s id for a word not in the vocabulary.

    ``decode`` joins the words with spaces and removes the space before punctuation, so it gives back
    the text up to spacing (``"It's"`` comes back as ``"It' s"``, as in the book). The text
    ``<|endoftext|>`` is a word of the vocabulary, so it encodes to that token's id.

    Args:
        tokens: the vocabulary in id order; it must hold ``<|endoftext|>`` and ``<|unk|>``, once each.
    """

    def __init__(self, tokens: list[str]):
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise TypeError("tokens must be a list of strings")
        self.tokens = list(tokens)
        self.vocab = {token: i for i, token in enumerate(tokens)}  # the book's str_to_int
        if len(self.vocab) != len(tokens):
            raise ValueError(f"tokens: {len(tokens) - len(self.vocab)} duplicate(s) in the vocabulary")
        missing = [t for t in (EOT, UNK) if t not in self.vocab]
        if missing:
            raise ValueError(f"tokens: the vocabulary lacks the special token(s) {missing}")
        self.int_to_str = dict(enumerate(tokens))
        self.eot_id, self.unk_id = self.vocab[EOT], self.vocab[UNK]

    @classmethod
    def from_words(cls, words: Iterable[str]) -> WordTokenizer:
        """The book's vocabulary: the distinct words sorted, then ``<|endoftext|>`` and ``<|unk|>``."""
        return cls(sorted(set(words) - {EOT, UNK}) + [EOT, UNK])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(word, self.unk_id) for word in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        text = " ".join(self.int_to_str[int(i)] for i in ids)
        return SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON, ``{"tokens": [...]}`` in id order (written whole, then renamed)."""
        partial = f"{os.fspath(path)}.{os.getpid()}.partial"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump({"tokens": self.tokens}, f, ensure_ascii=False)
        os.replace(partial, path)  # several ranks may save the same vocabulary at once

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)}: not a JSON word vocabulary ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise ValueError(f'{os.fspath(path)}: expected a JSON object {{"tokens": [...]}}')
        try:
            return cls(data["tokens"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from None


@register("word_encode")
class WordEncode(Stage[dict]):
    """Encodes documents to word ids with the book's ``SimpleTokenizerV2`` (a ``WordTokenizer``).

    The vocabulary is loaded from the file ``vocab`` when it exists. Otherwise it is built here, in
    the constructor, by a first pass over the source that keeps only the set of distinct words, and
    saved to ``vocab`` when given; the source then starts afresh for the real pass (so it must be able
    to: a reader or a list, not a one-shot generator). For that pass every reader upstream reads all
    of its shard units, whatever its rank, so each rank that builds gets the same vocabulary; DataLoader
    workers start later and inherit it. With many ranks or a large corpus, build the file once and
    give it to every run: loading it reads nothing.

    Items out are like ``bpe_encode``'s: ``ids`` (numpy ``int32``) and the document's other fields
    but ``text``. With ``eot``, ``<|endoftext|>``'s id starts every item after the first that does not
    continue the previous one (a piece of the same file starting at its ``end``). Words not in the
    vocabulary become ``<|unk|>`` and are counted in ``stats``.

    Args:
        vocab: a JSON vocabulary file (``WordTokenizer.save``) to load, or to write after building.
        build: build the vocabulary when ``vocab`` is not an existing file (False: that is an error).
        eot: put ``<|endoftext|>`` between documents.
    """

    consumes = "documents"
    produces = "tokens"
    in_workers = True  # worth running in DataLoader worker processes (Python-level work)

    def __init__(self, source, vocab: str | None = None, build: bool = True, eot: bool = True):
        super().__init__()
        if vocab is not None and not isinstance(vocab, (str, os.PathLike)):
            raise FieldError("vocab", f"vocab must be a file path or None, got {vocab!r}")
        check_field("build", bool, build)
        check_field("eot", bool, eot)
        self.source = source
        self.vocab_path = None if vocab is None else os.fspath(vocab)
        if self.vocab_path is not None and os.path.isfile(self.vocab_path):
            self.tokenizer = WordTokenizer.load(self.vocab_path)
        elif not build:
            raise FieldError("vocab", f"vocab: no file {self.vocab_path!r} to load, and build is false")
        else:
            folder = os.path.dirname(os.path.abspath(self.vocab_path)) if self.vocab_path is not None else "."
            if not os.path.isdir(folder):
                raise FieldError("vocab", f"vocab: cannot write {self.vocab_path!r}, no folder {folder!r}")
            self.tokenizer = WordTokenizer.from_words(self._corpus_words())
            if self.vocab_path is not None:
                self.tokenizer.save(self.vocab_path)
        self.vocab_size = len(self.tokenizer)  # rows the embed stage's token table needs
        self.eot_id = self.tokenizer.eot_id
        self._separators = Separators(self.eot_id, eot)

    def _corpus_words(self) -> set[str]:
        """The distinct words of the whole corpus, in one pass run as rank 0 of 1, epoch 0."""
        words: set[str] = set()
        self.set_context(RunContext(rank=0, world_size=1, epoch=0))
        try:
            self.source.reset()
            for doc in self.source:
                words.update(split_words(document_text(self, doc)))
        finally:
            self.set_context(RunContext(epoch=0))  # the real pass is epoch 0 (shuffled orders depend on it)
        return words

    def metrics(self) -> dict[str, float]:
        return mix_tokens(self.stats)  # tokens per input of a mix upstream

    def decode(self, ids) -> str:
        """The text of token ids (for showing windows)."""
        return self.tokenizer.decode(int(i) for i in ids)

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        if initial_state is None:
            self.source.reset()
            self._separators.previous = None
            return
        if initial_state["vocab_size"] != self.vocab_size:
            raise ValueError(
                f"vocab_size: the state was saved with a vocabulary of {initial_state['vocab_size']} tokens, "
                f"this stage has {self.vocab_size}"
            )
        self.source.reset(initial_state["source"])
        self._separators.previous = initial_state["previous"]

    def get_state(self) -> dict[str, Any]:
        previous = self._separators.previous
        return {"source": self.source.state_dict(), "previous": previous, "vocab_size": self.vocab_size}

    def next(self) -> dict:
        doc = next(self.source)
        ids = np.array(self.tokenizer.encode(document_text(self, doc)), dtype=np.int32)
        unknown = int(np.count_nonzero(ids == self.tokenizer.unk_id))
        if unknown:
            self.stats["unknown_words"] += unknown
        return self._separators.item(doc, ids, self.stats)
