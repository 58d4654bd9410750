"""``verify-resume``: stop a run on one topology (ranks x workers), resume on another, audit the documents."""

from __future__ import annotations

import argparse

from pipeline.cli.audit import verify_resume, with_field
from pipeline.config import apply_overrides, load_config


def topology(text: str) -> tuple[int, int]:
    """``RxW`` -> (ranks, workers per rank)."""
    ranks, x, workers = text.lower().partition("x")
    if not (x and ranks.isdigit() and workers.isdigit() and int(ranks) >= 1):
        raise argparse.ArgumentTypeError(f"expected RANKSxWORKERS such as 2x2 or 1x0, got {text!r}")
    return int(ranks), int(workers)


def verify_resume_command(args: argparse.Namespace) -> int:
    config = apply_overrides(load_config(args.config), args.set or [])
    if args.seed is not None:
        config = with_field(config, "seed", args.seed)
    (r0, w0), (r1, w1) = args.from_, args.to
    print(f"{args.steps} batches on {r0} rank(s) x {w0} worker(s), then the epoch's rest on {r1} x {w1}")
    report = verify_resume(config, args.steps, args.from_, args.to)
    columns = ["reader", "expected", "read", "lost", "repeated", "out of order"]
    print("\n| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for row in report["rows"]:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    again, lost, tail = report["tokens_again"], report["tokens_lost"], report["tail_tokens"]
    bad = again is not None and (again > 0 or lost > tail)
    if again is not None:  # token shards' windows are audited whole, above
        print(f"\ntokens of documents: {again:,} windowed again, {lost:,} not windowed ({tail:,} tail tokens counted)")
    for kind in ("lost", "repeated", "out_of_order"):
        if report[kind]:
            bad = True
            print(
                f"\n{kind.replace('_', ' ')} ({len(report[kind])}): "
                + ", ".join(report[kind][:10])
                + (" ..." if len(report[kind]) > 10 else "")
            )
    print("\nevery document read once, every token windowed at most once" if not bad else "\nthe audit FAILED")
    return 1 if bad else 0


def add_parser(commands) -> None:
    """The ``verify-resume`` verb, added to ``python -m pipeline``'s subcommands."""
    p = commands.add_parser(
        "verify-resume", help="stop on one topology (ranks x workers), resume on another, audit the documents"
    )
    p.add_argument("config", help="a YAML, TOML or JSON pipeline config")
    p.add_argument(
        "--set", action="append", metavar="STAGE.FIELD=VALUE", help="override a field (value read as YAML); repeatable"
    )
    p.add_argument("--steps", type=int, required=True, help="batches each rank takes before its state is saved")
    p.add_argument(
        "--from", dest="from_", type=topology, required=True, metavar="RxW", help="ranks x workers of the first run"
    )
    p.add_argument("--to", type=topology, required=True, metavar="RxW", help="ranks x workers of the resumed run")
    p.add_argument("--seed", type=int, default=None, help="set this seed on every stage that takes one")
    p.set_defaults(handler=verify_resume_command)
