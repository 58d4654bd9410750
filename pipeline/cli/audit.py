"""``verify-resume``: stop a run on one topology, continue it on another, and audit every document.

What the training loop receives is audited, not what readers read ahead. Each piece of a document
(a record, a piece of a text file) gets a fingerprint, and its token ids are replaced, as they leave
the encode stage, by (fingerprint, index in the piece): every token of every batch then says where it
came from. The run is: ``steps`` batches on each old rank (phase 1), its states saved as JSON; the old
topology continuing from its own states (the oracle: the exact resume, which shares no code with
resharding); the new topology continuing after ``load_state_dict(states, reshard=True)``. A piece the
oracle delivers and that neither phase 1 nor the new run delivers is lost (unless it is shorter than a
window: then it may lie in a tail); one that phase 1 delivered whole, the oracle does not deliver
again and the new run does, is repeated; a piece whose parts a worker reads backwards in a unit is
out of order. ``read_tokens`` pipelines carry no documents: their windows are compared as multisets.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

import stages  # noqa: F401  (registers the stage types: with_field reads their fields)
from pipeline.checkpoint import load_json, save_json
from pipeline.graph import Pipeline
from pipeline.registry import stage_class
from pipeline.schema import fields
from pipeline.shard import Reader
from pipeline.stage import upstream_nodes

_INDEX_BITS = 20  # a token's index in its piece; the fingerprint takes the 40 bits above (int64 ids)
_SEPARATOR = (1 << _INDEX_BITS) - 1  # the index of the <|endoftext|> before a piece (topology's glue: not audited)


def _piece(item: Mapping[str, Any]) -> str:
    """A piece's name: its file, and its byte offset or shard and record."""
    where = (
        f" byte {item['offset']}"
        if "offset" in item
        else f" shard {item['shard']} record {item['record']}"
        if "record" in item
        else ""
    )
    return f"{item.get('source')}{where}"


def _fingerprint(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=5).digest(), "little")


def _log(folder: str, line: list) -> None:
    with open(os.path.join(folder, f"{os.getpid()}.log"), "a") as log:  # one file per process (workers too)
        log.write(json.dumps(line) + "\n")


def _instrument(pipe: Pipeline, folder: str) -> None:
    """Readers log the pieces they read (with their unit); encode stages give provenance ids."""
    for node in upstream_nodes(pipe.root):
        if isinstance(node, Reader):
            node.next = _logging_reads(node, node.next, folder)
        elif getattr(node, "produces", None) == "tokens":
            node.next = _provenance(node.next, folder)


def _logging_reads(reader: Reader, read: Callable, folder: str) -> Callable:
    def next_item():
        item = read()
        if isinstance(item, Mapping):
            _log(folder, ["read", reader.name, _piece(item), getattr(reader, "unit", None), item.get("offset", 0)])
        return item

    return next_item


def _provenance(encode: Callable, folder: str) -> Callable:
    def next_item():
        item = dict(encode())
        separated = int(len(item["starts"]) > 0 and item["starts"][0] == 1)  # an <|endoftext|> first
        name, first = _piece(item), item.get("windowed", 0)  # the piece's own tokens windowed before a reshard
        n = first + len(item["ids"]) - separated
        if n >= _SEPARATOR:
            raise ValueError(f"verify-resume: piece {name} has {n:,} tokens, more than it can trace; lower chunk_bytes")
        own = np.arange(first, n, dtype=np.int64)
        index = np.concatenate([[_SEPARATOR], own]) if separated else own
        item["ids"] = (np.int64(_fingerprint(name)) << _INDEX_BITS) | index
        _log(folder, ["piece", _fingerprint(name), name, n])
        return item

    return next_item


def _delivered(batch: Mapping[str, Any], traced: bool) -> list:
    """Provenance ids in a batch's inputs and targets; without tracing, a fingerprint per window."""
    inputs, targets = batch["inputs"].numpy(), batch["targets"].numpy()
    if traced:
        return np.unique(np.concatenate([inputs.ravel(), targets.ravel()])).tolist()
    windows = np.concatenate([inputs[:, :1], targets], axis=1)
    return [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in windows]


def _output(config: Mapping[str, Any]) -> str | None:
    """The stage to iterate: the config's output, or the batches under an embed stage (ids are traced)."""
    specs = config["stages"]
    output = config.get("output") or list(specs)[-1]
    return specs[output]["input"] if specs.get(output, {}).get("type") == "embed" else output


def _in_processes(target: Callable[[int], None], ranks: int) -> None:
    """Run ``target(rank)`` for every rank at once, each in a process of its own (forked, as torchrun's ranks)."""
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=target, args=(rank,)) for rank in range(ranks)]
    for process in processes:
        process.start()
    for rank, process in enumerate(processes):
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(
                f"verify-resume: rank {rank} failed (exit status {process.exitcode}; its error is above)"
            )


def verify_resume(
    config: Mapping[str, Any],
    steps: int,
    old: tuple[int, int],
    new: tuple[int, int],
    restore: Callable[[Pipeline, list[dict]], None] | None = None,
) -> dict[str, Any]:
    """Run ``steps`` batches on each rank of ``old`` (ranks, workers), save, continue on ``new``; audit.

    Every rank runs in a process of its own; the states reach the next processes as JSON files.
    ``restore`` loads the states into a new pipeline (default: ``load_state_dict(states, reshard=True)``).
    Batches keep their last short one (``drop_last: false``), so no window is dropped on purpose.
    Returns ``{"rows", "lost", "repeated", "out_of_order", "tokens_again", "tokens_lost", "tail_tokens"}``:
    tokens of documents the new run windowed that the first run had (and the oracle does not have again),
    tokens the oracle windows that neither run did, and the tail tokens the new run's window stages counted
    (None for ``read_tokens`` windows).
    """
    restore = restore or (lambda pipe, states: pipe.load_state_dict(states, reshard=True))
    output = _output(config)
    config = with_field(config, "drop_last", False)  # a rank's last short batch is data too: nothing dropped on purpose
    with tempfile.TemporaryDirectory() as folder:
        logs = {phase: os.path.join(folder, phase) for phase in ("first", "expected", "got")}
        for path in logs.values():
            os.makedirs(path)
        saved = [os.path.join(folder, f"rank-{rank}.json") for rank in range(old[0])]

        def run(
            phase: str, rank: int, topology: tuple[int, int], start: Callable[[Pipeline], None], steps=None
        ) -> None:
            pipe = Pipeline.from_config(
                config, output=output, rank=rank, world_size=topology[0], num_workers=topology[1]
            )
            start(pipe)  # first: resharding replays the old streams, which is not reading
            _instrument(pipe, logs[phase])
            traced = any(getattr(n, "produces", None) == "tokens" for n in upstream_nodes(pipe.root))
            delivered = []
            for _, batch in zip(range(steps) if steps is not None else iter(int, 1), pipe):
                delivered += _delivered(batch, traced)
            if steps is not None:
                save_json(saved[rank], pipe.state_dict())
            tail = sum(stats.get("tail_tokens", 0) for stats in pipe.stats().values())  # at the end of the epoch
            pipe.close()
            save_json(
                os.path.join(folder, f"{phase}-{rank}.json"), {"traced": traced, "delivered": delivered, "tail": tail}
            )

        _in_processes(lambda rank: run("first", rank, old, lambda pipe: None, steps), old[0])
        _in_processes(
            lambda rank: run("expected", rank, old, lambda pipe: pipe.load_state_dict(load_json(saved[rank]))), old[0]
        )
        _in_processes(
            lambda rank: run("got", rank, new, lambda pipe: restore(pipe, [load_json(p) for p in saved])), new[0]
        )
        results = {
            phase: [load_json(os.path.join(folder, f"{phase}-{rank}.json")) for rank in range(ranks)]
            for phase, ranks in (("first", old[0]), ("expected", old[0]), ("got", new[0]))
        }
        window = _window_length(config)
        return _compare(results, {phase: _lines(path) for phase, path in logs.items()}, window)


def _lines(folder: str) -> list[list[list]]:
    """Each process's log lines, in the order written."""
    out = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            out.append([json.loads(line) for line in f])
    return out


def _window_length(config: Mapping[str, Any]) -> int:
    return max((spec.get("max_length", 0) + 1 for spec in config["stages"].values()), default=1)


def _compare(results: dict[str, list[dict]], logs: dict[str, list[list[list]]], window: int) -> dict[str, Any]:
    traced = results["first"][0]["traced"]
    first, expected, got = (
        Counter(x for rank in results[p] for x in rank["delivered"]) for p in ("first", "expected", "got")
    )
    backwards = set()
    for run in logs["got"]:  # a worker reads the pieces of a document in one unit forwards
        last: dict[tuple, int] = {}
        for line in (line for line in run if line[0] == "read"):
            _, reader, piece, unit, offset = line
            document = (reader, piece.rsplit(" byte ", 1)[0], unit)
            if offset < last.get(document, -1):
                backwards.add(f"{document[1]} (unit {unit})")
            last[document] = offset
    if not traced:  # windows from token shards: the same multiset, wherever they are read
        lost, repeated = expected - got, got - expected
        row = {
            "reader": "windows",
            "expected": sum(expected.values()),
            "read": sum(got.values()),
            "lost": sum(lost.values()),
            "repeated": sum(repeated.values()),
            "out of order": 0,
        }
        return {"rows": [row], "lost": sorted(lost), "repeated": sorted(repeated), "out_of_order": [], **_NO_TOKENS}
    names, lengths = {}, {}
    for run in (r for runs in logs.values() for r in runs):
        for line in (line for line in run if line[0] == "piece"):
            names[line[1]], lengths[line[1]] = line[2], line[3]
    delivered_again = set(got) & set(first)
    lost = _pieces(expected) - _pieces(got) - _pieces(first)
    lost = {p for p in lost if lengths.get(p, window) >= window}  # a piece shorter than a window may lie in a tail
    whole_before = _pieces(first) - _pieces(expected)
    repeated = _pieces(delivered_again) & whole_before
    before, after, oracle = (_own(tokens) for tokens in (first, got, expected))
    row = {
        "reader": "documents",
        "expected": len(_pieces(expected)),
        "read": len(_pieces(got)),
        "lost": len(lost),
        "repeated": len(repeated),
        "out of order": len(backwards),
    }
    return {
        "rows": [row],
        "lost": sorted(names.get(p, hex(p)) for p in lost),
        "repeated": sorted(names.get(p, hex(p)) for p in repeated),
        "out_of_order": sorted(backwards),
        "tokens_again": len(after & before - oracle),  # overlapping windows (stride < max_length) are the oracle's
        "tokens_lost": len(oracle - before - after),
        "tail_tokens": sum(rank["tail"] for rank in results["got"]),
    }


_NO_TOKENS = {"tokens_again": None, "tokens_lost": None, "tail_tokens": None}  # windows audited whole


def _own(tokens) -> set[int]:
    """The provenance ids of documents' own tokens (not the separators, which depend on the topology)."""
    return {t for t in tokens if t & _SEPARATOR != _SEPARATOR}


def _pieces(tokens) -> set[int]:
    """The fingerprints of the pieces that provenance ids come from."""
    return {t >> _INDEX_BITS for t in tokens}


def with_field(config: Mapping[str, Any], field: str, value: Any) -> dict[str, Any]:
    """``config`` with ``field`` set to ``value`` on every stage that takes it."""
    specs = {}
    for name, spec in config["stages"].items():
        takes = field in fields(stage_class(spec["type"], name))
        specs[name] = {**spec, field: value} if takes else dict(spec)
    return {**config, "stages": specs}
