"""The book's chapter 2 code, written plainly: the oracle the pipeline must match exactly."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from stages.encoding import load_encoding


class GPTDatasetV1(Dataset):
    def __init__(self, txt, tokenizer, max_length, stride):
        self.input_ids = []
        self.target_ids = []
        token_ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
        for i in range(0, len(token_ids) - max_length, stride):
            input_chunk = token_ids[i : i + max_length]
            target_chunk = token_ids[i + 1 : i + max_length + 1]
            self.input_ids.append(torch.tensor(input_chunk))
            self.target_ids.append(torch.tensor(target_chunk))

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, idx):
        return self.input_ids[idx], self.target_ids[idx]


def book_dataloader_v1(txt, batch_size=4, max_length=256, stride=128, shuffle=True, drop_last=True, num_workers=0):
    tokenizer = load_encoding("gpt2")  # the book calls tiktoken.get_encoding("gpt2"): the same files, offline
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers)


def book_windows(ids, max_length, stride):
    """(input, target) pairs of the book's windows over a list of ids."""
    return [(ids[i : i + max_length], ids[i + 1 : i + max_length + 1]) for i in range(0, len(ids) - max_length, stride)]
