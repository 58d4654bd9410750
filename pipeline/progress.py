"""Progress of long work on stderr: a bar with rate and ETA on a terminal, a line every few seconds in a log."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from torchdata.nodes import BaseNode

from pipeline.shard import ShardedSource
from pipeline.stage import upstream_nodes

BAR = 24  # characters of the bar


def corpus_bytes(root: BaseNode, num_workers: int = 0) -> tuple[int | None, Callable[[], int]]:
    """``(total, done)``: the bytes of the shard units this rank reads (None when a reader cannot say),
    and a function giving the bytes read so far (the readers' ``bytes`` counters)."""
    readers = [n for n in upstream_nodes(root) if isinstance(n, ShardedSource)]
    sizes = [reader.assigned_bytes(max(num_workers, 1)) for reader in readers]
    total = sum(sizes) if readers and None not in sizes else None
    return total, lambda: sum(int(reader.stats["bytes"]) for reader in readers)


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


class Progress:
    """Reports how far ``read()`` (bytes) is toward ``total``: on a terminal a bar redrawn up to 4 times a
    second, otherwise (a log file) a line every ``every`` seconds. Without a total it shows the rate only.

    Args:
        total: bytes of the whole work, or None when unknown.
        read: bytes done so far (called only when a report is due).
        counts: more to show, such as batches and tokens (called only when a report is due).
        enabled: False shows nothing.
        tty: draw a bar (default: whether ``stream`` is a terminal).
        every: seconds between lines when not on a terminal.
    """

    def __init__(self, total: int | None, read: Callable[[], int], counts: Callable[[], str] = str,
                 enabled: bool = True, tty: bool | None = None, every: float = 5.0, stream: TextIO | None = None):
        self.total, self.read, self.counts, self.enabled, self.every = total, read, counts, enabled, every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.start = self._last = time.perf_counter()
        self._shown = False  # a bar is on the terminal's last line

    def text(self, done: int, counts: str = "", now: float | None = None) -> str:
        """One report: percent, bytes, rate and ETA (with a total), then ``counts``."""
        seconds = max((now if now is not None else time.perf_counter()) - self.start, 1e-9)
        rate = done / seconds
        if self.total:
            share = min(done / self.total, 1.0)
            eta = _clock((self.total - done) / rate) if rate > 0 else "?"
            bar = "[" + "#" * int(share * BAR) + "." * (BAR - int(share * BAR)) + "] " if self.tty else ""
            text = f"{bar}{share:4.0%} of {self.total / 1e6:,.1f} MB, {rate / 1e6:.2f} MB/s, ETA {eta}"
        else:
            text = f"{done / 1e6:,.1f} MB read, {rate / 1e6:.2f} MB/s" if done else ""
        return " | ".join(part for part in (text, counts) if part)

    def update(self) -> None:
        """Report if it is time to (cheap otherwise: one clock read)."""
        now = time.perf_counter()
        if not self.enabled or now - self._last < (0.25 if self.tty else self.every):
            return
        self._last = now
        self._write(self.text(self.read(), self.counts(), now))

    def note(self, message: str) -> None:
        """A line of its own (a shard written), kept above the bar."""
        if self.enabled:
            self._clear()
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self._shown = False

    def _write(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text + " \x1b[K")  # erase what a longer previous line left
            self._shown = True
        else:
            self.stream.write("progress: " + text + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self._shown = False
