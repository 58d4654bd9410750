"""Which units (or windows) a worker reads in an epoch that continues from a seam (see ``pipeline.reshard``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def remaining_units(order: list[int], lists: list[list[list]], at: dict[str, Any]) -> list[list]:
    """``[unit, start]`` still to read after old workers stopped at ``at`` (``{g: [index, position]}``, or
    ``[index, position, windowed]`` when the piece at ``position`` had ``windowed`` of its tokens windowed):
    the units in progress first (``start``: where to go on; ``[unit, start, windowed]`` for such a piece),
    then the others in ``order``."""
    rank = {u: i for i, u in enumerate(order)}
    going, fresh = [], []
    for g, (index, position, *windowed) in sorted(at.items(), key=lambda kv: int(kv[0])):
        items = lists[int(g)][index:]
        if items and windowed:
            going.append([items[0][0], items[0][1] if position is None else position, *windowed])
            items = items[1:]
        elif items and position is not None:
            going.append([items[0][0], position])
            items = items[1:]
        for item in items:
            (going if item[1] is not None or len(item) > 2 else fresh).append(item)
    return going + sorted(fresh, key=lambda item: rank[item[0]])


def unit_lists(order: list[int], seam: dict | None, workers: int) -> list[list[list]]:
    """Each of ``workers`` global workers' ``[unit, start]`` list for one epoch: units ``g, g + G,
    ...`` of ``order``, or what a seam dealt it (empty for workers outside the seam's groups)."""
    if seam is None:
        return [[[u, None] for u in order[g::workers]] for g in range(workers)]
    before = unit_lists(order, seam["previous"], seam["workers"])
    lists: list[list[list]] = [[] for _ in range(workers)]
    for group in seam["groups"]:
        first, count = group["among"]
        left = remaining_units(order, before, group["at"])
        for j in range(count):
            if first + j < workers:
                lists[first + j] = left[j::count]
    return lists


class RemainingWindows:
    """The window numbers (in the epoch's order) old workers had not reached, ascending, by index.

    Old global worker ``g`` of ``G`` took numbers ``g, g + G, ...`` and stopped after ``at[g]`` of
    them; the rest of each of those progressions, merged, is an irregular start then whole periods
    of ``G`` numbers, so the ``i``-th is computed without listing them all. With ``within`` (the
    windows an earlier seam of the epoch left), the numbers are indices into those: an old worker
    took ``within``'s windows ``g, g + G, ...``.
    """

    def __init__(self, n: int, workers: int, at: dict[str, int], within: RemainingWindows | None = None):
        self.within = within
        starts = {int(g): int(g) + workers * min(p, n // workers + 1) for g, p in at.items()}  # past n: none left
        self.workers, self.residues = workers, np.array(sorted(starts), dtype=np.int64)
        self.base = max((s // workers for s in starts.values()), default=0) * workers  # all residues present from here
        self.prefix = np.array(
            sorted(k for s in starts.values() for k in range(s, min(self.base, n), workers)), dtype=np.int64
        )
        self.total = sum(len(range(s, n, workers)) for s in starts.values())

    def __call__(self, i: np.ndarray) -> np.ndarray:
        i = np.asarray(i, dtype=np.int64)
        later = np.maximum(i - len(self.prefix), 0)
        out = self.base + (later // len(self.residues)) * self.workers + self.residues[later % len(self.residues)]
        head = i < len(self.prefix)
        out[head] = self.prefix[i[head]]
        return out if self.within is None else self.within(out)


def seam_windows(n: int, seam: dict, group: dict) -> RemainingWindows:
    """The windows of ``n`` that old workers left at ``seam``, for the new workers of its ``group``; an
    earlier seam of the epoch (``previous``, of one group: every rank's states were passed) is followed."""
    previous = seam["previous"]
    if previous is None:
        return RemainingWindows(n, seam["workers"], group["at"])
    if len(previous["groups"]) != 1:
        raise ValueError(
            f"this state was itself continued on another topology in epoch {seam['epoch']} from single ranks' "
            "states; read_tokens reshards it again only from one that dealt every rank's (restore it on its own "
            "topology)"
        )
    (before,) = previous["groups"]
    first, count = before["among"]  # the old workers that dealt ``within``'s windows among them
    within = seam_windows(n, previous, before)
    at = {str(int(g) - first): p for g, p in group["at"].items() if first <= int(g) < first + count}
    return RemainingWindows(within.total, count, at, within)
