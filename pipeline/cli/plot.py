"""``plot``: pictures of a pipeline's speed, for ``bench --plot`` and ``python -m pipeline plot METRICS.jsonl``.

matplotlib is an optional extra (``pip install 'textpipe[plot]'``), imported only when a picture is drawn.
"""

from __future__ import annotations

import argparse
import json
from itertools import pairwise


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


def require_matplotlib():
    """matplotlib's ``Figure`` class (no pyplot, no display), or ``PlotUnavailable`` saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("drawing needs matplotlib, an optional extra: pip install 'textpipe[plot]' "
                              "(or pip install matplotlib)") from None
    return Figure


def figure(rows: int, height: float):
    """A figure with ``rows`` stacked axes."""
    fig = require_matplotlib()(figsize=(8, height), layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def bench_chart(rates: list[tuple[str, float]], whole: float, bottleneck: str, path: str) -> None:
    """Bars: each stage's M tokens/s alone; a line: the whole pipeline's; the bottleneck in red."""
    fig, (ax,) = figure(1, 1.2 + 0.45 * len(rates))
    names = [name for name, _ in rates][::-1]
    values = [rate for _, rate in rates][::-1]
    colors = ["tab:red" if name == bottleneck else "tab:blue" for name in names]
    ax.barh(names, values, color=colors)
    ax.axvline(whole, color="black", linestyle="--", label=f"whole pipeline: {whole:.2f} M tokens/s")
    ax.set_xscale("log")
    ax.set_xlabel("M tokens/s (each stage alone, fed from memory; log scale)")
    ax.set_title(f"bench: the bottleneck is `{bottleneck}`")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=110)


def read_lines(path: str) -> list[dict]:
    """The lines of a ``run --metrics`` file (refuses a line that is not a JSON object, naming it)."""
    lines = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not a JSON line ({e.msg})") from None
            if not isinstance(lines[-1], dict) or not {"time_s", "data_wait_share"} <= set(lines[-1]):
                raise ValueError(f"{path}, line {number}: not a line of `run --metrics` "
                                 "(no `time_s` or `data_wait_share`)")
    if len(lines) < 2:
        raise ValueError(f"{path}: {len(lines)} metrics line(s); a plot over time needs two or more "
                         "(use --metrics-every)")
    return lines


def metrics_chart(lines: list[dict], path: str) -> None:
    """Over time: the consumer's data wait share, the output's tokens/s, and each stage's busy share."""
    stages = [key[: -len("/busy_s")] for key in lines[-1] if key.endswith("/busy_s")]
    if not stages:
        raise ValueError("the metrics lines name no stage (no `<stage>/busy_s`)")
    output = next((s for s in reversed(stages) if lines[-1].get(f"{s}/tokens")), stages[-1])
    pairs = [(a, b) for a, b in pairwise(lines) if b["time_s"] > a["time_s"]]
    t = [b["time_s"] for _, b in pairs]
    fig, (wait, speed, busy) = figure(3, 8)
    wait.plot([line["time_s"] for line in lines], [100 * line["data_wait_share"] for line in lines], marker=".")
    wait.set_ylabel("data wait (% of wall)")
    wait.set_ylim(0, 105)
    wait.set_title("is the consumer waiting for data?")
    rate = [(b[f"{output}/tokens"] - a[f"{output}/tokens"]) / (b["time_s"] - a["time_s"]) / 1e6 for a, b in pairs]
    speed.plot(t, rate, marker=".")
    speed.set_ylabel(f"M tokens/s out of `{output}`")
    for stage in stages:
        busy.plot(t, [100 * (b.get(f"{stage}/busy_s", 0) - a.get(f"{stage}/busy_s", 0)) / (b["time_s"] - a["time_s"])
                      for a, b in pairs], label=stage)
    busy.set_ylabel("busy (% of wall)")
    busy.set_xlabel("seconds")
    busy.set_title("which stage is busy? (stages in workers: summed over them)")
    busy.legend(fontsize="small", ncol=3)
    fig.savefig(path, dpi=110)


def plot_command(args: argparse.Namespace) -> int:
    require_matplotlib()
    metrics_chart(read_lines(args.metrics), args.out)
    print(f"wrote {args.out}")
    return 0


def add_parser(commands) -> None:
    """The ``plot`` verb."""
    p = commands.add_parser("plot", help="draw a `run --metrics` file: data wait, throughput and busy stages over time")
    p.add_argument("metrics", metavar="METRICS.jsonl", help="a file written by run --metrics")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the picture to write (.png, .svg, .pdf)")
    p.set_defaults(handler=plot_command)
