"""The command line: ``python -m pipeline run | inspect | bench | prepare | plot | reference``, one module per verb."""

from __future__ import annotations

import argparse
import sys

from pipeline.checkpoint import CheckpointError
from pipeline.cli import bench, inspect, plot, prepare, reference, run
from pipeline.registry import ConfigError
from pipeline.stage import StageError

VERBS = (run, inspect, bench, prepare, plot, reference)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the verb; the exit status (2: a config error)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline",
                                     description="Run, inspect and measure text -> token -> embedding pipelines.")
    commands = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        verb.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, StageError, FileNotFoundError, ValueError, plot.PlotUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # not the user's input: the run itself failed
        print(f"error: {e}", file=sys.stderr)
        return 1
