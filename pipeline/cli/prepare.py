"""``prepare``: encode a corpus once into token shards that ``read_tokens`` serves (see ``stages.tokens``)."""

from __future__ import annotations

import argparse
import sys

from stages.tokens.format import SHARD_TOKENS
from stages.tokens.prepare import prepare


def add_parser(commands) -> None:
    """The ``prepare`` verb, added to ``python -m pipeline``'s subcommands."""
    p = commands.add_parser("prepare", help="encode a corpus once into token shards (Arrow) that read_tokens serves")
    p.add_argument("config", help="a pipeline config with a reader and a bpe_encode stage (later stages are ignored)")
    p.add_argument(
        "--out", required=True, help="the cache folder to write (atomically), or a URI (s3://...: the manifest last)"
    )
    p.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="local: this process; ray: a Ray Data job"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a cache of another encoding or corpus in --out")
    p.add_argument(
        "--shard-tokens", type=int, default=SHARD_TOKENS, help=f"tokens per shard file (default {SHARD_TOKENS:,})"
    )
    p.add_argument(
        "--set", action="append", metavar="STAGE.FIELD=VALUE", help="override a field (value read as YAML); repeatable"
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress and a line per shard written, on stderr (default: on)")
    p.set_defaults(handler=prepare_command)


def prepare_command(args: argparse.Namespace) -> int:
    try:
        m = prepare(
            args.config,
            args.out,
            engine=args.engine,
            overwrite=args.overwrite,
            shard_tokens=args.shard_tokens,
            overrides=args.set,
            progress=args.progress,
        )
    except KeyboardInterrupt:  # prepare() has removed its unfinished folder
        print(f"prepare: interrupted; nothing written to {args.out}", file=sys.stderr)
        return 130
    c = m["counts"]
    print(
        f"prepared {args.out} ({args.engine}): {c['documents']:,} documents, {c['tokens']:,} tokens ({m['dtype']}) in "
        f"{len(m['shards'])} shard(s), {c['rows']:,} rows; {c['source_bytes']:,} bytes of text in {m['seconds']:.2f} s "
        f"({c['source_bytes'] / 1e6 / m['seconds']:.2f} MB/s), encoding {m['encoding']['name']}",
        file=sys.stdout,
    )
    return 0
