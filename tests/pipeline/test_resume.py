"""Exact resume: stop after k batches, restore the JSON state elsewhere, get exactly what would have come."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

from pipeline import Pipeline
from tests.command_line import cli, run_process, trace_digests
from tests.corpora import write_arrow_corpus


def _config(corpus, shuffle: bool) -> dict:
    return {
        "stages": {
            "read": {"type": "read_arrow", "paths": [str(corpus)], "shuffle": shuffle, "seed": 5},
            "encode": {"type": "bpe_encode", "input": "read"},
            "window": {"type": "sliding_window", "input": "encode", "max_length": 6, "stride": 5},
            "batch": {"type": "batch", "input": "window", "batch_size": 4, "shuffle": shuffle, "shuffle_windows": 24},
        }
    }


def _restore_in_new_process(restorer, tmp_path, config, loader, resume: list) -> list[np.ndarray]:
    """For each (state, count): the next ``count`` batches after restoring ``state`` in another process."""
    out = tmp_path / "rest.npz"
    spec = {"config": config, "loader": loader, "resume": resume, "out": str(out)}
    restorer.stdin.write(json.dumps(spec) + "\n")
    restorer.stdin.flush()
    assert restorer.stdout.readline() == f"{out}\n", f"tests.resume_child exited {restorer.poll()}"
    rests = np.load(out)
    return [rests[str(i)] for i in range(len(resume))]


def _take(iterator, n) -> list[np.ndarray]:
    return [next(iterator)["inputs"].numpy() for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_in_a_new_process_equals_the_uninterrupted_run(restorer, tmp_path, num_workers, world_size, shuffle):
    write_arrow_corpus(tmp_path / "corpus", batches_per_file=(3, 2, 4), rows_per_batch=(5, 9, 2))
    config = _config(tmp_path / "corpus", shuffle)
    loader = {"rank": world_size - 1, "world_size": world_size, "num_workers": num_workers}
    pipe = Pipeline.from_config(config, **loader)
    epochs = [[b["inputs"].numpy() for b in pipe] for _ in range(2)]  # shuffled epochs may differ in length
    first = len(epochs[0])
    reference = epochs[0] + epochs[1]
    assert first > 6
    # stops: early, just before the epoch's end, and into the second epoch; each continues 5 batches
    # into the second epoch, so the restored run also crosses the epoch boundary where it must
    stops = [3, first - 1, first + 2]
    resume = []
    for k in stops:
        pipe = Pipeline.from_config(config, **loader)
        head = _take(iter(pipe), min(k, first))
        if k > first:
            head += _take(iter(pipe), k - first)
        assert all(np.array_equal(a, b) for a, b in zip(head, reference))
        state = json.loads(json.dumps(pipe.state_dict()))
        assert len(json.dumps(state)) < 4096
        resume.append((state, (first - k if k < first else 0) + 5))
    rests = _restore_in_new_process(restorer, tmp_path, config, loader, resume)
    for k, (state, count), rest in zip(stops, resume, rests):
        expected = reference[k:first] + epochs[1][:5] if k < first else reference[k : k + 5]
        assert len(rest) == len(expected) == count
        assert all(np.array_equal(a, b) for a, b in zip(rest, expected)), f"stopped after {k}"


def test_state_of_another_pipeline_is_refused(tmp_path):
    write_arrow_corpus(tmp_path / "corpus")
    config = _config(tmp_path / "corpus", False)
    pipe = Pipeline.from_config(config)
    next(iter(pipe))
    state = pipe.state_dict()

    other = json.loads(json.dumps(config))
    other["stages"]["window"]["stride"] = 6
    with pytest.raises(ValueError, match=r"`graph` was .* \(the stages or their parameters differ\)"):
        Pipeline.from_config(other).load_state_dict(state)
    with pytest.raises(ValueError, match=r"`world_size` was \[1\] when it was saved and is \[2\] now"):
        Pipeline.from_config(config, world_size=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"`num_workers` was 0 when it was saved and is 2 now"):
        Pipeline.from_config(config, num_workers=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state_version"):
        Pipeline.from_config(config).load_state_dict({"loader": state["loader"]})
    write_arrow_corpus(tmp_path / "corpus", batches_per_file=(3, 1, 5, 3))  # the corpus changed on disk
    with pytest.raises(ValueError, match=r"`corpus` was"):
        Pipeline.from_config(config).load_state_dict(state)


def _corpus_config(tmp_path, shakespeare_path) -> str:
    config = tmp_path / "shakespeare.yaml"
    config.write_text(
        "stages:\n"
        f"  read: {{type: read_text, paths: ['{shakespeare_path}'], chunk_bytes: 4096}}\n"
        "  encode: {type: bpe_encode, input: read, batch_bytes: 4096, num_threads: 1}\n"
        "  window: {type: sliding_window, input: encode, max_length: 8, stride: 8, block_windows: 16}\n"
        "  batch: {type: batch, input: window, batch_size: 2}\n"
    )
    return str(config)


def test_cli_killed_and_resumed_loses_nothing(tmp_path, shakespeare_path):
    config = _corpus_config(tmp_path, shakespeare_path)
    every = 50
    full = cli("run", config, "--trace", str(tmp_path / "full.txt"))  # the reference: in this process
    assert full.returncode == 0, full.stderr
    reference = trace_digests(tmp_path / "full.txt")
    assert len(reference) > 10_000

    killed = run_process(
        config,
        "--trace",
        str(tmp_path / "a.txt"),
        "--checkpoint",
        str(tmp_path / "ck.json"),
        "--checkpoint-every",
        str(every),
    )
    deadline = time.monotonic() + 120
    while len(trace_digests(tmp_path / "a.txt")) < 3000 and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    before = trace_digests(tmp_path / "a.txt")
    checkpointed = json.load(open(tmp_path / "ck.json"))["batches"]
    assert 3000 - every <= checkpointed <= len(before) < len(reference)

    resumed = run_process(config, "--resume", str(tmp_path / "ck.json"), "--trace", str(tmp_path / "b.txt"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    after = trace_digests(tmp_path / "b.txt")
    assert before == reference[: len(before)]
    assert after == reference[checkpointed:]  # nothing lost
    assert len(before) - checkpointed <= every  # repeated: at most the batches since the last checkpoint


def test_cli_sigterm_writes_a_checkpoint_and_resumes(tmp_path, shakespeare_path):
    config = _corpus_config(tmp_path, shakespeare_path)
    proc = run_process(
        config,
        "--trace",
        str(tmp_path / "a.txt"),
        "--checkpoint",
        str(tmp_path / "ck.json"),
        "--checkpoint-every",
        "100000",
    )
    deadline = time.monotonic() + 120
    while len(trace_digests(tmp_path / "a.txt")) < 1000 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    before = trace_digests(tmp_path / "a.txt")
    assert json.load(open(tmp_path / "ck.json"))["batches"] == len(before)
    # --max-batches counts this run's batches (issue 14): 10 more after the resume
    resumed = run_process(
        config,
        "--resume",
        str(tmp_path / "ck.json"),
        "--trace",
        str(tmp_path / "b.txt"),
        "--max-batches",
        "10",
    )
    assert resumed.wait(timeout=300) == 0
    full = cli("run", config, "--trace", str(tmp_path / "full.txt"), "--max-batches", str(len(before) + 10))
    assert full.returncode == 0
    assert before + trace_digests(tmp_path / "b.txt") == trace_digests(tmp_path / "full.txt")
