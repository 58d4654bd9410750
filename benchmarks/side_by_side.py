"""Side by side, tokens/s on the same Arrow documents: raw encoders, this pipeline, Hugging Face ``datasets``.

    python benchmarks/side_by_side.py --size 100MB --repeats 3 [--chart bench-out/side_by_side.png]

Every measurement is a fresh process; the runs are interleaved (each repeat runs every row once, in
order) and the table shows medians with the ratios to raw gigatoken and to ``datasets``.

- tiktoken: the documents joined into ~1 MB chunks, ``encode_ordinary_batch(chunks, num_threads=2)``.
- gigatoken: the documents as they are, ``Tokenizer.encode_batch`` on all cores, built from GPT-2's ranks.
  (both raw rows read the texts into memory first, untimed)
- hand loop: what a Python loop gets from the same encoder on 2 threads, with nothing else: each Arrow
  record batch's texts (``to_pylist``) in ~1 MB groups, ``encode_batch(parallel=False)`` on 2 threads one
  group ahead, ``<|endoftext|>`` between documents, [8, 256] int64 ``inputs``/``targets`` cut from the stream
  (no state, no resume, no shards, no checks): a ceiling for any Python consumer of these cores.
- pipeline, N workers: ``read_arrow -> bpe_encode(blocks=True) -> sliding_window(256, 256) -> batch(8)``, from
  ``Pipeline(...)`` to the last batch; ``+ embed 768`` adds the embed stage (d_model 768, CPU, no grad), with
  torch on one thread: its default, a spinning OpenMP thread per core, fights the encode threads for the
  cores (5x slower on 2 shared cores: 0.06 against 0.31 M tokens/s on 5 MB).
- prepare: ``stages.tokens.prepare`` (``python -m pipeline prepare``) of ``read_arrow -> bpe_encode`` into a
  temporary folder, from the call to the manifest written (sources hashed, shards written and synced).
- datasets: ``load_dataset("arrow", streaming=True)`` with one batched map that tokenizes (tiktoken,
  2 threads) and cuts rows of 257 tokens, read 8 rows at a time.

Tokens/s counts the tokens of the output (batches' inputs for ours and datasets', all ids for the
raw rows). The machine is shared: trust the ratios of one run more than absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "data"), str(ROOT / "benchmarks")]
from throughput import CHUNK, DEFAULT_SOURCE, OUT, arrow_corpus, read_texts  # noqa: E402

B, L = 8, 256
ROWS = ["tiktoken", "gigatoken", "loop", "pipeline-0", "pipeline-2", "embed-0", "embed-2", "prepare", "datasets"]
LABELS = {
    "tiktoken": "raw tiktoken, 2 threads, 1 MB chunks",
    "gigatoken": "raw gigatoken, all cores",
    "loop": "hand loop: 2 encode threads to batches",
    "pipeline-0": "pipeline to batch, 0 workers",
    "pipeline-2": "pipeline to batch, 2 workers",
    "embed-0": "pipeline to embed 768, 0 workers",
    "embed-2": "pipeline to embed 768, 2 workers",
    "prepare": "prepare: token shards on disk",
    "datasets": "HF datasets streaming, fused map",
}


def raw_tiktoken(corpus: Path) -> tuple[int, float]:
    from stages.encoding import load_encoding

    texts, chunks, current = read_texts(corpus), [], []
    for text in texts:
        current.append(text)
        if sum(map(len, current)) >= CHUNK:
            chunks.append("\n\n".join(current))
            current = []
    chunks += ["\n\n".join(current)] if current else []
    enc = load_encoding("gpt2")
    start = time.perf_counter()
    ids = enc.encode_ordinary_batch(chunks, num_threads=2)
    return sum(map(len, ids)), time.perf_counter() - start


def raw_gigatoken(corpus: Path) -> tuple[int, float]:
    from stages.encoding import load_encoding
    from stages.fast_bpe import TiktokenRanks, rank_file

    texts = read_texts(corpus)
    enc = load_encoding("gpt2")
    tok = TiktokenRanks(rank_file(enc), "gpt2", 1 << 62)._new()  # gigatoken.Tokenizer.from_tiktoken
    import awkward as ak  # the type of encode_batch's output, imported before the clock: not encoding time

    start = time.perf_counter()
    out = tok.encode_batch(texts)
    seconds = time.perf_counter() - start
    return int(ak.sum(ak.num(out, axis=1))), seconds


def hand_loop(corpus: Path) -> tuple[int, float]:
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from itertools import chain

    import awkward as ak  # as for the raw row: imported before the clock
    import numpy as np
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import torch

    from stages.encoding import cached_rank_file
    from stages.fast_bpe import TiktokenRanks
    from stages.separators import separated
    from throughput import corpus_files

    ranks = TiktokenRanks(cached_rank_file("gpt2"), "gpt2")
    start = time.perf_counter()
    tokenizers, pool = [ranks._new(), ranks._new()], ThreadPoolExecutor(2)

    def encode(i: int, texts: list[str]) -> np.ndarray:
        out = tokenizers[i].encode_batch(texts, parallel=False)
        counts = ak.to_numpy(ak.num(out, axis=1))
        return separated(ak.to_numpy(ak.flatten(out, axis=1)).view(np.int32), counts, 50256)[0]

    def groups():
        for path in corpus_files(corpus):
            reader = ipc.open_file(pa.memory_map(str(path)))
            for b in range(reader.num_record_batches):
                texts = reader.get_batch(b).column("text").to_pylist()
                step = max(1, len(texts) * (1 << 20) // max(1, sum(map(len, texts))))
                yield from (texts[i : i + step] for i in range(0, len(texts), step))

    def batches(ids: np.ndarray):
        """The batches the ids hold (a window's last token is the next one's first)."""
        for i in range(0, (len(ids) - 1) // (B * L) * B * L, B * L):
            yield {
                "inputs": torch.from_numpy(ids[i : i + B * L].astype(np.int64).reshape(B, L)),
                "targets": torch.from_numpy(ids[i + 1 : i + 1 + B * L].astype(np.int64).reshape(B, L)),
            }

    tokens, held, futures = 0, np.zeros(0, np.int32), deque()
    for k, texts in enumerate(chain(groups(), [None])):
        if texts is not None:
            futures.append(pool.submit(encode, k % 2, texts))
        while len(futures) > 2 or (texts is None and futures):  # two groups encode while this thread batches
            held = np.concatenate([held, futures.popleft().result()])
            used = sum(batch["inputs"].numel() for batch in batches(held))
            tokens, held = tokens + used, held[used:]
    return tokens, time.perf_counter() - start


def pipeline(corpus: Path, workers: int, embed: bool) -> tuple[int, float]:
    import torch

    from pipeline import Pipeline
    from stages import Batch, BpeEncode, Embed, ReadArrow, SlidingWindow

    torch.set_grad_enabled(False)
    if embed:
        torch.set_num_threads(1)
    start = time.perf_counter()
    node = Batch(SlidingWindow(BpeEncode(ReadArrow([str(corpus)]), blocks=True), max_length=L, stride=L), batch_size=B)
    if embed:
        node = Embed(node, vocab_size=50257, d_model=768, context_length=L)
    tokens = sum(batch["inputs"].numel() for batch in Pipeline(node, num_workers=workers))
    return tokens, time.perf_counter() - start


def prepare_cache(corpus: Path) -> tuple[int, float]:
    import tempfile

    from stages.tokens.prepare import prepare

    read, encode = {"type": "read_arrow", "paths": [str(corpus)]}, {"type": "bpe_encode", "input": "read"}
    config = {"stages": {"read": read, "encode": encode}}
    with tempfile.TemporaryDirectory(dir=OUT) as folder:
        start = time.perf_counter()
        manifest = prepare(config, Path(folder) / "cache")
        return manifest["counts"]["tokens"], time.perf_counter() - start


def hf_datasets(corpus: Path) -> tuple[int, float]:
    import datasets

    from stages.encoding import load_encoding

    datasets.disable_progress_bars()
    enc = load_encoding("gpt2")
    files = [str(p) for p in sorted(corpus.glob("part-*.arrow"))]
    start = time.perf_counter()

    def tokenize_and_chunk(batch: dict) -> dict:
        ids = [i for doc in enc.encode_ordinary_batch(batch["text"], num_threads=2) for i in doc + [enc.eot_token]]
        return {"ids": [ids[i : i + L + 1] for i in range(0, len(ids) - L, L)]}  # as the book: a shared token

    ds = datasets.load_dataset("arrow", data_files=files, split="train", streaming=True)
    ds = ds.map(tokenize_and_chunk, batched=True, batch_size=1000, remove_columns=["id", "text", "source"])
    tokens = sum(len(batch["ids"]) * L for batch in ds.iter(batch_size=B))
    return tokens, time.perf_counter() - start


def child(row: str, corpus: Path) -> dict:
    if row == "tiktoken":
        tokens, seconds = raw_tiktoken(corpus)
    elif row == "gigatoken":
        tokens, seconds = raw_gigatoken(corpus)
    elif row == "loop":
        tokens, seconds = hand_loop(corpus)
    elif row == "datasets":
        tokens, seconds = hf_datasets(corpus)
    elif row == "prepare":
        tokens, seconds = prepare_cache(corpus)
    else:
        kind, workers = row.split("-")
        tokens, seconds = pipeline(corpus, int(workers), kind == "embed")
    return {"row": row, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def chart(medians: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(medians)[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1))
    ax.barh(
        [LABELS[r] for r in rows],
        [medians[r] / 1e6 for r in rows],
        color=["tab:orange" if r.startswith(("pipeline", "embed")) else "tab:gray" for r in rows],
    )
    ax.set_xlabel("M tokens/s (median)")
    ax.set_title("GPT-2 BPE, Arrow documents -> [8, 256] batches")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="100MB", help="Arrow corpus size (data/make_corpus.py, cached in bench-out/)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    ap.add_argument("--chart", type=Path, default=OUT / "side_by_side.png", help="PNG of the table (needs matplotlib)")
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.corpus))))
        return
    corpus = arrow_corpus(args.source, args.size)
    runs: dict[str, list[float]] = {row: [] for row in args.rows}
    for repeat in range(args.repeats):
        for row in args.rows:
            cmd = [sys.executable, __file__, "--child", row, "--corpus", str(corpus)]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            runs[row].append(result["tok_s"])
            print(
                f"repeat {repeat + 1}: {row:<11} {result['tok_s'] / 1e6:6.2f} M tokens/s", file=sys.stderr, flush=True
            )
    medians = {row: statistics.median(rates) for row, rates in runs.items()}
    base, hf = medians.get("gigatoken"), medians.get("datasets")
    print(f"\n{args.size} Arrow corpus, medians of {args.repeats} interleaved repeats\n")
    print("| run | M tokens/s | x raw gigatoken | x HF datasets |\n| --- | ---: | ---: | ---: |")
    for row, rate in medians.items():
        ratio = lambda b: f"{rate / b:.2f}" if b else "-"  # noqa: E731
        print(f"| {LABELS[row]} | {rate / 1e6:.2f} | {ratio(base)} | {ratio(hf)} |")
    try:
        chart(medians, args.chart)
        print(f"\nchart: {args.chart}")
    except ImportError:
        print("\n(no chart: pip install '.[bench]' for matplotlib)")


if __name__ == "__main__":
    main()
