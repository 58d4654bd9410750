"""The book's ``create_dataloader_v1``: a real ``DataLoader`` over the book's windows, as views."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.nodes import IterableWrapper

from pipeline.graph import Pipeline
from stages.bpe_encode import BpeEncode


class GPTDatasetV1(Dataset):
    """The book's map-style dataset: window ``i`` starts at token ``i * stride``.

    ``__len__`` and ``__getitem__`` are the book's, but each window is a view of one int64 token
    tensor, so memory is O(tokens) rather than the book's O(windows x max_length).

    Args:
        ids: the token stream (int64, one dimension).
        max_length, stride: as in the book.
    """

    def __init__(self, ids: torch.Tensor, max_length: int, stride: int):
        self.ids, self.max_length = ids, max_length
        self.starts = range(0, len(ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[idx]  # a range: negative indices and IndexError as the book's list
        return self.ids[start : start + self.max_length], self.ids[start + 1 : start + self.max_length + 1]


def encode_text(txt: str) -> torch.Tensor:
    """``txt``'s GPT-2 tokens through the pipeline's encode stage, with ``<|endoftext|>`` allowed (the book's)."""
    document = IterableWrapper([{"text": txt, "source": "<txt>"}])
    encoded = Pipeline(BpeEncode(document, encoding="gpt2", allowed_special=["<|endoftext|>"]))
    ids = np.concatenate([np.empty(0, np.int32)] + [item["ids"] for item in encoded])
    return torch.from_numpy(ids.astype(np.int64))


def create_dataloader_v1(
    txt: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    seed: int | None = None,
) -> DataLoader:
    """A drop-in for the book's function: a ``DataLoader`` of ``(inputs, targets)`` GPT-2 windows of ``txt``.

    ``len``, ``.dataset``, ``.batch_size`` and ``Subset`` behave as the book's, and so does
    ``shuffle=True``: under the same ``torch.manual_seed`` the batches equal the book's bit for bit.
    ``seed`` (not in the book) shuffles from a generator of its own instead of torch's global one.
    """
    if not isinstance(txt, str):
        raise TypeError(f"txt must be a str, got {type(txt).__name__}")
    for field, value in (("batch_size", batch_size), ("max_length", max_length), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be a positive integer, got {value!r}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    dataset = GPTDatasetV1(encode_text(txt), max_length, stride)
    return DataLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
                      generator=generator)
