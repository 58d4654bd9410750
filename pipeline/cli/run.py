"""``run``: stream a pipeline, checkpoint it, and report what each stage did."""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time

from pipeline.checkpoint import CheckpointError, load_checkpoint, save_json
from pipeline.cli.common import add_pipeline_args, encoded_tokens, non_negative, open_pipeline, positive
from pipeline.graph import Pipeline
from pipeline.metrics import MetricsLog, parse_every
from pipeline.progress import Progress, corpus_bytes
from pipeline.stage import Stage, StageError, inputs_of, upstream_nodes
from pipeline.workers import Workers


def add_parser(commands) -> None:
    p = commands.add_parser("run", help="stream a pipeline and report what each stage did")
    add_pipeline_args(p)
    p.add_argument("--max-batches", type=non_negative, default=None, metavar="N",
                   help="stop after N batches of this run (after --resume too: N more batches; 0: none)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr: a bar with rate and ETA on a terminal, else a line every 5 s (default)")
    p.add_argument("--checkpoint",
                   help="write the pipeline's state to this JSON file periodically and on exit, Ctrl-C or SIGTERM")
    p.add_argument("--checkpoint-every", type=positive, default=100, help="batches between checkpoints (default 100)")
    p.add_argument("--resume", help="continue from a checkpoint written by --checkpoint")
    p.add_argument("--trace", help="append a line per batch (number and a hash of its inputs) to this file")
    p.add_argument("--metrics", metavar="FILE", help="write pipe.metrics() as JSON lines to this file (and at the end)")
    p.add_argument("--metrics-every", default="10s", type=_every, metavar="N|Ns",
                   help="a metrics line every N batches (100) or seconds (10s, the default)")
    p.set_defaults(handler=run)


def _every(text: str) -> str:
    try:
        parse_every(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def check_checkpoint_path(path: str) -> None:
    """Refuse, before the run starts, a checkpoint path that could never be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--checkpoint {path}: is a directory; name a file")
    if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--checkpoint {path}: cannot write in {folder}")


def run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        check_checkpoint_path(args.checkpoint)
    saved = load_checkpoint(args.resume) if args.resume else None
    pipe = open_pipeline(args)
    print(pipe)
    batches = 0  # over all runs, as in the checkpoint; --max-batches counts this run's only
    if saved is not None:
        try:
            pipe.load_state_dict(saved["pipeline"])
        except (ValueError, StageError) as e:
            raise ValueError(f"--resume {args.resume}: {e}") from None
        batches = saved["batches"]
        print(f"resumed from {args.resume} after batch {batches:,}")
    resumed_at = batches
    trace = open(args.trace, "a", buffering=1) if args.trace else None  # line-buffered: one line per batch
    metrics = MetricsLog(args.metrics, args.metrics_every, batches) if args.metrics else None
    progress = Progress(*corpus_bytes(pipe.root, args.num_workers), enabled=args.progress is not False,
                        counts=lambda: f"{batches:,} batches, {encoded_tokens(pipe):,} tokens encoded")

    def checkpoint() -> None:
        if args.checkpoint:
            try:
                save_json(args.checkpoint, {"pipeline": pipe.state_dict(), "batches": batches})
            except OSError as e:  # disk full, say: the previous checkpoint is still whole (atomic rename)
                message = f"cannot write checkpoint {args.checkpoint} after batch {batches:,}: {e}"
                raise CheckpointError(message) from None

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
        for batch in pipe if args.max_batches != 0 else ():
            first = time.perf_counter() - start if first is None else first
            batches += 1
            if isinstance(batch, dict):
                shapes = {k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
            if trace is not None:
                trace.write(f"{batches} {_digest(batch)}\n")
            if args.checkpoint and batches % args.checkpoint_every == 0:
                checkpoint()
            progress.update()
            if metrics is not None:
                metrics.update(pipe, batches)
            if stop or (args.max_batches is not None and batches - resumed_at >= args.max_batches):
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
        if metrics is not None:
            metrics.update(pipe, batches, final=True)
            metrics.close()
    checkpoint()
    elapsed = time.perf_counter() - start
    print(summary(pipe, elapsed))
    print(f"\nbatches: {batches:,}   last batch: " + ", ".join(f"{k} {list(v)}" for k, v in shapes.items()))
    tokens = encoded_tokens(pipe)
    print(
        f"time: {elapsed:.3f} s, first batch after {first or 0:.3f} s; {tokens / elapsed / 1e6:.2f} M tokens/s encoded"
    )
    if args.checkpoint:
        print(f"checkpoint: {args.checkpoint} (after batch {batches:,})")
    if stop:
        print(f"stopped by signal {stop[0]} after batch {batches:,}", file=sys.stderr)
        return 130
    return 0




def summary(pipe: Pipeline, elapsed: float) -> str:
    """Per stage: items in and out, tokens, share of the time (its own, inputs excluded), skips."""
    rows = [("stage", "type", "items in", "items out", "tokens", "time", "notes")]
    workers = any(isinstance(n, Workers) for n in upstream_nodes(pipe.root))
    for node in reversed(upstream_nodes(pipe.root)):
        if not isinstance(node, Stage):
            continue
        stats, inputs = node.stats, inputs_of(node)
        counted = [n.stats for n in inputs if isinstance(n, Stage)]
        items_in = sum(int(s.get("items", 0)) for s in counted) if inputs else None
        own = stats["seconds"] - sum(s.get("seconds", 0.0) for s in counted)
        in_workers = workers and node.in_workers
        share = f"{max(own, 0) / elapsed:.0%}" + (" (workers)" if in_workers else "") if elapsed > 0 else "-"
        notes = ", ".join(
            f"{stats.label(k)}: {int(v):,}"
            for k, v in stats.items()
            if k not in ("items", "seconds", "tokens", "documents", "bytes")
        )
        rows.append(
            (
                node.name,
                node.type_name,
                "-" if items_in is None else f"{items_in:,}",
                f"{int(stats['items']):,}",
                f"{int(stats['tokens']):,}" if "tokens" in stats else "",
                share,
                notes,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n" + "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def _digest(batch) -> str:
    """A short hash of a batch's token ids (or of the item), for traces."""
    data = batch["inputs"].numpy().tobytes() if isinstance(batch, dict) and "inputs" in batch else repr(batch).encode()
    return hashlib.sha1(data).hexdigest()[:16]
