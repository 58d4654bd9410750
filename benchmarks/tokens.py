"""Token shards: batches/s of ``read_tokens -> batch`` against nanoGPT's ``get_batch``, and prepare MB/s local vs Ray.

    python benchmarks/tokens.py --size 20MB --repeats 3 --batches 3000

In one run, on one corpus (Arrow documents made by data/make_corpus.py, cached under bench-out/):
1. ``prepare`` with the local engine and with ``--engine ray`` (a local Ray cluster of all cores,
   started once and timed apart), checking that both caches are the same bytes;
2. batches from the cache: ``read_tokens -> batch`` (in process, and with 2 worker processes) against
   nanoGPT's ``get_batch`` over an ``np.memmap`` uint16 file of the same tokens, sequential (the same
   windows, checked equal) and random (nanoGPT's ``torch.randint`` against our seeded shuffle).
Medians of ``--repeats`` runs; the table goes to stdout and bench-out/tokens.md.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out"
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
B, L, STRIDE = 8, 256, 128


def corpus_folder(source: Path, size_text: str) -> Path:
    """Arrow documents of ``size_text``, generated once and cached in bench-out/."""
    from make_corpus import make_corpus, parse_size

    out = OUT / f"tokens-corpus-{size_text}"
    done = out / "DONE"
    if not done.exists():
        print(f"generating {size_text} corpus in {out} ...", file=sys.stderr, flush=True)
        make_corpus([source], parse_size(size_text), out, fmt="arrow", overwrite=True)
        done.write_text(str(source))
    return out


def time_prepare(config: dict, out: Path, engine: str, repeats: int) -> list[float]:
    from stages.tokens.prepare import prepare

    runs = []
    for _ in range(repeats):
        manifest = prepare(config, out, engine=engine, overwrite=True)
        runs.append(manifest["seconds"])
        print(f"prepare {engine}: {manifest['seconds']:.2f} s", file=sys.stderr, flush=True)
    return runs


def same_cache(a: Path, b: Path) -> bool:
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def write_bin(cache: Path, path: Path) -> int:
    """nanoGPT's train.bin: the cache's token stream as one flat uint16 file."""
    from stages.tokens.format import load_manifest

    manifest = load_manifest(str(cache))
    with open(path, "wb") as f:
        for shard in manifest["shards"]:
            with pa.memory_map(str(cache / shard["file"])) as source:
                for batch in ipc.open_file(source).read_all().to_batches():
                    batch.column(0).flatten().to_numpy().astype(np.uint16).tofile(f)
    return manifest["counts"]["tokens"]


def nanogpt_get_batch(path: Path, k: int, random: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's train.py ``get_batch`` (CPU), with a sequential variant: the k-th batch of windows ``stride`` apart."""
    data = np.memmap(path, dtype=np.uint16, mode="r")  # recreated every batch, as nanoGPT does (avoids a memory leak)
    ix = torch.randint(len(data) - L, (B,)) if random else [(k * B + j) * STRIDE for j in range(B)]
    x = torch.stack([torch.from_numpy((data[i : i + L]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + L]).astype(np.int64)) for i in ix])
    return x, y


def rate_nanogpt(path: Path, n: int, random: bool) -> float:
    start = time.perf_counter()
    for k in range(n):
        nanogpt_get_batch(path, k, random)
    return n / (time.perf_counter() - start)


def ours(cache: Path, shuffle: bool, num_workers: int):
    from pipeline import Pipeline
    from stages import Batch, ReadTokens

    return Pipeline(
        Batch(ReadTokens(str(cache), max_length=L, stride=STRIDE, shuffle=shuffle, seed=0), batch_size=B),
        num_workers=num_workers,
    )


def rate_ours(cache: Path, n: int | None, shuffle: bool, num_workers: int = 0) -> float:
    """Batches/s over ``n`` batches (None: the whole epoch)."""
    pipe = ours(cache, shuffle, num_workers)
    start = time.perf_counter()
    count = 0
    for _ in pipe:  # from the first reset (memory maps opened, workers started) on
        count += 1
        if count == n:
            break  # (n None: to the end of the epoch)
    return count / (time.perf_counter() - start)


def rate_streaming(config: dict, n: int) -> float:
    """The same batches streamed from the raw corpus (read -> encode -> window -> batch), for reference."""
    from pipeline import Pipeline

    stages = dict(
        config["stages"],
        window={"type": "sliding_window", "input": "encode", "max_length": L, "stride": STRIDE},
        batch={"type": "batch", "input": "window", "batch_size": B},
    )
    pipe = Pipeline.from_config({"stages": stages})
    start = time.perf_counter()
    count = 0
    for _ in pipe:
        count += 1
        if count == n:
            break
    return count / (time.perf_counter() - start)


def check_same_batches(cache: Path, path: Path, n: int = 50) -> None:
    pipe = iter(ours(cache, False, 0))
    for k in range(n):
        batch, (x, y) = next(pipe), nanogpt_get_batch(path, k, False)
        assert torch.equal(batch["inputs"], x) and torch.equal(batch["targets"], y), f"batch {k} differs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="20MB", help="corpus size (default 20MB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=3000, help="batches per read measurement (at most an epoch)")
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    args = ap.parse_args()
    source = args.source if args.source.exists() else None
    if source is None:
        sys.exit(f"tokens: source text {args.source} not found; pass --source FILE")
    OUT.mkdir(exist_ok=True)
    corpus = corpus_folder(source, args.size)
    config = {
        "stages": {
            "read": {"type": "read_arrow", "paths": [str(corpus)]},
            "encode": {"type": "bpe_encode", "input": "read"},
        }
    }
    work = OUT / "tokens-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()

    # 1. preprocessing
    local_cache = work / "cache-local"
    local = time_prepare(config, local_cache, "local", args.repeats)
    from stages.tokens.format import load_manifest

    manifest = load_manifest(str(local_cache))
    mb, tokens = manifest["counts"]["source_bytes"] / 1e6, manifest["counts"]["tokens"]
    rows = [
        [
            "local (this process, 2 encode threads)",
            f"{statistics.median(local):.2f}",
            f"{mb / statistics.median(local):.2f}",
            f"{tokens / statistics.median(local) / 1e6:.2f}",
            "-",
        ]
    ]
    ray_note = "Ray not run (--no-ray)"
    if not args.no_ray:
        try:
            import ray
        except ImportError:
            ray = None
            ray_note = "Ray not installed (pip install '.[ray]')"
        if ray is not None:
            start = time.perf_counter()
            ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            started = time.perf_counter() - start
            cpus = int(ray.cluster_resources().get("CPU", 0))
            remote = time_prepare(config, work / "cache-ray", "ray", args.repeats)
            identical = same_cache(local_cache, work / "cache-ray")
            ray.shutdown()
            med = statistics.median(remote)
            rows.append(
                [
                    f"ray (local cluster, {cpus} CPUs)",
                    f"{med:.2f}",
                    f"{mb / med:.2f}",
                    f"{tokens / med / 1e6:.2f}",
                    f"{started:.1f}",
                ]
            )
            ray_note = f"Ray cache identical to the local one, byte for byte: {identical}"
    prep_table = _table(["engine", "seconds", "MB/s of text", "M tokens/s", "cluster start (s)"], rows)

    # 2. reading batches
    binary = work / "train.bin"
    write_bin(local_cache, binary)
    check_same_batches(local_cache, binary)
    epoch = len(range(0, tokens - L, STRIDE)) // B
    n = min(args.batches, epoch)
    measured = {
        "read_tokens -> batch, sequential": [rate_ours(local_cache, n, False) for _ in range(args.repeats)],
        "nanoGPT get_batch, sequential (same windows)": [rate_nanogpt(binary, n, False) for _ in range(args.repeats)],
        "streaming the raw corpus: read_arrow -> bpe_encode -> sliding_window -> batch": [
            rate_streaming(config, n) for _ in range(args.repeats)
        ],
        "read_tokens -> batch, shuffled (seeded permutation)": [
            rate_ours(local_cache, n, True) for _ in range(args.repeats)
        ],
        "nanoGPT get_batch, random (torch.randint)": [rate_nanogpt(binary, n, True) for _ in range(args.repeats)],
        # a whole epoch: workers left mid-epoch take ~5 s each to shut down (see the report)
        "read_tokens -> batch, sequential, 2 worker processes (whole epoch, startup included)": [
            rate_ours(local_cache, None, False, 2) for _ in range(args.repeats)
        ],
    }
    med = {k: statistics.median(v) for k, v in measured.items()}
    base = {
        "sequential": med["nanoGPT get_batch, sequential (same windows)"],
        "random": med["nanoGPT get_batch, random (torch.randint)"],
    }
    read_rows = []
    for name, rate in med.items():
        against = base["random"] if ("shuffled" in name or "random" in name) else base["sequential"]
        ratio = "1.00 (baseline)" if rate == against else f"{rate / against:.2f}"
        read_rows.append([name, f"{rate:,.0f}", f"{rate * B * L / 1e6:.1f}", ratio])
    read_table = _table(["reader", "batches/s", "M tokens/s", "ratio vs nanoGPT"], read_rows)

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    ray_version = f", ray {version('ray')}" if "identical" in ray_note else ""
    text = (
        f"### Preprocessing: {args.size} corpus ({mb:.1f} MB of text, {tokens / 1e6:.1f} M tokens, Arrow "
        f"documents)\n\n{prep_table}\n\n"
        f"{ray_note}. Seconds are a whole `prepare`: hashing the sources, reading, encoding (GPT-2), writing and "
        f"hashing the shards; the Ray cluster's start is apart (the first Ray run also pays its workers' imports).\n\n"
        f"### Batches from the cache: B={B}, max_length={L}, stride={STRIDE}, {n:,} batches a run\n\n{read_table}\n\n"
        f"Rows with workers run a whole epoch ({epoch:,} batches), the start of the worker processes included. "
        f"Sequential batches of both readers are checked equal. The ratio compares like with like: sequential "
        f"with sequential, shuffled with random.\n\n"
        f"Medians of {args.repeats} runs; {os.cpu_count()} CPUs; python {platform.python_version()}, "
        f"torch {version('torch')}, tiktoken {version('tiktoken')}, pyarrow {version('pyarrow')}{ray_version}\n"
        f"command: {command}\n"
    )
    print(text)
    (OUT / "tokens.md").write_text(text)
    shutil.rmtree(work, ignore_errors=True)


def _table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows])


if __name__ == "__main__":
    main()
