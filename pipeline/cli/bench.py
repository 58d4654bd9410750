"""``bench``: each stage's throughput alone (fed from memory) and in the whole; the bottleneck named."""

from __future__ import annotations

import argparse
import time

from torchdata.nodes import BaseNode

from pipeline.cli.common import add_pipeline_args, encoded_tokens, open_pipeline, positive
from pipeline.graph import Pipeline
from pipeline.cli.plot import bench_chart, require_matplotlib
from pipeline.schema import takes
from pipeline.stage import Stage, inputs_of, upstream_nodes
from pipeline.workers import Workers


def add_parser(commands) -> None:
    p = commands.add_parser("bench", help="each stage's throughput alone and in the whole; name the bottleneck")
    add_pipeline_args(p)
    p.add_argument("--max-batches", type=positive, default=200,
                   help="batches of the whole pipeline measured (default 200)")
    p.add_argument("--plot", metavar="FILE.png", help="draw each stage's throughput against the whole's (matplotlib)")
    p.set_defaults(handler=bench_command)


class Replay(BaseNode):
    """Items already in memory, served again; the state is an index (torchdata's IterableWrapper asks
    its iterator whether it is ``Stateful`` at every item, ~0.1 ms, more than a whole stage's work)."""

    def __init__(self, items: list):
        super().__init__()
        self.items = items

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._i = initial_state["i"] if initial_state is not None else 0

    def next(self):
        if self._i >= len(self.items):
            raise StopIteration
        self._i += 1
        return self.items[self._i - 1]

    def get_state(self) -> dict:
        return {"i": self._i}


def _take(pipe: Pipeline, n: int | None) -> list:
    return [item for item, _ in zip(pipe, range(n))] if n is not None else list(pipe)


def alone(node, items_by_node: dict[int, list]) -> float | None:
    """Seconds a fresh copy of ``node`` takes over its inputs' items, already in memory."""
    inputs = inputs_of(node)
    if not isinstance(node, Stage) or node.params is None or any(id(n) not in items_by_node for n in inputs):
        return None
    sources = [Replay(items_by_node[id(n)]) for n in inputs]
    many = takes(type(node)) == "many"
    copy = type(node)(sources, **node.params) if many else type(node)(*sources, **node.params)
    start = time.perf_counter()
    for _ in Pipeline(copy):
        pass
    return time.perf_counter() - start


def bench_command(args: argparse.Namespace) -> int:
    if args.plot:
        require_matplotlib()  # missing: say so now, not after the benchmark
    pipe = open_pipeline(args)
    start = time.perf_counter()
    batches = len(_take(pipe, args.max_batches))
    whole = time.perf_counter() - start
    tokens = encoded_tokens(pipe)
    print(f"{pipe}\n\nwhole: {batches:,} batches in {whole:.3f} s, {tokens / whole / 1e6:.2f} M tokens/s encoded\n")
    # Replay: each stage's output during the whole run, kept in memory, feeds a fresh copy of the next.
    nodes = [n for n in reversed(upstream_nodes(pipe.root)) if isinstance(n, Stage) and not isinstance(n, Workers)]
    counts = {id(n): int(n.stats["items"]) for n in nodes}
    items_by_node: dict[int, list] = {}
    rows = []
    for node in nodes:
        if node.name.partition(".")[0] in pipe.stages:
            items_by_node[id(node)] = _take(Pipeline(pipe.stages, output=node.name), counts[id(node)])
        seconds = alone(node, items_by_node) if inputs_of(node) else _time(pipe, node, counts[id(node)])
        rows.append((node, seconds))
    print(f"{'stage':<12} {'type':<15} {'items':>9} {'alone (s)':>10} {'items/s':>10}  M tokens/s")
    for node, seconds in rows:
        rate = f"{counts[id(node)] / seconds:,.0f}" if seconds else "-"
        token_rate = f"{tokens / seconds / 1e6:.2f}" if seconds else "-"
        print(
            f"{node.name:<12} {node.type_name:<15} {counts[id(node)]:>9,} {seconds or 0:>10.3f} {rate:>10}  "
            f"{token_rate}"
        )
    slowest, seconds = max(((n, s) for n, s in rows if s), key=lambda r: r[1])
    print(
        f"\nbottleneck: `{slowest.name}` ({slowest.type_name}): {seconds:.3f} s alone for this run's work, "
        f"{seconds / whole:.0%} of the whole run's {whole:.3f} s"
    )
    if args.plot:
        bench_chart([(n.name, tokens / s / 1e6) for n, s in rows if s], tokens / whole / 1e6, slowest.name, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _time(pipe: Pipeline, node, n: int) -> float:
    start = time.perf_counter()
    _take(Pipeline(pipe.stages, output=node.name), n)
    return time.perf_counter() - start
