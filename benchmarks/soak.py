"""Soak: stream a multi-GB Arrow corpus for several epochs with worker processes; nothing may grow.

    python benchmarks/soak.py [--corpus bench-out/arrow-2GB] [--size 1GB] [--max-epochs 3] [--num-workers 2]
    python benchmarks/soak.py --long-word 100MB      # one 100 MB "word" through read_text -> bpe_encode

Soak: ReadArrow -> BpeEncode -> SlidingWindow(256, 256) -> Batch(8) through ``Pipeline(...,
num_workers=N)``, iterated epoch after epoch in this process. A thread samples, every 0.25 s, the RSS
and the open file descriptors (``psutil`` ``num_fds``) of this process plus all its children (the
worker processes, forked afresh each epoch), and keeps each epoch's peaks; after each epoch it also
counts the fds and the live children left. Every epoch must give the same number of batch tokens
(and of encoded tokens); peak RSS and fds are flagged when an epoch exceeds the first by more than
``RSS_SLACK`` / ``FDS_SLACK``. The corpus is the first files of ``--corpus`` that add up to ``--size``
(made with data/make_corpus.py from tinyshakespeare when the folder is missing).

Long word: writes a file holding one word of ``--long-word`` random letters (no whitespace), streams
it through ReadText (``--chunk-bytes``, default 1 MiB) -> BpeEncode in a fresh process, and encodes it
with tiktoken's ``encode_ordinary`` alone in another, reporting each one's time and peak RSS
(``ru_maxrss``), and whether our tokens equal tiktoken's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out"
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
B, L, STRIDE = 8, 256, 256
INTERVAL = 0.25  # seconds between samples
RSS_SLACK = 1.10  # an epoch's peak RSS within 10% of the first epoch's
# an epoch's usual (most frequent) open fds (main + workers) within 2 of the baseline epoch's;
# the main's after it, equal
FDS_SLACK = 2
# Workers forked in epoch 1 inherit fewer of the main process's pipes than later ones (a one-off step of
# ~4 per worker, measured), so with 3+ epochs the fd baseline is epoch 2; RSS is compared to epoch 1.


class Sampler(threading.Thread):
    """Peak RSS and open fds of this process plus its children, per epoch (``mark`` starts a new one)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.lock = threading.Lock()
        self.peak_rss = self.peak_fds = self.peak_children = 0
        self.fds: list[int] = []  # this epoch's samples, for the steady-state value (their mode)
        self._done = threading.Event()

    def sample(self) -> tuple[int, int, int]:
        procs = [self.me]
        try:
            procs += self.me.children(recursive=True)
        except self.psutil.Error:
            pass
        rss = fds = live = 0
        for p in procs:
            try:
                if p is not self.me and p.status() == self.psutil.STATUS_ZOMBIE:
                    continue
                rss += p.memory_info().rss
                fds += p.num_fds()
                live += p is not self.me
            except self.psutil.Error:  # a worker ended between the listing and the read
                continue
        with self.lock:
            self.peak_rss, self.peak_fds = max(self.peak_rss, rss), max(self.peak_fds, fds)
            self.peak_children = max(self.peak_children, live)
            self.fds.append(fds)
        return rss, fds, live

    def mark(self) -> tuple[int, int, int, float]:
        """This epoch's peaks (RSS bytes, fds, live children) and most frequent fds; starts the next epoch's."""
        import statistics

        self.sample()
        with self.lock:
            out = self.peak_rss, self.peak_fds, self.peak_children, max(statistics.multimode(self.fds))
            self.peak_rss = self.peak_fds = self.peak_children = 0
            self.fds = []
        return out

    def run(self) -> None:
        while not self._done.wait(INTERVAL):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()


def corpus_files(folder: Path, size: int, source: Path) -> tuple[list[str], int]:
    """The first part files of ``folder`` whose text adds up to at least ``size`` bytes (made if missing)."""
    if not sorted(folder.glob("part-*.arrow")):
        from make_corpus import make_corpus

        print(f"making {folder} ({size / 1e9:.1f} GB of text from {source}) ...", file=sys.stderr, flush=True)
        make_corpus([source], size, folder, fmt="arrow")
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.ipc as ipc

    files, total = [], 0
    for path in sorted(folder.glob("part-*.arrow")):
        with pa.memory_map(str(path)) as source_file:
            reader = ipc.open_file(source_file)
            total += sum(
                pc.sum(pc.binary_length(reader.get_batch(i).column("text"))).as_py() or 0
                for i in range(reader.num_record_batches)
            )
        files.append(str(path))
        if total >= size:
            break
    return files, total


def soak(files: list[str], epochs: int, num_workers: int) -> list[dict]:
    import psutil

    from pipeline import Pipeline
    from stages import Batch, BpeEncode, ReadArrow, SlidingWindow

    sampler = Sampler()
    rss0, fds0, _ = sampler.sample()
    print(f"before: RSS {rss0 / 1e6:.0f} MB, {fds0} open fds", file=sys.stderr, flush=True)
    node = Batch(SlidingWindow(BpeEncode(ReadArrow(files)), max_length=L, stride=STRIDE), batch_size=B)
    pipe = Pipeline(node, num_workers=num_workers)
    sampler.mark()
    sampler.start()
    rows = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        tokens = batches = 0
        for batch in pipe:
            tokens += batch["inputs"].numel()
            batches += 1
        seconds = time.perf_counter() - t0
        stats = pipe.stats()
        encoded = int(next((s["tokens"] for s in stats.values() if "tokens" in s), 0))
        peak_rss, peak_fds, peak_children, steady_fds = sampler.mark()
        me = psutil.Process()
        fds_after = []
        for _ in range(5):  # the least over 1 s: pipes of the epoch's workers close as they are reaped
            time.sleep(0.2)
            fds_after.append(me.num_fds())
        left = [p for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        sampler.mark()  # drop the samples of the pause
        rows.append(
            {
                "epoch": epoch,
                "batch_tokens": tokens,
                "encoded_tokens": encoded,
                "batches": batches,
                "seconds": seconds,
                "peak_rss_mb": peak_rss / 1e6,
                "peak_fds": peak_fds,
                "steady_fds": steady_fds,
                "workers_seen": peak_children,
                "fds_after": min(fds_after),
                "rss_after_mb": me.memory_info().rss / 1e6,
                "live_children_after": len(left),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    sampler.stop()
    return rows


def report(
    rows: list[dict], files: list[str], text_bytes: int, args: argparse.Namespace, code: str
) -> tuple[str, list[str]]:
    first = rows[0]
    fd_base = rows[1] if len(rows) >= 3 else rows[0]
    head = [
        "epoch",
        "batch tokens",
        "encoded tokens",
        "seconds",
        "peak RSS MB (main + workers)",
        "open fds (main + workers): usual / peak",
        "fds after epoch (main)",
        "live children after epoch",
        "flags",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    problems = []
    for r in rows:
        flags = []
        if r["batch_tokens"] != first["batch_tokens"] or r["encoded_tokens"] != first["encoded_tokens"]:
            flags.append("TOKENS DIFFER")
        if r["peak_rss_mb"] > first["peak_rss_mb"] * RSS_SLACK:
            flags.append(f"RSS GREW {r['peak_rss_mb'] / first['peak_rss_mb']:.2f}x")
        late = r["epoch"] > fd_base["epoch"]
        if (late and r["steady_fds"] > fd_base["steady_fds"] + FDS_SLACK) or r["fds_after"] > first["fds_after"]:
            flags.append("FDS GREW")
        if r["live_children_after"]:
            flags.append("WORKERS LEFT")
        problems += [f"epoch {r['epoch'] + 1}: {f}" for f in flags]
        lines.append(
            f"| {r['epoch'] + 1} | {r['batch_tokens']:,} | {r['encoded_tokens']:,} | {r['seconds']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | "
            f"{r['steady_fds']} / {r['peak_fds']} | {r['fds_after']} | {r['live_children_after']} | "
            f"{', '.join(flags) or 'ok'} |"
        )
    verdict = (
        "FLAT: same tokens every epoch; peak RSS within "
        f"{RSS_SLACK - 1:.0%} of epoch 1; usual fds (the most frequent sample) of later epochs within {FDS_SLACK} "
        f"of epoch {fd_base['epoch'] + 1} and the main process's fds after each epoch "
        "no higher than after epoch 1; no worker left between epochs."
        if not problems
        else "GROWTH OR MISMATCH: " + "; ".join(problems)
    )
    return (
        "\n".join(lines) + "\n\n" + verdict + "\n\n"
        f"Corpus: {len(files)} Arrow files, {sum(os.path.getsize(f) for f in files) / 1e9:.2f} GB on disk, "
        f"{text_bytes / 1e9:.2f} GB of "
        f"text ({Path(files[0]).parent}, {', '.join(Path(f).name for f in files)}). ReadArrow -> BpeEncode -> "
        f"SlidingWindow({L}, {STRIDE}) -> Batch({B}) with Pipeline(num_workers={args.num_workers}), {len(rows)} "
        "epochs in one process; "
        f"RSS and fds (psutil) of the process plus its live children sampled every {INTERVAL} s.\n"
        f"python {platform.python_version()}, torch {version('torch')}, torchdata {version('torchdata')}, "
        f"tiktoken {version('tiktoken')}, pyarrow {version('pyarrow')}, psutil {version('psutil')}; "
        f"{os.cpu_count()} CPUs\n"
        f"{code}command: python benchmarks/soak.py {' '.join(sys.argv[1:])}\n"
    ), problems


# --- one enormous word ------------------------------------------------------------------------------


def long_word_child(path: str, n: int, chunk_bytes: int, tiktoken_only: bool) -> dict:
    """Ours (ReadText -> BpeEncode) or tiktoken alone (encode_ordinary of the file's text): time and peak RSS."""
    import numpy as np

    from stages import BpeEncode, ReadText
    from stages.encoding import load_encoding

    enc = load_encoding("gpt2")
    enc.encode_ordinary("warm up")
    base = _rss_now()
    t0 = time.perf_counter()
    if tiktoken_only:
        with open(path, encoding="utf-8") as f:
            ids = [np.asarray(enc.encode_ordinary(f.read()), dtype=np.int32)]
    else:
        node = BpeEncode(ReadText(path, chunk_bytes=chunk_bytes))
        node.reset()
        ids = [item["ids"] for item in iter(lambda: next(node, None), None)]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    got = np.concatenate(ids)
    out = {
        "bytes": n,
        "pieces": len(ids),
        "tokens": int(got.size),
        "seconds": seconds,
        "rss_before_mb": base / 1e6,
        "peak_rss_mb": peak / 1e6,
        "peak_over_word": (peak - base) / n,
        "chunk_bytes": chunk_bytes,
        "tiktoken_only": tiktoken_only,
    }
    if not tiktoken_only:
        with open(path, encoding="utf-8") as f:
            out["equal_to_encode_ordinary"] = bool(
                np.array_equal(got, np.asarray(enc.encode_ordinary(f.read()), dtype=np.int32))
            )
    return out


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def long_word(n: int, chunk_bytes: int) -> None:
    """One word of ``n`` random letters: ours and tiktoken alone, each in a fresh process (ru_maxrss is per process)."""
    import numpy as np

    OUT.mkdir(exist_ok=True)
    path = OUT / f"long-word-{n}.txt"
    if not path.exists() or path.stat().st_size != n:
        letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
        rng = np.random.default_rng(0)
        with open(
            path, "wb"
        ) as f:  # 1 MB at a time: this process stays small (a child's ru_maxrss starts at its parent's)
            for start in range(0, n, 1 << 20):
                f.write(letters[rng.integers(0, len(letters), min(1 << 20, n - start))].tobytes())
    print(
        "| run | pieces | tokens | seconds | RSS before (MB) | peak RSS (MB) | (peak - before) / word | tokens == "
        "encode_ordinary |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for tiktoken_only in (False, True):
        cmd = [sys.executable, __file__, "--long-word-child", str(path), "--chunk-bytes", str(chunk_bytes)] + (
            ["--tiktoken-only"] if tiktoken_only else []
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"long word: child failed, rc {proc.returncode}: {proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        name = (
            "tiktoken alone: encode_ordinary(text)"
            if tiktoken_only
            else f"ours: ReadText(chunk_bytes={chunk_bytes:,}) -> BpeEncode"
        )
        print(
            f"| {n / 1e6:.0f} MB word, {name} | {r['pieces']} | {r['tokens']:,} | {r['seconds']:.1f} | "
            f"{r['rss_before_mb']:.0f} | "
            f"{r['peak_rss_mb']:,.0f} | {r['peak_over_word']:.1f}x | {r.get('equal_to_encode_ordinary', '-')} |",
            flush=True,
        )
        print(json.dumps(r), file=sys.stderr)


def parse_size(text: str) -> int:
    from make_corpus import parse_size as parse

    return parse(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--corpus", type=Path, default=OUT / "arrow-2GB", help="a folder of Arrow part files (made if missing)"
    )
    ap.add_argument(
        "--size", default="2GB", help="stream the first files of the corpus holding at least this much text"
    )
    ap.add_argument("--max-epochs", type=int, default=3)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help="text to make the corpus from when it is missing"
    )
    ap.add_argument(
        "--long-word", metavar="SIZE", help="instead: stream one word of SIZE bytes through read_text -> bpe_encode"
    )
    ap.add_argument("--chunk-bytes", type=int, default=1 << 20, help="read_text chunk_bytes for --long-word")
    ap.add_argument("--long-word-child", help=argparse.SUPPRESS)
    ap.add_argument("--tiktoken-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.long_word_child:
        path = args.long_word_child
        print(json.dumps(long_word_child(path, os.path.getsize(path), args.chunk_bytes, args.tiktoken_only)))
        return
    if args.long_word:
        long_word(parse_size(args.long_word), args.chunk_bytes)
        return
    files, text_bytes = corpus_files(args.corpus, parse_size(args.size), args.source)
    from throughput import code_fingerprint, code_note  # beside this script

    before = code_fingerprint()
    rows = soak(files, args.max_epochs, args.num_workers)
    code = code_note(before)
    text, problems = report(rows, files, text_bytes, args, code)
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "soak.md").write_text(text)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
