"""Time to first batch and peak RSS: our streaming pipeline against the book's ``create_dataloader_v1``.

    python benchmarks/first_batch.py --sizes 10MB 100MB 1GB --repeats 3

Each run is a fresh subprocess (peak RSS is per run, from ``getrusage``); the table shows medians.
Corpora are made with data/make_corpus.py (one .txt file each) and cached under bench-out/.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out"
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
B, L, STRIDE = 8, 256, 128
BOOK_BYTES_PER_TEXT_BYTE = 25  # MEASURED.md: 100 MB of text -> 2,551 MB peak RSS


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def run_ours(path: str, rss_batches: int, steady_seconds: float) -> dict:
    """Time ``Pipeline.from_config`` (read_text -> bpe_encode -> sliding_window -> batch) to the first batch
    in hand (the modules imported before), then keep going."""
    import stages  # noqa: F401 - the stage types, imported before the clock starts as torch is
    from pipeline import Pipeline

    config = {
        "stages": {
            "read": {"type": "read_text", "paths": [path]},
            "encode": {"type": "bpe_encode", "input": "read"},
            "window": {"type": "sliding_window", "input": "encode", "max_length": L, "stride": STRIDE},
            "batch": {"type": "batch", "input": "window", "batch_size": B},
        }
    }
    t0 = time.perf_counter()
    batches = iter(Pipeline.from_config(config))
    next(batches)
    t1 = time.perf_counter()
    n, rss, ended = 1, None, True
    for _ in batches:
        n += 1
        if n == rss_batches:
            rss = peak_rss_mb()
        if n >= rss_batches and time.perf_counter() - t1 >= steady_seconds:
            ended = False
            break
    t2 = time.perf_counter()
    return {"first": t1 - t0, "rss": rss if rss is not None else peak_rss_mb(), "rss_end": peak_rss_mb(),
            "tok_s": (n - 1) * B * L / (t2 - t1), "batches": n, "ended": ended}


def run_book(path: str, mem_cap_gb: float) -> dict:
    """Read the file into a str and build the book's loader; time and peak RSS at the first batch.

    The address space is capped (after the imports) so a run too big for the machine fails alone.
    """
    from tests.book import book_dataloader_v1

    if mem_cap_gb:
        cap = int(mem_cap_gb * 1e9)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    t0 = time.perf_counter()
    text = Path(path).read_text(encoding="utf-8")
    next(iter(book_dataloader_v1(text, batch_size=B, max_length=L, stride=STRIDE, shuffle=False)))
    return {"first": time.perf_counter() - t0, "rss": peak_rss_mb()}


def child(args: argparse.Namespace) -> None:
    """Entry point of one measured run: print its result as one JSON line."""
    try:
        if args.child == "ours":
            result = run_ours(args.corpus, 100, args.steady_seconds)
        else:
            result = run_book(args.corpus, args.book_mem_cap)
    except MemoryError:
        result = {"error": "out of memory at cap"}
    print(json.dumps(result), flush=True)


def measure(which: str, corpus: Path, args: argparse.Namespace) -> dict:
    """Run one child and return its result (or {"error": ...})."""
    cmd = [sys.executable, __file__, "--child", which, "--corpus", str(corpus),
           "--steady-seconds", str(args.steady_seconds), "--book-mem-cap", str(args.book_mem_cap)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    if which == "book" and args.book_mem_cap:  # any failure under the cap is almost surely an allocation
        return {"error": f"out of memory at cap {args.book_mem_cap:g} GB (rc {proc.returncode}: {tail[:60]})"}
    return {"error": f"failed, rc {proc.returncode}: {tail[:120]}"}


def corpus_file(source: Path, size_text: str) -> Path:
    """A single .txt corpus of ``size_text`` (e.g. 100MB), generated once and cached in bench-out/."""
    from make_corpus import make_corpus, parse_size

    out = OUT / f"corpus-{size_text}"
    path = out / "part-00000.txt"
    if path.exists() and not (out / "part-00001.txt").exists():
        return path
    size = parse_size(size_text)
    print(f"generating {size_text} corpus in {out} ...", file=sys.stderr, flush=True)
    r = make_corpus([source], size, out, fmt="text", file_size=2 * size + (1 << 20), overwrite=True)
    assert r["files"] == [str(path)], r["files"]
    return path


def median_of(runs: list[dict], key: str, fmt: str, scale: float = 1.0) -> str:
    """Median of ``key`` over runs, scaled and formatted; the first error if any run failed."""
    errors = [r["error"] for r in runs if "error" in r]
    return errors[0] if errors else fmt.format(statistics.median(r[key] for r in runs) * scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["10MB", "100MB", "1GB"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--book-max-size", default="100MB", help="skip the book on larger corpora")
    ap.add_argument("--book-mem-cap", type=float, default=12.0, help="address-space cap of a book run, GB (0: none)")
    ap.add_argument("--steady-seconds", type=float, default=5.0, help="how long ours runs after the first batch")
    ap.add_argument("--child", choices=["ours", "book"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not args.source.exists():
        sys.exit(f"first_batch: source text {args.source} not found; these benchmarks need ../shared/data "
                 "beside the project checkout (or pass --source FILE)")
    from make_corpus import parse_size

    OUT.mkdir(exist_ok=True)
    rows = []
    for size_text in args.sizes:
        corpus = corpus_file(args.source, size_text)
        size = corpus.stat().st_size
        ours = [measure("ours", corpus, args) for _ in range(args.repeats)]
        if parse_size(size_text) > parse_size(args.book_max_size):
            need = f"not run (needs ~{size * BOOK_BYTES_PER_TEXT_BYTE / 1e9:.0f} GB, estimated from MEASURED.md's 25x)"
            book, ratio = [{"error": need}], "–"
        else:
            book = [measure("book", corpus, args) for _ in range(args.repeats)]
            ok = not any("error" in r for r in ours + book)
            median = statistics.median
            ratio = f"{median(r['first'] for r in book) / median(r['first'] for r in ours):.1f}x" if ok else "–"
        print(f"{size_text}: ours {ours}\n{size_text}: book {book}", file=sys.stderr, flush=True)
        rows.append(
            [
                f"{size_text} ({size / 1e6:.0f} MB)",
                median_of(ours, "first", "{:.2f}"),
                median_of(ours, "rss", "{:.0f}"),
                median_of(ours, "rss_end", "{:.0f}"),
                median_of(ours, "tok_s", "{:.2f}", 1e-6) + ("*" if any(r.get("ended") for r in ours) else ""),
                median_of(book, "first", "{:.2f}"),
                median_of(book, "rss", "{:.0f}"),
                ratio,
            ]
        )
    head = [
        "size",
        "ours first batch (s)",
        "ours peak RSS (MB)",
        f"ours peak RSS after {args.steady_seconds:g} s (MB)",
        "ours steady M tokens/s",
        "book first batch (s)",
        "book peak RSS (MB)",
        "ratio first-batch book/ours",
    ]
    table = "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows])
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    text = (
        f"{table}\n\nMedians of {args.repeats} runs, each in a fresh process; B={B}, max_length={L}, stride={STRIDE}; "
        f"ours' peak RSS is taken after 100 batches; tokens/s counts the batches' input tokens "
        f"(each corpus token is in {L // STRIDE} windows), from the first batch on; * the corpus ran out first, "
        f"so the rate is inflated by the text encoded before the first batch.\n"
        f"python {platform.python_version()}, torch {version('torch')}, tiktoken {version('tiktoken')}\n"
        f"command: {command}\n"
    )
    print(text)
    (OUT / "first_batch.md").write_text(text)


if __name__ == "__main__":
    main()
