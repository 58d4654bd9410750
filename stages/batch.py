"""``batch``: windows into ``inputs`` / ``targets`` tensors [B, T], optionally shuffled by a seed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.cursor import Cursor
from pipeline.items import describe
from pipeline.registry import register
from pipeline.schema import Positive, check_seed
from pipeline.stage import Stage


class BatchDict(dict):
    """A batch: a plain dict (``inputs``, ``targets``, ``embeddings``) that prints its shapes."""

    def __repr__(self) -> str:
        return f"BatchDict{describe(self)}"

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython / Jupyter
        printer.text(repr(self))


@register("batch")
class Batch(Stage[dict]):
    """Stacks windows (rows of ``max_length + 1`` tokens) into ``{"inputs", "targets"}``, int64 [B, T].

    Packed rows (``pack``) also give ``position_ids`` and ``cu_seqlens`` (see ``packed_batch``).
    With ``shuffle``, windows are read in groups of ``shuffle_windows`` and each group is permuted
    by a generator seeded from ``(seed, epoch, group)``: the order is a function of the seed alone,
    and the state stays a position (no buffered data).

    Args:
        batch_size: windows per batch.
        drop_last: drop a last batch smaller than ``batch_size`` (counted in ``stats``).
        shuffle: permute windows within groups.
        seed: seed of the permutations.
        shuffle_windows: windows per shuffled group (rounded up to a multiple of ``batch_size``).
    """

    consumes = ("windows", "packed")
    produces = "batches"

    def __init__(
        self,
        source,
        batch_size: Positive,
        drop_last: bool = True,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_windows: Positive = 8192,
    ):
        super().__init__()
        check_seed(seed)
        self.source = source
        self.stats.labels["windows_dropped"] = "windows dropped (drop_last)"
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.group_size = -(-shuffle_windows // batch_size) * batch_size if shuffle else batch_size
        self._epoch = -1

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self._cursor = Cursor(self.source)  # made at reset: a pipeline's copy of this stage reads another input
        if initial_state is None:
            self._epoch += 1
            self._cursor.reset()
            self._group_index, taken = 0, 0
        else:
            self._epoch = initial_state["epoch"]
            self._cursor.reset(initial_state["source"])
            self._group_index, taken = initial_state["group"], initial_state["taken"]
        self._group_start, self._group, self._taken = self._cursor.state(), None, taken  # the group loads on next()

    def get_state(self) -> dict[str, Any]:
        return {"source": self._group_start, "group": self._group_index, "taken": self._taken, "epoch": self._epoch}

    def source_states(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        return [state["source"]["source"]]

    def consumed(self, state: dict[str, Any]) -> int:
        """Windows of the input past ``source_states(state)`` that batches were made of."""
        return state["source"]["offset"] + state["taken"]

    def scattered(self, state: dict[str, Any]) -> tuple[int, str] | None:
        """A shuffled group only partly batched: its batched windows are scattered over it (a reshard
        refuses such a state unless the group was the epoch's last and its other windows are dropped)."""
        if not (self.shuffle and 0 < state["taken"] < self.group_size):
            return None
        return self.batch_size - 1 if self.drop_last else 0, (
            f"{state['taken']} of the {self.group_size} windows of shuffle group {state['group']} were batched "
            f"(save after a multiple of {self.group_size // self.batch_size} batches in the epoch to reshard)"
        )

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``reset()`` start epoch ``epoch``."""
        self._epoch = epoch - 1

    def next(self) -> dict:
        if self._group is None:
            self._load_group()
        if self._taken >= len(self._group):
            self._group_index += 1
            self._load_group()
            self._taken = 0
        windows = self._group[self._taken : self._taken + self.batch_size]
        if len(windows) == 0 or (len(windows) < self.batch_size and self.drop_last):
            if len(windows):
                self.stats["windows_dropped"] = len(windows)
            raise StopIteration
        self._taken += len(windows)
        self.stats["batches"] += 1
        if windows.ndim == 3:
            return packed_batch(windows)
        return BatchDict(
            inputs=torch.from_numpy(np.ascontiguousarray(windows[:, :-1], dtype=np.int64)),
            targets=torch.from_numpy(np.ascontiguousarray(windows[:, 1:], dtype=np.int64)),
        )

    def tokens_in(self, item: dict) -> int:
        return item["inputs"].numel()

    def _load_group(self) -> None:
        self._group_start = self._cursor.state()
        n = min(self._cursor.fill(self.group_size), self.group_size)
        if n == 0:
            self._group = np.empty((0, 0), dtype=np.int32)
            return
        group = self._cursor.peek(n)
        self._cursor.advance(n)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self._epoch, self._group_index])
            group = group[rng.permutation(n)]
        self._group = group


IGNORE_INDEX = -100  # cross_entropy's default ignore_index: targets on padding


def packed_batch(rows: np.ndarray) -> BatchDict:
    """A batch from packed rows ``[B, 2, T + 1]`` (tokens, positions; -1 on padding).

    ``position_ids`` int64 [B, T]: each input's position in its document or piece. ``cu_seqlens``
    int32: where each document or piece starts in the flattened B*T inputs, then B*T (flash-attention's
    variable-length convention); its length is rounded up to a power of two by repeating B*T (empty
    sequences), so torch.compile sees at most log2(B*T) + 1 shapes. Padding (only in a stream's last
    row) is a sequence of its own, its targets ``IGNORE_INDEX``.
    """
    tokens, positions = rows[:, 0], rows[:, 1]
    b, t = tokens.shape[0], tokens.shape[1] - 1
    pad = positions < 0
    targets = tokens[:, 1:].astype(np.int64)
    position_ids = positions[:, :-1].astype(np.int64)
    if pad.any():  # padding is at a row's end: it counts from 0 after the last real token
        targets[pad[:, 1:]] = IGNORE_INDEX
        position_ids = np.where(pad[:, :-1], np.arange(t) - (~pad).sum(axis=1, keepdims=True), position_ids)
    starts = np.flatnonzero(position_ids.reshape(-1) == 0)
    cu_seqlens = np.full(1 << len(starts).bit_length(), b * t, dtype=np.int32)
    cu_seqlens[: len(starts)] = starts
    return BatchDict(
        inputs=torch.from_numpy(tokens[:, :-1].astype(np.int64)),
        targets=torch.from_numpy(targets),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu_seqlens),
    )
