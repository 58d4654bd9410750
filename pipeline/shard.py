"""Which shard units a reader takes: by rank, world size and DataLoader worker, after a seeded shuffle.

Global worker ``g = rank * num_workers + worker_id`` of ``G = world_size * num_workers`` takes units
``g, g + G, g + 2G, ...`` of the (optionally per-epoch shuffled) unit order: every unit is read by
exactly one worker of one rank in each epoch.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import numpy as np
import torch

from pipeline.schema import check_seed
from pipeline.seam import unit_lists
from pipeline.stage import RunContext

FINISHED = 1 << 62  # the index (or position) of a worker that had read all of an epoch


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


def worker_slot(rank: int, world_size: int, context: RunContext) -> tuple[int, int]:
    """``(g, G)``: this process's global worker index and the number of workers over all ranks."""
    return rank * context.num_workers + context.worker, world_size * context.num_workers


def unit_order(n_units: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """All unit indices in this epoch's order (seeded by ``(seed, epoch)`` when shuffled)."""
    return np.random.default_rng([seed, epoch]).permutation(n_units) if shuffle else np.arange(n_units)


def assign_units(n_units: int, g: int, G: int, shuffle: bool, seed: int, epoch: int, name: str) -> list[int]:
    """The unit indices global worker ``g`` of ``G`` reads this epoch, in order."""
    order = unit_order(n_units, shuffle, seed, epoch)
    if n_units < G and g == 0:
        warnings.warn(
            f"stage '{name}': {n_units} shard unit(s) for {G} workers over all ranks; {G - n_units} will be idle"
        )
    return order[g::G].tolist()


def check_restored(stage, field: str, value, limit: int) -> None:
    """Refuse a restored position outside ``0..limit``, naming the reader (a hand-edited or foreign state)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise stage.error(f"the state's `{field}` is {value!r}; it must be an integer from 0 to {limit}")


class Reader:
    """Mixin for reader stages (before ``Stage`` in the bases): files, a place among ranks and workers,
    a seeded shuffle and an epoch.

    Its place comes from the run context (``Stage.set_context``), else from its own ``rank`` /
    ``world_size``; a context's epoch makes the next ``reset()`` start that epoch.
    """

    files: list

    def init_shards(self, rank: int | None, world_size: int | None, shuffle: bool, seed: int) -> None:
        self.rank, self.world_size = resolve_rank(rank, world_size)  # its own; a run context may name others
        check_seed(seed)
        self.shuffle, self.seed = shuffle, seed
        self._epoch = -1
        self._seams: dict[str, dict] = {}

    def set_seams(self, seams: dict[str, dict]) -> None:
        """Read each epoch in ``seams`` (by number), when a ``reset()`` starts it, from its seam
        (``pipeline.reshard``)."""
        self._seams = dict(seams)

    @property
    def seams(self) -> dict[str, dict]:
        """The seams of epochs not yet over, by epoch number."""
        return self._seams

    def frontier(self, state: dict | None, finished: bool = False) -> Any:
        """Where a worker stood in an epoch, from its state (None: at the start), for a seam."""
        raise NotImplementedError

    def _seam(self, initial_state: dict | None) -> dict | None:
        """The seam of the epoch being started or restored (None: read as usual); later ones are kept."""
        if initial_state is not None:
            self._seams = initial_state.get("seams", {})
        self._seams = {e: seam for e, seam in self._seams.items() if int(e) >= self._epoch}
        return self._seams.get(str(self._epoch))

    def paths(self) -> list[str]:
        """The files this reader reads (a saved state is checked against their sizes)."""
        return [os.fspath(f) for f in self.files]

    def place(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the coming passes: the run context's, else this reader's own."""
        context = self.context
        return resolve_rank(
            self.rank if context.rank is None else context.rank,
            self.world_size if context.world_size is None else context.world_size,
        )

    def slot(self) -> tuple[int, int]:
        """``(g, G)``: this copy's global worker index, and the number of workers over all ranks."""
        return worker_slot(*self.place(), self.context)

    def set_context(self, context: RunContext) -> None:
        super().set_context(context)
        self.place()  # refuse an impossible rank now
        if context.epoch is not None:
            self._epoch = context.epoch - 1  # the next reset() starts it


class ShardedSource(Reader):
    """A reader of shard units: this worker's share of them, and a position.

    A subclass sets ``self.units`` (JSON-able descriptions) in ``__init__`` and implements
    ``read(unit, position) -> (item, next_position) | None`` (None: the unit is done) and
    ``close_unit()``. The state is ``{epoch, index, position}``: which of this worker's units it is
    in, and where inside it; never data. A reader that knows its units' sizes says so in ``unit_bytes``
    and counts ``stats["bytes"]`` as it reads them (for progress bars). In an epoch continued on another
    topology its state also holds the seams (``pipeline.reshard``) this worker's units were dealt from.
    """

    def unit_bytes(self, unit) -> int | None:
        """Bytes of a shard unit, or None when the reader cannot say."""
        return None

    def assigned_bytes(self, num_workers: int = 1) -> int | None:
        """Bytes of the units this rank's ``num_workers`` workers read this epoch (None when unknown)."""
        sizes = [self.unit_bytes(unit) for unit in self.units]
        if None in sizes:
            return None
        rank, world_size = self.place()
        order = unit_order(len(self.units), self.shuffle, self.seed, max(self._epoch, 0))
        G = world_size * num_workers
        slots = range(rank * num_workers, (rank + 1) * num_workers)
        return sum(sizes[u] for g in slots for u in order[g::G])

    def frontier(self, state: dict | None, finished: bool = False) -> list:
        """``[index, position]`` of a worker in its units."""
        if finished:
            return [FINISHED, None]
        return [0, None] if state is None else [state["index"], state["position"]]

    def frontier_of(self, piece: dict, windowed: int) -> list:
        """``[index, position, windowed]`` of ``piece`` (an item made of one this worker reads next, or
        after items a split passed over) in its units, for a seam that continues it after ``windowed``
        of its own tokens."""
        while True:
            index, position = self._index, self._position
            try:
                item = self.next()
            except StopIteration:
                raise self.error(
                    f"reshard: the piece in progress at the save ({piece.get('source')}) is not ahead of the "
                    "reader's saved position"
                ) from None
            if all(item.get(k) == piece.get(k) for k in ("source", "offset", "shard", "record")):
                return [self._index, position if self._index == index else None, windowed]

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.close_unit()
        if initial_state is None:
            self._epoch, self._index, self._position = self._epoch + 1, 0, None
        else:
            self._epoch, self._index, self._position = (initial_state[k] for k in ("epoch", "index", "position"))
            check_restored(self, "epoch", self._epoch, 2**63 - 1)
        seam, (g, G) = self._seam(initial_state), self.slot()
        if seam is None:  # [unit, start]: start is where a unit in progress at a seam goes on from
            units = assign_units(len(self.units), g, G, self.shuffle, self.seed, self._epoch, self.name)
            self._assigned = [[u, None] for u in units]
        else:
            order = unit_order(len(self.units), self.shuffle, self.seed, self._epoch).tolist()
            self._assigned = unit_lists(order, seam, G)[g]
        if initial_state is not None:
            check_restored(self, "index", self._index, len(self._assigned))
            if self._position is not None:  # an integer, or a list of them (read_jsonl's [offset, record])
                for value in self._position if isinstance(self._position, list) else [self._position]:
                    check_restored(self, "position", value, 2**63 - 1)

    @property
    def unit(self) -> int | None:
        """The unit being read (None between epochs)."""
        return self._assigned[self._index][0] if self._index < len(self._assigned) else None

    def get_state(self) -> dict:
        state = {"epoch": self._epoch, "index": self._index, "position": self._position}
        return {**state, "seams": self._seams} if self._seams else state

    def read_many(self, unit, position, budget: int, size: Callable[[Any], int]) -> tuple[list, Any, int] | None:
        """Items of ``unit`` from ``position`` (not None) until their ``size`` adds up to ``budget``, the position
        after them and their total size; None when the unit is done. By default ``read`` one at a time; a reader
        that can give a unit's items for less overrides it."""
        items, total = [], 0
        while total < budget:
            out = self.read(unit, position)
            if out is None:
                break
            item, position = out
            items.append(item)
            total += size(item)
        return (items, position, total) if items else None

    def _more(self, budget: int, size: Callable[[Any], int]) -> list:
        items = []
        while budget > 0 and self._index < len(self._assigned):
            if self._position is None:  # a unit's first item, as next() gives it (a seam may mark it)
                try:
                    items.append(self.next())
                except StopIteration:
                    break
                budget -= size(items[-1])
                continue
            out = self.read_many(self.units[self._assigned[self._index][0]], self._position, budget, size)
            if out is None:
                self._next_unit()
                continue
            more, self._position, used = out
            items += more
            budget -= used
        return items

    def next(self):
        while self._index < len(self._assigned):
            unit, start, *windowed = self._assigned[self._index]  # windowed: of a piece continued at a seam
            first = self._position is None
            out = self.read(self.units[unit], start if first else self._position)
            if out is not None:
                item, self._position = out
                return {**item, "windowed": windowed[0]} if first and windowed else item
            self._next_unit()
        raise StopIteration

    def _next_unit(self) -> None:
        """The unit in hand is done: close it and go on to the next assigned one, from its start."""
        self.close_unit()
        self._index, self._position = self._index + 1, None
