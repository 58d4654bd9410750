"""The command line: ``python -m pipeline run CONFIG``."""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import time

from pipeline.checkpoint import load_json, save_json
from pipeline.graph import Pipeline
from pipeline.registry import ConfigError
from pipeline.stage import StageError


def run(args: argparse.Namespace) -> int:
    pipe = Pipeline.from_config(
        args.config, output=args.output, rank=args.rank, world_size=args.world_size, num_workers=args.num_workers
    )
    print(f"{pipe}")
    batches = 0
    if args.resume:
        saved = load_json(args.resume)
        pipe.load_state_dict(saved["pipeline"])
        batches = saved["batches"]
        print(f"resumed from {args.resume} after batch {batches:,}")
    trace = open(args.trace, "a", buffering=1) if args.trace else None  # line-buffered: one line per batch

    def checkpoint() -> None:
        if args.checkpoint:
            save_json(args.checkpoint, {"pipeline": pipe.state_dict(), "batches": batches})

    start, first, tokens, interrupted = time.perf_counter(), None, 0, None
    shapes: dict[str, tuple] = {}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for batch in pipe:
            first = time.perf_counter() - start if first is None else first
            batches += 1
            if isinstance(batch, dict):
                shapes = {k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
                tokens += batch["inputs"].numel() if "inputs" in batch else 0
            if trace is not None:
                trace.write(f"{batches} {_digest(batch)}\n")
            if args.checkpoint and batches % args.checkpoint_every == 0:
                checkpoint()
            if args.max_batches is not None and batches >= args.max_batches:
                break
    except KeyboardInterrupt as e:
        interrupted = e
    finally:
        signal.signal(signal.SIGTERM, previous)
        if trace is not None:
            trace.close()
    checkpoint()
    elapsed = time.perf_counter() - start
    print(f"\n{'stage':<10} counters")
    for name, counters in pipe.stats().items():
        print(f"{name:<10} " + ", ".join(f"{k}={v:,}" for k, v in counters.items()))
    print(f"\nbatches: {batches:,}   last batch: " + ", ".join(f"{k} {list(v)}" for k, v in shapes.items()))
    read_tokens = next((c["tokens"] for c in pipe.stats().values() if "tokens" in c), 0)
    print(
        f"time: {elapsed:.3f} s, first batch after {first or 0:.3f} s; "
        f"{read_tokens / elapsed / 1e6:.2f} M tokens/s encoded, {tokens / elapsed / 1e6:.2f} M tokens/s in batches"
    )
    if args.checkpoint:
        print(f"checkpoint: {args.checkpoint} (after batch {batches:,})")
    if interrupted is not None:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _digest(batch) -> str:
    """A short hash of a batch's token ids (or of the item), for traces."""
    data = batch["inputs"].numpy().tobytes() if isinstance(batch, dict) and "inputs" in batch else repr(batch).encode()
    return hashlib.sha1(data).hexdigest()[:16]


def add_loader_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, default=None, help="this process's rank (default: torch.distributed, else $RANK, else 0)")
    parser.add_argument("--world-size", type=int, default=None, help="number of ranks (default: torch.distributed, else $WORLD_SIZE, else 1)")
    parser.add_argument("--num-workers", type=int, default=0, help="worker processes for read/encode/window (default 0: in process)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Run text -> token -> embedding pipelines.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="stream a pipeline config and report what each stage did")
    run_parser.add_argument("config", help="a YAML, TOML or JSON pipeline config")
    run_parser.add_argument("--max-batches", type=int, default=None, help="stop after N batches")
    run_parser.add_argument("--output", default=None, help="the stage to iterate (default: the config's last)")
    add_loader_flags(run_parser)
    run_parser.add_argument("--checkpoint", help="write the pipeline's state to this JSON file periodically and on exit, Ctrl-C or SIGTERM")
    run_parser.add_argument("--checkpoint-every", type=int, default=100, help="batches between checkpoints (default 100)")
    run_parser.add_argument("--resume", help="continue from a checkpoint written by --checkpoint")
    run_parser.add_argument("--trace", help="append a line per batch (number and a hash of its inputs) to this file")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ConfigError, StageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
