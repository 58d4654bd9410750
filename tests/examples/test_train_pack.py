"""``examples/train_gpt.py --pack``: attention stays inside each document; one document's tokens change no other's."""

from __future__ import annotations

import itertools
import runpy

import numpy as np
import pytest
import torch
from torchdata.nodes import IterableWrapper, Loader

from stages.batch import Batch
from stages.embed import InputEmbedding
from stages.pack import Pack
from tests.conftest import ROOT
from tests.examples.test_train import train

EXAMPLE = runpy.run_path(str(ROOT / "examples" / "train_gpt.py"), run_name="train_gpt")
EOT, T = 50256, 24
STARTS = np.array([1])  # each item is one document whose own tokens follow its <|endoftext|> (as bpe_encode gives)


def model_and_tables(positional: str = "learned"):
    torch.manual_seed(0)
    return EXAMPLE["GPT"](32, 2, 2, T, vocab_size=EOT + 1).eval(), InputEmbedding(EOT + 1, 32, T, positional, seed=1)


def packed_row(docs: list[list[int]]) -> dict:
    """One packed batch of one row holding ``docs`` in this order (greedy: arrival order)."""
    items = IterableWrapper([{"ids": np.array([EOT] + d, dtype=np.int32), "starts": STARTS} for d in docs])
    return next(iter(Loader(Batch(Pack(items, T, "greedy", bos=EOT), 1, drop_last=False))))


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_changing_one_document_leaves_the_others_outputs_unchanged(positional):
    model, tables = model_and_tables(positional)
    a, c = [11, 12, 13, 14], [31, 32, 33, 34, 35]
    outputs = {}
    for name, b in (("b", [21, 22, 23]), ("b changed", [901, 902, 903]), ("b longer", [41, 42, 43, 44, 45, 46, 47])):
        batch = packed_row([a, b, c, [1] * (T - len(a) - len(b) - len(c) - 3)])
        with torch.no_grad():
            logits = model(tables(batch["inputs"], batch["position_ids"]), batch["position_ids"])
            plain = model(tables(batch["inputs"]))  # the book's causal attention over the whole row
        start_c = 2 + len(a) + len(b)
        outputs[name] = (logits[0, : len(a) + 1], logits[0, start_c : start_c + len(c) + 1],
                         plain[0, start_c : start_c + 6])
    for name in ("b changed", "b longer"):  # c moves when b grows: its positions restart, so its outputs stay
        torch.testing.assert_close(outputs[name][0], outputs["b"][0])
        torch.testing.assert_close(outputs[name][1], outputs["b"][1])
        assert not torch.allclose(outputs[name][2], outputs["b"][2])  # plain causal attention leaks across documents


def test_with_sliding_window_rows_the_outputs_are_plain_causal_attention():
    model, tables = model_and_tables()
    inputs = torch.randint(0, EOT, (3, T))
    position_ids = torch.arange(T).expand(3, T)  # one sequence per row, as sliding_window's rows are
    with torch.no_grad():
        torch.testing.assert_close(model(tables(inputs, position_ids), position_ids), model(tables(inputs)))


def test_document_mask_agrees_with_cu_seqlens():
    batch = next(iter(Loader(Batch(Pack(IterableWrapper([{"ids": np.full(n, EOT, np.int32), "starts": STARTS}
                                             for n in (5, 9, 30, 2, 7)]),
                                        T, "greedy", "keep", bos=EOT), 2, drop_last=False))))
    mask = EXAMPLE["document_mask"](batch["position_ids"])[:, 0].reshape(-1, T, T)
    cu = batch["cu_seqlens"].tolist()
    allowed = torch.zeros(2 * T, 2 * T, dtype=torch.bool)  # flash-attention varlen: causal inside each sequence
    for start, end in itertools.pairwise(cu):
        allowed[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert torch.equal(mask[0], allowed[:T, :T]) and torch.equal(mask[1], allowed[T:, T:])


def test_train_gpt_pack_logs_tokens_used_and_cropped(verdict_path):
    out = train(verdict_path, "--steps", "4", "--pack", "--remainder", "keep", "--piece-bytes", "512")
    assert "pack tokens_used=" in out and "tokens_cropped=0 " in out
    out = train(verdict_path, "--steps", "4", "--pack", "--piece-bytes", "256")
    cropped = int(out.split("tokens_cropped=")[1].split()[0])
    assert cropped > 0  # one book in pieces: each piece is cropped to a row
