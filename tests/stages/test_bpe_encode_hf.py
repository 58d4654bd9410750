"""``bpe_encode`` with a local Hugging Face ``tokenizer.json``: the ``tokenizers`` library is the oracle."""

from __future__ import annotations

import json

import pytest
from torchdata.nodes import IterableWrapper, Loader

from stages.bpe_encode import BpeEncode
from tests.conftest import BACKENDS, ROOT

tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.skipif("gigatoken" not in BACKENDS, reason="a tokenizer_file is encoded by gigatoken")
SAMPLE = sorted((ROOT / "data" / "sample").glob("*.txt"))
HOSTILE = [
    "a\r\nb  c\u00a0d",
    "😀 emoji 中文\t\ttabs",
    "",
    "   ",
    "naïve e\u0301 ﬁ",
    "x <|endoftext|> y",
    "<|endoftext|>",
]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    """A byte-level BPE (GPT-2's recipe, 2,000 tokens) trained here on the project's sample text."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(p) for p in SAMPLE], trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def oracle(path: str):
    tok = tokenizers.Tokenizer.from_file(path)
    tok.encode_special_tokens = True  # special-token text in a document is plain text, as in bpe_encode
    return tok


def test_sample_documents_encode_like_tokenizers(tokenizer_file):
    texts = [p.read_text(encoding="utf-8") for p in SAMPLE] + HOSTILE
    assert any("<|endoftext|>" in t for t in texts[: len(SAMPLE)])  # the sample holds the literal text
    node = BpeEncode(
        IterableWrapper([{"text": t, "source": "s", "record": i} for i, t in enumerate(texts)]),
        tokenizer_file=tokenizer_file,
        batch_bytes=4096,
    )
    out = [item["ids"].tolist() for item in Loader(node)]
    tok = oracle(tokenizer_file)
    eot = tok.token_to_id("<|endoftext|>")
    assert node.eot_id == eot and node.vocab_size == tok.get_vocab_size()
    assert out == [([eot] if i else []) + tok.encode(t, add_special_tokens=False).ids for i, t in enumerate(texts)]
    assert max(len(ids) for ids in out) > 1000 and sum(ids[1:].count(eot) for ids in out) == 0  # no special inside
    assert node.decode(out[1]) == "<|endoftext|>" + texts[1]


def test_the_separator_comes_from_the_files_special_tokens(tokenizer_file, tmp_path):
    config = json.loads(open(tokenizer_file, encoding="utf-8").read())
    for token in config["added_tokens"]:
        token["content"] = "</s>"
    (tmp_path / "eos.json").write_text(json.dumps(config), encoding="utf-8")
    assert BpeEncode(IterableWrapper([]), tokenizer_file=str(tmp_path / "eos.json")).eot_id == 0
    for token in config["added_tokens"]:
        token["content"] = "<pad>"
    (tmp_path / "pad.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=r"no document separator among its special tokens \['<pad>'\]"):
        BpeEncode(IterableWrapper([]), tokenizer_file=str(tmp_path / "pad.json"))


def test_a_tokenizer_file_refuses_what_it_cannot_honour(tokenizer_file, tmp_path):
    for kwargs, message in (
        ({"encoding": "gpt2"}, "not both"),
        ({"allowed_special": "all"}, "allowed_special"),
        ({"backend": "tiktoken"}, "gigatoken"),
        ({"backend": "fast"}, "auto, tiktoken, gigatoken"),
    ):
        with pytest.raises(ValueError, match=message):
            BpeEncode(IterableWrapper([]), tokenizer_file=tokenizer_file, **kwargs)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        BpeEncode(IterableWrapper([]), tokenizer_file=str(tmp_path / "nowhere.json"))
