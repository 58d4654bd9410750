"""The training examples, run as a user runs them: the loss falls, a checkpoint resumes exactly, DDP shares the data."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import ROOT

LINE = re.compile(r"^step=(\d+) train_loss=([\d.]+) val_loss=([\d.]+)$", re.M)
# A tiny GPT on half of the-verdict (train ~2,300 tokens: 9 batches of 16 x 16 tokens an epoch).
TINY = ["--emb-dim", "32", "--layers", "2", "--heads", "2", "--context", "16", "--batch", "16", "--lr", "1e-2",
        "--val-fraction", "0.5", "--eval-every", "4", "--eval-batches", "2", "--device", "cpu"]


def run(args: list[str], timeout: float = 180) -> str:
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def losses(out: str) -> dict[int, tuple[float, float]]:
    return {int(step): (float(train), float(val)) for step, train, val in LINE.findall(out)}


def train(verdict_path, *extra: str) -> str:
    return run([sys.executable, "examples/train_gpt.py", "--data", str(verdict_path), *TINY, *extra])


def test_training_lowers_the_loss_and_a_checkpoint_resumes_exactly(verdict_path, tmp_path):
    whole = losses(train(verdict_path, "--steps", "24"))
    assert sorted(whole) == [1, 4, 8, 12, 16, 20, 24]
    assert whole[24][0] < 0.8 * whole[1][0] and whole[24][1] < 0.8 * whole[1][1], whole

    checkpoint = str(tmp_path / "run.pt")
    first = losses(train(verdict_path, "--steps", "12", "--checkpoint", checkpoint))  # stops in the 2nd epoch
    assert first == {k: whole[k] for k in (1, 4, 8, 12)}
    refused = subprocess.run([sys.executable, "examples/train_gpt.py", "--data", str(verdict_path), *TINY, "--context", "8",
                              "--steps", "24", "--resume", checkpoint], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--context was 16, now 8" in refused.stderr
    out = train(verdict_path, "--steps", "24", "--resume", checkpoint)
    assert "from step 12" in out
    assert losses(out) == {k: whole[k] for k in (16, 20, 24)}  # the same batches, model and optimizer as uninterrupted


def test_ddp_ranks_read_disjoint_data_and_keep_identical_tables(verdict_path):
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "examples/ddp.py",
               "--data", str(verdict_path), *TINY, "--piece-bytes", "1024", "--steps", "8"], timeout=240)
    assert sorted(losses(out)) == [1, 4, 8]
    read = {int(r): [tuple(unit) for unit in json.loads(units)] for r, units in re.findall(r"^rank=(\d) read=(.*)$", out, re.M)}
    assert sorted(read) == [0, 1] and read[0] and read[1]
    assert not set(read[0]) & set(read[1])  # no piece read by both ranks
    pieces = sorted(read[0] + read[1], key=lambda unit: unit[1])
    assert pieces[0][1] == 0 and all(a[2] == b[1] for a, b in zip(pieces, pieces[1:]))  # together: all of the train text
    checks = re.findall(r"^rank=(\d) tables_identical=(\w+) model_identical=(\w+) tables_changed=(\w+)$", out, re.M)
    assert sorted(checks) == [("0", "True", "True", "True"), ("1", "True", "True", "True")], out
