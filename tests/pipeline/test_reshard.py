"""Elastic resume: stop on one topology (ranks x workers), continue on another, read every document once.

The oracle is the exact resume: the first topology continuing from its own saved states reads what
remains of the epoch; the resharded continuation must read exactly that (``pipeline.cli.audit``), with
every rank in a process of its own and every state through a JSON file.
"""

from __future__ import annotations

import itertools
import json
import os
import random

import numpy as np
import pytest

from pipeline import Pipeline
from pipeline.cli.audit import verify_resume
from stages.tokens.prepare import prepare
from pipeline.seam import RemainingWindows, remaining_units, unit_lists
from stages.batch import Batch
from tests.command_line import cli
from tests.corpora import write_arrow_corpus, write_text_corpus

TOPOLOGIES = [(1, 0), (2, 2), (3, 1), (1, 4)]  # (ranks, workers per rank)
PAIRS = [(a, b) for a, b in itertools.product(TOPOLOGIES, TOPOLOGIES) if a != b]


def _tail(source: str, shuffle: bool) -> dict:
    return {
        "encode": {"type": "bpe_encode", "input": source, "batch_bytes": 400},
        "window": {"type": "sliding_window", "input": "encode", "max_length": 8, "stride": 6, "block_windows": 8},
        # a shuffled group of one batch: a save never falls inside a group (see the test of that case)
        "batch": {"type": "batch", "input": "window", "batch_size": 2, "shuffle": shuffle, "shuffle_windows": 2},
    }


def arrow_config(folder, shuffle: bool) -> dict:
    return {
        "stages": {
            "read": {"type": "read_arrow", "paths": [str(folder)], "shuffle": shuffle, "seed": 3},
            **_tail("read", shuffle),
        }
    }


def text_config(folder, shuffle: bool) -> dict:
    # large files in the sense that matters: each is cut into several units and pieces
    read = {
        "type": "read_text",
        "paths": [str(folder)],
        "chunk_bytes": 200,
        "shard_bytes": 600,
        "shuffle": shuffle,
        "seed": 4,
    }
    return {"stages": {"read": read, **_tail("read", shuffle)}}


def mix_config(arrow, text, shuffle: bool) -> dict:
    return {
        "stages": {
            "a": {"type": "read_arrow", "paths": [str(arrow)], "shuffle": shuffle, "seed": 1},
            "t": {
                "type": "read_text",
                "paths": [str(text)],
                "chunk_bytes": 200,
                "shard_bytes": 600,
                "shuffle": shuffle,
            },
            "mix": {"type": "mix", "inputs": ["a", "t"], "weights": [2, 1], "seed": 9},
            **_tail("mix", shuffle),
        }
    }


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    write_arrow_corpus(root / "arrow", batches_per_file=(3, 2, 4), rows_per_batch=(5, 3, 2))
    write_text_corpus(root / "text", n_files=6)
    text = {
        "stages": {
            "read": {"type": "read_text", "paths": [str(root / "text")], "chunk_bytes": 300, "shard_bytes": 2000},
            "encode": {"type": "bpe_encode", "input": "read"},
        }
    }
    prepare(text, root / "cache", shard_tokens=300, batch_tokens=100)
    return root


def tokens_config(cache, shuffle: bool) -> dict:
    return {
        "stages": {
            "read": {
                "type": "read_tokens",
                "path": str(cache),
                "max_length": 8,
                "stride": 6,
                "shuffle": shuffle,
                "block_windows": 16,
            },
            "batch": {"type": "batch", "input": "read", "batch_size": 4},
        }
    }


def assert_exactly_once(report: dict) -> None:
    assert report["rows"] and all(row["expected"] > 0 for row in report["rows"]), report["rows"]
    assert not report["lost"] and not report["repeated"] and not report["out_of_order"], report
    if report["tokens_again"] is not None:  # documents' tokens: none windowed twice, none lost but in counted tails
        assert report["tokens_again"] == 0 and report["tokens_lost"] <= report["tail_tokens"], report


@pytest.mark.slow
@pytest.mark.parametrize("old,new", PAIRS, ids=[f"{a[0]}x{a[1]}-to-{b[0]}x{b[1]}" for a, b in PAIRS])
def test_arrow_grid(corpora, old, new):
    shuffle = PAIRS.index((old, new)) % 2 == 1
    steps = 1 + PAIRS.index((old, new)) % 3 * 2  # stops at 1, 3 and 5 batches a rank
    assert_exactly_once(verify_resume(arrow_config(corpora / "arrow", shuffle), steps, old, new))


REPRESENTATIVE = [((2, 2), (3, 1)), ((1, 4), (1, 0)), ((3, 1), (1, 4))]


@pytest.mark.parametrize("old,new", REPRESENTATIVE)
@pytest.mark.parametrize("shuffle", [False, True])
def test_text_pieces_of_large_files(corpora, old, new, shuffle):
    assert_exactly_once(verify_resume(text_config(corpora / "text", shuffle), 4, old, new))


@pytest.mark.parametrize("old,new", REPRESENTATIVE[:2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_token_shards_windows(corpora, old, new, shuffle):
    assert_exactly_once(verify_resume(tokens_config(corpora / "cache", shuffle), 2, old, new))


def _rows(batches) -> list[tuple]:
    """The windows of batches, as tuples of ``max_length + 1`` ids."""
    return [tuple(row) for b in batches for row in np.concatenate([b["inputs"][:, :1], b["targets"]], 1).tolist()]


@pytest.mark.parametrize("shuffle", [False, True])
def test_token_shards_reshard_twice_in_an_epoch(corpora, shuffle):
    config = tokens_config(corpora / "cache", shuffle)
    everything = _rows(Pipeline.from_config(config))
    seen, states = [], []
    for topology, taken in (((2, 0), 2), ((3, 2), 1)):  # 2 ranks, then 3 ranks of 2 workers, then 1 rank
        ranks, workers = topology
        saved = []
        for rank in range(ranks):
            with Pipeline.from_config(config, rank=rank, world_size=ranks, num_workers=workers) as pipe:
                if states:
                    pipe.load_state_dict(states, reshard=True)
                seen += _rows(b for _, b in zip(range(taken), pipe))
                saved.append(json.loads(json.dumps(pipe.state_dict())))
        states = saved
    pipe = Pipeline.from_config(config)
    pipe.load_state_dict(states, reshard=True)
    rest = _rows(pipe)
    assert rest and sorted(seen + rest) == sorted(everything)  # every window of the epoch once
    assert len(_rows(pipe)) == len(everything)  # the next epoch: this topology's own


@pytest.mark.parametrize("old,new", REPRESENTATIVE[::2])
def test_mix(corpora, old, new):
    assert_exactly_once(verify_resume(mix_config(corpora / "arrow", corpora / "text", True), 3, old, new))


def test_split(corpora):
    config = {
        "stages": {
            "read": {"type": "read_arrow", "paths": [str(corpora / "arrow")], "shuffle": True},
            "split": {"type": "split", "input": "read", "fractions": {"train": 0.7, "validation": 0.3}, "key": "id"},
            **_tail("split.train", True),
        }
    }
    assert_exactly_once(verify_resume(config, 3, (2, 2), (1, 0)))


def test_a_broken_restore_fails_the_audit_naming_lost_documents(corpora):
    def drop_rank_1(pipe, states):  # a restore that forgets rank 1's state when it deals the units out
        pipe.load_state_dict(states, reshard=True)
        reader = pipe.stages["read"]
        seams = reader._seams
        del seams["0"]["groups"][0]["at"]["1"]  # old global worker 1 = rank 1 (no workers), in epoch 0
        reader.set_seams(seams)

    report = verify_resume(arrow_config(corpora / "arrow", False), 2, (2, 0), (1, 0), restore=drop_rank_1)
    assert report["lost"] and all("record" in name for name in report["lost"])
    assert report["rows"][0]["lost"] == len(report["lost"])


@pytest.mark.parametrize("reader", ["text", "arrow"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_pieces_in_progress_go_on_after_their_windowed_tokens(corpora, tmp_path, reader, shuffle):
    def restore(pipe, states):  # keeps the seams' frontiers: [index, position, windowed] for a piece in progress
        pipe.load_state_dict(states, reshard=True)
        at = [
            f for seam in pipe.stages["read"].seams.values() for group in seam["groups"] for f in group["at"].values()
        ]
        (tmp_path / f"{os.getpid()}.json").write_text(json.dumps(at))

    config = text_config(corpora / "text", shuffle) if reader == "text" else arrow_config(corpora / "arrow", shuffle)
    report = verify_resume(config, 3, (2, 2), (3, 1), restore=restore)
    windowed = [f[2] for path in tmp_path.glob("*.json") for f in json.loads(path.read_text()) if len(f) == 3]
    assert any(windowed), "no piece was in the middle of its windows at the save: the case is not exercised"
    assert_exactly_once(report)  # its windowed tokens are not windowed again (the old code counted them twice)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_save_inside_a_shuffled_group_is_refused_not_read_again(corpora, workers):
    config = arrow_config(corpora / "arrow", True)
    config["stages"]["batch"]["shuffle_windows"] = 16  # eight batches a group: two batches leave it partly batched
    states = _two_batches_on_two_ranks(config)
    with Pipeline.from_config(config, num_workers=workers) as pipe:
        with pytest.raises(
            ValueError,
            match=r"stage 'batch' of rank 0: 4 of the 16 windows of shuffle group 0 .*"
            r"after a multiple of 8 batches",
        ):
            pipe.load_state_dict(states, reshard=True)


def test_a_save_on_a_group_boundary_or_after_the_last_group_reshards(corpora):
    config = arrow_config(corpora / "arrow", True)
    config["stages"]["batch"]["shuffle_windows"] = 4  # two batches a group: two batches end group 0
    assert_exactly_once(verify_resume(config, 2, (2, 2), (3, 1)))
    config["stages"]["batch"]["shuffle_windows"] = 1024  # one group an epoch, all of it batched: nothing left
    states = _states(config, {0: None, 1: None})
    pipe = Pipeline.from_config(config, rank=0, world_size=3)
    pipe.load_state_dict(states, reshard=True)
    assert _batches(pipe) == []


def test_a_restore_from_the_replay_points_is_caught_as_repeats(corpora, monkeypatch):
    def coarse(pipe, states):  # forget the windows batched past the point a restore replays from
        monkeypatch.setattr(Batch, "consumed", lambda self, state: 0)
        pipe.load_state_dict(states, reshard=True)

    # saved after 4 batches: inside a block of windows on every rank, so the replay repeats some (after 3, a
    # rank's save can fall between two blocks now that the first blocks are small, and replay none)
    report = verify_resume(arrow_config(corpora / "arrow", False), 4, (2, 2), (3, 1), restore=coarse)
    assert report["repeated"] and not report["lost"]


def test_cli_prints_the_table_and_passes(corpora, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(arrow_config(corpora / "arrow", True)))
    done = cli("verify-resume", str(config), "--steps", "2", "--from", "2x0", "--to", "1x2", "--seed", "11")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| reader | expected | read | lost | repeated | out of order |" in done.stdout
    assert "every document read once" in done.stdout


def _batches(pipe) -> list[np.ndarray]:
    return [b["inputs"].numpy() for b in pipe]


def _two_batches_on_two_ranks(config: dict) -> list[dict]:
    """Each of 2 ranks' state after 2 batches, through JSON."""
    return _states(config, {0: 2, 1: 2})


def _states(config: dict, batches: dict[int, int | None]) -> list[dict]:
    """Each rank's state after its number of batches (None: its whole epoch), through JSON."""
    states = []
    for rank, n in batches.items():
        with Pipeline.from_config(config, rank=rank, world_size=len(batches)) as pipe:
            for _ in zip(range(n) if n is not None else iter(int, 1), pipe):
                pass
            states.append(json.loads(json.dumps(pipe.state_dict())))
    return states


def test_the_next_epoch_is_the_new_topologys_and_a_seam_state_resumes_exactly(corpora):
    config = arrow_config(corpora / "arrow", True)
    states = _two_batches_on_two_ranks(config)
    fresh = Pipeline.from_config(config, rank=0, world_size=3)
    _batches(fresh)
    next_epoch = _batches(fresh)
    pipe = Pipeline.from_config(config, rank=0, world_size=3)
    pipe.load_state_dict(states, reshard=True)
    iterator = iter(pipe)
    head = [next(iterator)["inputs"].numpy() for _ in range(2)]
    mid = json.loads(json.dumps(pipe.state_dict()))  # saved inside the seam's epoch: restores on this topology
    rest = [b["inputs"].numpy() for b in iterator]
    again = Pipeline.from_config(config, rank=0, world_size=3)
    again.load_state_dict(mid)
    assert all(np.array_equal(a, b) for a, b in zip(_batches(again), rest)) and head
    after = _batches(pipe)
    assert len(after) == len(next_epoch) and all(np.array_equal(a, b) for a, b in zip(after, next_epoch))


def test_refusals_name_the_field_and_reshard(corpora, tmp_path):
    config = arrow_config(corpora / "arrow", False)
    with Pipeline.from_config(config, rank=0, world_size=2, num_workers=2) as pipe:
        next(iter(pipe))
        state = pipe.state_dict()
    other = Pipeline.from_config(config, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"`world_size` was \[2\].*reshard=True"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"rank 0.s of 2; this is rank 0 of 1; pass the states of all 2 ranks"):
        other.load_state_dict([state], reshard=True)
    write_arrow_corpus(tmp_path / "other", batches_per_file=(1,), rows_per_batch=(3,))
    with pytest.raises(ValueError, match=r"`(graph|corpus)`"):
        Pipeline.from_config(arrow_config(tmp_path / "other", False)).load_state_dict([state], reshard=True)
    same_world = Pipeline.from_config(config, rank=0, world_size=2, num_workers=1)
    same_world.load_state_dict(state, reshard=True)  # only num_workers changed: this rank's own state is enough
    with pytest.raises(ValueError, match="rank 0's of 2; this is rank 1"):
        Pipeline.from_config(config, rank=1, world_size=2).load_state_dict(state, reshard=True)


def test_dealing_reads_every_unit_once_against_brute_force():
    rng = random.Random(5)
    for _ in range(200):
        n, G, H = rng.randint(0, 30), rng.randint(1, 6), rng.randint(1, 6)
        order = rng.sample(range(n), n)
        lists = unit_lists(order, None, G)
        at = {str(g): [rng.randint(0, len(lists[g])), rng.choice([None, 7])] for g in range(G)}
        dealt = unit_lists(
            order, {"epoch": 0, "workers": G, "previous": None, "groups": [{"among": [0, H], "at": at}]}, H
        )
        done = {u for g in range(G) for u, _ in lists[g][: at[str(g)][0]]}
        going = {
            lists[g][at[str(g)][0]][0] for g in range(G) if at[str(g)][1] is not None and at[str(g)][0] < len(lists[g])
        }
        read = [u for worker in dealt for u, _ in worker]
        assert sorted(read) == sorted(set(order) - done) and len(read) == len(set(read))
        assert {u for worker in dealt for u, start in worker if start is not None} == going
        assert all(start == 7 for worker in dealt for u, start in worker if u in going)  # go on where they stood
        left = remaining_units(order, lists, at)  # dealt round robin, units in progress first
        assert all(dealt[j] == left[j::H] for j in range(H)) and all(s is not None for _, s in left[: len(going)])


def test_remaining_windows_against_brute_force():
    rng = random.Random(6)
    for _ in range(300):
        n, G = rng.randint(0, 80), rng.randint(1, 7)
        covered = rng.sample(range(G), rng.randint(1, G))
        at = {str(g): rng.randint(0, len(range(g, n, G))) for g in covered}
        left = sorted(k for g in covered for k in range(g + G * at[str(g)], n, G))
        numbers = RemainingWindows(n, G, at)
        assert numbers.total == len(left)
        assert numbers(np.arange(len(left))).tolist() == left


def _names(items) -> list[str]:
    return [f"{doc['source']}:{doc['shard']}:{doc['record']}" for doc in items]


def _take(pipe, n: int) -> list[str]:
    """The next ``n`` documents' names, on through epoch ends."""
    out: list[str] = []
    while len(out) < n:
        for doc in pipe:
            out += _names([doc])
            if len(out) == n:
                break
    return out


def test_ranks_saved_in_different_epochs(corpora):
    # documents straight from the reader: what a rank took is exactly what it consumed
    config = {"stages": {"read": {"type": "read_arrow", "paths": [str(corpora / "arrow")], "shuffle": True, "seed": 2}}}
    epochs = {
        rank: [_names(Pipeline.from_config(config, rank=rank, world_size=2)) for _ in range(2)] for rank in range(2)
    }
    short = min(epochs, key=lambda rank: len(epochs[rank][0]))
    taken = {short: len(epochs[short][0]) + 2, 1 - short: 1}  # the rank with fewer documents is into epoch 1
    states, read = [], {}
    for rank in range(2):
        pipe = Pipeline.from_config(config, rank=rank, world_size=2)
        read[rank] = _take(pipe, taken[rank])
        states.append(json.loads(json.dumps(pipe.state_dict())))
    everything = sorted(epochs[0][0] + epochs[1][0])
    done = {0: read[1 - short] + read[short][: len(epochs[short][0])], 1: read[short][len(epochs[short][0]) :]}
    pipe = Pipeline.from_config(config, rank=0, world_size=1)
    pipe.load_state_dict(states, reshard=True)
    for epoch in (0, 1):
        rest = _names(pipe)
        assert sorted(rest + done[epoch]) == everything, f"epoch {epoch}"
    assert sorted(_names(pipe)) == everything  # epoch 2: the new topology's own


@pytest.mark.parametrize("shuffle_windows", [2, 64])  # 64: the group's start lies before any worker's first block
def test_a_state_saved_in_the_seam_epoch_resumes_exactly_with_workers(corpora, shuffle_windows):
    config = arrow_config(corpora / "arrow", True)
    config["stages"]["batch"]["shuffle_windows"] = shuffle_windows
    # a rank inside a group cannot be resharded: with groups of 32 batches, one rank saved after its last group
    states = _two_batches_on_two_ranks(config) if shuffle_windows == 2 else _states(config, {0: None, 1: 0})
    with Pipeline.from_config(config, num_workers=2) as pipe:
        pipe.load_state_dict(states, reshard=True)
        iterator = iter(pipe)
        next(iterator)
        mid = json.loads(json.dumps(pipe.state_dict()))
        rest = [b["inputs"].numpy() for b in iterator]
    with Pipeline.from_config(config, num_workers=2) as again:
        again.load_state_dict(mid)
        resumed = _batches(again)
    assert len(resumed) == len(rest) > 0 and all(np.array_equal(a, b) for a, b in zip(resumed, rest))
