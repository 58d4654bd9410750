"""``pack`` against ``sliding_window`` on documents of log-normal length: tokens used / cropped / padded, and speed.

    python benchmarks/pack.py --size 10MB --repeats 3

The corpus (cached in bench-out/): Arrow documents cut from tinyshakespeare at random offsets, their
lengths in characters log-normal (median ``--median-chars`` 2,000, about 600 GPT-2 tokens; sigma
``--sigma`` 1.0; at most 200,000). For each max_length (256, 1024, 2048), each repeat runs, in this
process and in turn, ``read_arrow -> bpe_encode -> X -> batch(8)`` for X = ``sliding_window``
(stride = max_length), ``pack`` best_fit and greedy (remainder drop, buffer 1000) and best_fit with
remainder keep. Shares are of the encoder's tokens (its ``<|endoftext|>`` separators included):
used = tokens placed in rows, cropped = dropped by ``pack`` (the tail after the last window for
``sliding_window``), padded = padding tokens per row token. The rate is the encoder's tokens over the
wall time from building the pipeline to its last batch; its ratio is to the same repeat's
``sliding_window`` run (medians; every other repeat runs in reverse order). The machine is shared, so
the same ratio per CPU-second of this process (all its threads) is shown too. "alone" is the stage by
itself on the encoded items, held in memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from torchdata.nodes import IterableWrapper

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "data")]

from make_corpus import parse_size  # noqa: E402
from pipeline import Pipeline  # noqa: E402
from stages import Batch, BpeEncode, Pack, ReadArrow, SlidingWindow  # noqa: E402

SOURCE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
LENGTHS = (256, 1024, 2048)
RUNS = {  # name -> the stage after the encoder
    "sliding_window": lambda node, L: SlidingWindow(node, max_length=L, stride=L),
    "best_fit": lambda node, L: Pack(node, max_length=L, policy="best_fit"),
    "greedy": lambda node, L: Pack(node, max_length=L, policy="greedy"),
    "best_fit, keep": lambda node, L: Pack(node, max_length=L, policy="best_fit", remainder="keep"),
}


def corpus(size: int, median_chars: int, sigma: float, seed: int = 0) -> Path:
    folder = ROOT / "bench-out" / f"lognormal-{size}-{median_chars}-{sigma}"
    if (folder / "part-0.arrow").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    text = SOURCE.read_text(encoding="utf-8")
    rng = np.random.default_rng(seed)
    schema = pa.schema([("text", pa.string())])
    with ipc.new_file(folder / "part-0.arrow", schema) as writer:
        written = 0
        while written < size:
            lengths = np.clip(rng.lognormal(np.log(median_chars), sigma, 1000), 20, 200_000).astype(int)
            starts = rng.integers(0, len(text), 1000)
            docs = [(text * 2)[s : s + n] if s + n > len(text) else text[s : s + n] for s, n in zip(starts, lengths)]
            writer.write_batch(pa.record_batch({"text": docs}, schema=schema))
            written += sum(map(len, docs))
    return folder


def run(folder: Path, name: str, max_length: int) -> dict:
    started, cpu = time.perf_counter(), time.process_time()
    encode = BpeEncode(ReadArrow([str(folder)], column="text"))
    stage = RUNS[name](encode, max_length)
    rows = 0
    for batch in Pipeline(Batch(stage, 8, drop_last=False)):
        rows += len(batch["inputs"])
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    tokens = encode.stats["tokens"]
    if name == "sliding_window":
        used, cropped, padded = rows * max_length, stage.stats["tail_tokens"], 0
    else:
        stats = stage.stats
        used, cropped, padded = stats["tokens_packed"], stats["tokens_cropped"], stats["padding_tokens"]
    return {"rate": tokens / seconds, "cpu rate": tokens / cpu, "used": used / tokens, "cropped": cropped / tokens,
            "padded": padded / (rows * (max_length + 1)), "by_age": stage.stats["placed_by_age"], "rows": rows}


def alone(items: list[dict], name: str, max_length: int) -> float:
    """Tokens/s of the stage by itself, fed the encoded items from memory."""
    started = time.perf_counter()
    for _ in RUNS[name](_Items(items), max_length):
        pass
    return sum(len(item["ids"]) for item in items) / (time.perf_counter() - started)


class _Items(IterableWrapper):
    eot_id = 50256  # pack takes its bos from the encoder upstream


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="10MB")
    p.add_argument("--median-chars", type=int, default=2000)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    folder = corpus(parse_size(args.size), args.median_chars, args.sigma)
    items = list(BpeEncode(ReadArrow([str(folder)], column="text")))
    lengths = np.array([len(item["ids"]) for item in items])
    print(f"corpus {folder.name}: {len(items):,} documents, {lengths.sum():,} tokens; tokens per document: "
          f"median {int(np.median(lengths))}, mean {int(lengths.mean())}, p90 {int(np.percentile(lengths, 90))}, "
          f"max {lengths.max():,}")
    print("\n| max_length | rows from | used | cropped | padded | placed by age | M tokens/s end to end | ratio to "
          "sliding_window | per CPU-second, ratio | M tokens/s alone |\n" + "| --- " * 10 + "|")
    for max_length in LENGTHS:
        results: dict[str, list[dict]] = {name: [] for name in RUNS}
        for repeat in range(args.repeats):
            for name in list(RUNS)[:: 1 if repeat % 2 == 0 else -1]:  # every other repeat in reverse: drift cancels
                results[name].append(run(folder, name, max_length))
        for name, runs in results.items():
            ratio, cpu_ratio = (statistics.median(r[key] / w[key] for r, w in zip(runs, results["sliding_window"]))
                                for key in ("rate", "cpu rate"))
            rate = statistics.median(r["rate"] for r in runs)
            first = runs[0]
            print(f"| {max_length} | {name} | {first['used']:.1%} | {first['cropped']:.1%} | {first['padded']:.2%} | "
                  f"{first['by_age']:,} | {rate / 1e6:.2f} | {ratio:.2f} | {cpu_ratio:.2f} | "
                  f"{alone(items, name, max_length) / 1e6:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
