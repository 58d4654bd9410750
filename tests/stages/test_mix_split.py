"""Fan-in (``mix``) and fan-out (``split``): proportions, stop rules, determinism, resume, branches.

Statistical checks state their tolerance: 4 binomial standard deviations, ``4 * sqrt(n p (1 - p))``
(a fair draw falls outside about once in 16,000 runs; the seeds are fixed, so a run never flakes).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import yaml
from torchdata.nodes import IterableWrapper, Loader

from pipeline import ConfigError, Pipeline, StageError
from stages import Mix, Split
from stages.split import Branch
from tests.resume import check_resume

EXAMPLE = "examples/mix_split.yaml"


def within(count: int, n: int, p: float, sds: float = 4.0) -> bool:
    """Whether ``count`` successes of ``n`` draws is within ``sds`` binomial standard deviations of ``n p``."""
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


def stream(name: str, n: int) -> IterableWrapper:
    """``n`` documents of stream ``name``, named like a stage of a graph."""
    node = IterableWrapper([{"stream": name, "i": i} for i in range(n)])
    node.name = name
    return node


def take(iterable, n: int) -> list:
    return list(itertools.islice(iterable, n))


def by_stream(items: list[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for item in items:
        out.setdefault(item["stream"], []).append(item["i"])
    return out


# --- mix: proportions and determinism ------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weights", [[0.3, 0.7], [1, 2, 5]])
def test_mix_shares_match_the_weights(weights, seed):
    names = ["books", "web", "code"][: len(weights)]
    n = 20_000
    mix = Mix([stream(name, 50_000) for name in names], weights=weights, seed=seed, stop="first")
    items = take(Loader(mix), n)
    assert len(items) == n  # no stream can run out in 20,000 draws
    counts = Counter(item["mix"] for item in items)
    for name, weight in zip(names, weights):
        p = weight / sum(weights)
        assert within(counts[name], n, p), (
            f"{name}: {counts[name]} of {n}, expected {n * p:.0f} ± {4 * math.sqrt(n * p * (1 - p)):.0f}"
        )
    for item in items:
        assert item["mix"] == item["stream"]  # `mix` is the name of the stream (its node's `.name`)
    for name, indices in by_stream(items).items():
        assert indices == list(range(len(indices))), f"{name}: items out of order or repeated"


def mixed(seed: int, n: int = 3_000) -> list[tuple[str, int]]:
    mix = Mix([stream("a", 5_000), stream("b", 5_000)], weights=[0.3, 0.7], seed=seed, stop="first")
    return [(item["mix"], item["i"]) for item in take(Loader(mix), n)]


def test_mix_order_is_a_function_of_the_seed():
    assert mixed(7) == mixed(7)
    assert mixed(7) != mixed(8)
    assert mixed(0)[:200] != mixed(1)[:200]


def test_each_epoch_mixes_anew_and_reproducibly():
    def epochs(seed: int) -> list[list[tuple[str, int]]]:
        pipe = Pipeline(Mix([stream("a", 300), stream("b", 700)], weights=[0.3, 0.7], seed=seed))
        return [[(item["mix"], item["i"]) for item in pipe] for _ in range(3)]

    first = epochs(0)
    assert first[0] != first[1] and first[1] != first[2] and first[0] != first[2]
    for epoch in first:
        assert sorted(epoch) == sorted([("a", i) for i in range(300)] + [("b", i) for i in range(700)])
    assert epochs(0) == first  # epoch k of a fresh pipeline is epoch k again


# --- mix: when to stop ---------------------------------------------------------------------------


class Noted:
    """An iterable stream that notes in ``ends`` how many mixed items had come out when it ran out."""

    def __init__(self, name: str, n: int, out: list, ends: list):
        self.name, self.n, self.out, self.ends = name, n, out, ends

    def __iter__(self):
        for i in range(self.n):
            yield {"stream": self.name, "i": i}
        self.ends.append((self.name, len(self.out)))


def run_noted(sizes: dict[str, int], stop: str, seed: int = 0) -> tuple[list[dict], list[tuple[str, int]]]:
    out: list[dict] = []
    ends: list[tuple[str, int]] = []
    sources = []
    for name, n in sizes.items():
        node = IterableWrapper(Noted(name, n, out, ends))
        node.name = name
        sources.append(node)
    for item in Loader(Mix(sources, weights=[1] * len(sizes), seed=seed, stop=stop)):
        out.append(item)
    return out, ends


@pytest.mark.parametrize("seed", [0, 5])
def test_stop_all_yields_every_item_once(seed):
    sizes = {"a": 10, "b": 100, "c": 1_000}
    out, ends = run_noted(sizes, "all", seed)
    assert by_stream(out) == {name: list(range(n)) for name, n in sizes.items()}
    assert sorted(name for name, _ in ends) == ["a", "b", "c"]  # each ran out once and was not restarted


@pytest.mark.parametrize("seed", [0, 5])
def test_stop_first_ends_when_the_first_stream_runs_out(seed):
    sizes = {"short": 100, "long": 10_000}
    out, ends = run_noted(sizes, "first", seed)
    assert ends[0][0] == "short" and len(ends) == 1
    assert ends[0][1] == len(out), "an item came out after the first stream ran out"
    got = by_stream(out)
    assert got["short"] == list(range(100))  # the stream that ended: all of its items
    assert got["long"] == list(range(len(got["long"])))
    # Equal weights: about as many long items as short ones, far from the long stream's 10,000.
    assert 50 <= len(got["long"]) <= 200


@pytest.mark.parametrize("seed", [0, 5])
def test_stop_cycle_restarts_short_streams_until_all_ended_once(seed):
    sizes = {"a": 7, "b": 30, "c": 200}
    out, ends = run_noted(sizes, "cycle", seed)
    ended = [name for name, _ in ends]
    assert ended[-1] == "c" and ended.count("c") == 1, ended
    assert ends[-1][1] == len(out), "an item came out after every stream had ended"
    got = by_stream(out)
    assert got["c"] == list(range(200))  # the longest: each item exactly once
    for name in ("a", "b"):
        n, indices = sizes[name], got[name]
        assert len(indices) >= n  # at least one whole pass
        assert indices == [k % n for k in range(len(indices))]  # whole passes in order, then a prefix
        restarts = indices.count(0) - 1
        assert ended.count(name) == restarts, f"{name}: {ended.count(name)} ends for {restarts} restarts"


# --- mix and split: save and restore -------------------------------------------------------------


def small_mix(stop: str) -> Mix:
    return Mix([stream("a", 5), stream("b", 12)], weights=[1, 2], seed=3, stop=stop)


@pytest.mark.parametrize("stop", ["first", "all", "cycle"])
def test_mix_resumes_exactly(stop):
    reference = Loader(small_mix(stop))
    lengths = [len(list(reference)) for _ in range(2)]
    # check_resume takes k == len(epoch 0) as the end of an epoch in both epochs; with "first" and
    # "cycle" the epochs' lengths differ, so stop short of the shorter one there.
    shortest = min(lengths)
    stops = None if lengths[0] == lengths[1] else sorted({0, 1, shortest // 2, shortest - 1})
    first = check_resume(lambda: small_mix(stop), stop_after=stops)
    assert {item["mix"] for item in first} == {"a", "b"}


def test_restoring_leaves_the_saved_state_alone():
    loader = Loader(small_mix("all"))
    iter(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    before = copy.deepcopy(state)
    resumed = Loader(small_mix("all"))
    resumed.load_state_dict(state)
    list(resumed)
    assert state == before


def documents(n: int, prefix: str = "doc") -> list[dict]:
    return [{"text": f"{prefix} {i}: " + "lorem ipsum " * (i % 5), "n": i} for i in range(n)]


def test_split_and_its_branches_resume_exactly():
    fractions = {"train": 0.6, "validation": 0.4}
    tagged = check_resume(lambda: Split(IterableWrapper(documents(20)), fractions=fractions, seed=1))
    assert {doc["split"] for doc in tagged} == {"train", "validation"}
    for branch in fractions:
        got = check_resume(lambda: Branch(Split(IterableWrapper(documents(20)), fractions=fractions, seed=1), branch))
        assert got == [doc for doc in tagged if doc["split"] == branch]


# --- split: disjoint, complete, stable -----------------------------------------------------------

FRACTIONS = {"train": 0.9, "validation": 0.1}
DOCS = documents(5_000)


def assignment(docs: list[dict], fractions=FRACTIONS, **kwargs) -> dict[str, str]:
    """Text -> branch, from the ``split`` field Split adds."""
    return {doc["text"]: doc["split"] for doc in Loader(Split(IterableWrapper(docs), fractions=fractions, **kwargs))}


@pytest.mark.parametrize("fractions", [FRACTIONS, {"train": 0.8, "validation": 0.15, "test": 0.05}])
def test_branches_are_disjoint_complete_and_sized_by_fraction(fractions):
    texts = [doc["text"] for doc in DOCS]
    branches = {}
    for name in fractions:
        got = list(Loader(Branch(Split(IterableWrapper(DOCS), fractions=fractions), name)))
        assert all(doc["split"] == name for doc in got)
        branches[name] = [doc["text"] for doc in got]
        assert len(set(branches[name])) == len(branches[name]), f"{name}: a document twice"
    assert sum(len(b) for b in branches.values()) == len(texts)  # with the union below: no doc in two
    assert set().union(*map(set, branches.values())) == set(texts)
    for name, fraction in fractions.items():
        assert within(len(branches[name]), len(texts), fraction), f"{name}: {len(branches[name])} of {len(texts)}"


def test_a_document_lands_on_the_same_side_whatever_the_order_and_company():
    reference = assignment(DOCS)
    assert assignment(random.Random(0).sample(DOCS, len(DOCS))) == reference
    company = DOCS[::3] + documents(2_000, prefix="other")
    random.Random(1).shuffle(company)
    moved = {
        text: branch for text, branch in assignment(company).items() if text in reference and branch != reference[text]
    }
    assert not moved


def test_another_seed_assigns_anew():
    a, b = assignment(DOCS, seed=0), assignment(DOCS, seed=1)
    changed = sum(a[text] != b[text] for text in a)
    # Independent assignments differ with probability 2 p (1 - p) = 0.18 for p = 0.9.
    assert within(changed, len(a), 2 * 0.9 * 0.1), f"{changed} of {len(a)} changed side"
    assert within(sum(side == "validation" for side in b.values()), len(b), 0.1)


def test_key_fields_decide_the_side():
    docs = [
        {"text": f"copy {copy} of ({a}, {b})", "a": a, "b": b}
        for a in range(40)
        for b in range(40)
        for copy in range(2)
    ]
    halves = {"left": 0.5, "right": 0.5}
    sides = {
        doc["text"]: doc["split"] for doc in Loader(Split(IterableWrapper(docs), fractions=halves, key=["a", "b"]))
    }
    by_key: dict[tuple[int, int], set[str]] = {}
    for doc in docs:
        by_key.setdefault((doc["a"], doc["b"]), set()).add(sides[doc["text"]])
    assert all(len(found) == 1 for found in by_key.values()), "two documents with one key on two sides"
    side = {key: found.pop() for key, found in by_key.items()}
    assert {side[(0, b)] for b in range(40)} == {"left", "right"}  # `b` matters...
    assert {side[(a, 0)] for a in range(40)} == {"left", "right"}  # ...and so does `a`
    single = {doc["text"]: doc["split"] for doc in Loader(Split(IterableWrapper(docs), fractions=halves, key="a"))}
    listed = {doc["text"]: doc["split"] for doc in Loader(Split(IterableWrapper(docs), fractions=halves, key=["a"]))}
    assert single == listed
    assert all(len({single[d["text"]] for d in docs if d["a"] == a}) == 1 for a in range(40))


def write_arrow(folder: Path, docs: list[dict], files: int = 3, batches: int = 4) -> None:
    """Arrow IPC files of several record batches (shard units), like tests/corpora.py."""
    folder.mkdir(parents=True)
    per_file = math.ceil(len(docs) / files)
    for f in range(files):
        part = docs[f * per_file : (f + 1) * per_file]
        per_batch = math.ceil(len(part) / batches)
        with ipc.new_file(folder / f"part-{f}.arrow", pa.schema([("text", pa.string()), ("n", pa.int64())])) as writer:
            for b in range(batches):
                rows = part[b * per_batch : (b + 1) * per_batch]
                writer.write_batch(pa.record_batch({"text": [d["text"] for d in rows], "n": [d["n"] for d in rows]}))


def test_branches_of_one_config_in_workers_match_the_split(tmp_path):
    docs = DOCS[:2_000]
    write_arrow(tmp_path / "corpus", docs)
    config = {
        "stages": {
            "read": {"type": "read_arrow", "paths": [str(tmp_path / "corpus")]},
            "split": {"type": "split", "input": "read", "fractions": FRACTIONS},
        }
    }
    tagged = {doc["text"]: doc["split"] for doc in Pipeline.from_config(config, output="split")}
    assert tagged == {text: side for text, side in assignment(DOCS).items() if text in tagged}
    assert len(tagged) == len(docs)
    for branch in FRACTIONS:
        expected = sorted(text for text, side in tagged.items() if side == branch)
        for workers in (0, 2):
            got = [doc["text"] for doc in Pipeline.from_config(config, output=f"split.{branch}", num_workers=workers)]
            assert sorted(got) == expected, f"split.{branch}, num_workers={workers}"


def text_file(tmp_path: Path) -> str:
    path = tmp_path / "c.txt"
    path.write_text("some text to split\n", encoding="utf-8")
    return str(path)


def test_a_missing_key_field_names_the_stage(tmp_path):
    config = {
        "stages": {
            "read": {"type": "read_text", "paths": [text_file(tmp_path)]},
            "holdout": {"type": "split", "input": "read", "fractions": FRACTIONS, "key": ["source", "lang"]},
        }
    }
    with pytest.raises(StageError) as info:
        list(Pipeline.from_config(config, output="holdout.train"))
    assert info.value.stage == "holdout"
    assert "holdout" in str(info.value) and "`lang`" in str(info.value)


def test_fractions_that_do_not_add_up(tmp_path):
    config = {
        "stages": {
            "read": {"type": "read_text", "paths": [text_file(tmp_path)]},
            "holdout": {"type": "split", "input": "read", "fractions": {"train": 0.9, "validation": 0.2}},
        }
    }
    with pytest.raises(ConfigError) as info:
        Pipeline.from_config(config)
    assert (info.value.stage, info.value.field) == ("holdout", "fractions")
    assert "`holdout`" in str(info.value) and "fractions" in str(info.value)


def test_an_output_that_reads_a_stage_twice(tmp_path):
    config = {
        "stages": {
            "read": {"type": "read_text", "paths": [text_file(tmp_path)]},
            "split": {"type": "split", "input": "read", "fractions": FRACTIONS},
            "again": {"type": "mix", "inputs": ["split.train", "split.validation"], "weights": [1, 1]},
        }
    }
    with pytest.raises(ConfigError, match="feeds two stages") as info:
        Pipeline.from_config(config)
    assert info.value.stage == "split"
    Pipeline.from_config(config, output="split.validation")  # one branch alone is fine


# --- the shipped example -------------------------------------------------------------------------


def pieces(output: str) -> list[tuple[str, int]]:
    return [(doc["source"], doc["offset"]) for doc in Pipeline.from_config(EXAMPLE, output=output)]


def test_the_example_gives_two_loaders_of_batches(in_root):
    for output in ("train_batch", "val_batch"):
        batches = list(Pipeline.from_config(EXAMPLE, output=output))
        assert batches, output
        for batch in batches:
            assert batch["inputs"].shape[1] == 64 and batch["inputs"].shape == batch["targets"].shape
            assert batch["inputs"].shape[0] == 8 or output == "val_batch"  # train drops its last short batch
    windows = sum(len(block) for block in Pipeline.from_config(EXAMPLE, output="val_window"))
    assert sum(len(b["inputs"]) for b in Pipeline.from_config(EXAMPLE, output="val_batch")) == windows


def test_the_example_splits_every_piece_of_the_sample_once(in_root):
    config = yaml.safe_load(Path(EXAMPLE).read_text(encoding="utf-8"))
    assert {spec["type"] for spec in config["stages"].values()} >= {"mix", "split"}
    train, validation = pieces("split.train"), pieces("split.validation")
    assert train and validation
    assert len(set(train)) == len(train) and len(set(validation)) == len(validation)
    assert not set(train) & set(validation)
    docs = list(Pipeline.from_config(EXAMPLE, output="stories")) + list(Pipeline.from_config(EXAMPLE, output="notes"))
    assert set(train) | set(validation) == {(doc["source"], doc["offset"]) for doc in docs}
    # The pieces tile the shipped sample: every byte of every file, once.
    sample = sorted(Path("data/sample").glob("*.txt"))
    assert sorted({doc["source"] for doc in docs}) == [str(p) for p in sample]
    for path in sample:
        mine = sorted((doc["offset"], doc["end"], doc["text"]) for doc in docs if doc["source"] == str(path))
        assert [start for start, _, _ in mine] == [0] + [end for _, end, _ in mine[:-1]]
        assert mine[-1][1] == path.stat().st_size
        assert "".join(text for _, _, text in mine) == path.read_text(encoding="utf-8")
    # Each branch's token stream comes from its own pieces, and each piece carries its stream's name.
    assert pieces("train_encode") == train and pieces("val_encode") == validation
    for doc in Pipeline.from_config(EXAMPLE, output="mix"):
        assert doc["mix"] == ("stories" if Path(doc["source"]).name[:2] in ("01", "02", "03") else "notes")


# --- mix in workers and over ranks ---------------------------------------------------------------


def test_each_epoch_mixes_anew_in_workers(tmp_path):
    write_arrow(tmp_path / "a", documents(200, "a"), files=1, batches=2)
    write_arrow(tmp_path / "b", documents(200, "b"), files=1, batches=2)
    config = {
        "stages": {
            "a": {"type": "read_arrow", "paths": [str(tmp_path / "a")]},
            "b": {"type": "read_arrow", "paths": [str(tmp_path / "b")]},
            "mix": {"type": "mix", "inputs": ["a", "b"], "weights": [1, 1], "seed": 0},
        }
    }
    pipe = Pipeline.from_config(config, num_workers=1)
    first, second = [doc["text"] for doc in pipe], [doc["text"] for doc in pipe]
    assert sorted(first) == sorted(second)
    assert first != second


def test_ranks_draw_independently(tmp_path):
    write_arrow(tmp_path / "a", documents(400, "a"), files=2, batches=2)
    write_arrow(tmp_path / "b", documents(400, "b"), files=2, batches=2)
    config = {
        "stages": {
            "a": {"type": "read_arrow", "paths": [str(tmp_path / "a")]},
            "b": {"type": "read_arrow", "paths": [str(tmp_path / "b")]},
            "mix": {"type": "mix", "inputs": ["a", "b"], "weights": [1, 1], "seed": 0},
        }
    }
    ranks = [[doc["mix"] for doc in Pipeline.from_config(config, rank=r, world_size=2)] for r in (0, 1)]
    n = min(map(len, ranks)) - 50  # before either rank's streams run low
    agree = sum(x == y for x, y in zip(ranks[0][:n], ranks[1][:n]))
    assert within(agree, n, 0.5), f"ranks drew the same stream at {agree} of {n} steps"


def test_split_checks_its_seed_when_built():
    with pytest.raises((TypeError, ValueError), match="seed"):
        Split(IterableWrapper(documents(3)), fractions=FRACTIONS, seed=1.5)
