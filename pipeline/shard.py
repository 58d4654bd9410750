"""Which shard units a reader takes: by rank, world size and DataLoader worker, after a seeded shuffle.

Global worker ``g = rank * num_workers + worker_id`` of ``G = world_size * num_workers`` takes units
``g, g + G, g + 2G, ...`` of the (optionally per-epoch shuffled) unit order: every unit is read by
exactly one worker of one rank in each epoch.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else ``torch.distributed``'s, else ``RANK``/``WORLD_SIZE``,
    else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    return rank, world_size


def worker_slot(rank: int, world_size: int) -> tuple[int, int]:
    """``(g, G)``: this process's global worker index and the number of workers over all ranks."""
    info = torch.utils.data.get_worker_info()
    worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * num_workers + worker_id, world_size * num_workers


def assign_units(
    n_units: int, rank: int, world_size: int, shuffle: bool, seed: int, epoch: int, name: str
) -> list[int]:
    """The unit indices this worker reads this epoch, in order."""
    g, G = worker_slot(rank, world_size)
    order = np.arange(n_units)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n_units)
    if n_units < G and g == 0:
        warnings.warn(
            f"stage '{name}': {n_units} shard unit(s) for {G} workers over all ranks; {G - n_units} will be idle"
        )
    return order[g::G].tolist()


class ShardedSource:
    """Mixin for reader stages: a list of shard units, this worker's share of them, and a position.

    A subclass sets ``self.units`` (JSON-able descriptions) in ``__init__`` and implements
    ``read(unit, position) -> (item, next_position) | None`` (None: the unit is done) and
    ``close_unit()``. The state is ``{epoch, index, position}``: which of this worker's units it is
    in, and where inside it; never data.
    """

    def init_shards(self, rank: int | None, world_size: int | None, shuffle: bool, seed: int) -> None:
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.shuffle, self.seed = shuffle, seed
        self._epoch = -1

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``reset()`` start epoch ``epoch`` (for copies in worker processes)."""
        self._epoch = epoch - 1

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.close_unit()
        if initial_state is None:
            self._epoch, self._index, self._position = self._epoch + 1, 0, None
        else:
            self._epoch, self._index, self._position = (initial_state[k] for k in ("epoch", "index", "position"))
        self._assigned = assign_units(
            len(self.units), self.rank, self.world_size, self.shuffle, self.seed, self._epoch, self.name
        )

    def get_state(self) -> dict:
        return {"epoch": self._epoch, "index": self._index, "position": self._position}

    def next(self):
        while self._index < len(self._assigned):
            out = self.read(self.units[self._assigned[self._index]], self._position)
            if out is not None:
                item, self._position = out
                return item
            self.close_unit()
            self._index, self._position = self._index + 1, None
        raise StopIteration
