"""A read position inside a stream of arrays, kept as (source state, offset) so it can be saved.

Stages that cut a stream of arrays into pieces of another size (tokens into windows, windows into
batches) keep their state as the source's state before the array that holds the next unread element,
plus that element's offset inside it: a position, never the data itself. Restoring replays that one
array from the source and skips the offset.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np
from torchdata.nodes import BaseNode


class Cursor:
    """Reads arrays from ``source`` (through ``unpack``) and serves their elements along axis 0."""

    def __init__(self, source: BaseNode, unpack: Callable[[Any], np.ndarray] = np.asarray):
        self.source = source
        self.unpack = unpack
        self._clear()

    def reset(self, state: dict[str, Any] | None = None) -> None:
        """Go back to the start of the source, or to a position from ``state()``."""
        self._clear()
        if state is None:
            self.source.reset()
        else:
            self.source.reset(state["source"])
            self._offset = state["offset"]

    def _clear(self) -> None:
        self._arrays: deque[tuple[dict, np.ndarray]] = deque()  # (source state before it, array)
        self._offset = 0  # into _arrays[0]; may run past it (stride > window skips unread elements)
        self._held = 0  # elements in _arrays
        self.ended = False

    def state(self) -> dict[str, Any]:
        head = self._arrays[0][0] if self._arrays else self.source.state_dict()
        return {"source": head, "offset": self._offset}

    @property
    def available(self) -> int:
        return self._held - self._offset if self._arrays else 0

    @property
    def skipping(self) -> int:
        """Elements past the held ones still to be skipped (after an advance beyond them)."""
        return 0 if self._arrays else self._offset

    def fill(self, n: int) -> int:
        """Pull arrays until ``n`` elements are held or the source ends; return how many are held."""
        while self.available < n and not self.ended:
            before = self.source.state_dict()
            try:
                array = self.unpack(next(self.source))
            except StopIteration:
                self.ended = True
                break
            self._arrays.append((before, array))
            self._held += len(array)
            self._settle()
        return self.available

    def peek(self, n: int) -> np.ndarray:
        """The next ``n`` held elements (a view when they lie in one array)."""
        pieces, need, offset = [], n, self._offset
        for _, array in self._arrays:
            piece = array[offset : offset + need]
            pieces.append(piece)
            need -= len(piece)
            offset = 0
            if need == 0:
                break
        if need:
            raise ValueError(f"peek({n}) but only {n - need} elements are held")
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def advance(self, n: int) -> None:
        """Consume ``n`` elements; past the held ones, the next arrays' first elements are skipped."""
        self._offset += n
        self._settle()

    def _settle(self) -> None:
        while self._arrays and self._offset >= len(self._arrays[0][1]):
            dropped = len(self._arrays.popleft()[1])
            self._offset -= dropped
            self._held -= dropped
