"""What metrics cost on an end-to-end run: ratios of wall time to the same run with no instrumentation.

    python benchmarks/metrics_overhead.py --size 10MB --repeats 5

The pipeline: ReadArrow -> BpeEncode -> SlidingWindow(256, 256) -> Batch(8), in this process, over an
Arrow corpus from data/make_corpus.py (documents of 1 to 16 paragraphs: many small items, the worst
case for a cost per item). In each repeat three runs follow each other, and the table shows medians:

- bare: ``Stage.__next__`` (the per-item clock and counters, the token hook) and the consumer's clock
  replaced by torchdata's plain ``BaseNode.__next__``: no instrumentation at all;
- on: as shipped (the counters always run), ``metrics()`` never read;
- every batch: as shipped, ``metrics()`` read and written as a JSON line after every batch (what
  ``run --metrics FILE --metrics-every 1`` does; the default is every 10 s).

The order of the three rotates from repeat to repeat. Then the costs alone, free of the machine's noise:
nanoseconds a stage's ``next`` gains per item (a trivial stage over 200,000 items, bare and on), and
microseconds per ``metrics()`` call on the pipeline above.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "data")]

from torchdata.nodes import BaseNode  # noqa: E402

from pipeline import Pipeline  # noqa: E402
from pipeline.graph import _Iteration  # noqa: E402
from pipeline.stage import Stage  # noqa: E402
from stages import Batch, BpeEncode, ReadArrow, SlidingWindow  # noqa: E402

SOURCE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def corpus(size: str) -> Path:
    from make_corpus import make_corpus, parse_size

    out = ROOT / "bench-out" / f"arrow-{size}"
    if not out.exists():
        make_corpus([str(SOURCE)], parse_size(size), str(out))
    return out


def run(path: Path, mode: str) -> tuple[float, float, int]:
    node = SlidingWindow(BpeEncode(ReadArrow(str(path)), num_threads=2), max_length=256, stride=256)
    node = Batch(node, batch_size=8)
    with open(os.devnull, "w") as sink:
        start, cpu = time.perf_counter(), time.process_time()
        pipe = Pipeline(node)
        batches = 0
        for _ in pipe:
            batches += 1
            if mode == "every batch":
                sink.write(json.dumps(pipe.metrics()) + "\n")
    return time.perf_counter() - start, time.process_time() - cpu, batches


SHIPPED = Stage.__next__, _Iteration.__next__


def bare(enabled: bool) -> None:
    """Take the instrumentation out (or put it back)."""
    if enabled:
        Stage.__next__ = BaseNode.__next__
        _Iteration.__next__ = lambda self: next(self._iterator)
    else:
        Stage.__next__, _Iteration.__next__ = SHIPPED


class Count(Stage[int]):
    """The cheapest stage: the numbers up to ``n``."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def reset(self, initial_state=None):
        super().reset(initial_state)
        self.i = 0

    def get_state(self):
        return {"i": self.i}

    def next(self) -> int:
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return self.i


def per_item_ns(n: int = 200_000) -> float:
    """Nanoseconds the instrumentation adds to one ``next()`` (median of 5, bare against on)."""
    times = {True: [], False: []}
    for _ in range(5):
        for off in (True, False):
            bare(off)
            node = Count(n)
            node.reset()
            start = time.perf_counter()
            for _ in range(n):
                next(node)
            times[off].append(time.perf_counter() - start)
            bare(False)
    return (statistics.median(times[False]) - statistics.median(times[True])) / n * 1e9


def metrics_call_us(path: Path, calls: int = 2000) -> float:
    pipe = Pipeline(Batch(SlidingWindow(BpeEncode(ReadArrow(str(path))), max_length=256, stride=256), batch_size=8))
    next(iter(pipe))
    start = time.perf_counter()
    for _ in range(calls):
        pipe.metrics()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="10MB")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    path = corpus(args.size)
    run(path, "on")  # warm: the encoding's files, the page cache
    modes = ["bare", "on", "every batch"]
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for repeat in range(args.repeats):
        for mode in modes[repeat % 3:] + modes[: repeat % 3]:
            bare(mode == "bare")
            elapsed, used, batches = run(path, mode)
            bare(False)
            seconds[mode].append(elapsed)
            cpu[mode].append(used)
    base, base_cpu = statistics.median(seconds["bare"]), statistics.median(cpu["bare"])
    print(f"{args.size} Arrow corpus, {batches:,} batches of 8 x 256, medians of {args.repeats}; "
          "CPU: this process's threads")
    for mode in modes:
        wall, used = statistics.median(seconds[mode]), statistics.median(cpu[mode])
        print(f"{mode:<12} wall {wall:7.3f} s (ratio {wall / base:.3f})   "
              f"CPU {used:7.3f} s (ratio {used / base_cpu:.3f})")
    print(f"per item: {per_item_ns():.0f} ns more a next(); per metrics() call: {metrics_call_us(path):.0f} us")


if __name__ == "__main__":
    main()
