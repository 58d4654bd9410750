"""``inspect``: the graph as text, Mermaid and Graphviz; a sample of windows; what flows on each edge."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from typing import Protocol, runtime_checkable

from pipeline.config import apply_overrides, load_config
from pipeline.graph import Pipeline, check_config
from pipeline.items import describe
from pipeline.cli.common import add_pipeline_args
from pipeline.registry import ConfigError, stage_class
from stages.item_kinds import ITEMS
from pipeline.stage import Stage, upstream_nodes
from pipeline.workers import Workers


@runtime_checkable
class Decoder(Protocol):
    """A stage that turns its ids back into text (``bpe_encode``, ``word_encode``): ``--sample`` shows windows."""

    def decode(self, ids) -> str: ...


def add_parser(commands) -> None:
    p = commands.add_parser("inspect",
                            help="show the graph: stages, the items on each edge, a Mermaid (and Graphviz) picture")
    add_pipeline_args(p)
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="decode the first N windows and show the first batch at every stage")
    p.add_argument("--picture", metavar="FILE.svg|FILE.png", help="draw the graph with Graphviz (needs `dot`)")
    p.set_defaults(handler=inspect_command)


def edges(config: dict) -> list[tuple[str, str, str]]:
    """(from, to, item kind) for every input reference of the config."""
    refs = check_config(config)
    stages = config["stages"]
    return [
        (ref, name, stage_class(stages[ref.partition(".")[0]]["type"], ref).produces)
        for name, names in refs.items()
        for ref in names
    ]


def mermaid(config: dict) -> str:
    stages = config["stages"]
    lines = ["flowchart LR"]
    for name, spec in stages.items():
        lines.append(f'  {name}["{name}<br/>{spec["type"]}"]')
    for source, target, kind in edges(config):
        base, _, branch = source.partition(".")
        label = f"{branch}: {kind}" if branch else kind
        lines.append(f"  {base} -->|{label}| {target}")
    return "\n".join(lines)


def dot(config: dict) -> str:
    lines = [
        "digraph pipeline {",
        "  rankdir=LR; node [shape=box, fontname=Helvetica]; edge [fontname=Helvetica, fontsize=10];",
    ]
    for name, spec in config["stages"].items():
        lines.append(f'  "{name}" [label="{name}\\n{spec["type"]}"];')
    for source, target, kind in edges(config):
        base, _, branch = source.partition(".")
        lines.append(f'  "{base}" -> "{target}" [label="{branch + ": " if branch else ""}{kind}"];')
    return "\n".join(lines + ["}"])


def shapes(pipe: Pipeline) -> list[tuple[str, str, str]]:
    """(stage, type, its first item described) for every stage on the output's path, upstream first."""
    rows = []
    for node in reversed(upstream_nodes(pipe.root)):
        if not isinstance(node, Stage) or isinstance(node, Workers):
            continue
        probe = Pipeline(pipe.stages, output=node.name) if node.name.partition(".")[0] in pipe.stages else None
        item = next(iter(probe), None) if probe is not None else None
        rows.append((node.name, node.type_name, describe(item) if item is not None else "(no items)"))
    return rows


def sample_windows(pipe: Pipeline, config: dict, n: int) -> list[str]:
    """The first ``n`` windows of the window stage on the output's path (else the config's first),
    decoded: ``context ---> next token``."""
    on_path = [node.name for node in upstream_nodes(pipe.root)
               if isinstance(node, Stage) and node.type_name == "sliding_window"]
    in_config = [name for name, spec in config["stages"].items() if spec.get("type") == "sliding_window"]
    if not on_path and not in_config:
        raise ConfigError("--sample needs a sliding_window stage")
    window = Pipeline(pipe.stages, output=(on_path or in_config)[0])
    encoder = next((node for node in upstream_nodes(window.root) if isinstance(node, Decoder)), None)
    if encoder is None:
        raise ConfigError("--sample needs an encode stage that can decode (bpe_encode, word_encode)", window.output)
    lines: list[str] = []
    for block in window:
        for row in block[: n - len(lines)]:
            lines.append(f"{encoder.decode(row[:-1])!r} ---> {encoder.decode(row[-1:])!r}")
        if len(lines) >= n:
            break
    return lines


def inspect_command(args: argparse.Namespace) -> int:
    config = apply_overrides(load_config(args.config), args.set or [])
    pipe = Pipeline.from_config(config, output=args.output, rank=args.rank, world_size=args.world_size)
    print(f"{args.config}: output `{pipe.output}`\n\nstages:")
    for name, spec in config["stages"].items():
        params = ", ".join(f"{k}: {v}" for k, v in spec.items() if k not in ("type", "input", "inputs"))
        print(f"  {name:<12} {spec['type']:<15} {params}")
    print("\nedges:")
    for source, target, kind in edges(config):
        print(f"  {source} -> {target}: {kind} ({ITEMS[kind].split(':')[0]})")
    print("\nmermaid:\n" + mermaid(config))
    if args.picture:
        if shutil.which("dot") is None:
            raise ConfigError(
                "--picture needs Graphviz's `dot` (apt-get install graphviz); the Mermaid text above draws the same "
                "graph"
            )
        fmt = args.picture.rsplit(".", 1)[-1]
        subprocess.run(["dot", f"-T{fmt}", "-o", args.picture], input=dot(config), text=True, check=True)
        print(f"\npicture: {args.picture}")
    if args.sample:
        print(f"\nfirst batch at every stage (output `{pipe.output}`):")
        for name, type_name, text in shapes(pipe):
            print(f"  {name:<12} {type_name:<15} {text}")
        print(f"\nfirst {args.sample} windows (context ---> next token):")
        for line in sample_windows(pipe, config, args.sample):
            print("  " + line)
    return 0
