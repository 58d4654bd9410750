"""Peak RSS of ``bpe_encode`` (gigatoken) on text made of never-repeating words: flat whatever the size.

    python benchmarks/bpe_cache.py --sizes 100MB 1GB [--cache-memory BYTES] [--refresh-bytes N]

gigatoken caches every pre-token it meets and never evicts; ``bpe_encode`` builds a tokenizer anew once
the process's memory has grown by ``cache_memory`` since it was built (and every ``refresh_bytes`` of
text, when given). Each run is a fresh process that streams ``size`` characters of random
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


def child(size: int, settings: dict) -> dict:
    import psutil
    from torchdata.nodes import IterableWrapper

    from stages.bpe_encode import BpeEncode

    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], me.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    start, tokens = time.perf_counter(), 0
    node = BpeEncode(IterableWrapper(words(size)), backend="gigatoken", **settings)
    builds, new = [0], node._fast._new
    node._fast._new = lambda: builds.__setitem__(0, builds[0] + 1) or new()
    for item in node:
        tokens += len(item["ids"])
    seconds = time.perf_counter() - start
    done.set()
    peak_mb = max(peak[0], me.memory_info().rss) / 1e6
    return {"size": size, "peak_rss_mb": peak_mb, "seconds": seconds, "tokens": tokens, "builds": builds[0]}


def main() -> None:
    from make_corpus import parse_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["100MB", "1GB"], help="the first is the reference")
    ap.add_argument("--cache-memory", type=int, help="bpe_encode's cache_memory (default: its own)")
    ap.add_argument("--refresh-bytes", type=int, help="bpe_encode's refresh_bytes (default: none)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    settings = {k: v for k, v in [("cache_memory", args.cache_memory), ("refresh_bytes", args.refresh_bytes)] if v}
    if args.child is not None:
        print(json.dumps(child(args.child, settings)))
        return
    rows = []
    for size in map(parse_size, args.sizes):
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
        cmd = [sys.executable, __file__, "--child", str(size), *flags]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        r = rows[-1]
        print(
            f"{r['size'] / 1e6:>8,.0f} MB  peak RSS {r['peak_rss_mb']:>7,.0f} MB  "
            f"{r['size'] / r['seconds'] / 1e6:5.1f} MB/s  {r['tokens'] / r['seconds'] / 1e6:5.2f} M tokens/s  "
            f"{r['builds']} tokenizers built",
            flush=True,
        )
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(
        f"{settings or 'defaults'}: peak RSS ratio {ratio:.2f} (target <= 1.20): "
        f"{'ok' if ratio <= 1.2 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
