"""``Loader``: iterate a stage graph one epoch per ``iter()``, resumable at any item, across epoch ends."""

from __future__ import annotations

from typing import Any

from torchdata.nodes import BaseNode


class Loader:
    """Iterates ``root`` one epoch per ``iter()``; ``state_dict()`` is where it stands (JSON, no data).

    It takes the place of torchdata's ``nodes.Loader`` (0.11), whose state goes wrong in silence in two
    cases: restored from a state saved at an epoch's end, its iterator keeps reporting that state after
    restarting into the next epoch (the look-ahead that finds the end caches it past the restart), so a
    later checkpoint repeats the epoch; and a ``state_dict()`` taken before ``load_state_dict`` makes the
    next ``iter()`` ignore the loaded state. The state keeps torchdata's layout (``root``, ``num_yielded``).

    Args:
        root: the last stage of the graph.
    """

    ROOT_KEY, NUM_YIELDED_KEY = "root", "num_yielded"

    def __init__(self, root: BaseNode):
        self.root = root
        self._pending: dict[str, Any] | None = None  # the state the next iter() starts from
        self._ahead: tuple[Any, dict[str, Any]] | None = None  # a restore's look-ahead item, the state before it
        self._yielded = 0
        self._begun = False  # the root was reset for a pass
        self._continue = False  # state_dict() began the pass: the next iter() continues it

    def __iter__(self) -> Loader:
        if self._continue:
            self._continue = False
        else:
            self._begin()
        return self

    def __next__(self) -> Any:
        if self._ahead is not None:
            item, self._ahead = self._ahead[0], None
        else:
            item = next(self.root)  # StopIteration ends the epoch
        self._yielded += 1
        return item

    def _begin(self) -> None:
        state, self._pending, self._ahead, self._begun = self._pending, None, None, True
        self.root.reset(None if state is None else state[self.ROOT_KEY])
        self._yielded = 0 if state is None else state[self.NUM_YIELDED_KEY]
        if state is not None:
            try:  # a state saved after an epoch's last item continues with the next epoch
                self._ahead = (next(self.root), state)
            except StopIteration:
                self.root.reset(None)
                self._yielded = 0

    def state_dict(self) -> dict[str, Any]:
        """The state to pass to ``load_state_dict`` to continue with the items that follow."""
        if self._pending is not None:
            return self._pending
        if not self._begun:
            self._begin()
            self._continue = True
        if self._ahead is not None:
            return self._ahead[1]
        return {self.ROOT_KEY: self.root.state_dict(), self.NUM_YIELDED_KEY: self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next ``iter()``."""
        self._pending, self._continue = state, False
