"""Chained resume across epoch ends: any sequence of (load, take k batches, save through JSON), each in a
fresh pipeline, gives exactly the batches of one uninterrupted run over several epochs."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import Pipeline
from tests.command_line import cli
from tests.corpora import write_arrow_corpus

EPOCHS = 3


def _config(corpus, shuffle: bool, mixed: bool) -> dict:
    tail = {
        "encode": {"type": "bpe_encode", "input": "split.train" if mixed else "read"},
        "window": {"type": "sliding_window", "input": "encode", "max_length": 8, "stride": 8},
        "batch": {"type": "batch", "input": "window", "batch_size": 4, "shuffle": shuffle, "shuffle_windows": 12},
    }
    read = {"type": "read_arrow", "shuffle": shuffle, "seed": 3}
    if not mixed:
        return {"stages": {"read": {**read, "paths": [str(corpus / "a")]}, **tail}, "output": "batch"}
    return {
        "stages": {
            "a": {**read, "paths": [str(corpus / "a")]},
            "b": {**read, "paths": [str(corpus / "b")]},
            "mix": {"type": "mix", "inputs": ["a", "b"], "weights": [0.6, 0.4], "seed": 1},
            "split": {"type": "split", "input": "mix", "fractions": {"train": 0.8, "validation": 0.2}},
            **tail,
        },
        "output": "batch",
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("chained")
    write_arrow_corpus(root / "a", batches_per_file=(2, 3), rows_per_batch=(3, 5, 2))
    write_arrow_corpus(root / "b", batches_per_file=(2, 1), rows_per_batch=(4, 2))
    return root


_references: dict = {}


def _epochs(config: dict, num_workers: int) -> list[list[np.ndarray]]:
    """The inputs of every batch of ``EPOCHS`` uninterrupted epochs (computed once per configuration)."""
    key = (json.dumps(config, sort_keys=True), num_workers)
    if key not in _references:
        with Pipeline.from_config(config, num_workers=num_workers) as pipe:
            _references[key] = [[b["inputs"].numpy() for b in pipe] for _ in range(EPOCHS)]
    return _references[key]


def _reference(config: dict, num_workers: int) -> list[np.ndarray]:
    return [batch for epoch in _epochs(config, num_workers) for batch in epoch]


def _take(pipe: Pipeline, k: int) -> list[np.ndarray]:
    """The next ``k`` batches, starting new epochs as the old ones end."""
    out, iterator = [], iter(pipe)
    while len(out) < k:
        try:
            out.append(next(iterator)["inputs"].numpy())
        except StopIteration:
            iterator = iter(pipe)
    return out


def _check_chain(config: dict, num_workers: int, takes: list[int]) -> None:
    reference = _reference(config, num_workers)
    state, done = None, 0
    for k in takes:
        k = min(k, len(reference) - done)  # stay within the reference's epochs
        with Pipeline.from_config(config, num_workers=num_workers) as pipe:
            if state is not None:
                pipe.load_state_dict(state)
            got = _take(pipe, k)
            state = json.loads(json.dumps(pipe.state_dict()))
        for i, batch in enumerate(got):
            assert np.array_equal(batch, reference[done + i]), f"takes {takes}: batch {done + i} differs"
        done += k


_takes = st.lists(st.integers(0, 14), min_size=2, max_size=6)


@pytest.mark.parametrize(("num_workers", "examples"), [(0, 12), (2, 2)])  # worker processes start each epoch: few
@pytest.mark.parametrize("mixed", [False, True], ids=["read", "mix_split"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_chained_resume_equals_the_uninterrupted_run(corpus, shuffle, mixed, num_workers, examples):
    @settings(max_examples=examples, deadline=None, derandomize=True)
    @given(takes=_takes)
    def check(takes):
        _check_chain(_config(corpus, shuffle, mixed), num_workers, takes)

    check()


def test_a_state_saved_at_an_epoch_end_and_resumed_moves_on(corpus):
    """Issue 14, item 1: after resuming from an end-of-epoch state, a new state is no longer that state."""
    config = _config(corpus, False, False)
    with Pipeline.from_config(config) as pipe:
        epoch = len(list(pipe))
        at_end = json.loads(json.dumps(pipe.state_dict()))
    with Pipeline.from_config(config) as pipe:
        pipe.load_state_dict(at_end)
        _take(pipe, 5)
        later = json.loads(json.dumps(pipe.state_dict()))
    assert later != at_end
    with Pipeline.from_config(config) as pipe:
        pipe.load_state_dict(later)
        assert np.array_equal(_take(pipe, 1)[0], _reference(config, 0)[epoch + 5])


def test_a_state_taken_before_loading_does_not_hide_the_loaded_one(corpus):
    config = _config(corpus, False, False)
    with Pipeline.from_config(config) as pipe:
        _take(pipe, 3)
        state = pipe.state_dict()
    with Pipeline.from_config(config) as pipe:
        pipe.state_dict()
        pipe.load_state_dict(state)
        assert pipe.state_dict() == state
        assert np.array_equal(_take(pipe, 1)[0], _reference(config, 0)[3])


@pytest.mark.parametrize(("mixed", "num_workers"), [(False, 0), (True, 2)], ids=["read", "mix_split-workers"])
def test_chained_cli_runs_equal_the_uninterrupted_run(corpus, tmp_path, mixed, num_workers):
    """``run --max-batches``, then ``run --resume ck --checkpoint ck2`` twice: epoch by epoch, each run continues."""
    config = _config(corpus, True, mixed)
    (tmp_path / "config.json").write_text(json.dumps(config))
    epochs = _epochs(config, num_workers)
    trace = tmp_path / "trace.txt"
    common = [str(tmp_path / "config.json"), "--num-workers", str(num_workers), "--trace", str(trace), "--no-progress"]
    assert cli("run", *common, "--max-batches", "3", "--checkpoint", str(tmp_path / "ck0.json")).returncode == 0
    for i in range(EPOCHS):  # the rest of epoch 0, then epochs 1 and 2, each run to its epoch's end
        resume = ["--resume", str(tmp_path / f"ck{i}.json"), "--checkpoint", str(tmp_path / f"ck{i + 1}.json")]
        assert cli("run", *common, *resume).returncode == 0
    digests = [line.split()[1] for line in trace.read_text().splitlines()]
    expected = [hashlib.sha1(batch.tobytes()).hexdigest()[:16] for epoch in epochs for batch in epoch]
    assert digests == expected  # every epoch, each batch once
