"""End-to-end tokens/s from Arrow files to batches, as a ratio to raw tiktoken on the same documents.

    python benchmarks/throughput.py --size 100MB --repeats 3 [--profile]

Each measurement is a fresh subprocess. In every repeat each configuration of ours runs right after
its own baseline run, and its ratio is taken to that baseline; the table shows medians.

- baseline: all documents' texts read into a list first (untimed, pyarrow ``to_pylist``), then
  ``enc.encode_ordinary_batch(texts, num_threads=2)`` timed; tokens/s = its tokens / its time.
- ceiling (reference): the same texts joined into ~1 MB chunks, ``encode_ordinary_batch(chunks,
  num_threads=2)``: tiktoken's 2-core rate with no per-call overhead.
- ours: ``Pipeline(ReadArrow -> BpeEncode -> SlidingWindow(256, 256) -> Batch(8), num_workers=N)``,
  timed from construction (encoding load included) to the last batch; tokens/s counts the batches'
  ``inputs.numel()`` (the encode stage's counters are not visible from worker processes). With
  stride == max_length that is the corpus's tokens plus one ``<|endoftext|>`` per document, minus
  each stream's tail (< 257 tokens) and the last partial batch.

``--profile`` then samples ours (num_workers 0 and 2, every process and thread) with py-spy and
prints where the busy time goes. Corpora come from data/make_corpus.py and are cached in bench-out/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out"
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
B, L, STRIDE = 8, 256, 256
CHUNK = 1 << 20  # ceiling: texts joined into chunks of about this many characters
TARGET = 0.85


def code_fingerprint() -> str:
    """A hash of the code under test (pipeline/ and stages/), to tell whether it changed during a run."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted([*ROOT.rglob("pipeline/**/*.py"), *ROOT.rglob("stages/**/*.py")]):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def code_note(before: str) -> str:
    """The report's line naming the code measured (fingerprinted with ``code_fingerprint`` at the start)."""
    after = code_fingerprint()
    changed = f" at the start, {after} at the end: WARNING, the code changed during the measurements"
    return f"code measured: pipeline/ + stages/ sha256 {before}{changed if after != before else ''}\n"


def arrow_corpus(source: Path, size_text: str) -> Path:
    """An Arrow corpus directory of ``size_text`` (e.g. 100MB), generated once and cached in bench-out/."""
    from make_corpus import make_corpus, parse_size

    out = OUT / f"arrow-{size_text}"
    done = out / "DONE"  # written last, so an interrupted generation is redone
    if done.exists():
        return out
    print(f"generating {size_text} Arrow corpus in {out} ...", file=sys.stderr, flush=True)
    r = make_corpus([source], parse_size(size_text), out, fmt="arrow", seed=0, overwrite=True)
    done.write_text(json.dumps(r))
    return out


def corpus_files(corpus: Path) -> list[Path]:
    return sorted(corpus.glob("part-*.arrow"))


def read_texts(corpus: Path) -> list[str]:
    """Every document's text, in corpus order (the baseline's untimed set-up)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    texts: list[str] = []
    for path in corpus_files(corpus):
        with pa.memory_map(str(path)) as source:
            texts += ipc.open_file(source).read_all().column("text").to_pylist()
    return texts


class OthersLoad:
    """CPU the rest of the machine used while a section ran, in cores: system busy time minus this process tree's."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        import resource

        import psutil

        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        me = psutil.Process()
        own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        for c in me.children(recursive=True):  # children not yet reaped
            try:
                ct = c.cpu_times()
                own += ct.user + ct.system
            except Exception:  # psutil.NoSuchProcess: it ended (and was counted in RUSAGE_CHILDREN)
                pass
        return time.perf_counter(), busy, own

    def stop(self) -> dict:
        end = self._sample()
        wall, busy, own = (b - a for a, b in zip(self.start, end))
        return {"own_cores": own / wall, "others_cores": max(busy - own, 0.0) / wall}


def run_baseline(corpus: Path, chunked: bool) -> dict:
    """Time ``encode_ordinary_batch`` over the documents (or over ~1 MB chunks of them)."""
    from stages.encoding import load_encoding

    texts = read_texts(corpus)
    nbytes = sum(len(t.encode()) for t in texts)
    if chunked:
        chunks, current, size = [], [], 0
        for t in texts:
            current.append(t)
            size += len(t) + 2
            if size >= CHUNK:
                chunks.append("\n\n".join(current))
                current, size = [], 0
        if current:
            chunks.append("\n\n".join(current))
        texts = chunks
    t0 = time.perf_counter()
    enc = load_encoding("gpt2")
    load = time.perf_counter() - t0
    load_meter = OthersLoad()
    t0 = time.perf_counter()
    ids = enc.encode_ordinary_batch(texts, num_threads=2)
    seconds = time.perf_counter() - t0
    load_info = load_meter.stop()
    tokens = sum(map(len, ids))
    return {"seconds": seconds, "tokens": tokens, "bytes": nbytes, "calls": len(texts), "tok_s": tokens / seconds,
            "load_encoding_s": load, **load_info}


def run_ours(corpus: Path, num_workers: int, go=None) -> dict:
    """Stream the corpus to batches; time from construction to the last batch."""
    from pipeline import Pipeline
    from stages import Batch, BpeEncode, ReadArrow, SlidingWindow

    if go is not None:  # profiling: wait (imports done) until the profiler is attached
        go()
    load_meter = OthersLoad()
    t0 = time.perf_counter()
    node = Batch(SlidingWindow(BpeEncode(ReadArrow([str(corpus)])), max_length=L, stride=STRIDE), batch_size=B)
    pipe = Pipeline(node, num_workers=num_workers)
    first, batches, tokens = None, 0, 0
    for batch in pipe:
        if first is None:
            first = time.perf_counter() - t0
        batches += 1
        tokens += batch["inputs"].numel()
    seconds = time.perf_counter() - t0
    load_info = load_meter.stop()
    encoded = next((c["tokens"] for c in pipe.stats().values() if "tokens" in c), None) if num_workers == 0 else None
    return {"seconds": seconds, "first": first, "batches": batches, "tokens": tokens, "tok_s": tokens / seconds,
            "encoded_tokens": encoded, **load_info}


def child(args: argparse.Namespace) -> None:
    """Entry point of one measured run: print its result as one JSON line."""
    import psutil  # noqa: F401  (imported before any timed or profiled part)

    code = code_fingerprint()  # of the code this process imports (others may be editing the tree)
    corpus = Path(args.corpus)
    if args.child == "ours":
        go = None
        if args.wait_go:
            def go() -> None:
                print("ready", flush=True)
                sys.stdin.readline()
        result = run_ours(corpus, args.num_workers, go)
    else:
        result = run_baseline(corpus, chunked=args.child == "ceiling")
    print(json.dumps({**result, "code": code}), flush=True)


def wait_for_quiet(max_seconds: float, threshold: float = 25.0) -> float:
    """Wait (up to max_seconds) until the machine's CPU use over 1 s is under threshold %; return the last reading."""
    import psutil

    deadline = time.monotonic() + max_seconds
    while True:
        busy = psutil.cpu_percent(interval=1.0)
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def measure(which: str, corpus: Path, workers: int = 0, quiet_wait: float = 0.0) -> dict:
    if quiet_wait:
        wait_for_quiet(quiet_wait)
    cmd = [sys.executable, __file__, "--child", which, "--corpus", str(corpus), "--num-workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    return {"error": f"failed, rc {proc.returncode}: {tail[:160]}"}


# --- profiling: py-spy over every process and thread, then busy samples by category ------------

WAIT_LEAVES = ("wait", "poll", "select", "acquire", "sleep", "recv_bytes", "_recv", "Queue.get", "SimpleQueue.get",
               "_worker (concurrent/futures/thread.py", "join")
CATEGORIES = [  # first match, searching a stack from its leaf up
    ("tiktoken BPE (Encoding.encode*, GIL released)", ("Encoding.encode",)),
    ("encoding load (stages/encoding.py)", ("stages/encoding.py", "tiktoken/load.py")),
    ("pyarrow to_pylist (ReadArrow._load)", ("to_pylist",)),
    ("pyarrow read_unit (mmap + get_batch)", ("read_unit",)),
    (
        "pickle / queue between processes",
        (
            "multiprocessing/queues.py",
            "multiprocessing/reduction.py",
            "multiprocessing/connection.py",
            "torch/multiprocessing/reductions.py",
        ),
    ),
    ("encode stage Python: join texts, split ids, per-doc dicts (stages/encode.py)", ("stages/encode.py",)),
    (
        "reader Python: per-document dicts (stages/arrow.py, pipeline/shard.py)",
        ("stages/arrow.py", "pipeline/shard.py"),
    ),
    ("window: stages/window.py and its Cursor (pipeline/cursor.py)", ("stages/window.py",)),
    ("batch: stages/batch.py and its Cursor, int64 copies to tensors", ("stages/batch.py",)),
    (
        "DataLoader / torchdata / node plumbing",
        ("torch/utils/data", "torchdata/", "pipeline/workers.py", "base_node.py"),
    ),
    ("imports (some lazy, during construction)", ("importlib._bootstrap",)),
]


def _is_wait(leaf: str) -> bool:
    name = leaf.split(" (")[0].lower()
    return any(w.lower() in name for w in WAIT_LEAVES if "(" not in w) or any(
        w in leaf for w in WAIT_LEAVES if "(" in w
    )


def summarize_profile(raw: Path, rate: int, seconds: float) -> str:
    """Busy samples by category and by leaf line, main process vs worker processes."""
    cats: Counter = Counter()
    leaves: Counter = Counter()
    procs: Counter = Counter()
    waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        role = "worker" if len(frames) > 1 and frames[1].startswith("process ") else "main"
        code = [f for f in frames if not f.startswith("process ")]
        if not code or _is_wait(code[-1]):
            waiting += n
            continue
        category = "other"
        for f in reversed(code):  # the deepest frame that matches a category decides
            hit = next((name for name, keys in CATEGORIES if any(k in f for k in keys)), None)
            if hit:
                category = hit
                break
        cats[(role, category)] += n
        leaves[code[-1]] += n
        procs[role] += n
    busy = sum(cats.values())
    lines = [
        f"busy samples {busy} ({busy / rate / seconds:.2f} cores on average over {seconds:.1f} s), "
        f"idle/waiting samples {waiting}; main {procs['main']}, workers {procs['worker']}",
        "",
        "| process | where | % of busy samples |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {role} | {cat} | {100 * n / busy:.1f} |" for (role, cat), n in cats.most_common()]
    lines += ["", "| leaf frame (function (file:line)) | % of busy samples |", "| --- | --- |"]
    lines += [f"| {leaf} | {100 * n / busy:.1f} |" for leaf, n in leaves.most_common(15)]
    return "\n".join(lines)


def profile(corpus: Path, workers: int, rate: int = 100) -> str:
    """Run ours once with py-spy attached after its imports (every process and thread); summarize."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return f"py-spy not installed in {spy.parent} (pip install py-spy)"
    raw = OUT / f"throughput-profile-w{workers}.txt"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "ours",
        "--corpus",
        str(corpus),
        "--num-workers",
        str(workers),
        "--wait-go",
    ]
    child_proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if child_proc.stdout.readline().strip() != "ready":
        child_proc.kill()
        return "profiled child did not start"
    spy_proc = subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(child_proc.pid),
            "--subprocesses",
            "-r",
            str(rate),
            "--format",
            "raw",
            "-o",
            str(raw),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(2.0)  # let py-spy attach
    child_proc.stdin.write("go\n")
    child_proc.stdin.flush()
    out = child_proc.stdout.read()
    child_proc.wait()
    spy_out = spy_proc.communicate(timeout=60)[0]
    if not raw.exists():
        return f"py-spy failed (rc {spy_proc.returncode}): {spy_out.strip()[-300:]}"
    result = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
    return (
        f"### num_workers={workers}\n\nUnder py-spy at {rate} Hz: {result['tok_s'] / 1e6:.2f} M tokens/s in "
        f"{result['seconds']:.1f} s (sampling slows it); raw stacks in {raw.relative_to(ROOT)}.\n\n"
        + summarize_profile(raw, rate, result["seconds"])
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="100MB", help="Arrow corpus size (cached in bench-out/arrow-SIZE)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values of ours")
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--profile", action="store_true", help="also profile ours (num_workers 0 and 2) with py-spy")
    ap.add_argument("--child", choices=["baseline", "ceiling", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--num-workers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--wait-go", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each run, wait up to this many seconds for the machine to be idle (<25%% CPU)",
    )
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not args.source.exists():
        sys.exit(f"throughput: source text {args.source} not found; pass --source FILE")
    OUT.mkdir(exist_ok=True)
    corpus = arrow_corpus(args.source, args.size)
    nbytes = sum(p.stat().st_size for p in corpus_files(corpus))
    code_before = code_fingerprint()

    base: list[dict] = []
    ceiling: list[dict] = []
    ours: dict[int, list[dict]] = {w: [] for w in args.workers}
    ratios: dict[int, list[float]] = {w: [] for w in args.workers}
    for r in range(args.repeats):
        for w in args.workers:  # each of ours right after its own baseline
            b = measure("baseline", corpus, quiet_wait=args.quiet_wait)
            o = measure("ours", corpus, w, quiet_wait=args.quiet_wait)
            base.append(b)
            ours[w].append(o)
            if "error" not in b and "error" not in o:
                ratios[w].append(o["tok_s"] / b["tok_s"])
            print(f"repeat {r}: baseline {b}\nrepeat {r}: ours w={w} {o}", file=sys.stderr, flush=True)
        c = measure("ceiling", corpus, quiet_wait=args.quiet_wait)
        ceiling.append(c)
        print(f"repeat {r}: ceiling {c}", file=sys.stderr, flush=True)

    def med(runs: list[dict], key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        ok = [x[key] for x in runs if "error" not in x]
        failed = len(runs) - len(ok)
        if not ok:
            return next(x["error"] for x in runs)
        return fmt.format(statistics.median(ok) * scale) + (f" ({failed} of {len(runs)} runs failed)" if failed else "")

    ok_base = [x for x in base if "error" not in x]
    ok_ceiling = [x for x in ceiling if "error" not in x]
    base_tokens = ok_base[0]["tokens"] if ok_base else None
    rows = [
        [
            f"baseline: encode_ordinary_batch(docs, num_threads=2), {ok_base[0]['calls'] if ok_base else '?'} docs",
            med(base, "tok_s", 1e-6),
            "1.00",
            "–",
            med(base, "others_cores"),
        ]
    ]
    rows.append(
        [
            "ceiling: encode_ordinary_batch(~1 MB chunks, num_threads=2)",
            med(ceiling, "tok_s", 1e-6),
            f"{med(ceiling, 'tok_s', 1e-6)} / {med(base, 'tok_s', 1e-6)} = "
            + (
                f"{statistics.median(c['tok_s'] for c in ok_ceiling) / statistics.median(b['tok_s'] for b in ok_base):.2f}"  # noqa: E501
                if ok_base and ok_ceiling
                else "–"
            ),
            "–",
            med(ceiling, "others_cores"),
        ]
    )
    best = None
    for w in args.workers:
        ratio = statistics.median(ratios[w]) if ratios[w] else None
        if ratio is not None and (best is None or ratio > best[1]):
            best = (w, ratio)
        rows.append(
            [
                f"ours, num_workers={w}",
                med(ours[w], "tok_s", 1e-6),
                f"{ratio:.2f}" if ratio is not None else "–",
                med(ours[w], "first", 1.0, "{:.2f}"),
                med(ours[w], "others_cores"),
            ]
        )
    head = [
        "config",
        "M tokens/s (median)",
        "ratio to baseline (median of per-repeat ratios)",
        "first batch (s)",
        "others' CPU during the timed part (cores, median)",
    ]
    table = "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows])

    ok_ours = [x for runs in ours.values() for x in runs if "error" not in x]
    counts = ""
    if ok_base and ok_ours:
        batch_tokens = sorted({x["tokens"] for x in ok_ours})
        encoded = sorted({x["encoded_tokens"] for x in ok_ours if x.get("encoded_tokens")})
        counts = (
            f"Token counts: baseline {base_tokens:,} (documents only); ours' batch tokens "
            f"{', '.join(f'{t:,}' for t in batch_tokens)} ({batch_tokens[-1] / base_tokens:.4f}x baseline); "
            + (
                f"ours' encoded tokens with num_workers=0 {encoded[0]:,} (documents + one <|endoftext|> "
                f"per document boundary), so batch tokens are {batch_tokens[0] / encoded[0]:.5f} of the "
                f"encoded ones (tails and the last partial batch dropped). "
                if encoded
                else ""
            )
            + "The rates above count batch tokens.\n"
        )
    per_repeat = "; ".join(f"num_workers={w}: " + ", ".join(f"{x:.2f}" for x in ratios[w]) for w in args.workers)
    verdict = (
        (
            f"Best: num_workers={best[0]} at {best[1]:.2f} of baseline "
            f"({'meets' if best[1] >= TARGET else 'below'} the {TARGET} target).\n"
        )
        if best
        else ""
    )
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    code = code_note(code_before)
    all_runs = [*base, *ceiling, *(y for v in ours.values() for y in v)]
    seen = Counter(x.get("code") for x in all_runs if "error" not in x)
    if len(seen) > 1:
        code += "code versions seen by the runs: " + ", ".join(f"{k} ({n} runs)" for k, n in seen.most_common()) + "\n"
    failures = [x["error"] for x in all_runs if "error" in x]
    if failures:
        code += f"{len(failures)} run(s) failed and are left out, e.g.: {failures[0]}\n"
    text = (
        f"{table}\n\n"
        f"Corpus: {args.size} Arrow ({nbytes / 1e6:.0f} MB on disk, {ok_base[0]['bytes'] / 1e6:.0f} MB of text, "
        f"{ok_base[0]['calls'] if ok_base else '?'} documents) from {args.source.name}; medians of {args.repeats} "
        "repeats, "
        f"each run in a fresh process; each of ours ran right after its own baseline run and its ratio is to "
        f"that run. Ours: ReadArrow -> BpeEncode -> SlidingWindow(max_length={L}, stride={STRIDE}) -> "
        f"Batch({B}), timed from construction (encoding load included) to the last batch; the baseline's "
        f"timing excludes reading (to_pylist) and the encoding load "
        f"({med(base, 'load_encoding_s', 1.0, '{:.2f}')} s, median, as timed in the baseline's process).\n"
        f"Others' CPU: the machine's busy CPU time minus this run's process tree's, over the timed part (the "
        f"machine is shared; before each run we waited up to {args.quiet_wait:g} s for it to be under 25% busy).\n"
        f"Per-repeat ratios: {per_repeat}.\n{counts}{verdict}"
        f"python {platform.python_version()}, torch {version('torch')}, torchdata {version('torchdata')}, "
        f"tiktoken {version('tiktoken')}, pyarrow {version('pyarrow')}, numpy {version('numpy')}; "
        f"{os.cpu_count()} CPUs\n"
        f"{code}command: {command}\n"
    )
    if args.profile:
        text += "\n## Profile (py-spy attached after imports, all processes and threads)\n"
        for w in (0, 2):
            text += "\n" + profile(corpus, w) + "\n"
    print(text)
    (OUT / "throughput.md").write_text(text)


if __name__ == "__main__":
    main()
