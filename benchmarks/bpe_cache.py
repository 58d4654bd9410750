"""Peak RSS of ``bpe_encode`` (gigatoken) on text made of never-repeating words: flat whatever the size.

    python benchmarks/bpe_cache.py --sizes 100MB 1GB [--refresh-bytes N]

gigatoken caches every pre-token it meets and never evicts; ``bpe_encode`` builds it anew every
``refresh_bytes`` of text. Each run is a fresh process that streams ``size`` characters of random
lowercase words (8 letters: 2e11 of them, so words practically never repeat), 1 MB a document,
through ``BpeEncode(backend="gigatoken")`` and samples its RSS every 0.1 s. The large run's peak
must be within 20% of the small run's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
DOC = 1_000_000  # characters a document


def words(total: int, seed: int = 0):
    """Documents of random 8-letter words, ``total`` characters in all, made as they are read."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for i in range(0, total, DOC):
        letters = rng.integers(ord("a"), ord("z") + 1, size=min(DOC, total - i), dtype=np.uint8)
        letters[::9] = ord(" ")  # " abcdefgh" repeated
        yield {"text": letters.tobytes().decode("ascii"), "source": "words", "record": i // DOC}


def child(size: int, refresh_bytes: int) -> dict:
    import psutil
    from torchdata.nodes import IterableWrapper

    from stages.bpe_encode import BpeEncode

    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], me.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    start, tokens = time.perf_counter(), 0
    node = BpeEncode(IterableWrapper(words(size)), backend="gigatoken", refresh_bytes=refresh_bytes)
    for item in node:
        tokens += len(item["ids"])
    seconds = time.perf_counter() - start
    done.set()
    return {"size": size, "peak_rss_mb": max(peak[0], me.memory_info().rss) / 1e6, "seconds": seconds, "tokens": tokens}


def main() -> None:
    from make_corpus import parse_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["100MB", "1GB"], help="the first is the reference")
    ap.add_argument("--refresh-bytes", type=int, default=None, help="bpe_encode's refresh_bytes (default: its own)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.refresh_bytes is None:
        import inspect

        from stages.bpe_encode import BpeEncode

        args.refresh_bytes = inspect.signature(BpeEncode).parameters["refresh_bytes"].default
    if args.child is not None:
        print(json.dumps(child(args.child, args.refresh_bytes)))
        return
    rows = []
    for size in map(parse_size, args.sizes):
        cmd = [sys.executable, __file__, "--child", str(size), "--refresh-bytes", str(args.refresh_bytes)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        r = rows[-1]
        print(
            f"{r['size'] / 1e6:>8,.0f} MB  peak RSS {r['peak_rss_mb']:>7,.0f} MB  "
            f"{r['size'] / r['seconds'] / 1e6:5.1f} MB/s  {r['tokens'] / r['seconds'] / 1e6:5.2f} M tokens/s",
            flush=True,
        )
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(
        f"refresh_bytes {args.refresh_bytes:,}: peak RSS ratio {ratio:.2f} (target <= 1.20): "
        f"{'ok' if ratio <= 1.2 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
