"""``Pipeline.metrics``: each stage's counters and timing, and the consumer's data wait, as one flat dict.

Per stage (keys ``<stage>/<name>``): ``items`` and ``tokens`` given, ``busy_s`` (its own work) and
``wait_s`` (waiting on its inputs) since the pass began, plus what the stage adds through its ``metrics``
hook (a mix's draws per input, the workers' queues). For the pipeline: ``data_wait_s``, the seconds the
consumer spent blocked in ``next()``, and ``data_wait_share``, that over the wall time, both since the
previous call. Every value is a plain number, for any logger (TensorBoard, W&B, a JSON line).
"""

from __future__ import annotations

import json
import time

from torchdata.nodes import BaseNode

from pipeline.stage import Stage, upstream_nodes


class DataClock:
    """The consumer's side: seconds blocked waiting for the next item, and the interval since the last read."""

    def __init__(self) -> None:
        self.waited = 0.0
        self._mark = (time.perf_counter(), 0.0)

    def interval(self) -> tuple[float, float]:
        """``(waited, wall)`` seconds since the previous call (or since the clock was made)."""
        now, (then, waited_then) = time.perf_counter(), self._mark
        self._mark = (now, self.waited)
        return self.waited - waited_then, now - then


def collect(root: BaseNode, clock: DataClock) -> dict[str, float]:
    """The flat metrics of the stages upstream of ``root`` (upstream first) and of the consumer's ``clock``."""
    out: dict[str, float] = {}
    for node in reversed(upstream_nodes(root)):
        if not isinstance(node, Stage):
            continue
        seconds, wait = node.stats["seconds"], node.wait_seconds()
        out[f"{node.name}/items"] = int(node.stats["items"])
        out[f"{node.name}/tokens"] = int(node.stats["tokens"])
        out[f"{node.name}/busy_s"] = max(seconds - wait, 0.0)
        out[f"{node.name}/wait_s"] = wait
        out.update({f"{node.name}/{key}": value for key, value in node.metrics().items()})
    waited, wall = clock.interval()
    out["data_wait_s"] = waited
    out["data_wait_share"] = waited / wall if wall > 0 else 0.0
    return out


def parse_every(text: str) -> tuple[int | None, float | None]:
    """``"100"``: every 100 batches, ``(100, None)``; ``"30s"``: every 30 seconds, ``(None, 30.0)``."""
    try:
        value = float(text[:-1]) if text.endswith("s") else int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"expected a number of batches (100) or of seconds (30s), got {text!r}")
    return (None, value) if text.endswith("s") else (value, None)


class MetricsLog:
    """``Pipeline.metrics()`` as JSON lines in ``path`` (written afresh), each with ``batches`` (taken so far)
    and ``time_s`` (since the log opened), every N batches or seconds (``every``, see ``parse_every``)."""

    def __init__(self, path: str, every: str = "10s", batches: int = 0):
        self.batches_every, self.seconds_every = parse_every(every)
        # open until close(); line-buffered, so a crashed run keeps its lines
        self.file = open(path, "w", buffering=1)  # noqa: SIM115
        self.start = self._time = time.perf_counter()
        self._batches = batches  # taken before (a resumed run)

    def update(self, pipe, batches: int, final: bool = False) -> None:
        """Write a line if one is due (one clock read otherwise), or when ``final`` and batches came since the last."""
        now = time.perf_counter()
        due = (self.batches_every is not None and batches - self._batches >= self.batches_every) or (
            self.seconds_every is not None and now - self._time >= self.seconds_every)
        if due or (final and (batches > self._batches or self.file.tell() == 0)):
            self._time, self._batches = now, batches
            self.file.write(json.dumps({"batches": batches, "time_s": now - self.start, **pipe.metrics()}) + "\n")

    def close(self) -> None:
        self.file.close()
