"""The book's ``create_dataloader_v1``, on the pipeline's stages."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torchdata.nodes import IterableWrapper

from pipeline.graph import Pipeline
from stages.batch import Batch
from stages.bpe_encode import BpeEncode
from stages.sliding_window import SlidingWindow


class BookLoader:
    """Iterates ``(inputs, targets)`` pairs like the book's ``DataLoader``; ``pipeline`` is the graph."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.pipeline:
            yield batch["inputs"], batch["targets"]


def create_dataloader_v1(
    txt: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    seed: int = 0,
) -> BookLoader:
    """A drop-in for the book's function: GPT-2 windows of ``txt`` in batches of ``(inputs, targets)``.

    With ``shuffle=False`` the batches equal the book's exactly. With ``shuffle=True`` every window of
    the text is permuted by ``seed`` (the book draws from torch's global generator instead).
    ``num_workers`` is accepted for compatibility; the text is already in memory, so it runs in-process.
    """
    if not isinstance(txt, str):
        raise TypeError(f"txt must be a str, got {type(txt).__name__}")
    document = IterableWrapper([{"text": txt, "source": "<txt>"}])
    # The book encodes with allowed_special={"<|endoftext|>"}; so does the drop-in.
    encoded = BpeEncode(document, encoding="gpt2", allowed_special=["<|endoftext|>"])
    windows = SlidingWindow(encoded, max_length=max_length, stride=stride)
    # Every window of the text in one shuffled group (at most one window per byte).
    batches = Batch(
        windows, batch_size, drop_last=drop_last, shuffle=shuffle, seed=seed, shuffle_windows=max(1, len(txt.encode()))
    )
    return BookLoader(Pipeline(batches))
