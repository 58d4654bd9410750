"""Peak RSS while streaming a large Arrow corpus against a small one: memory must not grow with the corpus.

    python benchmarks/memory.py --sizes 100MB 2GB --workers 0 2 [--max-seconds 240]

Each run is a fresh subprocess streaming ReadArrow -> BpeEncode -> SlidingWindow(256, 256) -> Batch(8)
through ``Pipeline(..., num_workers=N)`` to the end of the corpus (or ``--max-seconds``). A thread in
that process samples every 0.2 s the RSS of the process plus all its children (the worker
processes) and keeps the maximum; ``ru_maxrss`` of the process and of its waited-for children
(RUSAGE_CHILDREN, the largest single child) are reported too. How much text was streamed is read
from the pipeline's state (each reader's shard unit and row) when a run stops early.
Corpora come from data/make_corpus.py and are cached in bench-out/.
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
import threading
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out"
sys.path[:0] = [str(ROOT), str(ROOT / "data"), str(ROOT / "benchmarks")]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
B, L, STRIDE = 8, 256, 256
INTERVAL = 0.2  # seconds between RSS samples
TARGET = 1.20  # the large corpus's peak RSS within 20% of the small one's


class PeakRss(threading.Thread):
    """Samples RSS (and PSS) of this process plus its children every ``INTERVAL`` s; keeps the maxima."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.peak_sum = self.peak_self = self.peak_pss = 0
        self.max_children = 0
        self.samples = 0
        self._done = threading.Event()

    def sample(self) -> None:
        procs = [self.me]
        try:
            procs += self.me.children(recursive=True)
        except self.psutil.Error:
            pass
        total = pss = 0
        for i, p in enumerate(procs):
            try:
                rss = p.memory_info().rss
                pss += p.memory_full_info().pss  # RSS counts pages shared between forked workers once per process
            except self.psutil.Error:  # a worker ended between the listing and the read
                continue
            total += rss
            if i == 0:
                self.peak_self = max(self.peak_self, rss)
        self.peak_sum = max(self.peak_sum, total)
        self.peak_pss = max(self.peak_pss, pss)
        self.max_children = max(self.max_children, len(procs) - 1)
        self.samples += 1

    def run(self) -> None:
        while not self._done.wait(INTERVAL):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.sample()


def run_child(corpus: Path, num_workers: int, max_seconds: float) -> dict:
    from pipeline import Pipeline
    from pipeline.stage import upstream_nodes
    from stages import Batch, BpeEncode, ReadArrow, SlidingWindow

    mb = 1e6
    sampler = PeakRss()
    sampler.sample()
    rss_start = sampler.peak_sum
    sampler.start()
    t0 = time.perf_counter()
    node = Batch(SlidingWindow(BpeEncode(ReadArrow([str(corpus)])), max_length=L, stride=STRIDE), batch_size=B)
    pipe = Pipeline(node, num_workers=num_workers)
    reader = next(n for n in upstream_nodes(pipe.root) if isinstance(n, ReadArrow))
    tokens, batches, stopped = 0, 0, False
    for batch in pipe:
        tokens += batch["inputs"].numel()
        batches += 1
        if time.perf_counter() - t0 >= max_seconds:
            stopped = True
            break
    seconds = time.perf_counter() - t0
    state = pipe.state_dict() if stopped else None
    pipe.close()  # stop the workers of a run cut short, so they are reaped and counted in RUSAGE_CHILDREN
    sampler.stop()
    return {
        "peak_rss_sum_mb": sampler.peak_sum / mb, "peak_rss_main_mb": sampler.peak_self / mb,
        "peak_pss_sum_mb": sampler.peak_pss / mb, "rss_start_mb": rss_start / mb, "max_children": sampler.max_children,
        "samples": sampler.samples,
        "ru_maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / mb,
        "ru_maxrss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / mb,
        "seconds": seconds, "tokens": tokens, "batches": batches, "stopped": stopped, "state": state,
        "files": [f.path for f in reader.files], "n_workers": num_workers,
    }


# --- how much text a run streamed, from the readers' positions in the pipeline's state ---------

def _reader_states(obj, g: int = 0, G: int = 1):
    """(global worker, number of workers, {epoch, index, position}) for every reader in a state dict."""
    if isinstance(obj, dict):
        if "_worker_snapshots" in obj:
            G = obj.get("_main_snapshot", {}).get("_num_workers", G)
            for snap in obj["_worker_snapshots"].values():
                yield from _reader_states(snap.get("dataset_state"), snap["worker_id"], G)
            return
        if set(obj) == {"epoch", "index", "position"}:
            yield g, G, obj
            return
        for value in obj.values():
            yield from _reader_states(value, g, G)


def _unit_offsets(files: list[str]) -> list:
    """Per shard unit (record batch, in ReadArrow's order), the text column's UTF-8 offsets."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.ipc as ipc

    units = []
    for path in files:
        with pa.memory_map(path) as source:
            reader = ipc.open_file(source)
            for i in range(reader.num_record_batches):
                lengths = pc.binary_length(reader.get_batch(i).column("text")).fill_null(0)
                units.append(np.concatenate([[0], np.cumsum(lengths.to_numpy(), dtype=np.int64)]))
    return units


def streamed_bytes(result: dict) -> tuple[int, int]:
    """(text bytes streamed, text bytes in the corpus); the readers' positions trail the batches by < 1 block."""
    units = _unit_offsets(result["files"])
    total = int(sum(u[-1] for u in units))
    if not result["stopped"]:
        return total, total
    done = 0
    for g, G, s in _reader_states(result["state"]):
        assigned = list(range(len(units)))[g::G]
        done += sum(int(units[u][-1]) for u in assigned[: s["index"]])
        if s["index"] < len(assigned) and s["position"]:
            done += int(units[assigned[s["index"]]][s["position"]])
    return done, total


def measure(corpus: Path, workers: int, max_seconds: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "--corpus", str(corpus), "--num-workers", str(workers),
           "--max-seconds", str(max_seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"error": f"failed, rc {proc.returncode}: {tail[:160]}"}
    result = json.loads(lines[-1])
    result["streamed_bytes"], result["corpus_bytes"] = streamed_bytes(result)
    result.pop("state")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["100MB", "2GB"], help="corpus sizes; the first is the reference")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=240.0,
                    help="stop a run after this long (the table says how much it streamed)")
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--num-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(Path(args.corpus), args.num_workers, args.max_seconds)), flush=True)
        return
    if not args.source.exists():
        sys.exit(f"memory: source text {args.source} not found; pass --source FILE")
    from throughput import arrow_corpus, code_fingerprint, code_note

    OUT.mkdir(exist_ok=True)
    code_before = code_fingerprint()
    runs: dict[tuple[str, int], list[dict]] = {}
    for size_text in args.sizes:
        corpus = arrow_corpus(args.source, size_text)
        for w in args.workers:
            for _ in range(args.repeats):
                r = measure(corpus, w, args.max_seconds)
                runs.setdefault((size_text, w), []).append(r)
                print(f"{size_text} workers={w}: {r}", file=sys.stderr, flush=True)

    def med(rs: list[dict], key: str) -> float | None:
        ok = [r[key] for r in rs if "error" not in r]
        return statistics.median(ok) if ok else None

    rows = []
    for (size_text, w), rs in runs.items():
        errors = [r["error"] for r in rs if "error" in r]
        if errors:
            rows.append([size_text, str(w), errors[0]] + ["–"] * 8)
            continue
        peak = med(rs, "peak_rss_sum_mb")
        ref = med(runs.get((args.sizes[0], w), []), "peak_rss_sum_mb")
        ratio = f"{peak / ref:.2f}" if ref else "–"
        streamed, total = med(rs, "streamed_bytes"), med(rs, "corpus_bytes")
        rows.append(
            [
                size_text,
                str(w),
                f"{peak:.0f}",
                ratio,
                f"{med(rs, 'peak_rss_main_mb'):.0f}",
                f"{med(rs, 'peak_pss_sum_mb'):.0f}",
                f"{med(rs, 'ru_maxrss_self_mb'):.0f}",
                f"{med(rs, 'ru_maxrss_children_mb'):.0f}",
                f"{streamed / 1e6:,.0f} of {total / 1e6:,.0f} ({100 * streamed / total:.0f}%)",
                f"{med(rs, 'seconds'):.0f}",
                f"{med(rs, 'tokens') / med(rs, 'seconds') / 1e6:.2f}",
            ]
        )
    head = [
        "size",
        "workers",
        "peak RSS (MB)",
        f"ratio to {args.sizes[0]} run",
        "peak RSS main process (MB)",
        "peak PSS, main + children (MB)",
        "ru_maxrss self (MB)",
        "ru_maxrss RUSAGE_CHILDREN (MB)",
        "text streamed (MB)",
        "seconds",
        "M batch tokens/s",
    ]
    table = "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows])
    worst = [float(r[3]) for r in rows if r[3] not in ("–",) and r[0] != args.sizes[0]]
    verdict = (
        (
            f"Largest ratio {max(worst):.2f}: {'within' if max(worst) <= TARGET else 'over'} the target "
            f"(within {TARGET - 1:.0%} of the {args.sizes[0]} run).\n"
        )
        if worst
        else ""
    )
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    code = code_note(code_before)
    text = (
        f"{table}\n\n"
        f"{'Median of ' + str(args.repeats) + ' runs' if args.repeats > 1 else 'One run'} per row, each in a fresh "
        f"process: ReadArrow -> BpeEncode -> SlidingWindow(max_length={L}, stride={STRIDE}) -> Batch({B}) with "
        f"Pipeline(num_workers=N), streamed to the end of the corpus or for at most {args.max_seconds:g} s. "
        f"Peak RSS: the largest sum of the RSS of the process and all its children, sampled every {INTERVAL} s by "
        f"a thread in the process (pages shared between the forked workers count once per process there; the "
        f"PSS column shares them out). ru_maxrss RUSAGE_CHILDREN is the largest single waited-for child (the "
        f"workers). Text streamed: document text read, from the readers' positions in the pipeline's state at "
        f"the stop (behind the last batch by less than one block of windows).\n{verdict}"
        f"python {platform.python_version()}, torch {version('torch')}, torchdata {version('torchdata')}, "
        f"tiktoken {version('tiktoken')}, pyarrow {version('pyarrow')}, psutil {version('psutil')}\n"
        f"{code}command: {command}\n"
    )
    print(text)
    (OUT / "memory.md").write_text(text)


if __name__ == "__main__":
    main()
