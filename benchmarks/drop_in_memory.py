"""Peak RSS of ``create_dataloader_v1``: the drop-in (windows as views) against the book's, fresh processes.

    python benchmarks/drop_in_memory.py [--mb 1] [--stride 4]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def child(which: str, mb: float, stride: int) -> None:
    import pipeline
    from stages.encoding import load_encoding
    from tests.book import book_dataloader_v1

    text = (ROOT.parent / "shared" / "data" / "the-verdict.txt").read_text(encoding="utf-8")
    size = int(mb * 1e6)
    text = (text * (size // len(text) + 1))[:size]
    load_encoding("gpt2")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    make = pipeline.create_dataloader_v1 if which == "ours" else book_dataloader_v1
    loader = make(text, batch_size=8, max_length=256, stride=stride, shuffle=False)
    next(iter(loader))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(f"{which}: {len(loader.dataset):,} windows of 256, peak RSS grew {grown:,.0f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=float, default=1.0, help="MB of text (the verdict, repeated)")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--child", choices=["ours", "book"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.mb, args.stride)
    for which in ("ours", "book"):
        subprocess.run([sys.executable, __file__, "--child", which, "--mb", str(args.mb), "--stride", str(args.stride)],
                       check=True)


if __name__ == "__main__":
    main()
