"""read_jsonl: peak RSS over a large .jsonl.zst against a small one, and its read rate against the encoder's.

    python benchmarks/jsonl.py --sizes 100MB 1GB --repeats 3

Corpora: documents from data/make_corpus.py (remixed paragraphs of --source) as JSON Lines
``{"id", "text", "source"}``, zstd-compressed (level 3); sizes are of the uncompressed JSON Lines,
generated once into bench-out/. Each measurement is a fresh subprocess:

- memory: ``ReadJsonl(corpus)`` streamed to the end, peak RSS = the process's ``ru_maxrss``;
  the large corpus's peak is given as a ratio to the small one's (one run each).
- rate, on the first --rate-mb MB of the small corpus's documents: ``read_jsonl`` alone (decompress,
  split, parse, build documents; MB/s of document text); ``bpe_encode`` alone fed the same documents
  from a list in memory (its default backend and threads); and the raw gigatoken encoder alone, one
  thread, on the same texts joined by ``<|endoftext|>`` into ~1 MB calls (its tokenizer built before
  the clock starts). Ratios are read / encoder per repeat; the table shows medians over --repeats
  (each repeat a fresh process running the three, one after the other). --rate-only skips the memory runs.
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


def jsonl_corpus(source: Path, size_text: str) -> Path:
    """A .jsonl.zst of ``size_text`` uncompressed bytes, generated once (written under a temporary name)."""
    import zstandard
    from make_corpus import iter_documents, load_paragraphs, parse_size

    path = OUT / f"corpus-{size_text}.jsonl.zst"
    if path.exists():
        return path
    print(f"generating {path} ...", file=sys.stderr, flush=True)
    OUT.mkdir(exist_ok=True)
    target, written = parse_size(size_text), 0
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as out:
        for doc_id, text, name, _ in iter_documents(*load_paragraphs([source]), seed=0):
            line = (json.dumps({"id": doc_id, "text": text, "source": name}, ensure_ascii=False) + "\n").encode()
            out.write(line)
            written += len(line)
            if written >= target:
                break
    tmp.rename(path)
    return path


def child(mode: str, corpus: Path, rate_mb: float) -> dict:
    from torchdata.nodes import IterableWrapper

    from pipeline import Pipeline
    from stages import BpeEncode, ReadJsonl

    if mode == "memory":
        start, docs, text_bytes = time.perf_counter(), 0, 0
        for doc in ReadJsonl(str(corpus)):
            docs += 1
            text_bytes += len(doc["text"])  # characters; ~bytes for this mostly-ASCII text
        seconds = time.perf_counter() - start
        return {
            "docs": docs,
            "seconds": seconds,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    limit = rate_mb * 1e6
    start, docs, text_bytes = time.perf_counter(), [], 0
    for doc in ReadJsonl(str(corpus)):
        docs.append(doc)
        text_bytes += len(doc["text"].encode())
        if text_bytes >= limit:
            break
    read_seconds = time.perf_counter() - start
    gigatoken = gigatoken_seconds([d["text"] for d in docs])  # first: the process's pool of tokenizers is empty
    stage = BpeEncode(IterableWrapper(docs))
    encode = Pipeline(stage, num_workers=0)
    start, tokens = time.perf_counter(), 0
    for item in encode:
        tokens += len(item["ids"])
    encode_seconds = time.perf_counter() - start
    return {
        "text_mb": text_bytes / 1e6,
        "read_mb_s": text_bytes / 1e6 / read_seconds,
        "encode_mb_s": text_bytes / 1e6 / encode_seconds,
        "backend": f"{stage.backend}, {stage.num_threads} threads",
        "gigatoken_mb_s": text_bytes / 1e6 / gigatoken,
        "tokens": tokens,
    }


def gigatoken_seconds(texts: list[str]) -> float:
    """Seconds a new raw gigatoken tokenizer takes over ``texts`` on one thread, in ~1 MB calls (built before
    the clock starts; refresh_bytes 0: dropped after, not lent to bpe_encode with its warm cache)."""
    from stages.encoding import load_encoding
    from stages.fast_bpe import PRETOKENIZERS, TiktokenRanks, rank_file

    calls, size = [[]], 0
    for text in texts:
        calls[-1].append(text)
        size += len(text)
        if size >= 1 << 20:
            calls, size = [*calls, []], 0
    ranks = TiktokenRanks(rank_file(load_encoding("gpt2")), PRETOKENIZERS["gpt2"], 0)
    with ranks.tokenizer(0) as tokenizer:
        tokenizer.encode_batch(["warm"], parallel=False)  # awkward's import, outside the clock
        start = time.perf_counter()
        for call in calls:
            tokenizer.encode_batch(call, parallel=False)
        return time.perf_counter() - start


def run(mode: str, corpus: Path, rate_mb: float) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--corpus", str(corpus), "--rate-mb", str(rate_mb)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"jsonl benchmark child failed: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs=2, default=["100MB", "1GB"], help="small and large corpus (uncompressed)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate-mb", type=float, default=20.0, help="MB of document text for the rate runs")
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--rate-only", action="store_true", help="skip the memory runs (and the large corpus)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.corpus, args.rate_mb)), flush=True)
        return
    small = jsonl_corpus(args.source, args.sizes[0])
    rates = [run("rate", small, args.rate_mb) for _ in range(args.repeats)]

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    lines = []
    if not args.rate_only:
        large = jsonl_corpus(args.source, args.sizes[1])
        memory = {s: [run("memory", c, 0)] for s, c in zip(args.sizes, (small, large))}  # barely varies: one run
        peak = {s: med(rows, "ru_maxrss_mb") for s, rows in memory.items()}
        lines = [
            "| corpus (uncompressed) | .zst size (MB) | documents | peak RSS (MB) | ratio to the small one | seconds |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for s, c in zip(args.sizes, (small, large)):
            lines.append(
                f"| {s} | {c.stat().st_size / 1e6:,.0f} | {med(memory[s], 'docs'):,.0f} | {peak[s]:.0f} | "
                f"{peak[s] / peak[args.sizes[0]]:.2f} | {med(memory[s], 'seconds'):.1f} |"
            )
        lines.append("")

    def ratio(key: str) -> float:
        return statistics.median(r["read_mb_s"] / r[key] for r in rates)

    lines += [
        "| stage alone, same documents | MB/s of document text | read_jsonl's rate / this |",
        "| --- | --- | --- |",
        f"| read_jsonl (.jsonl.zst: decompress, parse, documents) | {med(rates, 'read_mb_s'):.0f} | |",
        f"| bpe_encode (from a list in memory; {rates[0]['backend']}) | {med(rates, 'encode_mb_s'):.0f} | "
        f"{ratio('encode_mb_s'):.2f}x |",
        f"| raw gigatoken, 1 thread, ~1 MB calls | {med(rates, 'gigatoken_mb_s'):.0f} | "
        f"{ratio('gigatoken_mb_s'):.2f}x |",
    ]
    text = "\n".join(lines) + (
        f"\n\nOne memory run per corpus; rates: medians of {args.repeats} runs, each a fresh process, over the "
        f"first {args.rate_mb:g} MB of document text. python {platform.python_version()}, "
        f"pyarrow {version('pyarrow')}, orjson {version('orjson')}, tiktoken {version('tiktoken')}, "
        f"gigatoken {version('gigatoken')}\n"
        f"command: {shlex.join(['python', *sys.argv])}\n"
    )
    print(text)
    (OUT / "jsonl.md").write_text(text)


if __name__ == "__main__":
    main()
