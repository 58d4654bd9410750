"""``pack``: documents packed into rows that start at a document, with positions that restart at each one."""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from typing import Any

import numpy as np

from pipeline.registry import register
from pipeline.schema import FieldError, Positive, one_of
from pipeline.stage import Stage, upstream_nodes
from stages.separators import document_ids

POLICIES = ("best_fit", "greedy")
REMAINDERS = ("drop", "keep")
WAIT_BUFFERS = 2  # a document may wait while this many buffers' worth of newer ones are read


def _segments(item: dict, bos: int, separated: bool | None) -> list[np.ndarray]:
    """The documents and pieces of a tokens item (read through ``document_ids``), each document led by ``bos``.

    A document start that follows the encoder's separator takes it as its first token; any other (the
    stream's first document, every one with ``eot: false``) gets ``bos`` prepended. A leading piece
    before the first start continues the previous item's document. ``separated``: the encoder's
    ``eot``, or None (no encoder upstream) to read it off the ids.
    """
    ids, starts = document_ids(item)
    out, at, lead = [], 0, False
    for s in starts.tolist():
        joined = s > 0 and (ids[s - 1] == bos if separated is None else separated)
        head = s - 1 if joined else s
        if head > at or lead:
            out.append(_led(ids[at:head], bos, lead))
        at, lead = head, not joined
    if len(ids) > at or lead:
        out.append(_led(ids[at:], bos, lead))
    return out


def _led(ids: np.ndarray, bos: int, lead: bool) -> np.ndarray:
    return np.concatenate([np.array([bos], dtype=ids.dtype), ids]) if lead else ids


def _encoder_of(source):
    """The nearest upstream node with an ``eot_id`` (the encoder), or None."""
    return next((n for n in upstream_nodes(source) if isinstance(getattr(n, "eot_id", None), int)), None)


@register("pack")
class Pack(Stage[np.ndarray]):
    """Packs documents into rows of ``max_length + 1`` tokens that each start at a document or piece.

    ``best_fit`` holds up to ``buffer`` documents and fills each row with the largest one that fits
    the space left, again and again; when none fits, the shortest is cropped to fill the row.
    ``greedy`` takes documents in arrival order and crops the last one of each row. The cropped tail
    is dropped and counted (``remainder: drop``, stat ``tokens_cropped``) or goes back into the buffer
    as a piece of its own (``keep``: no token is lost). So that a restore re-reads a bounded stretch,
    a document still buffered after ``2 * buffer`` newer ones were read goes into the next row first
    (stat ``placed_by_age``). Each document starts with ``<|endoftext|>`` (``bos``); a piece does not.
    Only the last row of a stream may be short: it is padded (stat ``padding_tokens``).

    Items are int32 blocks ``[n, 2, max_length + 1]``: ``[:, 0]`` the tokens, ``[:, 1]`` each
    token's position in its document or piece (0 at its first token; -1 on padding). The state is a
    position: the input's state before the oldest item still buffered, and where each buffered
    document lies in the items after it (a list as long as the buffer).

    Args:
        max_length: tokens in each input (and target); rows hold ``max_length + 1``.
        policy: ``best_fit`` or ``greedy``.
        remainder: what happens to a cropped document's tail: ``drop`` or ``keep``.
        buffer: documents held to choose from (``best_fit``).
        block_rows: most rows in one item.
        bos: the id that starts each document (default: the upstream encoder's ``<|endoftext|>``).
    """

    in_workers = True  # worth running in DataLoader worker processes
    consumes = "tokens"
    produces = "packed"

    def __init__(
        self,
        source,
        max_length: Positive,
        policy: str = "best_fit",
        remainder: str = "drop",
        buffer: Positive = 1000,
        block_rows: Positive = 256,
        bos: int | None = None,
    ):
        super().__init__()
        one_of("policy", policy, POLICIES)
        one_of("remainder", remainder, REMAINDERS)
        encoder = _encoder_of(source)
        bos = getattr(encoder, "eot_id", None) if bos is None else bos
        if isinstance(bos, bool) or not isinstance(bos, int) or bos < 0:
            no_eot = "no encoder upstream gives its <|endoftext|> id"
            raise FieldError("bos", f"bos must be a token id; {no_eot}, got {bos!r}")
        self.source = source
        self.max_length = max_length
        self.policy = policy
        self.keep = remainder == "keep"
        self.buffer = buffer if policy == "best_fit" else 1  # greedy needs only the next document
        self.block_rows = block_rows
        self.wait = WAIT_BUFFERS * buffer  # documents read while one waits, at most, before it goes first
        self.bos = self.params["bos"] = bos  # resolved: a copy built from params (bench) needs no encoder upstream
        self._separated = getattr(encoder, "eot", None)  # whether the encoder puts bos before each document
        self._positions = np.arange(max_length + 1, dtype=np.int32)

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self._docs: dict[int, list] = {}  # seq -> [ids left, item number, segment, offset]
        self._by_len: list[tuple[int, int]] = []  # (tokens left, seq), sorted
        self._by_seq: list[int] = []  # seqs, sorted: oldest first
        self._held: deque[list] = deque()  # [item number, input state before it, live documents]
        self._items = self._read = 0  # items and documents read this pass
        self._ended = False
        self._state: dict[str, Any] | None = None
        if initial_state is None:
            self.source.reset()
            return
        self.source.reset(initial_state["source"])
        self._items, self._read = initial_state["item"], initial_state["read"]
        segments = [self._pull() for _ in range(initial_state["items"])]
        for rel, seg, offset, age in initial_state["buffer"]:
            self._add(self._read - age, segments[rel][seg][offset:], self._held[rel][0], seg, offset)
        self._release()

    def get_state(self) -> dict[str, Any]:
        if self._state is None:  # asked for before each item by a cursor downstream: built once per item
            self._state = self._position()
        return self._state

    def _position(self) -> dict[str, Any]:
        first = self._held[0][0] if self._held else self._items
        return {
            "source": self._held[0][1] if self._held else self.source.state_dict(),
            "item": first,
            "items": len(self._held),
            "read": self._read,
            "buffer": [[item - first, seg, at, self._read - seq] for seq, (_, item, seg, at) in self._docs.items()],
        }

    def next(self) -> np.ndarray:
        self._state = None
        span = self.max_length + 1
        block = np.empty((self.block_rows, 2, span), dtype=np.int32)
        n = 0
        while n < self.block_rows:
            whole = self._whole_rows(block[n:])
            if whole:
                n += whole
            elif self._row(block[n, 0], block[n, 1]):
                n += 1
            else:
                break
        if n == 0:
            raise StopIteration
        self.stats["rows"] += n
        return block[:n]

    def tokens_in(self, item: np.ndarray) -> int:
        return item.shape[0] * (item.shape[2] - 1)  # input positions, padding included (as a batch's inputs)

    # --- rows ---------------------------------------------------------------------------------

    def _row(self, tokens: np.ndarray, positions: np.ndarray) -> bool:
        """Fill one row; False when the stream has ended and nothing is left."""
        span, used = len(tokens), 0
        while used < span:
            self._fill()
            if not self._docs:
                break
            used += self._place(self._pick(span - used), tokens, positions, used, span - used)
        if used == 0:
            return False
        if used < span:  # the stream ended: the last row is padded
            tokens[used:], positions[used:] = self.bos, -1
            self.stats["padding_tokens"] += span - used
        self.stats["tokens_packed"] += used
        return True

    def _whole_rows(self, out: np.ndarray) -> int:
        """Rows filled at once by a long document that would fill them one by one (``keep``: its tail
        comes back oldest, so greedy or the age rule places it first again); 0 when none."""
        self._fill()
        if not self.keep or not self._docs:
            return 0
        seq = self._by_seq[0]
        by_age = self._read - seq > self.wait
        if not (by_age or self.policy == "greedy"):
            return 0
        entry = self._docs[seq]
        ids, span = entry[0], out.shape[2]
        k = min((len(ids) - 1) // span, len(out))  # the row that ends it goes the usual way
        if k == 0:
            return 0
        out[:k, 0] = ids[: k * span].reshape(k, span)
        out[:k, 1] = self._positions
        del self._by_len[bisect_left(self._by_len, (len(ids), seq))]
        entry[0], entry[3] = ids[k * span :], entry[3] + k * span
        insort(self._by_len, (len(ids) - k * span, seq))
        self.stats["pieces"] += k
        self.stats["placed_by_age"] += k * by_age
        self.stats["tokens_packed"] += k * span
        return k

    def _pick(self, space: int) -> int:
        """The seq of the document to place next in ``space`` tokens."""
        oldest = self._by_seq[0]
        if self.policy == "greedy":
            return oldest
        if self._read - oldest > self.wait:  # waited too long: a restore would re-read too much
            self.stats["placed_by_age"] += 1
            return oldest
        i = bisect_right(self._by_len, (space, math.inf)) - 1  # the largest that fits
        return self._by_len[i][1] if i >= 0 else self._by_len[0][1]  # else the shortest, cropped

    def _place(self, seq: int, tokens: np.ndarray, positions: np.ndarray, at: int, space: int) -> int:
        entry = self._docs[seq]
        ids = entry[0]
        n = min(len(ids), space)
        tokens[at : at + n] = ids[:n]
        positions[at : at + n] = self._positions[:n]
        del self._by_len[bisect_left(self._by_len, (len(ids), seq))]
        if n < len(ids) and self.keep:  # the tail goes back as a piece of its own
            entry[0], entry[3] = ids[n:], entry[3] + n
            insort(self._by_len, (len(ids) - n, seq))
            self.stats["pieces"] += 1
            return n
        self.stats["tokens_cropped"] += len(ids) - n
        del self._docs[seq], self._by_seq[bisect_left(self._by_seq, seq)]
        self._held[entry[1] - self._held[0][0]][2] -= 1
        self._release()
        return n

    # --- the buffer and where its documents came from -------------------------------------------

    def _fill(self) -> None:
        while len(self._docs) < self.buffer and not self._ended:
            try:
                segments = self._pull()
            except StopIteration:
                self._ended = True  # not saved: a restored stage finds the end again
                return
            for seg, ids in enumerate(segments):
                if len(ids):
                    self._add(self._read, ids, self._items - 1, seg, 0)
                    self._read += 1
            self._release()

    def _pull(self) -> list[np.ndarray]:
        """Read the next item; hold its input state; return its segments."""
        before = self.source.state_dict()
        item = next(self.source)
        self._held.append([self._items, before, 0])
        self._items += 1
        return _segments(item, self.bos, self._separated)

    def _add(self, seq: int, ids: np.ndarray, item: int, seg: int, offset: int) -> None:
        self._docs[seq] = [ids, item, seg, offset]
        insort(self._by_len, (len(ids), seq))
        insort(self._by_seq, seq)
        self._held[item - self._held[0][0]][2] += 1

    def _release(self) -> None:
        """Forget held items whose documents are all placed."""
        while self._held and self._held[0][2] == 0:
            self._held.popleft()
