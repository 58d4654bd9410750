"""``batch``: windows into ``inputs`` / ``targets`` tensors [B, T], optionally shuffled by a seed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.cursor import Cursor
from pipeline.items import describe
from pipeline.registry import register
from pipeline.schema import Positive, check_field
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

    consumes = "windows"
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
        check_field("seed", int, seed)
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
        return BatchDict(
            inputs=torch.from_numpy(np.ascontiguousarray(windows[:, :-1], dtype=np.int64)),
            targets=torch.from_numpy(np.ascontiguousarray(windows[:, 1:], dtype=np.int64)),
        )

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
