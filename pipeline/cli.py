"""The command line: ``python -m pipeline run | inspect | bench | reference``."""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import time
from typing import Any

from pipeline.checkpoint import load_json, save_json
from pipeline.config import apply_overrides, load_config
from pipeline.graph import Pipeline
from pipeline.registry import ConfigError
from pipeline.stage import StageError, inputs_of, upstream_nodes


def open_pipeline(args: argparse.Namespace, **extra: Any) -> Pipeline:
    config = apply_overrides(load_config(args.config), args.set or [])
    return Pipeline.from_config(
        config, output=args.output, rank=args.rank, world_size=args.world_size, num_workers=args.num_workers, **extra
    )


def run(args: argparse.Namespace) -> int:
    pipe = open_pipeline(args)
    print(pipe)
    batches = 0
    if args.resume:
        saved = load_json(args.resume)
        pipe.load_state_dict(saved["pipeline"])
        batches = saved["batches"]
        print(f"resumed from {args.resume} after batch {batches:,}")
    trace = open(args.trace, "a", buffering=1) if args.trace else None  # line-buffered: one line per batch
    progress = Progress(pipe, enabled=sys.stderr.isatty() if args.progress is None else args.progress)

    def checkpoint() -> None:
        if args.checkpoint:
            save_json(args.checkpoint, {"pipeline": pipe.state_dict(), "batches": batches})

    start, first = time.perf_counter(), None
    shapes: dict[str, tuple] = {}
    # A first Ctrl-C or SIGTERM stops after the batch in hand, so the checkpoint is a clean position;
    # a second one stops at once, without a checkpoint.
    stop: list[int] = []

    def request_stop(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for batch in pipe:
            first = time.perf_counter() - start if first is None else first
            batches += 1
            if isinstance(batch, dict):
                shapes = {k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
            if trace is not None:
                trace.write(f"{batches} {_digest(batch)}\n")
            if args.checkpoint and batches % args.checkpoint_every == 0:
                checkpoint()
            progress.update(batches)
            if stop or (args.max_batches is not None and batches >= args.max_batches):
                break
    except KeyboardInterrupt:
        print("interrupted twice: no checkpoint written", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        progress.close()
        if trace is not None:
            trace.close()
    checkpoint()
    elapsed = time.perf_counter() - start
    print(summary(pipe, elapsed))
    print(f"\nbatches: {batches:,}   last batch: " + ", ".join(f"{k} {list(v)}" for k, v in shapes.items()))
    tokens = encoded_tokens(pipe)
    print(f"time: {elapsed:.3f} s, first batch after {first or 0:.3f} s; {tokens / elapsed / 1e6:.2f} M tokens/s encoded")
    if args.checkpoint:
        print(f"checkpoint: {args.checkpoint} (after batch {batches:,})")
    if stop:
        print(f"stopped by signal {stop[0]} after batch {batches:,}", file=sys.stderr)
        return 130
    return 0


def encoded_tokens(pipe: Pipeline) -> int:
    return next((int(node.stats["tokens"]) for node in upstream_nodes(pipe.root) if getattr(node, "produces", None) == "tokens"), 0)


class Progress:
    """One live line on stderr: batches, documents, tokens and tokens/s."""

    def __init__(self, pipe: Pipeline, enabled: bool):
        self.pipe, self.enabled = pipe, enabled
        self.start = self.last = time.perf_counter()

    def update(self, batches: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < 0.25:
            return
        self.last = now
        nodes = upstream_nodes(self.pipe.root)
        documents = next((int(n.stats["documents"]) for n in nodes if getattr(n, "produces", None) == "tokens"), 0)
        tokens = encoded_tokens(self.pipe)
        rate = tokens / (now - self.start) / 1e6
        sys.stderr.write(f"\r{batches:,} batches | {documents:,} documents | {tokens:,} tokens | {rate:.2f} M tokens/s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def summary(pipe: Pipeline, elapsed: float) -> str:
    """Per stage: items in and out, tokens, share of the time (its own, inputs excluded), skips."""
    rows = [("stage", "type", "items in", "items out", "tokens", "time", "notes")]
    for node in reversed(upstream_nodes(pipe.root)):
        if not hasattr(node, "stats"):
            continue
        stats, inputs = node.stats, inputs_of(node)
        items_in = sum(int(getattr(n, "stats", {}).get("items", 0)) for n in inputs) if inputs else None
        own = stats["seconds"] - sum(getattr(n, "stats", {}).get("seconds", 0.0) for n in inputs)
        in_workers = any(n.type_name == "workers" for n in upstream_nodes(pipe.root) if hasattr(n, "type_name")) and node.in_workers
        share = f"{max(own, 0) / elapsed:.0%}" + (" (workers)" if in_workers else "") if elapsed > 0 else "-"
        notes = ", ".join(f"{k}: {int(v):,}" for k, v in stats.items() if k not in ("items", "seconds", "tokens", "documents", "bytes"))
        rows.append((node.name, node.type_name, "-" if items_in is None else f"{items_in:,}", f"{int(stats['items']):,}",
                     f"{int(stats['tokens']):,}" if "tokens" in stats else "", share, notes))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n" + "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def _digest(batch) -> str:
    """A short hash of a batch's token ids (or of the item), for traces."""
    data = batch["inputs"].numpy().tobytes() if isinstance(batch, dict) and "inputs" in batch else repr(batch).encode()
    return hashlib.sha1(data).hexdigest()[:16]


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML, TOML or JSON pipeline config")
    parser.add_argument("--set", action="append", metavar="STAGE.FIELD=VALUE", help="override a field (value read as YAML); repeatable")
    parser.add_argument("--output", default=None, help="the stage (or split.branch) to iterate (default: the config's last)")
    parser.add_argument("--rank", type=int, default=None, help="this process's rank (default: torch.distributed, else $RANK, else 0)")
    parser.add_argument("--world-size", type=int, default=None, help="number of ranks (default: torch.distributed, else $WORLD_SIZE, else 1)")
    parser.add_argument("--num-workers", type=int, default=0, help="worker processes for read/encode/window (default 0: in process)")


def main(argv: list[str] | None = None) -> int:
    from pipeline import bench, view

    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Run, inspect and measure text -> token -> embedding pipelines.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="stream a pipeline and report what each stage did")
    add_pipeline_args(p)
    p.add_argument("--max-batches", type=int, default=None, help="stop after N batches")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="live progress line (default: when stderr is a terminal)")
    p.add_argument("--checkpoint", help="write the pipeline's state to this JSON file periodically and on exit, Ctrl-C or SIGTERM")
    p.add_argument("--checkpoint-every", type=int, default=100, help="batches between checkpoints (default 100)")
    p.add_argument("--resume", help="continue from a checkpoint written by --checkpoint")
    p.add_argument("--trace", help="append a line per batch (number and a hash of its inputs) to this file")
    p.set_defaults(handler=run)
    p = commands.add_parser("inspect", help="show the graph: stages, the items on each edge, a Mermaid (and Graphviz) picture")
    add_pipeline_args(p)
    p.add_argument("--sample", type=int, default=0, metavar="N", help="decode the first N windows and show the first batch at every stage")
    p.add_argument("--picture", metavar="FILE.svg|FILE.png", help="draw the graph with Graphviz (needs `dot`)")
    p.set_defaults(handler=view.inspect_command)
    p = commands.add_parser("bench", help="each stage's throughput alone and in the whole; name the bottleneck")
    add_pipeline_args(p)
    p.add_argument("--max-batches", type=int, default=200, help="batches of the whole pipeline measured (default 200)")
    p.set_defaults(handler=bench.bench_command)
    from pipeline import prepare

    prepare.add_parser(commands)  # prepare: token shards for read_tokens
    p = commands.add_parser("reference", help="print the stage reference (Markdown), as in the README")
    p.set_defaults(handler=lambda args: print(view.reference()) or 0)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, StageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
