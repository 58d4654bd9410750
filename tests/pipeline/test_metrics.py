"""``Pipeline.metrics``: the keys, the counts against independent counts, who waits on whom, mixtures.

Timing checks rest on what sleeps guarantee (a stage that sleeps 20 ms an item is busy at least that
long, and the stages pulling from it wait at least as long) and on shares with wide margins, never on
how fast this machine is. Mixture checks use 4 binomial standard deviations with fixed seeds.
"""

from __future__ import annotations

import itertools
import math
import re
import runpy
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from torchdata.nodes import IterableWrapper

from pipeline import Pipeline
from pipeline.stage import PassThrough, Stage
from stages import Batch, BpeEncode, Mix, Pack, ReadText, SlidingWindow
from tests.conftest import ROOT
from tests.examples.test_train import TINY

SLEEP = 0.02


class Slow(PassThrough[dict]):
    """Passes documents on after sleeping ``SLEEP`` seconds each: the pipeline's bottleneck on purpose."""

    type_name = "slow"

    def __init__(self, source):
        super().__init__()
        self.source = source

    def next(self) -> dict:
        item = next(self.source)
        time.sleep(SLEEP)
        return item


def corpus(tmp_path, files: int = 3, paragraphs: int = 40) -> list[str]:
    paths = []
    for f in range(files):
        path = tmp_path / f"{f}.txt"
        lines = [f"File {f}, paragraph {p}: the river runs past the mill again.\n" for p in range(paragraphs)]
        path.write_text("".join(lines))
        paths.append(str(path))
    return paths


def chain(paths, slow: bool = False, chunk_bytes: int = 256, batch_size: int = 2):
    node = ReadText(paths, chunk_bytes=chunk_bytes)
    node.name = "read"
    if slow:
        node = Slow(node)
        node.name = "slow"
    node = BpeEncode(node, num_threads=1)
    node.name = "encode"
    node = SlidingWindow(node, max_length=8, stride=8, block_windows=4)
    node.name = "window"
    return Batch(node, batch_size=batch_size, drop_last=False)


def test_keys_and_counts_match_an_independent_count(tmp_path):
    paths = corpus(tmp_path)
    pipe = Pipeline(chain(paths))
    batches = list(pipe)
    m = pipe.metrics()
    stages = ["read", "encode", "window", "batch"]
    assert set(m) == {f"{s}/{k}" for s in stages for k in ("items", "tokens", "busy_s", "wait_s")} | {
        "data_wait_s", "data_wait_share"}
    assert all(isinstance(v, (int, float)) for v in m.values())
    encoding = tiktoken.get_encoding("gpt2")
    stream = sum(len(encoding.encode(Path(p).read_text())) for p in paths) + len(paths) - 1  # + <|endoftext|>s
    assert m["encode/tokens"] == stream
    assert m["batch/items"] == len(batches)
    assert m["batch/tokens"] == sum(b["inputs"].numel() for b in batches)
    assert m["window/tokens"] == m["batch/tokens"] == len(range(0, stream - 8, 8)) * 8
    assert m["read/items"] == m["encode/items"] and m["read/tokens"] == 0
    # the inputs run inside the stage's next(): its wait is their time, all of it
    assert m["encode/wait_s"] == pytest.approx(m["read/busy_s"] + m["read/wait_s"])
    assert m["batch/wait_s"] == pytest.approx(m["window/busy_s"] + m["window/wait_s"])


def test_packed_rows_count_their_input_tokens(tmp_path):
    node = Batch(Pack(BpeEncode(ReadText(corpus(tmp_path), chunk_bytes=256)), max_length=16), batch_size=2,
                 drop_last=False)
    pipe = Pipeline(node)
    batches = list(pipe)
    m = pipe.metrics()
    assert m["pack/tokens"] == m["batch/tokens"] == sum(b["inputs"].numel() for b in batches) > 0


def test_a_slow_stage_is_named(tmp_path):
    pipe = Pipeline(chain(corpus(tmp_path), slow=True))
    start = time.perf_counter()
    list(pipe)
    wall = time.perf_counter() - start
    m = pipe.metrics()
    documents = m["slow/items"]
    assert documents >= 10
    busy = {s: m[f"{s}/busy_s"] for s in ("read", "slow", "encode", "window", "batch")}
    assert busy["slow"] >= documents * SLEEP  # what the sleeps guarantee
    assert max(busy, key=busy.get) == "slow"
    assert busy["slow"] > 0.5 * wall  # its busy share is most of the whole (near 1 on an idle machine)
    for downstream in ("encode", "window", "batch"):  # each waits on it, through the chain
        assert m[f"{downstream}/wait_s"] >= busy["slow"]
    assert m["data_wait_s"] >= busy["slow"] and m["data_wait_share"] > 0.5


def test_a_slow_consumer_waits_for_nothing(tmp_path):
    """Workers run ahead while the consumer works: its data wait is ~0 and the queue is full."""
    pipe = Pipeline(chain(corpus(tmp_path, files=4, paragraphs=200), batch_size=1), num_workers=1)
    it = iter(pipe)
    next(it)  # the first batch waits for the worker to start
    deadline = time.monotonic() + 60
    while pipe.metrics()["workers/queue_fill"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker runs ahead: prefetch_factor (4) blocks of 4 windows, made and waiting
    assert pipe.metrics()["workers/queue_fill"] == 1.0
    consumed = 0
    for _ in itertools.islice(it, 12):  # batches of one window: the queued blocks hold 16
        time.sleep(SLEEP)  # a training step
        consumed += 1
    m = pipe.metrics()
    assert consumed == 12
    assert m["data_wait_share"] < 0.1  # ~0: the batches were ready
    assert 0 <= m["workers/queue_fill"] <= 1
    assert m["workers/busy_s"] < m["workers/wait_s"] + 0.05  # its time is waiting on the workers
    pipe.close()


def test_data_wait_counts_since_the_previous_call(tmp_path):
    pipe = Pipeline(chain(corpus(tmp_path), slow=True))
    it = iter(pipe)
    next(it)
    first = pipe.metrics()
    assert first["data_wait_s"] >= SLEEP
    again = pipe.metrics()
    assert again["data_wait_s"] == 0 and again["data_wait_share"] == 0  # no next() in between
    assert again["slow/busy_s"] == first["slow/busy_s"]  # stage counters are totals of the pass


def test_workers_report_the_counters_of_their_stages(tmp_path):
    paths = corpus(tmp_path, files=4)
    pipe = Pipeline(chain(paths), num_workers=2)
    batches = list(pipe)
    m = pipe.metrics()
    encoding = tiktoken.get_encoding("gpt2")
    # each worker reads two of the files as a stream of its own: one <|endoftext|> in each
    assert m["encode/tokens"] == sum(len(encoding.encode(Path(p).read_text())) for p in paths) + 2
    assert m["read/items"] == m["encode/items"] > 0
    assert m["batch/tokens"] == sum(b["inputs"].numel() for b in batches) == m["window/tokens"]
    assert m["workers/items"] == m["window/items"] == m["workers/0/items"] + m["workers/1/items"]
    assert m["workers/0/items"] > 0 and m["workers/1/items"] > 0  # each worker read two of the files
    assert m["encode/busy_s"] > 0  # measured in the worker processes, summed here
    assert m["workers/0/busy_s"] + m["workers/1/busy_s"] == pytest.approx(
        m["read/busy_s"] + m["encode/busy_s"] + m["window/busy_s"])  # the whole chain's time in the workers
    pipe.close()


# --- mixtures ------------------------------------------------------------------------------------


class Documents(Stage[dict]):
    """``n`` documents of ``words`` words each, named ``name`` (a stand-in reader)."""

    def __init__(self, name: str, n: int, words: int):
        super().__init__()
        self.name, self.n, self.words = name, n, words

    def reset(self, initial_state=None):
        super().reset(initial_state)
        self.i = 0 if initial_state is None else initial_state["i"]

    def get_state(self):
        return {"i": self.i}

    def next(self) -> dict:
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return {"text": " ".join([f"{self.name}{self.i}"] * self.words), "source": self.name}


@pytest.mark.parametrize("seed", [0, 1])
def test_mixture_accounting_is_within_binomial_bounds(seed):
    weights = {"books": 0.2, "web": 0.5, "code": 0.3}
    inputs = [Documents(name, 2000, words) for name, words in zip(weights, (3, 1, 7))]
    mix = Mix(inputs, list(weights.values()), seed=seed, stop="first")  # every draw made while all have documents
    encode = BpeEncode(mix, num_threads=1)
    encode.name = "encode"
    pipe = Pipeline(encode)
    items = list(pipe)
    m = pipe.metrics()
    n = len(items)
    assert sum(m[f"mix/{name}/documents"] for name in weights) == n == m["mix/items"]
    for name, p in weights.items():
        drawn = [item for item in items if item["mix"] == name]
        assert m[f"mix/{name}/documents"] == len(drawn)  # against the items themselves
        assert m[f"mix/{name}/weight"] == pytest.approx(p)
        assert m[f"mix/{name}/share"] == pytest.approx(len(drawn) / n)
        sd = math.sqrt(n * p * (1 - p))
        assert abs(len(drawn) - n * p) <= 4 * sd  # the draws follow the weights
        assert m[f"mix/{name}/z"] == pytest.approx((len(drawn) - n * p) / sd)
        assert abs(m[f"mix/{name}/z"]) <= 4
        assert m[f"encode/{name}/tokens"] == sum(len(item["ids"]) for item in drawn)
    assert sum(m[f"encode/{name}/token_share"] for name in weights) == pytest.approx(1)


def test_mixture_z_flags_a_stream_that_runs_out():
    inputs = [Documents("a", 50, 1), Documents("b", 10_000, 1)]
    pipe = Pipeline(Mix(inputs, [0.5, 0.5], seed=0))  # stop: all; a ends after 50 and b goes on alone
    list(itertools.islice(pipe, 1000))
    m = pipe.metrics()
    assert m["mix/a/documents"] == 50 and m["mix/a/z"] < -4 and m["mix/b/z"] > 4


def test_stages_without_tokens_report_zero_and_torchdata_nodes_are_skipped():
    node = SlidingWindow(IterableWrapper([{"ids": np.arange(40, dtype=np.int32)}]), max_length=4, stride=4)
    pipe = Pipeline(node)
    blocks = list(pipe)
    m = pipe.metrics()
    assert m["sliding_window/tokens"] == sum(b.shape[0] * 4 for b in blocks) == 36
    assert not any(key.startswith("IterableWrapper") for key in m)


def test_train_gpt_logs_the_data_wait_beside_the_loss(verdict_path, capsys):
    train_gpt = runpy.run_path(str(ROOT / "examples" / "train_gpt.py"))  # in this process: no second torch import
    train_gpt["main"](["--data", str(verdict_path), *TINY, "--steps", "4"])
    out = capsys.readouterr().out
    losses = re.findall(r"^step=(\d+) train_loss=", out, re.M)
    waits = re.findall(r"^step=(\d+) data_wait_ms=([\d.]+) data_wait_share=([\d.]+)$", out, re.M)
    assert [step for step, _, _ in waits] == losses == ["1", "4"]
    assert all(float(ms) > 0 and 0 <= float(share) <= 1 for _, ms, share in waits)
