"""The training examples, run as a user runs them: the loss falls, a checkpoint resumes exactly, DDP shares the data."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys

import pytest
import torch

from tests.command_line import script
from tests.conftest import ROOT, shared_file

LINE = re.compile(r"^step=(\d+) train_loss=([\d.]+) val_loss=([\d.]+)$", re.M)
# A tiny GPT on the first quarter of the-verdict (~1,150 tokens: 9 batches of 8 x 16 tokens an epoch).
TINY = [
    "--emb-dim",
    "32",
    "--layers",
    "2",
    "--heads",
    "2",
    "--context",
    "16",
    "--batch",
    "8",
    "--lr",
    "1e-2",
    "--val-fraction",
    "0.75",
    "--eval-every",
    "4",
    "--eval-batches",
    "2",
    "--device",
    "cpu",
]


def run(args: list[str], timeout: float = 180) -> str:
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def losses(out: str) -> dict[int, tuple[float, float]]:
    return {int(step): (float(train), float(val)) for step, train, val in LINE.findall(out)}


def train(verdict_path, *extra: str) -> str:
    """``python examples/train_gpt.py`` with the tiny settings, run in this process (a fresh one costs seconds)."""
    done = script("examples/train_gpt.py", "--data", str(verdict_path), *TINY, *extra)
    assert done.returncode == 0, f"{done.args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def uninterrupted() -> dict[int, tuple[float, float]]:
    """The losses of a 24-step run (the reference of the resume test)."""
    return losses(train(shared_file("the-verdict.txt"), "--steps", "24"))


def test_training_lowers_the_loss(uninterrupted):
    assert sorted(uninterrupted) == [1, 4, 8, 12, 16, 20, 24]
    first, last = uninterrupted[1], uninterrupted[24]
    assert last[0] < 0.8 * first[0] and last[1] < 0.9 * first[1], (
        uninterrupted
    )  # validation: a small text, it overfits soon


def test_a_checkpoint_resumes_exactly(verdict_path, tmp_path, uninterrupted):
    checkpoint = str(tmp_path / "run.pt")
    first = losses(train(verdict_path, "--steps", "12", "--checkpoint", checkpoint))  # stops in the 2nd epoch
    assert first == {k: uninterrupted[k] for k in (1, 4, 8, 12)}
    train_gpt = runpy.run_path(str(ROOT / "examples" / "train_gpt.py"))  # in this process: a second start costs seconds
    with pytest.raises(SystemExit, match="--context was 16, now 8"):
        train_gpt["main"](
            ["--data", str(verdict_path), *TINY, "--context", "8", "--steps", "24", "--resume", checkpoint]
        )
    out = train(verdict_path, "--steps", "24", "--resume", checkpoint)
    assert "from step 12" in out
    assert losses(out) == {k: uninterrupted[k] for k in (16, 20, 24)}  # the same batches, model and optimizer


def ddp(*extra: str) -> str:
    return run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "examples/ddp.py",
            "--data",
            str(shared_file("the-verdict.txt")),
            *TINY,
            "--piece-bytes",
            "1024",
            *extra,
        ],
        timeout=240,
    )


@pytest.fixture(scope="module")
def ddp_8_steps() -> str:
    return ddp("--steps", "8")


def test_ddp_ranks_read_disjoint_data_and_keep_identical_tables(ddp_8_steps):
    out = ddp_8_steps
    assert sorted(losses(out)) == [1, 4, 8]
    read = {
        int(r): [tuple(unit) for unit in json.loads(units)]
        for r, units in re.findall(r"^rank=(\d) read=(.*)$", out, re.M)
    }
    assert sorted(read) == [0, 1] and read[0] and read[1]
    assert not set(read[0]) & set(read[1])  # no piece read by both ranks
    pieces = sorted(read[0] + read[1], key=lambda unit: unit[1])
    assert pieces[0][1] == 0 and all(
        a[2] == b[1] for a, b in zip(pieces, pieces[1:])
    )  # together: all of the train text
    checks = re.findall(r"^rank=(\d) tables_identical=(\w+) model_identical=(\w+) tables_changed=(\w+)$", out, re.M)
    assert sorted(checks) == [("0", "True", "True", "True"), ("1", "True", "True", "True")], out


@pytest.fixture(scope="module")
def ddp_4_steps_saved(tmp_path_factory) -> tuple[str, str]:
    """Two ranks, 4 steps, checkpointed: the output and the checkpoint (only read by the tests)."""
    checkpoint = str(tmp_path_factory.mktemp("ddp") / "ddp.pt")
    return ddp("--steps", "4", "--checkpoint", checkpoint), checkpoint


def test_ddp_checkpoint_resumes_every_rank_exactly(ddp_4_steps_saved, ddp_8_steps):
    saved, checkpoint = ddp_4_steps_saved
    first = losses(saved)
    uninterrupted = losses(ddp_8_steps)
    assert first == {k: uninterrupted[k] for k in (1, 4)}
    assert len(torch.load(checkpoint, weights_only=True)["data"]) == 2  # each rank's pipeline state
    resumed = losses(ddp("--steps", "8", "--resume", checkpoint))
    assert resumed == {8: uninterrupted[8]}  # from step 4 on: the same batches on each rank, model and optimizer


def test_ddp_resumes_on_another_number_of_ranks(verdict_path, ddp_4_steps_saved):
    first, checkpoint = ddp_4_steps_saved  # saved by 2 ranks
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    common = ["examples/ddp.py", "--data", str(verdict_path), *TINY, "--piece-bytes", "1024"]
    assert sorted(losses(first)) == [1, 4]
    resume = ["--steps", "8", "--resume", checkpoint]
    out = run(torchrun + ["--nproc_per_node", "1"] + common + resume, timeout=240)
    assert "resumed at step 4, saved by 2 rank(s), on 1" in out
    assert sorted(losses(out)) == [8]
    assert re.search(r"^rank=0 tables_identical=True model_identical=True tables_changed=True$", out, re.M), out
