"""``sliding_window``: the book's (input, target) windows over the token stream, in blocks."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.cursor import Cursor
from pipeline.registry import register
from pipeline.schema import Positive
from pipeline.stage import Stage
from stages.separators import document_ids


def _ids(item: Any) -> np.ndarray:
    return item["ids"] if isinstance(item, dict) else np.asarray(item)


def input_tokens(block: np.ndarray) -> int:
    """Input tokens in a block of windows ``[n, max_length + 1]`` (a window's last token is a target only)."""
    return block.shape[0] * (block.shape[1] - 1)


@register("sliding_window")
class SlidingWindow(Stage[np.ndarray]):
    """Cuts the token stream into windows of ``max_length + 1`` tokens, ``stride`` apart.

    Windows start at ``i in range(0, len(ids) - max_length, stride)`` over the whole stream (documents
    joined), exactly the book's ``GPTDatasetV1``; row ``w`` of a block is ``ids[i : i + max_length + 1]``,
    so the input is ``w[:-1]`` and the target ``w[1:]``. Each item is a block ``[n, max_length + 1]`` of
    up to ``block_windows`` windows (views, not copies): those the tokens held give, once they give 1 at a
    stream's start (a quick first item), then 2, 4, ... up to ``block_windows``. Tokens after the last
    window are counted in ``stats`` as ``tail tokens``.

    Args:
        max_length: tokens in each input (and target).
        stride: tokens between the starts of consecutive windows (may exceed ``max_length``).
        block_windows: most windows in one block.
    """

    in_workers = True  # worth running in DataLoader worker processes
    consumes = "tokens"
    produces = "windows"

    def __init__(self, source, max_length: Positive, stride: Positive, block_windows: Positive = 1024):
        super().__init__()
        self.source = source
        self.max_length = max_length
        self.stride = stride
        self.block_windows = block_windows

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self._cursor = Cursor(self.source, _ids)  # made at reset: a pipeline's copy reads another input
        self._cursor.reset(initial_state["cursor"] if initial_state is not None else None)
        self._windowed = initial_state is not None and initial_state["windowed"]  # a window was made
        # windows to wait for before the next block: 1 (a quick first block), doubling to block_windows; in the
        # state, so a restore replays a block as it was cut (a state without it is from before: block_windows)
        self._want = 1 if initial_state is None else initial_state.get("want", self.block_windows)

    def get_state(self) -> dict[str, Any]:
        return {"cursor": self._cursor.state(), "windowed": self._windowed, "want": self._want}

    def skip(self, n: int) -> None:
        """Pass the next ``n`` windows as ``next`` would give them, without making them (resharding
        replays a saved position this way)."""
        span = self.max_length + 1
        if self._cursor.fill(span + self.stride * (n - 1)) < span + self.stride * (n - 1):
            raise ValueError(f"stage '{self.name}': cannot skip {n} windows, the stream ends before")
        self._cursor.advance(self.stride * n)
        self._windowed = True

    def source_states(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        return [state["cursor"]["source"]]

    def continued(self, state: dict[str, Any]) -> tuple[dict, int] | None:
        """The tokens item its input was in at ``state`` and how many of its document's own tokens windows
        had used (past its separator, and with those used before an earlier reshard), for a reshard to go
        on after them; None when none were used."""
        offset = state["cursor"]["offset"]
        if not offset:
            return None
        self.source.reset(state["cursor"]["source"])
        item = next(self.source)
        if not isinstance(item, dict) or "source" not in item:
            raise self.error(
                "reshard: the tokens item windows were in names no document to go on from (bare ids, or a block "
                "of many documents from `blocks: true`); reshard a graph whose encoder gives an item per document"
            )
        ids, starts = document_ids(item)
        separated = int(len(starts) > 0 and starts[0] == 1)  # its own tokens start after the <|endoftext|>
        return item, item.get("windowed", 0) + min(offset, len(ids)) - separated

    def next(self) -> np.ndarray:
        span = self.max_length + 1
        want = self._want
        self._want = min(2 * want, self.block_windows)
        held = self._cursor.fill(span + self.stride * (want - 1))
        if held < span:
            # tokens after the last window's target: the held ones, less those it covers (stride <
            # span), plus those the stride jumped over and the stream never reached (stride > span)
            tail = held + self.stride - span - self._cursor.skipping if self._windowed else held
            self.stats["tail_tokens"] = max(tail, 0)
            raise StopIteration
        n = min(self.block_windows, (held - span) // self.stride + 1)
        tokens = self._cursor.peek(span + self.stride * (n - 1))
        self._cursor.advance(self.stride * n)
        self._windowed = True
        self.stats["windows"] += n
        return sliding_window_view(tokens, span)[:: self.stride]

    def tokens_in(self, item: np.ndarray) -> int:
        return input_tokens(item)
