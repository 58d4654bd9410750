"""The command line: ``python -m pipeline run CONFIG``."""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.graph import Pipeline
from pipeline.registry import ConfigError
from pipeline.stage import StageError


def run(args: argparse.Namespace) -> int:
    pipe = Pipeline.from_config(
        args.config, output=args.output, rank=args.rank, world_size=args.world_size, num_workers=args.num_workers
    )
    print(f"{pipe}")
    start = time.perf_counter()
    first = None
    batches = tokens = 0
    shapes: dict[str, tuple] = {}
    for batch in pipe:
        if first is None:
            first = time.perf_counter() - start
        batches += 1
        if isinstance(batch, dict):
            shapes = {k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
            tokens += batch["inputs"].numel() if "inputs" in batch else 0
        if args.max_batches is not None and batches >= args.max_batches:
            break
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
    return 0


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
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ConfigError, StageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
