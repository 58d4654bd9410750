"""What the verbs share: the pipeline arguments, opening the pipeline they name, tokens encoded."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.config import apply_overrides, load_config
from pipeline.graph import Pipeline
from pipeline.stage import Stage, upstream_nodes


def open_pipeline(args: argparse.Namespace, **extra: Any) -> Pipeline:
    config = apply_overrides(load_config(args.config), args.set or [])
    return Pipeline.from_config(
        config, output=args.output, rank=args.rank, world_size=args.world_size, num_workers=args.num_workers, **extra
    )


def encoded_tokens(pipe: Pipeline) -> int:
    return next(
        (
            int(node.stats["tokens"])
            for node in upstream_nodes(pipe.root)
            if isinstance(node, Stage) and node.produces == "tokens"
        ),
        0,
    )


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML, TOML or JSON pipeline config")
    parser.add_argument(
        "--set", action="append", metavar="STAGE.FIELD=VALUE", help="override a field (value read as YAML); repeatable"
    )
    parser.add_argument(
        "--output", default=None, help="the stage (or split.branch) to iterate (default: the config's last)"
    )
    parser.add_argument(
        "--rank", type=int, default=None, help="this process's rank (default: torch.distributed, else $RANK, else 0)"
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="number of ranks (default: torch.distributed, else $WORLD_SIZE, else 1)",
    )
    parser.add_argument(
        "--num-workers", type=int, default=0, help="worker processes for read/encode/window (default 0: in process)"
    )


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value
