"""The book's own package (``llms-from-scratch``, installed with --no-deps) on the drop-in loader.

Its chapter 2 and 5 tests run with ``create_dataloader_v1`` replaced by ours, offline: the text is
the shipped verdict file, and tiktoken's GPT-2 files come from the packaged vocabulary.
"""

from __future__ import annotations

import shutil
import urllib.request

import pytest
import tiktoken
import torch

import pipeline
from stages.encoding import load_encoding
from tests.book import book_dataloader_v1

from llms_from_scratch import ch04, ch05  # `make test` installs llms-from-scratch with --no-deps
from llms_from_scratch.tests import test_ch02, test_ch05

TINY_GPT = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0,
            "qkv_bias": False}


@pytest.fixture
def offline(monkeypatch, tmp_path, verdict_path):
    """No network; the verdict in the working folder; the drop-in in the book's tests."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"network used: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    monkeypatch.setattr(tiktoken, "get_encoding", load_encoding)
    for module in (test_ch02, test_ch05):
        monkeypatch.setattr(module, "create_dataloader_v1", pipeline.create_dataloader_v1)
    shutil.copy(verdict_path, tmp_path / "the-verdict.txt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_books_chapter_2_test(offline):
    test_ch02.test_dataloader(offline, "the-verdict.txt")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a 124M-parameter GPT trained and sampled on CPU: minutes on 2 shared cores
@pytest.mark.parametrize("model_class", ["GPTModel", "GPTModelFast"])
def test_the_books_chapter_5_test(offline, model_class):
    test_ch05.test_train_simple(offline, getattr(ch04, model_class))


def _train(make_loader, text):
    torch.manual_seed(123)
    model = ch04.GPTModel(TINY_GPT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    split = int(0.9 * len(text))
    train = make_loader(text[:split], batch_size=2, max_length=32, stride=32, shuffle=True, drop_last=True)
    val = make_loader(text[split:], batch_size=2, max_length=32, stride=32, shuffle=False, drop_last=False)
    losses = ch05.train_model_simple(model, train, val, optimizer, "cpu", num_epochs=1, eval_freq=20, eval_iter=5,
                                     start_context="Every effort moves you", tokenizer=load_encoding("gpt2"))
    return losses, ch05.calc_loss_loader(val, model, "cpu")


def test_chapter_5_training_loop_equals_the_books(verdict_text):
    assert _train(pipeline.create_dataloader_v1, verdict_text) == _train(book_dataloader_v1, verdict_text)
